"""Additional-scan (MambaPEFT, Yoshimura et al. ICLR 2025): extra learnable state dimensions in every scan.

Per layer and scan direction, `n` new state dimensions: n columns of A (their own A_log, (d_inner, n)) and the
x_proj rows that make their B and C from the scan input (one bias-free Linear d_inner -> 2n: B's rows, then
C's). The official code (sony/MambaPEFT `vision/personal_lib/mmpretrain/models/peft/vim_peft_all.py`:
`set_peft` L919-994 creates `A_log_scan_addi` / `x_proj_scan_addi` and the `_b` pair; `forward_mamba_peft`
L97-103 and L146-156 uses them) concatenates the new columns of A and the new x_proj rows into the B and the
C blocks of x_proj's weight, before (`pos="prefix"`) or after (`"suffix"`) the 16 of the backbone, and runs
the scan with the wider state. Here the backbone's mixer hands each direction's (u, A, B, C) to this module
(Vim's state sites `state`, `state_b`), which appends the new dimensions at the same place: the same scan.

Init as the official code: with `copy_A` (`scan_A_copy_from_last`), every new column of A_log is a copy of the
pretrained A_log's first column (prefix) or last column (suffix) (L925-933); without it, log(d_state + 1 ..
d_state + n), the continuation of Mamba's A init (L935-940). The x_proj rows keep nn.Linear's default init (the
config leaves `zero_init_x_proj` False): the new states carry input from the first step, so the method is NOT
an identity at init (with zero x_proj rows it is: B = 0 keeps the new states at 0).
Defaults: `4_small_addiscan_prefix_6_copyfirst.py` (n 6, prefix, copy). On Vim-S: 24 layers x 2 directions x
768 x (6 + 12) = 663,552 parameters (their table's 672K adds a head: 8,500 to 8,636 parameters fit all their
rows whose count is derived). Weight decay: their optimiser (the config's `custom_keys` '.A_log', '.A_b_log',
matched as substrings) exempts the new A_log and decays the new x_proj rows.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from backbones import adapter_sites

from ..errors import UnknownName
from ..options import option
from .base import Switch, conflict, module_path, register


@dataclass
class AddScanConfig:
    n: int = option(6, "number of added scan states (MambaPEFT's scan_addition_num)")
    pos: Literal["prefix", "suffix"] = option("prefix", "where the added states join the scan (scan_addition_pos)")
    copy_A: bool = option(True, "initialise the added A from the layer's last state (scan_A_copy_from_last)")


class AdditionalScan(Switch, nn.Module):
    """n extra state dimensions of one scan direction: called as (u, A, B, C) -> (A, B, C) with the new
    columns of A and rows of B and C before (prefix) or after (suffix) the backbone's."""

    def __init__(self, A_log: torch.Tensor, n: int, pos: str, copy_A: bool):
        super().__init__()
        d_inner, d_state = A_log.shape
        if copy_A:
            init = A_log.detach().float()[:, [0 if pos == "prefix" else -1]].expand(d_inner, n)
        else:
            init = torch.log(torch.arange(d_state + 1, d_state + 1 + n, dtype=torch.float32)).expand(d_inner, n)
        self.A_log = nn.Parameter(init.clone().to(A_log.device))
        self.x_proj = nn.Linear(d_inner, 2 * n, bias=False, device=A_log.device)
        self.prefix = pos == "prefix"

    def forward(self, u, A, B, C):
        if not self.enabled:
            return A, B, C
        B_new, C_new = self.x_proj(u.transpose(1, 2)).transpose(1, 2).chunk(2, dim=1)  # (b, n, l) each

        def join(new, old):
            return torch.cat([new, old] if self.prefix else [old, new], dim=1)
        return join(-torch.exp(self.A_log.float()), A), join(B_new, B), join(C_new, C)


@register("addscan", AddScanConfig)
def attach_addscan(model: nn.Module, cfg: AddScanConfig) -> None:
    for layer in adapter_sites(model):
        if not layer.state:
            raise UnknownName(f"addscan needs state sites (a state-space backbone such as vim-s); "
                              f"{model.backbone_name!r} has none")
        for site in layer.state.values():
            if getattr(site.parent, site.attr) is not None:
                raise conflict("addscan", module_path(site.parent, site.attr), "its state is widened already; it "
                               "cannot be widened twice")
            setattr(site.parent, site.attr, AdditionalScan(site.A_log, cfg.n, cfg.pos, cfg.copy_A))
