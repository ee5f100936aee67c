"""Adapter (Houlsby et al. 2019): a sequential bottleneck y -> y + up(act(down(y))) on a sub-layer's output.

The common VTAB-1K tables (NOAH, FacT, SSF, ...: "Adapter, 0.16M") quote NOAH's runs (ZhangYuanhan-AI/NOAH,
`model/module/adapter_super.py`, `experiments/Adapter/ViT-B_prompt_adapter_8.yaml`): ONE adapter per block,
after the MLP (its output after drop_path, before the residual sum), width 8, with biases, QuickGELU
(x * sigmoid(1.702 x)), Xavier-uniform weights and N(0, 1e-6) biases, no dropout: 12 x (2 x 768 x 8 + 8
+ 768) = 156,768 parameters on ViT-B/16. That is Pfeiffer's placement, not Houlsby's two adapters per
layer; `placement="houlsby"` adds the second one after attention (313,536 at width 8).

Not an identity at initialisation (the up projection is Xavier-initialised, as NOAH's); `init="zero"`
zero-initialises the up projection (Houlsby's near-identity start).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from backbones import adapter_sites

from ..options import OptionError
from .base import add_serial, register

PLACEMENTS = {"mlp": ("mlp_out",), "houlsby": ("attn_out", "mlp_out")}


@dataclass
class AdapterConfig:
    width: int = 8
    placement: str = "mlp"  # "mlp": NOAH (after the MLP); "houlsby": after attention and after the MLP
    dropout: float = 0.0
    init: str = "xavier"  # "xavier": NOAH; "zero": up projection zero (identity at initialisation)

    def __post_init__(self):
        if self.placement not in PLACEMENTS:
            raise OptionError(f"adapter placement must be one of {sorted(PLACEMENTS)}, got {self.placement!r}")
        if self.init not in ("xavier", "zero"):
            raise OptionError(f"adapter init must be 'xavier' or 'zero', got {self.init!r}")


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
