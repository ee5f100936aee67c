"""LoRA (Hu et al. 2021) as in the Lily / Binary Adapter ViT code: per target a down Linear
(d_in -> r, no bias), dropout, an up Linear (r -> d_out, no bias, zero-init), times scale s.

Targets are layer sites (one branch per layer) or model-level sites. On Vim, `patch_embed` is MambaPEFT's
LoRA(embed) (`vim_peft_all.py` Conv2dAdapter L648-670, forward_patch_embed L581-589, set_peft L1030-1035): the
down projection is a Conv2d with the patch conv's kernel, stride and padding (3 -> r, no bias), then dropout,
an up 1x1 Conv2d (r -> d, no bias, zero-init), times s, added to the patch conv's output. MambaPEFT's
LoRA(x_proj) and LoRA(dt_proj) merge W + s up @ down into the weight (L115-123, L161-171), so they have no
dropout: give `dropout=0` for those targets.

Merged inference form (`merge_lora`, Method.merge; Hu et al. Sec. 4.1: W + s B A, no extra latency): each
branch folds into the weight rows of its slice (q, v of the fused qkv), a conv branch into the patch conv
(W + s up . down, contracted over r); the wrappers are removed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from backbones import ConvSite, model_sites

from ..errors import UnknownName
from ..options import option
from .base import Adapted, TargetedConfig, add_branch, attach_each, fold_linear, merges, register


@dataclass
class LoRAConfig(TargetedConfig):
    r: int = option(8, "rank of the update B A")
    s: float = option(1.0, "scale of the update (LoRA's alpha / r)")
    dropout: float = option(0.1, "dropout on the branch's input", (0.0, 1.0))


class LoRABranch(nn.Module):
    linear = nn.Linear  # Bi-LoRA swaps in its 1-bit Linear

    def __init__(self, d_in: int, d_out: int, r: int, s: float, dropout: float):
        super().__init__()
        self.down = self.linear(d_in, r, bias=False)
        self.dropout = nn.Dropout(dropout)
        self.up = self.linear(r, d_out, bias=False)
        nn.init.zeros_(self.up.weight)
        self.s = s

    def forward(self, x):
        return self.up(self.dropout(self.down(x))) * self.s


class ConvLoRABranch(nn.Module):
    """LoRA on a Conv2d: down = the conv's own kernel, stride and padding to r channels; up = 1x1 (zero-init)."""

    def __init__(self, site: ConvSite, r: int, s: float, dropout: float):
        super().__init__()
        self.down = nn.Conv2d(site.d_in, r, site.kernel_size, site.stride, site.padding, bias=False)
        self.dropout = nn.Dropout(dropout)
        self.up = nn.Conv2d(r, site.d_out, 1, bias=False)
        nn.init.zeros_(self.up.weight)
        self.s = s

    def forward(self, x):
        return self.up(self.dropout(self.down(x))) * self.s


@register("lora", LoRAConfig)
def attach_lora(model: nn.Module, cfg: LoRAConfig) -> None:
    whole = model_sites(model)
    on_model = [t for t in cfg.targets if t in whole]
    for t in on_model:
        if not isinstance(whole[t], ConvSite):
            raise UnknownName(f"lora cannot adapt {t!r} ({type(whole[t]).__name__}): its model-level targets are "
                              f"{sorted(n for n, s in whole.items() if isinstance(s, ConvSite))}; the others are "
                              "per-layer sites")
    attach_each(model, [t for t in cfg.targets if t not in whole],
                lambda site: LoRABranch(site.d_in, site.d_out, cfg.r, cfg.s, cfg.dropout))
    for t in on_model:
        add_branch(whole[t], ConvLoRABranch(whole[t], cfg.r, cfg.s, cfg.dropout))


@merges("lora")
@torch.no_grad()
def merge_lora(model: nn.Module) -> None:
    fold_linear(model, (LoRABranch,))
    for parent in list(model.modules()):
        for name, wrapper in list(parent.named_children()):
            if isinstance(wrapper, Adapted) and isinstance(wrapper.base, nn.Conv2d) and len(wrapper.branches) == 1 \
                    and isinstance(wrapper.branches[0], ConvLoRABranch):
                branch, conv = wrapper.branches[0], wrapper.base
                delta = torch.einsum("or,rikl->oikl", branch.up.weight[:, :, 0, 0], branch.down.weight) * branch.s
                conv.weight += delta.to(conv.weight.dtype)
                setattr(parent, name, conv)
