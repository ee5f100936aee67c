"""LoRAp: MambaPEFT's partial LoRA (Yoshimura et al. 2025), a LoRA on a slice of a fused Vim weight, and their
DoRA variant (`vim_peft_all.py`; set_peft L830-896, forward_mamba_peft L65-144, Adapter L592-618, DoRAAdapter
L620-646; Vim-S configs `2_small_lorap_{X_64,Z_64,d_dim64,B_dim64,C_dim64}.py`, `2_small_lorap_X_64_dora.py`).

Targets: `x`, `z` (the two halves of in_proj's output: sites in_proj_x, in_proj_z), `dt`, `B`, `C` (the rows
of x_proj: their lora_d / lora_B / lora_C, one LoRA per scan direction, as the official code). Per target and
layer the branch adds s * up(down(h)) to the slice (down: no bias; up: no bias, zero-init; PyTorch's default
init of down, as their Adapter). Dropout as the official forward: 0.1 on x / z (their Adapter is called on
the input, L84-89), none on dt / B / C (their LoRA is merged into x_proj's weight, L124-144).

`dora=True`: their DoRAAdapter on the slice W (rows of the frozen weight): V = W + s up @ down,
W' = m * V / ||V|| with the L2 norm over the slice's rows (dim 0, one per input feature, `keepdim`) detached
as DoRA's gradient approximation, m initialised to ||W||; the branch adds (W' - W) h (so it is an identity at
init up to rounding), without dropout. Their lora_d_b / lora_B_b / lora_C_b initialise m from the forward
direction's x_proj (L866, L878, L890); here each direction's m is its own weight's norm, so that DoRA starts
as the identity on both directions.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import nn

from backbones import adapter_sites

from ..options import option
from .base import add_branch, register, site_module, split_names
from .lora import LoRABranch

SITES = {"x": ("in_proj_x",), "z": ("in_proj_z",), "dt": ("x_proj_dt", "x_proj_b_dt"),
         "B": ("x_proj_B", "x_proj_b_B"), "C": ("x_proj_C", "x_proj_b_C")}
DROPOUT = {"x": 0.1, "z": 0.1, "dt": 0.0, "B": 0.0, "C": 0.0}  # Adapter's nn.Dropout(0.1) (L609) where it runs


@dataclass
class LoRApConfig:
    targets: tuple[str, ...] = option(("x",), "parts of in_proj / x_proj joined by '+' (x, z, dt, B, C; "
                                               "LoRAp(X), their best row)")
    r: int = option(64, "rank (dim_X = 64 in every 2_small_lorap_* config, L20-21)")
    s: float = option(0.1, "scale of the update (s_X = 0.1, same lines)")
    dora: bool = option(False, "DoRA's magnitude / direction split (use_dora, 2_small_lorap_X_64_dora.py L20)")

    def __post_init__(self):
        self.targets = split_names(self.targets, SITES, "lorap targets")


class DoRABranch(nn.Module):
    """(W' - W) h for the rows `out` of a frozen Linear, W' = m * V / ||V||_rows.detach(), V = W + s up @ down."""

    def __init__(self, frozen: nn.Linear, out: slice, r: int, s: float):
        super().__init__()
        weight = frozen.weight[out].detach()
        self.down = nn.Linear(weight.shape[1], r, bias=False)
        self.up = nn.Linear(r, weight.shape[0], bias=False)
        nn.init.zeros_(self.up.weight)
        self.m = nn.Parameter(weight.norm(p=2, dim=0, keepdim=True).clone())
        self.s, self.out = s, out
        object.__setattr__(self, "frozen", frozen)  # the backbone's module, not a child of the branch

    def forward(self, h):
        weight = self.frozen.weight[self.out]
        v = weight + self.s * self.up.weight @ self.down.weight
        return F.linear(h, self.m * v / v.norm(p=2, dim=0, keepdim=True).detach() - weight)


@register("lorap", LoRApConfig)
def attach_lorap(model: nn.Module, cfg: LoRApConfig) -> None:
    for layer in adapter_sites(model):
        for t in cfg.targets:
            for site in [layer.get(name) for name in SITES[t]]:
                branch = (DoRABranch(site_module(site), site.out, cfg.r, cfg.s) if cfg.dora
                          else LoRABranch(site.d_in, site.d_out, cfg.r, cfg.s, DROPOUT[t]))
                add_branch(site, branch)

