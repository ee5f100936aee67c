"""FacT (Factor-Tuning, Jie & Deng 2023) as the official code (JieShibo/PETL-ViT, `FacT/fact_tt.py`,
`FacT/fact_tk.py`).

All increments of a ViT's weights (per layer q, k, v, proj, and fc1, fc2 as `chunks` = 4 blocks of
d x d each) form one tensor, factorised with factors shared by all layers:
- shared by all layers and weights, stored once in `model.fact`: U (d -> r, no bias, PyTorch's default
  init) and V (r -> d, no bias, zero-init, so FacT starts as the identity);
- FacT-TT: per layer and weight a middle factor S: r x r for q, k, v, proj; r -> 4r for fc1; 4r -> r for
  fc2 (Linear layers without bias, default init), owned by that weight's branch;
- FacT-TK: one core C (r x r x r) and one P (r x 12 L), both in `model.fact`, Xavier-uniform; weight j of
  layer l uses C @ P[:, 12 l + j] (q, k, v, proj = columns 0-3; fc1 = 4-7; fc2 = 8-11, reshaped as the
  official code).
Branch: delta = V(dropout(U(x) @ M)) * s (dropout 0.1, on the r-dim code); fc1 maps U(x) to 4 codes
and V to 4 blocks of its output; fc2 reads its input as 4 blocks through U.
Parameters on ViT-B/16: TT 1,536 r + 144 r^2; TK 1,536 r + r^3 + 144 r. Over the official per-task ranks
(`FacT/configs/{tt,tk}`) the means are 39,734 (TT) and 68,985 (TK): the paper's 0.040M and 0.069M.
Merged inference form (`merge_fact`, Method.merge): every increment is a linear map without bias, so, as LoRA's,
it folds into its weight (base.fold_linear); the shared factors then compute nothing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from backbones import adapter_sites

from ..options import option
from .base import add_branch, fold_linear, merges, register

TARGETS = ("q", "k", "v", "proj", "fc1", "fc2")


@dataclass
class FacTConfig:
    type: Literal["tt", "tk"] = option("tt", "tt: tensor-train factors (fact_tt.py); tk: Tucker (fact_tk.py)")
    r: int = option(8, "rank of the shared factors U, V (per task: FacT/configs/{tt,tk})")
    s: float = option(1.0, "scale of the increment (per task: FacT/configs)")
    dropout: float = option(0.1, "dropout on the r-dim code", (0.0, 1.0))


class FacTShared(nn.Module):
    """U and V (both types) and, for FacT-TK, the core C and the layer/weight factor P."""

    def __init__(self, d: int, r: int, kind: str, columns: int):
        super().__init__()
        self.kind, self.r = kind, r
        self.u = nn.Linear(d, r, bias=False)
        self.v = nn.Linear(r, d, bias=False)
        nn.init.zeros_(self.v.weight)
        if kind == "tk":
            self.core = nn.Parameter(nn.init.xavier_uniform_(torch.empty(r, r, r)))
            self.p = nn.Parameter(nn.init.xavier_uniform_(torch.empty(r, columns)))


class FacTBranch(nn.Module):
    """The increment of one weight of one layer (target in TARGETS)."""

    def __init__(self, shared: FacTShared, target: str, first_column: int, chunks: int, cfg: FacTConfig):
        super().__init__()
        object.__setattr__(self, "shared", shared)  # not registered: stored once, in model.fact
        self.target, self.chunks, self.s = target, chunks, cfg.s
        self.columns = (first_column, chunks) if target in ("fc1", "fc2") else (first_column, 1)
        self.dropout = nn.Dropout(cfg.dropout)
        r = cfg.r
        if shared.kind == "tt":
            self.factor = nn.Linear(r * (chunks if target == "fc2" else 1), r * (chunks if target == "fc1" else 1),
                                    bias=False)

    def matrix(self) -> torch.Tensor:
        """M with code -> U(x) @ M: r x r, r x 4r (fc1) or 4r x r (fc2)."""
        if self.shared.kind == "tt":
            return self.factor.weight.t()
        start, n = self.columns
        c = self.shared.core @ self.shared.p[:, start:start + n]  # r x r x n
        m = c.reshape(self.shared.r, self.shared.r * n)
        return m.t() if self.target == "fc2" else m

    def forward(self, x):
        u, v, r = self.shared.u, self.shared.v, self.shared.r
        if self.target == "fc2":
            code = u(x.unflatten(-1, (self.chunks, -1))).flatten(-2)
        else:
            code = u(x)
        code = self.dropout(code @ self.matrix().to(code.dtype))
        if self.target == "fc1":
            return v(code.unflatten(-1, (self.chunks, r))).flatten(-2) * self.s
        return v(code) * self.s


@register("fact", FacTConfig)
def attach_fact(model: nn.Module, cfg: FacTConfig) -> None:
    layers = adapter_sites(model)
    d = layers[0].get("q").d_in
    chunks = layers[0].get("fc1").d_out // d
    per_layer = 4 + 2 * chunks  # q, k, v, proj, then fc1 and fc2 as `chunks` blocks each
    model.fact = FacTShared(d, cfg.r, cfg.type, per_layer * len(layers))
    first = {"q": 0, "k": 1, "v": 2, "proj": 3, "fc1": 4, "fc2": 4 + chunks}
    for layer in layers:
        for t in TARGETS:
            column = per_layer * layer.index + first[t]
            add_branch(layer.get(t), FacTBranch(model.fact, t, column, chunks, cfg))


@merges("fact")
def merge_fact(model: nn.Module) -> None:
    fold_linear(model, (FacTBranch,))
