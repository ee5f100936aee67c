"""Backbone registry: create_backbone(name, ...) and adapter_sites(model).

Backbones know nothing of adapters or tasks; each exposes its adaptable places as LayerSites.
Names: the named ViTs and Vims below, and `timm:<model name>` for any timm model of the ViT family.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from .sites import LayerSites, LinearSite, ParallelSite
from .vim import VIM_SPECS, create_vim, vim_head, vim_sites
from .vit import (
    TIMM_PREFIX,
    VIT_SPECS,
    UnmappableBackbone,
    WeightsError,
    check_timm_model,
    create_vit,
    vit_head,
    vit_sites,
)

__all__ = ["BACKBONES", "LayerSites", "LinearSite", "ParallelSite", "UnmappableBackbone", "WeightsError",
           "adapter_sites", "check_backbone", "create_backbone", "family", "head_of"]


@dataclass(frozen=True)
class Backbone:
    create: Callable[..., nn.Module]
    sites: Callable[[nn.Module], list[LayerSites]]
    head: Callable[[nn.Module], nn.Module]
    drop_path_rate: float  # the paper's recipe


BACKBONES: dict[str, Backbone] = {
    **{name: Backbone(lambda *a, _n=name, **k: create_vit(_n, *a, **k), vit_sites, vit_head, 0.1)
       for name in VIT_SPECS},
    **{name: Backbone(lambda *a, _n=name, **k: create_vim(_n, *a, **k), vim_sites, vim_head, 0.05)
       for name in VIM_SPECS},
}


def family(name: str) -> str:
    """'vim' for Vision Mamba backbones, 'vit' for the rest: methods pick their defaults by family."""
    return "vim" if name.startswith("vim") else "vit"


def _backbone(name: str) -> Backbone:
    if name.startswith(TIMM_PREFIX):
        return Backbone(lambda *a, **k: create_vit(name, *a, **k), vit_sites, vit_head, 0.1)
    if name not in BACKBONES:
        raise KeyError(f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)} or timm:<model name>")
    return BACKBONES[name]


@functools.cache
def check_backbone(name: str) -> None:
    """Raise one clear error for an unknown backbone, or a timm model that is unknown or cannot be mapped
    to adapter sites, without building it for real (nothing is downloaded)."""
    _backbone(name)
    if name.startswith(TIMM_PREFIX):
        check_timm_model(name)


def create_backbone(name: str, num_classes: int, pretrained: bool = True, weights: str | None = None,
                    drop_path_rate: float | None = None, **kwargs) -> nn.Module:
    """Build backbone `name` with a fresh `num_classes` head. pretrained=False never downloads;
    `weights` loads a local file instead of the hub."""
    spec = _backbone(name)
    rate = spec.drop_path_rate if drop_path_rate is None else drop_path_rate
    model = spec.create(num_classes, pretrained=pretrained, weights=weights, drop_path_rate=rate, **kwargs)
    model.backbone_name = name
    return model


def adapter_sites(model: nn.Module) -> list[LayerSites]:
    return _backbone(model.backbone_name).sites(model)


def head_of(model: nn.Module) -> nn.Module:
    return _backbone(model.backbone_name).head(model)
