"""Prompt-tuning on Vision Mamba as MambaPEFT (Yoshimura et al., ICLR 2025; sony/MambaPEFT
`vision/personal_lib/mmpretrain/models/peft/vim_peft_all.py`, configs
`vision/configs/mmpretrain/vim/vtab1k/1_small/4_small_prompt_prefixsuffix_8*.py`).

`n` prompt tokens of width D join the embedded sequence after the class token and the position embeddings
(no position embedding of their own, L468-497): `prefix` puts all n before the patches, `suffix` all after,
`prefix_suffix` (their configs) the first ceil(n/2) before and the rest after (torch.tensor_split). The class
token is read at its index shifted by the prompts before it (L475, L494, L564). The tokens come from their
`PrefixEncoder` (L672-710, after peft's prefix tuning), built with one layer and width D (L777-779): with
`project` an Embedding (n, D) through Linear(D, D), Tanh, Linear(D, D); without, the Embedding alone. PyTorch's
default initialisation (Embedding N(0, 1), Linear kaiming-uniform), as the official code creates the encoder
after the backbone's init_weights; no dropout. Not an identity at initialisation: the prompts enter both
scans from the first layer on, so the class token's output changes. Vim-S: 298,752 parameters with the
projection (their table: 307K with the ~9K head), 3,072 without (12K).

The encoder (`PrefixEncoder`) is shared with `affix`, which builds it for every layer's scan input.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..options import option
from .base import Switch, model_site, register, set_hook


@dataclass
class PromptConfig:
    n: int = option(8, "prompt tokens (their prefixsuffix_8 configs: 8)")
    type: Literal["prefix", "suffix", "prefix_suffix"] = option(
        "prefix_suffix", "where the prompts join: before the patches, after them, or half before and half after")
    project: bool = option(True, "the PrefixEncoder's projection (Linear, Tanh, Linear) after its Embedding")


class PrefixEncoder(nn.Module):
    """MambaPEFT's PrefixEncoder: n virtual tokens of `pieces` x `width` features, given piece by piece (`forward(j)`:
    (n, width), the official output's columns [j width, (j + 1) width)). With `project`: an Embedding (n, d) through
    Linear(d, d), Tanh (`transform`, shared by all pieces), then Linear(d, pieces x width), stored as one
    Linear(d, width) per piece (`out`); without: an Embedding (n, pieces x width), stored as one (n, width) tensor
    per piece (`tokens`). The pieces have the official shapes' default inits (Linear: bounds 1 / sqrt(d), the same
    fan-in; Embedding: N(0, 1)); split, a piece's backward writes its own gradient, where slices of one
    Linear(1536, 73,728) would each write a full-size one (affix on Vim-S: 48 per step)."""

    def __init__(self, n: int, d: int, width: int, pieces: int, project: bool):
        super().__init__()
        if project:
            self.embedding = nn.Embedding(n, d)
            self.transform = nn.Sequential(nn.Linear(d, d), nn.Tanh())
            self.out = nn.ModuleList(nn.Linear(d, width) for _ in range(pieces))
        else:
            self.tokens = nn.ParameterList(nn.Parameter(torch.randn(n, width)) for _ in range(pieces))
        self.project = project

    def forward(self, j: int = 0) -> torch.Tensor:
        if not self.project:
            return self.tokens[j]
        return self.out[j](self.transform(self.embedding.weight))


class PromptTokens(Switch, nn.Module):
    """The `tokens` hook: the encoder's n tokens, `before` of them ahead of the sequence and the rest after;
    the class token's index moves by `before`."""

    def __init__(self, encoder: PrefixEncoder, before: int):
        super().__init__()
        self.before = before
        object.__setattr__(self, "encoder", encoder)  # not registered here: it lives in model.prompt

    def forward(self, x, cls_index: int):
        if not self.enabled:
            return x, cls_index
        p = self.encoder().to(x.dtype).expand(x.shape[0], -1, -1)
        return torch.cat([p[:, :self.before], x, p[:, self.before:]], dim=1), cls_index + self.before


@register("prompt", PromptConfig)
def attach_prompt(model: nn.Module, cfg: PromptConfig) -> None:
    site = model_site(model, "tokens", "the token-sequence hook", " (Vision Mamba backbones have it; on a ViT use vpt)")
    before = {"prefix": cfg.n, "suffix": 0, "prefix_suffix": -(-cfg.n // 2)}[cfg.type]
    model.prompt = PrefixEncoder(cfg.n, site.d, site.d, 1, cfg.project)
    set_hook(site, PromptTokens(model.prompt, before))
