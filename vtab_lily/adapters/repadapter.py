"""RepAdapter (Luo et al. 2023, "Towards Efficient Visual Adaption via Structural Re-parameterization"), as the
official code (luogen1996/RepAdapter `repadapter.py`).

A linear, group-wise bottleneck on the input of attention and of the MLP (L21-24 `forward_vit_block_adapter`:
`attn(adapter_attn(norm1(x)))`, `mlp(adapter_mlp(norm2(x)))`), i.e. serially on the outputs of norm1 and norm2:

    y -> y + s * up(dropout(down(y)))        (L168-172; no activation, which is what makes it mergeable)

- `down`: a dense d -> width projection with a bias (L158 `conv_A`, a 1x1 Conv1d with groups=1), Xavier-uniform
  weight, zero bias (L164-165);
- `up`: a grouped width -> d projection with a bias (L159 `conv_B`, groups=2: output channels g*d/G..(g+1)*d/G read
  input channels g*width/G..(g+1)*width/G), zero weight and bias (L166-167), so the model is the frozen backbone
  at initialisation;
- dropout 0.1 between them (L160), scale s (L155 default 1; its per-task values: configs/repblock/<task>.yaml,
  recipes.REPADAPTER_SCALE), width 8 (train.py L79 `--dim 8`), groups 2 (L154).
`placement="block"` (default, train.py L77 `--method repblock`) adapts both inputs; `"attn"` (`repattn`, L26-29)
only attention's. Parameters on ViT-B/16 at width 8: per adapter 768*8 + 8 (down) + 768*4 + 768 (up) = 9,992;
two per layer, 12 layers: 239,808.

`merge(model)`: the inference form (L201-220 `reparameterize`, `sparse2dense`; L271-299 `set_RepWeight`): the
adapter is the affine map y -> M y + c with M = I + s * Up @ Down (Up the block-diagonal dense form of the grouped
projection), c = s * (Up b_down + b_up); it is folded into the Linear(s) that read it (qkv, or q/k/v; fc1):
W <- W M, b <- W c + b, and the norm is unwrapped, so the merged model has no extra modules and computes the same
outputs. The official forward adds both branches through `drop_path1` (L22-23); here the MLP's goes through its
own `drop_path2`, the same rate on every timm ViT.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from backbones import adapter_sites

from ..options import OptionError, option
from .base import Adapted, add_serial, merges, register

PLACEMENTS = {"block": (("norm1", ("q", "k", "v")), ("norm2", ("fc1",))), "attn": (("norm1", ("q", "k", "v")),)}


@dataclass
class RepAdapterConfig:
    width: int = option(8, "bottleneck width (train.py L79 --dim)")
    groups: int = option(2, "groups of the up projection's grouped conv (repadapter.py L154)")
    s: float = option(1.0, "scale of the adapter's output (repadapter.py L155; per task: configs/repblock)")
    dropout: float = option(0.1, "dropout on the adapter's input (repadapter.py L160)", (0.0, 1.0))
    placement: Literal["block", "attn"] = option(
        "block", "block: before attention and before the MLP (repblock); attn: before attention only (repattn)")


class GroupedLinear(nn.Module):
    """A width -> d projection in `groups` independent blocks (a grouped 1x1 conv): output features
    g*d/G..(g+1)*d/G are a linear map of input features g*width/G..(g+1)*width/G. weight: (d, width/G), as the
    conv's (d, width/G, 1)."""

    def __init__(self, width: int, d: int, groups: int):
        super().__init__()
        self.groups = groups
        self.weight = nn.Parameter(torch.zeros(d, width // groups))
        self.bias = nn.Parameter(torch.zeros(d))

    def blocks(self) -> torch.Tensor:
        """(groups, d/G, width/G): the block of each group."""
        return self.weight.view(self.groups, -1, self.weight.shape[1])

    def dense(self) -> torch.Tensor:
        """The (d, width) matrix of the same map (block diagonal)."""
        return torch.block_diag(*self.blocks())

    def forward(self, h):
        g = h.unflatten(-1, (self.groups, -1))
        return torch.einsum("...gc,gdc->...gd", g, self.blocks()).flatten(-2) + self.bias


class RepAdapterBranch(nn.Module):
    """The increment s * up(dropout(down(y))) of y -> y + s * up(dropout(down(y)))."""

    def __init__(self, d: int, width: int, groups: int, s: float, dropout: float):
        super().__init__()
        self.down = nn.Linear(d, width)
        self.dropout = nn.Dropout(dropout)
        self.up = GroupedLinear(width, d, groups)
        nn.init.xavier_uniform_(self.down.weight)
        nn.init.zeros_(self.down.bias)
        self.s = s

    def forward(self, y):
        return self.up(self.dropout(self.down(y))) * self.s

    def affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(M, c) in float64 with y + branch(y) = M y + c (eval mode: no dropout)."""
        up, down = self.up.dense().double(), self.down.weight.double()
        eye = torch.eye(down.shape[1], dtype=torch.float64, device=down.device)
        return eye + self.s * up @ down, self.s * (up @ self.down.bias.double() + self.up.bias.double())


@register("repadapter", RepAdapterConfig)
def attach_repadapter(model: nn.Module, cfg: RepAdapterConfig) -> None:
    layers = adapter_sites(model)
    d = layers[0].get("norm1").d_out
    if cfg.width % cfg.groups or d % cfg.groups:
        raise OptionError(f"repadapter groups ({cfg.groups}) must divide its width ({cfg.width}) and the "
                          f"backbone's ({d})")
    for layer in layers:
        for norm, _ in PLACEMENTS[cfg.placement]:
            site = layer.get(norm)
            add_serial(site, RepAdapterBranch(site.d_out, cfg.width, cfg.groups, cfg.s, cfg.dropout))


@merges("repadapter")
@torch.no_grad()
def merge(model: nn.Module) -> int:
    """Fold every RepAdapter into the Linear(s) that read its norm's output (qkv or q/k/v, fc1) and unwrap the
    norm; returns how many were merged. An adapter whose readers carry another method's branches stays (their
    branches read the adapted input, which merging would change)."""
    merged = 0
    for layer in adapter_sites(model):
        for norm, readers in PLACEMENTS["block"]:
            site = layer.serial.get(norm)
            wrapper = getattr(site.parent, site.attr) if site is not None else None
            if not (isinstance(wrapper, Adapted) and len(wrapper.branches) == 1
                    and isinstance(wrapper.branches[0], RepAdapterBranch)):
                continue
            linears = {(id(s.parent), s.attr): getattr(s.parent, s.attr) for s in map(layer.linear.get, readers)}
            if not all(isinstance(m, nn.Linear) for m in linears.values()):
                continue
            M, c = wrapper.branches[0].affine()
            for linear in linears.values():
                w = linear.weight.double()
                bias = w @ c + (0 if linear.bias is None else linear.bias.double())
                linear.weight.copy_((w @ M).to(linear.weight.dtype))
                if linear.bias is None:
                    linear.bias = nn.Parameter(bias.to(linear.weight.dtype), requires_grad=False)
                else:
                    linear.bias.copy_(bias.to(linear.bias.dtype))
            setattr(site.parent, site.attr, wrapper.base)
            merged += 1
    return merged
