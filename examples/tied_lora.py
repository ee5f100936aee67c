"""Tied-LoRA (Renduchintala et al. 2023), in its variant where everything trains: per target, ONE down
matrix A (d_in x r) and ONE up matrix B (r x d_out) shared by all layers, and per layer two scaling
vectors: u (r) between them and v (d_out) on the output. Update at layer l: v_l * (B (u_l * (A x))), B zero-init,
so the model starts as its backbone.

A complete method from outside the suite, written against the public API only:

    python -m vtab_lily.run --backbone vit-b --task dtd --method examples.tied_lora:tied_lora --set r=8

Parameters on a backbone of L layers, per target: d_in r + r d_out (shared, counted once) + L (r + d_out).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from backbones import adapter_sites
from vtab_lily.adapters import TargetedConfig, add_branch, register
from vtab_lily.options import option


@dataclass
class TiedLoRAConfig(TargetedConfig):  # `targets`: site names, default q, v on ViT and in_proj on Vim
    r: int = option(8, "rank of the shared pair A, B")
    s: float = option(1.0, "scale of the update")


class Tied(nn.Module):
    """The shared pair of one target: A (down) and B (up, zero-init)."""

    def __init__(self, d_in: int, d_out: int, r: int):
        super().__init__()
        self.down = nn.Linear(d_in, r, bias=False)
        self.up = nn.Linear(r, d_out, bias=False)
        nn.init.zeros_(self.up.weight)


class TiedBranch(nn.Module):
    def __init__(self, tied: Tied, s: float):
        super().__init__()
        self.tied = tied  # the same module in every layer: its parameters exist once
        self.u = nn.Parameter(torch.ones(tied.down.out_features))
        self.v = nn.Parameter(torch.ones(tied.up.out_features))
        self.s = s

    def forward(self, x):
        return self.v * self.tied.up(self.u * self.tied.down(x)) * self.s


@register("tied_lora", TiedLoRAConfig)
def attach_tied_lora(model: nn.Module, cfg: TiedLoRAConfig) -> None:
    layers = adapter_sites(model)
    for target in cfg.targets:
        first = layers[0].get(target)
        tied = Tied(first.d_in, first.d_out, cfg.r)
        for layer in layers:
            add_branch(layer.get(target), TiedBranch(tied, cfg.s))
