"""Backbones: ViT (timm) and Vision Mamba, their weights, adapter sites and scan kernels.

Backbones know nothing of adapters or tasks; each exposes its adaptable places as LayerSites. The registry
(`create_backbone(name, ...)`, `adapter_sites(model)`, ...) is backbones/registry.py. The names below are
imported from their modules on first use, so that `backbones.errors` (the suite's UserError) and
`backbones.shapes` load without torch.
"""
from __future__ import annotations

import importlib

_WHERE = {  # public name -> its module
    **dict.fromkeys(("BACKBONES", "Backbone", "_backbone", "adapter_sites", "check_backbone", "create_backbone",
                     "family", "head_of", "init_head", "model_sites", "patch_size", "pretrained_file"), "registry"),
    **dict.fromkeys(("ConvSite", "HookSite", "LayerSites", "LinearSite", "OutputSite", "ParallelSite", "StateSite",
                     "StreamSite", "TensorSite", "TokenSite"), "sites"),
    "UnmappableBackbone": "vit",
    "WeightsError": "weights",
}
__all__ = sorted(name for name in _WHERE if not name.startswith("_"))


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value
    return value
