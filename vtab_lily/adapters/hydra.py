"""Hydra (Kim et al. 2024, "Hydra: multi-head low-rank adaptation"), as its official VTAB-1K code
(extremebird/Hydra `vtab1k/hydra.py`).

Per block, on attn.proj and on mlp.fc2 (`set_hydra` L77-91, method `hydra_both`), two low-rank branches:
- parallel: reads the Linear's input (`forward_vit_hydra_attn` L37, `forward_vit_hydra_ffn` L12);
- sequential: reads the Linear's output (L39, L14);
both added to the Linear's output before its dropout (L40 `proj_drop(x + par + seq)`, L15 `drop2(...)`).
Each branch is `Hydra_layer` (L43-61): down Linear (d_in -> r, bias, xavier_uniform weight, zero bias), dropout,
up Linear (r -> d_out, bias, all zero), times `scale`: zero at init, so the model starts as the backbone.
Sites: `proj_parallel` / `fc2_parallel` (read the Linear's input, add after its dropout) and serial branches on
`proj` / `fc2`; timm's proj_drop and drop2 are Dropout(0), so where the parallel sum enters changes nothing.

Defaults: r = 2 (`scripts/train_hydra.sh` L5 dim=2); scale and dropout are per task in `configs/hydra_both/
<task>.yaml` (recipes.HYDRA holds all 19, with lr, wd and batch size); the defaults here are their most common
values (scale 0.1 on 9 tasks, dropout 0.2 on 14).

Parameters on ViT-B/16 at r = 2, per block: proj parallel and sequential 2 x (768*2 + 2 + 2*768 + 768) = 7,684,
fc2 parallel 3072*2 + 2 + 2*768 + 768 = 8,450, fc2 sequential 3,842: 19,976; x 12 = 239,712.

`merge_hydra` is not provided: the official re-parameterisation (`set_hydraWeight` L97-126) folds both branches
into the Linear (W + s (Wp + Ws W)), but for attn.proj it reads mlp.fc2's weights (L118), so its merged attention
is not the trained model's; see docs/methods-vit.md.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from backbones import adapter_sites

from ..options import option
from .base import add_branch, add_serial, register


@dataclass
class HydraConfig:
    r: int = option(2, "rank of each low-rank branch (train_hydra.sh L5 dim=2)")
    s: float = option(0.1, "scale of both branches (configs/hydra_both/<task>.yaml `scale`; recipes.HYDRA)")
    dropout: float = option(0.2, "dropout on the branches' input (configs/hydra_both/<task>.yaml `dropout`)",
                            (0.0, 1.0))


class HydraBranch(nn.Module):
    """`Hydra_layer`: up(dropout(down(x))) * s, down xavier-uniform with a zero bias, up all zero."""

    def __init__(self, d_in: int, d_out: int, r: int, s: float, dropout: float):
        super().__init__()
        self.down = nn.Linear(d_in, r)
        self.dropout = nn.Dropout(dropout)
        self.up = nn.Linear(r, d_out)
        nn.init.xavier_uniform_(self.down.weight)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.s = s

    def forward(self, x):
        return self.up(self.dropout(self.down(x))) * self.s


@register("hydra", HydraConfig)
def attach_hydra(model: nn.Module, cfg: HydraConfig) -> None:
    for layer in adapter_sites(model):
        for linear in ("proj", "fc2"):
            parallel, serial = layer.get(f"{linear}_parallel"), layer.get(linear)
            add_branch(parallel, HydraBranch(parallel.d_in, parallel.d_out, cfg.r, cfg.s, cfg.dropout))
            add_serial(serial, HydraBranch(serial.d_out, serial.d_out, cfg.r, cfg.s, cfg.dropout))
