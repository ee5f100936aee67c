"""ConvPass (Jie and Deng 2022, "Convolutional Bypasses Are Better Vision Transformer Adapters"), as the official
code (JieShibo/PETL-ViT `convpass/vtab/convpass.py`).

A convolutional bypass beside attention and beside the MLP of every block (L7-10 `forward_block`:
`x + drop_path(attn(norm1(x))) + drop_path(adapter_attn(norm1(x))) * s`, the same with mlp / norm2): it reads the
normalised input of the sub-layer and adds s times its output to the sub-layer's (sites `attn` and `mlp`):

    h = QuickGELU(down(x))                  (L132-133; down: a d -> width Linear, a 1x1 conv)
    patches: h on the patch grid -> conv    (L135-137; a width -> width 3x3 conv, stride 1, padding 1)
    cls: the class token alone as a 1x1 image through the same conv (L139-141: only the kernel's centre reads it)
    up(dropout(QuickGELU(.)))               (L145-147; up: a width -> d Linear), times s (L8-9)

Initialisation (L110-123): down Xavier-uniform, zero bias; up zero weight and bias (so the model is the backbone at
initialisation); the conv zero with the identity at the kernel's centre and a zero bias, or Xavier-uniform when
`xavier_init` (a per-task setting). Dropout 0.1 (L126), width 8 (train.py L69 `dim=8`), s per task (L69
`config['scale']`). Task settings: configs/convpass/<task>.yaml (`scale`, `xavier_init`), recipes.CONVPASS;
recipe: the ViT one (train.py L57-58 lr 1e-3, wd 1e-4; L84-85 cosine, 10 warm-up epochs of 100) with
ImageNet-normalised inputs (vtab.py L55).
`placement="attn"` (`convpass_attn`, L13-16) has the attention bypass only.

The patch grid and the prefix tokens come from the backbone (model_sites' TokenSite `blocks`: its prefix count;
the grid is the square of the remaining tokens), where the official code fixes a 14 x 14 grid and one class token;
each prefix token (the class token, and registers where a backbone has them) passes alone as a 1x1 image.
The bypass's output enters inside the sub-layer's drop_path (and layer scale, where a backbone has one), where the
official code draws a drop_path of its own: the same at evaluation, the same rate in training.
Parameters on ViT-B/16 at width 8: per bypass 768*8 + 8 (down) + 8*8*9 + 8 (conv) + 8*768 + 768 (up) = 13,648;
two per layer, 12 layers: 327,552.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from backbones import adapter_sites

from ..options import option
from .adapter import QuickGELU
from .base import add_branch, model_site, register

PLACEMENTS = {"block": ("attn", "mlp"), "attn": ("attn",)}


@dataclass
class ConvPassConfig:
    width: int = option(8, "channels of the convolutional bypass (train.py L69 dim=8)")
    s: float = option(1.0, "scale of the bypass's output (convpass.py L188; per task: configs/convpass/<task>.yaml)")
    xavier_init: bool = option(False, "Xavier-uniform init of the 3x3 conv (convpass.py L107; per task)")
    dropout: float = option(0.1, "dropout inside the bypass (convpass.py L126)", (0.0, 1.0))
    placement: Literal["block", "attn"] = option(
        "block", "block: a bypass beside attention and one beside the MLP (convpass); attn: beside attention only")


class ConvPassBranch(nn.Module):
    def __init__(self, d: int, width: int, s: float, dropout: float, xavier_init: bool, prefix: int):
        super().__init__()
        self.down = nn.Linear(d, width)
        self.conv = nn.Conv2d(width, width, 3, 1, 1)
        self.up = nn.Linear(width, d)
        self.act = QuickGELU()
        self.dropout = nn.Dropout(dropout)
        self.s, self.prefix = s, prefix
        nn.init.xavier_uniform_(self.down.weight)
        nn.init.zeros_(self.down.bias)
        if xavier_init:
            nn.init.xavier_uniform_(self.conv.weight)
        else:
            with torch.no_grad():
                self.conv.weight.zero_()
                self.conv.weight[:, :, 1, 1] = torch.eye(width)
        nn.init.zeros_(self.conv.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x):
        b, n, _ = x.shape
        h = self.act(self.down(x))
        side = math.isqrt(n - self.prefix)
        if side * side != n - self.prefix:
            raise RuntimeError(f"convpass needs a square patch grid after the {self.prefix} prefix token(s); got "
                               f"{n - self.prefix} patch tokens")
        grid = h[:, self.prefix:].unflatten(1, (side, side)).permute(0, 3, 1, 2)
        patches = self.conv(grid).flatten(2).transpose(1, 2)  # (b, side * side, width), row-major as the tokens
        if self.prefix:
            tokens = self.conv(h[:, :self.prefix].reshape(b * self.prefix, h.shape[-1], 1, 1))
            patches = torch.cat([tokens.reshape(b, self.prefix, -1), patches], dim=1)
        h = patches
        return self.up(self.dropout(self.act(h))) * self.s


@register("convpass", ConvPassConfig)
def attach_convpass(model: nn.Module, cfg: ConvPassConfig) -> None:
    sequence = model_site(model, "blocks", "a token-sequence site", " (its patch grid)")
    for layer in adapter_sites(model):
        for name in PLACEMENTS[cfg.placement]:
            site = layer.get(name)
            add_branch(site, ConvPassBranch(site.d_in, cfg.width, cfg.s, cfg.dropout, cfg.xavier_init,
                                            sequence.prefix))
