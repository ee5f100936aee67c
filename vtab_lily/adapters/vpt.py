"""VPT (Visual Prompt Tuning, Jia et al. 2022) as the official code (KMnP/vpt, `vit_prompt/vit.py`).

`length` prompt tokens of width d enter after the class token, before the patches (no position
embedding). Shallow: one set, inserted before the first block. Deep: a set per block; before every
block after the first, the previous block's outputs at the prompt positions are replaced by that
block's own prompts. Initialisation: uniform(-v, v) with v = sqrt(6 / (3 * patch^2 + d)) (Xavier for
a patch's flattened pixels -> d); dropout on the prompts (official: `MODEL.PROMPT.DROPOUT`, 0.1 in its
VTAB commands for VPT-deep, none for VPT-shallow).

Not an identity at initialisation: the prompts take part in attention from the first block on, so
the class token's output changes (tests check the exact computation instead).

Differences from the official code: the prompts are removed after the last block (the official keeps
them through the final norm and reads the class token only, which gives the same logits); the official
ViT has no stochastic depth (and dropout 0 in its VTAB configs), which the `extended` preset matches with
drop_path 0, and normalises inputs with ImageNet's mean / std (`src/data/datasets/tf_dataset.py` L75-76),
as the preset does.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from backbones import TokenSite

from ..options import option
from .base import Switch, model_site, register


@dataclass
class VPTConfig:
    length: int = option(10, "prompt tokens per prompted block (the paper's p)")
    deep: bool = option(True, "prompts before every block (VPT-Deep) or before the first only (VPT-Shallow)")
    dropout: float | None = option(None, "dropout on the prompts (None: 0.1 deep, 0.0 shallow: the official VTAB "
                                         "commands)", (0.0, 1.0))

    def __post_init__(self):
        if self.dropout is None:
            self.dropout = 0.1 if self.deep else 0.0


class Prompts(nn.Module):
    """The prompt tokens: (1 or depth, length, d), one set per prompted block."""

    def __init__(self, sets: int, length: int, d: int, patch_size: int, dropout: float):
        super().__init__()
        bound = math.sqrt(6.0 / (3 * patch_size ** 2 + d))
        self.tokens = nn.Parameter(torch.empty(sets, length, d).uniform_(-bound, bound))
        self.dropout = nn.Dropout(dropout)

    def forward(self, i: int, batch: int) -> torch.Tensor:
        return self.dropout(self.tokens[i].expand(batch, -1, -1))


class PromptedBlocks(Switch, nn.Sequential):
    """The backbone's blocks (same modules, same names) run with prompt tokens after the first `prefix`
    tokens; the prompts are dropped from the output."""

    def __init__(self, blocks: nn.Sequential, prompts: Prompts, prefix: int):
        super().__init__(*blocks)
        self.prefix = prefix
        object.__setattr__(self, "prompts", prompts)  # not registered here: it lives in model.vpt

    def forward(self, x):
        if not self.enabled:
            return super().forward(x)
        p, n = self.prefix, self.prompts.tokens.shape[1]
        x = torch.cat([x[:, :p], self.prompts(0, x.shape[0]).to(x.dtype), x[:, p:]], dim=1)
        for i, block in enumerate(self):
            if 0 < i < len(self.prompts.tokens):
                x = torch.cat([x[:, :p], self.prompts(i, x.shape[0]).to(x.dtype), x[:, p + n:]], dim=1)
            x = block(x)
        return torch.cat([x[:, :p], x[:, p + n:]], dim=1)


def prompt_site(model: nn.Module) -> TokenSite:
    return model_site(model, "blocks", "a token-sequence site")


@register("vpt", VPTConfig)
def attach_vpt(model: nn.Module, cfg: VPTConfig) -> None:
    site = prompt_site(model)
    blocks = getattr(site.parent, site.attr)
    model.vpt = Prompts(len(blocks) if cfg.deep else 1, cfg.length, site.d, site.patch_size, cfg.dropout)
    setattr(site.parent, site.attr, PromptedBlocks(blocks, model.vpt, site.prefix))
