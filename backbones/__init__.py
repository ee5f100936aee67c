"""Backbone registry: create_backbone(name, ...) and adapter_sites(model).

Backbones know nothing of adapters or tasks; each exposes its adaptable places as LayerSites.
Names: the named ViTs and Vims below, and `timm:<model name>` for any timm model of the ViT family.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from .errors import UnknownName
from .hub import hub_access
from .sites import (
    ConvSite,
    HookSite,
    LayerSites,
    LinearSite,
    OutputSite,
    ParallelSite,
    StateSite,
    StreamSite,
    TensorSite,
    TokenSite,
)
from .vim import VIM_SPECS, create_vim, vim_head, vim_hub_file, vim_model_sites, vim_sites
from .vit import (
    TIMM_PREFIX,
    VIT_SPECS,
    UnmappableBackbone,
    WeightsError,
    check_timm_model,
    create_vit,
    vit_head,
    vit_hub_file,
    vit_model_sites,
    vit_patch_size,
    vit_sites,
)
from .weights import SHIPPED, shipped_weights

__all__ = ["BACKBONES", "ConvSite", "HookSite", "LayerSites", "LinearSite", "OutputSite", "ParallelSite", "StateSite",
           "StreamSite", "TensorSite", "TokenSite", "UnmappableBackbone", "WeightsError", "adapter_sites",
           "check_backbone", "create_backbone", "family", "head_of", "model_sites", "patch_size"]


@dataclass(frozen=True)
class Backbone:
    create: Callable[..., nn.Module]
    sites: Callable[[nn.Module], list[LayerSites]]
    head: Callable[[nn.Module], nn.Module]
    drop_path_rate: float  # the paper's recipe
    hub_file: tuple[str, str] | None = None  # (Hugging Face repo, file) of its pretrained weights
    model_sites: Callable[[nn.Module], dict] = lambda model: {}  # model-level sites by name


BACKBONES: dict[str, Backbone] = {
    **{name: Backbone(lambda *a, _n=name, **k: create_vit(_n, *a, **k), vit_sites, vit_head, 0.1, vit_hub_file(name),
                      vit_model_sites)
       for name in VIT_SPECS},
    **{name: Backbone(lambda *a, _n=name, **k: create_vim(_n, *a, **k), vim_sites, vim_head, 0.05, vim_hub_file(name),
                      vim_model_sites)
       for name in VIM_SPECS},
}


def family(name: str) -> str:
    """'vim' for Vision Mamba backbones, 'vit' for the rest: methods pick their defaults by family."""
    return "vim" if name.startswith("vim") else "vit"


def _backbone(name: str) -> Backbone:
    if name.startswith(TIMM_PREFIX):
        return Backbone(lambda *a, **k: create_vit(name, *a, **k), vit_sites, vit_head, 0.1, vit_hub_file(name),
                        vit_model_sites)
    if name not in BACKBONES:
        raise UnknownName(f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)} or timm:<model name>")
    return BACKBONES[name]


@functools.cache
def check_backbone(name: str) -> None:
    """Raise one clear error for an unknown backbone, or a timm model that is unknown or cannot be mapped
    to adapter sites, without building it for real (nothing is downloaded)."""
    _backbone(name)
    if name.startswith(TIMM_PREFIX):
        check_timm_model(name)


@functools.cache
def patch_size(name: str) -> int | None:
    """The side of backbone `name`'s square patches (the least image size; an image size must be a multiple of
    it), without building it for real; None when the model does not say."""
    _backbone(name)
    return VIM_SPECS[name].patch_size if name in VIM_SPECS else vit_patch_size(name)


def create_backbone(name: str, num_classes: int, pretrained: bool = True, weights: str | None = None,
                    drop_path_rate: float | None = None, **kwargs) -> nn.Module:
    """Build backbone `name` with a fresh `num_classes` head. pretrained=False never downloads;
    `weights` loads a local file instead of the hub."""
    spec = _backbone(name)
    rate = spec.drop_path_rate if drop_path_rate is None else drop_path_rate
    model = spec.create(num_classes, pretrained=pretrained, weights=weights, drop_path_rate=rate, **kwargs)
    model.backbone_name = name
    if not getattr(model, "head_loaded", False):
        init_head(spec.head(model), family(name))
    return model


def init_head(head: nn.Module, family_name: str) -> None:
    """The official code's initialisation of a new classification head, per family.

    ViT (Lily / FacT code, timm 0.4.12 `reset_classifier`): PyTorch's default nn.Linear init, weight and bias
    uniform in +-1/sqrt(fan_in) (timm 1.x would give trunc_normal(0.02), bias 0). Vim (hustvl's
    `segm_init_weights`): trunc_normal(std 0.02), bias 0."""
    if not isinstance(head, nn.Linear):
        return  # num_classes=0: no head
    if family_name == "vim":
        nn.init.trunc_normal_(head.weight, std=0.02)
        nn.init.zeros_(head.bias)
    else:
        head.reset_parameters()


def pretrained_file(name: str) -> tuple[str, dict] | None:
    """The local file of backbone `name`'s pretrained weights (from the Hugging Face cache, downloaded when
    missing) and where it came from ({"repo", "file", "revision"}); None when the backbone has none."""
    if name in SHIPPED:  # the mini backbones: a file in the repository, checked against its SHA-256
        return str(shipped_weights(name)), {"source": "shipped", "file": f"backbones/weights/{name}.safetensors"}
    hub = _backbone(name).hub_file
    if hub is None:
        return None
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    path = try_to_load_from_cache(*hub)
    if not isinstance(path, str):
        with hub_access() as offline:
            try:
                path = hf_hub_download(*hub)
            except Exception as e:  # network, hub or cache failures all end here
                why = f"{offline}, and it is not in the local hub cache" if offline else type(e).__name__
                raise WeightsError(f"could not fetch {hub[1]} of {hub[0]} from the Hugging Face hub for {name!r} "
                                   f"({why}). Offline, download it on a connected machine and pass it with "
                                   "--weights PATH (Python: weights=PATH)") from e
    revision = Path(path).parent.name  # .../snapshots/<commit>/<file>
    return path, {"repo": hub[0], "file": hub[1], "revision": revision}


def adapter_sites(model: nn.Module) -> list[LayerSites]:
    """The per-layer sites of the backbone as it was when first asked (see `_cached`)."""
    return _cached(model, "_adapter_sites", _backbone(model.backbone_name).sites)


def model_sites(model: nn.Module) -> dict:
    """Sites that belong to the whole model, not to a layer (e.g. ViT's `patch_embed`, `norm`, `blocks`)."""
    return _cached(model, "_model_sites", _backbone(model.backbone_name).model_sites)


def _cached(model: nn.Module, key: str, find):
    """Sites are found once per model and kept on it: a method wraps the modules they name (which hides
    their Linear attributes), and a second method (a composition) must find the same sites; a site's
    (parent, attribute) stays valid through wrapping."""
    if key not in model.__dict__:
        model.__dict__[key] = find(model)
    return model.__dict__[key]


def head_of(model: nn.Module) -> nn.Module:
    return _backbone(model.backbone_name).head(model)
