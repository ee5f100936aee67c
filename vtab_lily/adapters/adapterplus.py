"""Adapter+ (Steitz and Roth, CVPR 2024, "Adapters Strike Back"), as the official code (visinf/adapter_plus) in its
Adapter+ configuration (`conf/config.yaml` L2 `adapter: adapter_plus`; `conf/adapter/adapter_plus.yaml`,
`conf/adapter/base_adapter.yaml`).

One adapter per block, in the post-adapter position: it reads the block's output (after both residual sums) and
adds to it (`adapter_plus/vit_adapter.py` L269-273 `forward_post`: `x = adapter(x, skip=x)`; site `block`):

    y -> y + scaling * drop_path(up(GELU(down(y))))          (L91-102 Adapter.forward)

- channel-wise scaling: a learned vector, ones at init (adapter_plus.yaml L5 `scaling: channel`; L46-47);
- no layer norm in the adapter (base_adapter.yaml L2 `norm_layer: false`), biases (L3), GELU (L1 `act_layer: true`:
  the ViT's act_layer, nn.GELU), no dropout (L8 `dropout: 0`), drop path 0.1 on the adapter's output (L9; L42);
- Houlsby init (L4; vit_adapter.py L52-63): both projections trunc_normal(std 0.01) cut at +-0.02, zero biases,
  so the adapter is not an identity at initialisation;
- bottleneck width 8 (base_adapter.yaml L6 `dim: 8`), the option `width` (their VTAB rows: 1 to 32, per task in
  `conf/experiment/vtab/adapter_plus_dim*.yaml`).
Parameters on ViT-B/16 at width 8: 768*8 + 8 (down) + 8*768 + 768 (up) + 768 (scaling) = 13,832 per layer,
12 layers: 165,984.

Their recipe (`conf/train/default.yaml`, `conf/train/optimizer/adamw.yaml`, `modeling/adaptermodel.py` L112-126,
L159-177): AdamW lr 1e-3, weight decay 1e-4 except on 1-d tensors, biases and the scalings, 100 epochs, a linear
warm-up of 10 epochs from lr / 100 then cosine to lr / 1000, batch 64 (`conf/data/base_data.yaml` L2), drop path 0.1
in the ViT (`conf/config.yaml` L15), no label smoothing, ImageNet mean / std (`data/vtab.py` L43-44):
recipes.ADAPTER_PLUS (the schedule as timm's, see docs/methods-vit.md).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from timm.layers import DropPath
from torch import nn

from backbones import adapter_sites

from ..options import option
from .base import add_serial, register


@dataclass
class AdapterPlusConfig:
    width: int = option(8, "bottleneck width of the post-adapter (conf/adapter/base_adapter.yaml L6 dim)")
    drop_path: float = option(0.1, "drop-path rate of the adapter's branch (base_adapter.yaml L9)", (0.0, 1.0))


class AdapterPlusBranch(nn.Module):
    """The increment scaling * drop_path(up(GELU(down(y)))) of the post-adapter."""

    def __init__(self, d: int, width: int, drop_path: float):
        super().__init__()
        self.down = nn.Linear(d, width)
        self.act = nn.GELU()
        self.up = nn.Linear(width, d)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.scaling = nn.Parameter(torch.ones(d))
        for linear in (self.down, self.up):
            nn.init.trunc_normal_(linear.weight, std=0.01, a=-0.02, b=0.02)
            nn.init.zeros_(linear.bias)

    def forward(self, y):
        return self.drop_path(self.up(self.act(self.down(y)))) * self.scaling


@register("adapterplus", AdapterPlusConfig)
def attach_adapterplus(model: nn.Module, cfg: AdapterPlusConfig) -> None:
    for layer in adapter_sites(model):
        site = layer.get("block")
        add_serial(site, AdapterPlusBranch(site.d_out, cfg.width, cfg.drop_path))
