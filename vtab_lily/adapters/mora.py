"""MoRA (Jiang et al. 2024): one square, zero-initialised r_hat x r_hat matrix per target, between a
parameter-free compression of the input to r_hat and a decompression to d_out (official peft-mora code).

r_hat = int(sqrt((d_in + d_out) * r) + 0.5) (111 for 768 -> 768 at r = 8).
type 1: compress by summing consecutive r_hat-blocks of the input (padded with its own first entries),
        decompress by repeating the output.
type 6: the input blocks are rotated with RoPE (position = block index) instead of summed, the r_hat-wide
        outputs of all blocks are concatenated and cut to d_out; r_hat is rounded down to even.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..options import option
from .base import TargetedConfig, attach_each, register


def mora_rank(d_in: int, d_out: int, r: int, kind: int) -> int:
    r_hat = int(math.sqrt((d_in + d_out) * r) + 0.5)
    return r_hat - r_hat % 2 if kind == 6 else r_hat


@dataclass
class MoRAConfig(TargetedConfig):
    r: int = option(8, "the LoRA rank whose parameter count the square matrix matches (r_hat^2 ~ r (d_in + d_out))")
    type: Literal[1, 6] = option(1, "compression / decompression: 1 (sharing rows) or 6 (rotation), MoRA's mora_type")
    s: float = option(1.0, "scale of the update")
    dropout: float = option(0.1, "dropout on the branch's input", (0.0, 1.0))


class MoRABranch(nn.Module):
    def __init__(self, d_in: int, d_out: int, cfg: MoRAConfig):
        super().__init__()
        self.d_in, self.d_out, self.kind, self.s = d_in, d_out, cfg.type, cfg.s
        self.r_hat = r = mora_rank(d_in, d_out, cfg.r, cfg.type)
        self.blocks = -(-d_in // r)
        self.matrix = nn.Linear(r, r, bias=False)
        nn.init.zeros_(self.matrix.weight)
        self.dropout = nn.Dropout(cfg.dropout)
        if cfg.type == 6:
            inv_freq = 1.0 / (10000 ** (torch.arange(0, r, 2).float() / r))
            emb = torch.outer(torch.arange(self.blocks).float(), inv_freq).repeat(1, 2)
            self.register_buffer("cos", emb.cos(), persistent=False)
            self.register_buffer("sin", emb.sin(), persistent=False)

    def compress(self, x: torch.Tensor) -> torch.Tensor:
        r = self.r_hat
        pad = self.blocks * r - self.d_in
        if pad:
            x = torch.cat([x, x[..., :pad]], dim=-1)
        x = x.reshape(*x.shape[:-1], self.blocks, r)
        if self.kind == 1:
            return x.sum(dim=-2)
        rotated = torch.cat([-x[..., r // 2:], x[..., : r // 2]], dim=-1)
        return x * self.cos + rotated * self.sin

    def decompress(self, y: torch.Tensor) -> torch.Tensor:
        if self.kind == 6:
            y = y.flatten(-2)
        repeats = -(-self.d_out // y.shape[-1])
        return torch.cat([y] * repeats, dim=-1)[..., : self.d_out] if repeats > 1 else y[..., : self.d_out]

    def forward(self, x):
        return self.decompress(self.matrix(self.compress(self.dropout(x)))) * self.s


@register("mora", MoRAConfig)
def attach_mora(model: nn.Module, cfg: MoRAConfig) -> None:
    attach_each(model, cfg.targets, lambda site: MoRABranch(site.d_in, site.d_out, cfg))
