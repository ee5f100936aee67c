"""DTL (Disentangled Transfer Learning, Fu et al. AAAI 2024), as its official code (heekhero/DTL
`models/vision_transformer.py`).

A compact side network (CSN) beside the frozen blocks (VisionTransformer.forward L424-444): before each block i,
its input tokens x_i pass through a low-rank Linear (`LoRALinear` L47-68: x @ A^T @ B^T, A (r, d)
kaiming_uniform(a = sqrt 5), B (d, r) zero, no bias, no scale, no dropout) and add up across blocks into the
CSN's state h_i = sum_{j <= i} B_j A_j x_j (L426-427); after each block from `add_from` on, the backbone's tokens
get swish(h_i) = h_i * sigmoid(beta h_i) back (L431-444 with fusion_size 0; L44-45 swish). B = 0 makes the model
the backbone at init. Site: the token sequence through the blocks (`blocks`).

Defaults: every ViT-VTAB script `train_scripts/vit/vtab/<task>/train_dtl.sh` sets --r 2, --beta 100.0,
--lora_before_blocks 0-11 (the CSN reads every block) and --add_after_blocks 6-11 (here add_from = half the depth);
their per-task lr and drop path are recipes.DTL. Parameters on ViT-B/16 at r = 2: 12 x (2*768 + 768*2) = 36,864.

Not here: DTL+ (`train_dtl+.sh`, fusion_size 3: a depthwise 3x3 convolution over the patch grid of swish(h)), and
the official model's head, which averages the patch tokens and then normalises (L446-448) where the suite's ViT
reads the class token after the final norm (docs/methods-vit.md).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..options import OptionError, option
from .base import Switch, model_site, register


@dataclass
class DTLConfig:
    r: int = option(2, "rank of the side network's linears (train_dtl.sh --r 2)", (1, None))
    beta: float = option(100.0, "scale of the side network's output fed back (train_dtl.sh --beta 100.0)")
    add_from: int | None = option(None, "first block whose side output is added back (train_dtl.sh "
                                  "--add_after_blocks 6-11 on ViT-B's 12); None: half the depth", (0, None))


class LowRank(nn.Module):
    """`LoRALinear`: x @ A^T @ B^T, A kaiming-uniform, B zero."""

    def __init__(self, d: int, r: int):
        super().__init__()
        self.A = nn.Parameter(torch.empty(r, d))
        self.B = nn.Parameter(torch.zeros(d, r))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))

    def forward(self, x):
        return x @ self.A.T.to(x.dtype) @ self.B.T.to(x.dtype)


class CSN(nn.Module):
    """The compact side network: one low-rank Linear per block and the gate's beta."""

    def __init__(self, depth: int, d: int, r: int, beta: float, add_from: int):
        super().__init__()
        self.lowrank = nn.ModuleList(LowRank(d, r) for _ in range(depth))
        self.beta, self.add_from = beta, add_from


class DisentangledBlocks(Switch, nn.Sequential):
    """The backbone's blocks (same modules, same names) with the CSN beside them."""

    def __init__(self, blocks: nn.Sequential, csn: CSN):
        super().__init__(*blocks)
        object.__setattr__(self, "csn", csn)  # not registered here: it lives in model.dtl

    def forward(self, x):
        if not self.enabled:
            return super().forward(x)
        h = 0
        for i, block in enumerate(self):
            h = h + self.csn.lowrank[i](x)
            x = block(x)
            if i >= self.csn.add_from:
                x = x + h * torch.sigmoid(h * self.csn.beta)
        return x


@register("dtl", DTLConfig)
def attach_dtl(model: nn.Module, cfg: DTLConfig) -> None:
    site = model_site(model, "blocks", "a token-sequence site")
    blocks = getattr(site.parent, site.attr)
    add_from = len(blocks) // 2 if cfg.add_from is None else cfg.add_from
    if add_from >= len(blocks):
        raise OptionError(f"dtl add_from must be below the depth {len(blocks)}, got {add_from}")
    model.dtl = CSN(len(blocks), site.d, cfg.r, cfg.beta, add_from)
    setattr(site.parent, site.attr, DisentangledBlocks(blocks, model.dtl))
