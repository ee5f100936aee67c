"""ViT backbones from timm, their weights and their adapter sites.

- vit-b: ViT-B/16 with the original ImageNet-21K weights (timm tag `orig_in21k`, the same weights as
  Google's ViT-B_16.npz used by the Lily / Binary Adapter / FacT code). Not `vit_base_patch16_224_in21k`,
  which timm now maps to AugReg weights.
- vit-b-in1k: ViT-B/16 trained on ImageNet-1K only (timm tag `augreg_in1k`), for Table 5's ViT rows.
  The Lily repository does not name the checkpoint it used; this is the ImageNet-1K-only ViT-B/16 in timm.
- vit-tiny: a 4-layer, 64-wide ViT/16 with random weights, for tests and offline demos.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import timm
import torch
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from .sites import LayerSites, LinearSite, OutputSite, ParallelSite, TokenSite


@dataclass(frozen=True)
class ViTSpec:
    timm_name: str
    hub_file: str | None  # what to fetch when offline (None: no pretrained weights exist)
    kwargs: dict = field(default_factory=dict)


VIT_SPECS = {
    "vit-b": ViTSpec("vit_base_patch16_224.orig_in21k", "ViT-B_16.npz (or timm/vit_base_patch16_224.orig_in21k)"),
    "vit-b-in1k": ViTSpec("vit_base_patch16_224.augreg_in1k", "timm/vit_base_patch16_224.augreg_in1k"),
    "vit-tiny": ViTSpec("vit_base_patch16_224", None, dict(embed_dim=64, depth=4, num_heads=4)),
}


class WeightsError(RuntimeError):
    """Pretrained weights could not be loaded; the message says what to bring and how to pass it."""


def create_vit(name: str, num_classes: int, pretrained: bool = True, weights: str | None = None,
               drop_path_rate: float = 0.1, **kwargs) -> VisionTransformer:
    spec = VIT_SPECS[name]
    args = {"num_classes": num_classes, "drop_path_rate": drop_path_rate, **spec.kwargs, **kwargs}
    if weights is not None:
        model = timm.create_model(spec.timm_name, pretrained=False, **args)
        load_vit_weights(model, weights)
        return model
    if not pretrained or spec.hub_file is None:
        return timm.create_model(spec.timm_name, pretrained=False, **args)
    try:
        model = timm.create_model(spec.timm_name, pretrained=True, **args)
        model.head_loaded = model.pretrained_cfg.get("num_classes") == num_classes
        return model
    except Exception as e:  # network, hub or cache failures all end here
        raise WeightsError(
            f"could not load pretrained weights for {name!r} ({spec.timm_name}) from the Hugging Face hub: "
            f"{type(e).__name__}: {e}. Offline, download {spec.hub_file} on a connected machine and pass "
            f"it with --weights PATH (Python: weights=PATH); .npz, .safetensors and .pth are accepted."
        ) from e


def vit_hub_file(name: str) -> tuple[str, str] | None:
    """(Hugging Face repo, file) of the backbone's pretrained weights; None for random-only backbones."""
    spec = VIT_SPECS[name]
    if spec.hub_file is None:
        return None
    return timm.models.get_pretrained_cfg(spec.timm_name).hf_hub_id, "model.safetensors"


def load_vit_weights(model: VisionTransformer, path: str | os.PathLike) -> None:
    """Load a local checkpoint (.npz from Google, or a timm .safetensors / .pth); the head is kept only
    when its class count matches."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist")
    try:
        _load_file(model, path)
    except WeightsError:
        raise
    except Exception as e:  # unreadable or foreign files fail in many ways inside numpy / torch / timm
        raise WeightsError(f"{path} is not a ViT checkpoint this backbone can load ({type(e).__name__}: "
                           f"{str(e)[:200]}); pass Google's .npz or a timm .safetensors / .pth of the same "
                           "architecture") from e


def _load_file(model: VisionTransformer, path: Path) -> None:
    if path.suffix == ".npz":
        model.load_pretrained(str(path))  # keeps the file's head when its class count matches
        with np.load(path) as w:
            model.head_loaded = "head/bias" in w and w["head/bias"].shape[-1] == model.num_classes
        return
    state = timm.models.load_state_dict(str(path))
    state = checkpoint_filter_fn(state, model)
    head = {k: v for k, v in model.state_dict().items() if k.startswith("head.")}
    if any(k in state and state[k].shape != v.shape for k, v in head.items()):
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
    model.head_loaded = bool(head) and all(k in state for k in head)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("head.")]
    if missing or unexpected:
        raise WeightsError(f"{path} does not fit {type(model).__name__}: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}; pass weights of the same architecture")


def vit_sites(model: VisionTransformer) -> list[LayerSites]:
    """Per block: q, k, v (slices of the fused qkv), qkv, proj, fc1, fc2; parallel sites `mlp` (reads
    the MLP input after norm2, adds to the MLP output, inside drop_path) and `mlp_residual` (reads the
    block's stream before norm2, adds after drop_path2: AdaptFormer's placement); serial sites `norm1`,
    `norm2` (the norms' outputs), `attn_out` and `mlp_out` (each branch's output after its drop_path,
    before the residual sum)."""
    layers = []
    for i, block in enumerate(model.blocks):
        attn, mlp = block.attn, block.mlp
        d = attn.qkv.in_features
        layers.append(LayerSites(
            index=i,
            linear={
                "q": LinearSite(attn, "qkv", d, slice(0, d)),
                "k": LinearSite(attn, "qkv", d, slice(d, 2 * d)),
                "v": LinearSite(attn, "qkv", d, slice(2 * d, 3 * d)),
                "qkv": LinearSite(attn, "qkv", d, slice(0, 3 * d)),
                "proj": LinearSite(attn, "proj", d, slice(0, d)),
                "fc1": LinearSite(mlp, "fc1", d, slice(0, mlp.fc1.out_features)),
                "fc2": LinearSite(mlp, "fc2", mlp.fc2.in_features, slice(0, d)),
            },
            parallel={
                "mlp": ParallelSite(block, "mlp", "mlp", d, d),
                "mlp_residual": ParallelSite(block, "norm2", "drop_path2", d, d),
            },
            serial={"norm1": OutputSite(block, "norm1", d), "norm2": OutputSite(block, "norm2", d),
                    "attn_out": OutputSite(block, "drop_path1", d), "mlp_out": OutputSite(block, "drop_path2", d)},
        ))
    return layers


def vit_model_sites(model: VisionTransformer) -> dict:
    """`patch_embed` (the patch tokens before the class token and positions), `norm` (the final norm's
    output) and `blocks` (the token sequence through the blocks)."""
    d = model.embed_dim
    return {"patch_embed": OutputSite(model, "patch_embed", d), "norm": OutputSite(model, "norm", d),
            "blocks": TokenSite(model, "blocks", d, model.num_prefix_tokens, model.patch_embed.patch_size[0])}


def vit_head(model: VisionTransformer) -> torch.nn.Module:
    return model.get_classifier()
