"""Adapter (Houlsby et al. 2019): a sequential bottleneck y -> y + up(act(down(y))) on a sub-layer's output.

The common VTAB-1K tables (NOAH, FacT, SSF, ...: "Adapter, 0.16M") quote NOAH's runs (ZhangYuanhan-AI/NOAH,
`model/module/adapter_super.py`, `configs/Adapter/VTAB/slurm_train_adapter_vtab.sh`): ONE adapter per block,
after the MLP (its output after drop_path, before the residual sum: `model/supernet_vision_transformer_timm.py`
L365), width 8, with biases, QuickGELU (x * sigmoid(1.702 x)), dropout 0.1 after the activation
(`supernet_train_prompt.py` L209 `--drop_rate_adapter` default 0.1, passed down at L307 -> L426 -> L326),
12 x (2 x 768 x 8 + 8 + 768) = 156,768 parameters on ViT-B/16. That is Pfeiffer's placement, not Houlsby's
two adapters per layer; `placement="houlsby"` adds the second one after attention (313,536 at width 8).

Initialisation (`init`): "trunc_normal" (default, NOAH's effective one): the adapter's own Xavier-uniform /
N(0, 1e-6) init (`adapter_super.py` L38-44) is overwritten when the model is built, by timm's ViT init applied
to every module (`supernet_vision_transformer_timm.py` L462 -> L531 `self.apply(_init_vit_weights)`, L684-688:
trunc_normal(std 0.02) weights, zero biases). "xavier": the adapter module's own init alone (our previous
default). "zero": up projection zero (Houlsby's near-identity start). Only "zero" is an identity at init.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from backbones import adapter_sites

from ..options import option
from .base import add_serial, register

PLACEMENTS = {"mlp": ("mlp_out",), "houlsby": ("attn_out", "mlp_out")}


@dataclass
class AdapterConfig:
    width: int = option(8, "bottleneck width of each adapter (NOAH: 8)")
    placement: Literal["mlp", "houlsby"] = option(
        "mlp", "mlp: one adapter after each block's MLP (NOAH, Pfeiffer's placement); houlsby: also after attention")
    dropout: float = option(0.1, "dropout after the activation (NOAH's --drop_rate_adapter)", (0.0, 1.0))
    init: Literal["trunc_normal", "xavier", "zero"] = option(
        "trunc_normal", "trunc_normal: timm's ViT init (NOAH's effective one); xavier: the adapter's own; "
        "zero: zero up projection (an identity at init)")


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class AdapterBranch(nn.Module):
    def __init__(self, d: int, width: int, dropout: float, init: str):
        super().__init__()
        self.down = nn.Linear(d, width)
        self.act = QuickGELU()
        self.dropout = nn.Dropout(dropout)
        self.up = nn.Linear(width, d)
        for linear in (self.down, self.up):
            if init == "trunc_normal":
                nn.init.trunc_normal_(linear.weight, std=0.02)  # timm's bounds: [-2, 2]
                nn.init.zeros_(linear.bias)
            else:
                nn.init.xavier_uniform_(linear.weight)
                nn.init.normal_(linear.bias, std=1e-6)
        if init == "zero":
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    def forward(self, y):
        return self.up(self.dropout(self.act(self.down(y))))


@register("adapter", AdapterConfig)
def attach_adapter(model: nn.Module, cfg: AdapterConfig) -> None:
    for layer in adapter_sites(model):
        for name in PLACEMENTS[cfg.placement]:
            site = layer.get(name)
            add_serial(site, AdapterBranch(site.d_out, cfg.width, cfg.dropout, cfg.init))
