"""SSF (Scale and Shift Features, Lian et al. 2022) as the official code (dongzelian/SSF,
`models/vision_transformer.py`): after each operation, y -> y * scale + shift (per feature).

ViT placements (official): the patch embedding, per block norm1, qkv, proj, norm2, fc1, fc2, and the
final norm: 205,824 parameters on ViT-B/16 (the paper's 0.24M adds the head, averaged over the 19 tasks).
Initialisation as the official `init_ssf_scale_shift`: scale ~ N(1, 0.02), shift ~ N(0, 0.02), so SSF
is not an identity at initialisation (it is at scale 1, shift 0: `init="identity"`).
Vim ("SSF-style", no official code): after each block's RMSNorm, in_proj, x_proj, dt_proj (both scan
directions) and out_proj, and the final norm (not after the channel-first patch conv and causal convs).

`merge_ssf(model)` re-parameterises into the frozen weights for inference, as the paper: for a Linear,
a LayerNorm or a conv, W <- W * scale (per output feature), b <- b * scale + shift (a bias is created
where there was none); modules without a bias to receive the shift (Vim's RMSNorm) keep their SSF.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn

from backbones import adapter_sites, model_sites

from ..options import option
from .base import Adapted, add_serial, merges, register, split_targets

VIT_SITES = ("patch_embed", "norm1", "qkv", "proj", "norm2", "fc1", "fc2", "norm")
VIM_SITES = ("norm", "in_proj", "x_proj", "x_proj_b", "dt_proj", "dt_proj_b", "out_proj", "norm_f")


@dataclass
class SSFConfig:
    targets: tuple[str, ...] | None = option(None, "scaled and shifted sites joined by '+': layer sites, then model "
                                                    "sites (default: every Linear and norm of the official code)")
    init: Literal["official", "identity"] = option(
        "official", "official: scale N(1, 0.02), shift N(0, 0.02); identity: scale 1, shift 0")
    FAMILY_DEFAULTS: ClassVar[dict] = {"vit": {"targets": VIT_SITES}, "vim": {"targets": VIM_SITES}}

    def __post_init__(self):
        self.targets = split_targets(self.targets)


class ScaleShift(nn.Module):
    """A serial branch: y -> y * scale + shift, written as the increment y * (scale - 1) + shift."""

    def __init__(self, d: int, init: str):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(d))
        self.shift = nn.Parameter(torch.zeros(d))
        if init == "official":
            nn.init.normal_(self.scale, mean=1.0, std=0.02)
            nn.init.normal_(self.shift, std=0.02)

    def forward(self, y):
        return y * (self.scale - 1).to(y.dtype) + self.shift.to(y.dtype)


@register("ssf", SSFConfig)
def attach_ssf(model: nn.Module, cfg: SSFConfig) -> None:
    whole, layers = model_sites(model), adapter_sites(model)  # sites first: wrapping hides module attributes
    for t in cfg.targets:
        for site in [whole[t]] if t in whole else [layer.get(t) for layer in layers]:
            add_serial(site, ScaleShift(site.d_out, cfg.init))


@merges("ssf")
@torch.no_grad()
def merge_ssf(model: nn.Module) -> int:
    """Fold every SSF into the weights of the module it follows and unwrap that module; returns how many
    were merged. The model then computes the same logits without SSF's extra operations."""
    merged = 0
    for parent in list(model.modules()):
        for name, wrapper in list(parent.named_children()):
            if not (isinstance(wrapper, Adapted) and len(wrapper.branches) == 1
                    and isinstance(wrapper.branches[0], ScaleShift) and _mergeable(wrapper.base)):
                continue
            _fold(wrapper.base, wrapper.branches[0])
            setattr(parent, name, wrapper.base)
            merged += 1
    return merged


def _mergeable(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.LayerNorm, nn.Conv2d)) or _is_patch_embed(module)


def _is_patch_embed(module: nn.Module) -> bool:
    """timm's PatchEmbed with a conv projection and no norm: SSF on its output folds into the conv."""
    return isinstance(getattr(module, "proj", None), nn.Conv2d) and isinstance(getattr(module, "norm", None),
                                                                               nn.Identity)


def _fold(module: nn.Module, ssf: ScaleShift) -> None:
    target = module.proj if _is_patch_embed(module) else module
    scale, shift = ssf.scale.to(target.weight.dtype), ssf.shift.to(target.weight.dtype)
    target.weight.mul_(scale.view(-1, *[1] * (target.weight.dim() - 1)))
    if target.bias is None:
        target.bias = nn.Parameter(shift.clone(), requires_grad=False)
    else:
        target.bias.mul_(scale).add_(shift)
