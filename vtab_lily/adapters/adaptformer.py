"""AdaptFormer (Chen et al. 2022): a parallel bottleneck beside each block's MLP.

down (d -> width), ReLU, dropout, up (width -> d, zero-init), times s. It reads the block's stream
before norm2 and adds after the MLP's drop_path (site `mlp_residual`), as the official AdaptFormer and
the Lily copy do. Default: the bias-free copy of the Lily / Binary Adapter code (18,432 * width
parameters on ViT-B); `bias=True` is the original AdaptFormer (biases zero-initialised on the up side).

On Vim it is MambaPEFT's ParallelAdapter (`vim_peft_all.py` Adapter L592-618 with use_act=True, set_peft
L801-806, forward_mamba_peft L325-334): it reads the mixer's scan output (out_proj's input, d_inner wide, the
two directions' mean) and adds to the mixer's output (out_proj's output): site `out_proj`. Their Vim-S config
(`4_small_adaptf_32.py` L20): width 32, s 0.1; the Adapter has no biases and dropout 0.1, as the defaults here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from ..options import option
from .base import attach_each, register


@dataclass
class AdaptFormerConfig:
    width: int = option(32, "bottleneck width (AdaptFormer's ffn_num)")
    s: float = option(0.1, "scale of the branch's output (AdaptFormer's adapter_scalar)")
    dropout: float = option(0.1, "dropout after the ReLU", (0.0, 1.0))
    bias: bool = option(False, "biases in down and up (the original AdaptFormer; the Lily copy has none)")
    site: str | None = option(None, "the site the branch reads and adds to (a site name: mlp_residual on ViT reads "
                                    "before norm2 and adds after the MLP; out_proj on Vim)")
    FAMILY_DEFAULTS: ClassVar[dict] = {"vit": {"site": "mlp_residual"}, "vim": {"site": "out_proj"}}


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
