"""LoRA (Hu et al. 2021) as in the Lily / Binary Adapter ViT code: per target a down Linear
(d_in -> r, no bias), dropout, an up Linear (r -> d_out, no bias, zero-init), times scale s."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from backbones import adapter_sites

from .base import TARGETS_BY_FAMILY, add_branch, register, split_targets


@dataclass
class LoRAConfig:
    r: int = 8
    s: float = 1.0
    dropout: float = 0.1
    targets: tuple[str, ...] | None = None  # ViT: q, v; Vim: in_proj
    FAMILY_DEFAULTS: ClassVar[dict] = TARGETS_BY_FAMILY

    def __post_init__(self):
        self.targets = split_targets(self.targets)


class LoRABranch(nn.Module):
    def __init__(self, d_in: int, d_out: int, r: int, s: float, dropout: float):
        super().__init__()
        self.down = nn.Linear(d_in, r, bias=False)
        self.dropout = nn.Dropout(dropout)
        self.up = nn.Linear(r, d_out, bias=False)
        nn.init.zeros_(self.up.weight)
        self.s = s

    def forward(self, x):
        return self.up(self.dropout(self.down(x))) * self.s


@register("lora", LoRAConfig)
def attach_lora(model: nn.Module, cfg: LoRAConfig) -> None:
    for layer in adapter_sites(model):
        for t in cfg.targets:
            site = layer.get(t)
            add_branch(site, LoRABranch(site.d_in, site.d_out, cfg.r, cfg.s, cfg.dropout))
