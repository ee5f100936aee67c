"""Affix-tuning on Vision Mamba as MambaPEFT's `prefix_tuning` with `prefix_type="inner_dual_prefix"`
(sony/MambaPEFT `vision/personal_lib/mmpretrain/models/peft/vim_peft_all.py`; configs
`vision/configs/mmpretrain/vim/vtab1k/1_small/4_small_affixtune_prefix3dual*.py`: n=3, with / without the
projection).

Per layer and per scan direction, n virtual tokens of width 2 d_inner are prepended to the mixer's scan input
xz (the in_proj output, the backward direction's already flipped) BEFORE the causal conv (L192-195): they run
through the conv and the scan, and their n outputs are dropped (L278-280), so the first real tokens' conv
window and scan state see them. Their z half only gates the dropped outputs (it gets no gradient; it is
created and counted as the official does). One encoder for all layers (L758-772): MambaPEFT's PrefixEncoder
(prompt.py) with token width T = 2 d_inner and output width depth x 2 x T; layer i reads columns
[2iT, (2i+1)T) for the forward scan and [(2i+1)T, (2i+2)T) for the backward one (L530-531, L192-195): pieces
2i and 2i + 1 of our encoder. With `project`: Embedding (n, T), Linear(T, T), Tanh, Linear(T, depth 2 T)
(encoder_hidden_size None -> T; the last Linear stored per piece); without: an Embedding (n, depth 2 T) (stored
per piece). PyTorch's default init, no dropout: not an identity at initialisation. Vim-S
(T = 1536, 24 layers): 115,685,376 parameters with the projection (their table prints 117,000K with the ~9K
head: 1.1% more than the construction gives), 221,184 without (230K).

Runs on every scan backend: the sequence is l + n long inside the mixer only (backbones/vim.py Mixer.scan).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from backbones import adapter_sites

from ..errors import UnknownName
from ..options import option
from .base import Switch, register, set_hook
from .prompt import PrefixEncoder


@dataclass
class AffixConfig:
    n: int = option(3, "virtual tokens per layer and scan direction (MambaPEFT's prefix3dual configs: 3)")
    project: bool = option(True, "the PrefixEncoder's projection (Linear, Tanh, Linear) after its Embedding")


class AffixTokens(Switch, nn.Module):
    """The `scan` hook of layer `layer`: its n tokens for the direction being scanned, prepended to xz."""

    def __init__(self, encoder: PrefixEncoder, layer: int):
        super().__init__()
        self.layer = layer
        object.__setattr__(self, "encoder", encoder)  # not registered here: it lives in model.affix

    def forward(self, xz, suffix: str):
        if not self.enabled:
            return xz
        p = self.encoder(2 * self.layer + (suffix == "_b")).T  # (2 d_inner, n)
        return torch.cat([p.to(xz.dtype).expand(xz.shape[0], -1, -1), xz], dim=-1)


@register("affix", AffixConfig)
def attach_affix(model: nn.Module, cfg: AffixConfig) -> None:
    layers = adapter_sites(model)
    if "scan" not in layers[0].hooks:
        raise UnknownName(f"affix needs the scan-input hook 'scan' (Vision Mamba backbones have it); backbone "
                          f"{model.backbone_name!r} has none")
    sites = [layer.hooks["scan"] for layer in layers]
    model.affix = PrefixEncoder(cfg.n, sites[0].d, sites[0].d, 2 * len(sites), cfg.project)
    for i, site in enumerate(sites):
        set_hook(site, AffixTokens(model.affix, i))
