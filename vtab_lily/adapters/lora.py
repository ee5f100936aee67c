"""LoRA (Hu et al. 2021) as in the Lily / Binary Adapter ViT code: per target a down Linear
(d_in -> r, no bias), dropout, an up Linear (r -> d_out, no bias, zero-init), times scale s."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .base import TargetedConfig, attach_each, register


@dataclass
class LoRAConfig(TargetedConfig):
    r: int = 8
    s: float = 1.0
    dropout: float = 0.1


class LoRABranch(nn.Module):
    linear = nn.Linear  # Bi-LoRA swaps in its 1-bit Linear

    def __init__(self, d_in: int, d_out: int, r: int, s: float, dropout: float):
        super().__init__()
        self.down = self.linear(d_in, r, bias=False)
        self.dropout = nn.Dropout(dropout)
        self.up = self.linear(r, d_out, bias=False)
        nn.init.zeros_(self.up.weight)
        self.s = s

    def forward(self, x):
        return self.up(self.dropout(self.down(x))) * self.s


@register("lora", LoRAConfig)
def attach_lora(model: nn.Module, cfg: LoRAConfig) -> None:
    attach_each(model, cfg.targets, lambda site: LoRABranch(site.d_in, site.d_out, cfg.r, cfg.s, cfg.dropout))
