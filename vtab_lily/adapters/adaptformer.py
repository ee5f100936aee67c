"""AdaptFormer (Chen et al. 2022): a parallel bottleneck beside each block's MLP.

down (d -> width), ReLU, dropout, up (width -> d, zero-init), times s. It reads the block's stream
before norm2 and adds after the MLP's drop_path (site `mlp_residual`), as the official AdaptFormer and
the Lily copy do. Default: the bias-free copy of the Lily / Binary Adapter code (18,432 * width
parameters on ViT-B); `bias=True` is the original AdaptFormer (biases zero-initialised on the up side).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .base import attach_each, register


@dataclass
class AdaptFormerConfig:
    width: int = 32
    s: float = 0.1
    dropout: float = 0.1
    bias: bool = False
    site: str = "mlp_residual"


class AdaptFormerBranch(nn.Module):
    def __init__(self, d_in: int, d_out: int, width: int, s: float, dropout: float, bias: bool):
        super().__init__()
        self.down = nn.Linear(d_in, width, bias=bias)
        self.act = nn.ReLU()
        self.dropout = nn.Dropout(dropout)
        self.up = nn.Linear(width, d_out, bias=bias)
        nn.init.zeros_(self.up.weight)
        if bias:
            nn.init.zeros_(self.up.bias)
        self.s = s

    def forward(self, x):
        return self.up(self.dropout(self.act(self.down(x)))) * self.s


@register("adaptformer", AdaptFormerConfig)
def attach_adaptformer(model: nn.Module, cfg: AdaptFormerConfig) -> None:
    attach_each(model, [cfg.site],
                lambda site: AdaptFormerBranch(site.d_in, site.d_out, cfg.width, cfg.s, cfg.dropout, cfg.bias))
