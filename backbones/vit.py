"""ViT backbones from timm, their weights and their adapter sites.

- vit-b: ViT-B/16 with the original ImageNet-21K weights (timm tag `orig_in21k`, the same weights as
  Google's ViT-B_16.npz used by the Lily / Binary Adapter / FacT code). Not `vit_base_patch16_224_in21k`,
  which timm now maps to AugReg weights.
- vit-b-in1k: ViT-B/16 trained on ImageNet-1K only (timm tag `augreg_in1k`), for Table 5's ViT rows.
  The Lily repository does not name the checkpoint it used; this is the ImageNet-1K-only ViT-B/16 in timm.
- vit-tiny: a 4-layer, 64-wide ViT/16 with random weights, for tests.
- vit-mini: an 8-layer, 64-wide ViT/8 at 32 px, pretrained on the procedural glyphs task (backbones/shapes.py)
  by `python -m backbones.pretrain`; its weights ship in backbones/weights/ (the offline mini-benchmark).
- vit-l, dinov2-b, clip-b: the other backbones of recent VTAB-1K papers: ViT-L/16 ImageNet-21K (timm
  `orig_in21k`), DINOv2 ViT-B/14 (`lvd142m`), CLIP ViT-B/16 (OpenAI); they run with the ViT recipe.
- timm:<model name>: any timm model of the ViT family (ViT, DeiT, DINOv2 with registers and layer scale,
  CLIP with its pre-norm, MAE, EVA with separate q/k/v), with `.<tag>` for its pretrained weights.
Adapter sites are derived from each block's modules (vit_sites), so all of these adapt alike.
"""

from __future__ import annotations

import difflib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import timm
import torch
from timm.models.vision_transformer import checkpoint_filter_fn
from torch import nn

from .errors import UnknownName, UserError
from .sites import LayerSites, LinearSite, OutputSite, ParallelSite, StreamSite, TokenSite
from .weights import WeightsError, from_hub, shipped_weights, torch_file


@dataclass(frozen=True)
class ViTSpec:
    timm_name: str
    hub_file: str | None  # what to fetch when offline (None: no hub weights)
    kwargs: dict = field(default_factory=dict)
    shipped: bool = False  # pretrained weights ship in backbones/weights/ (checked by SHA-256)


VIT_SPECS = {
    "vit-b": ViTSpec("vit_base_patch16_224.orig_in21k", "ViT-B_16.npz (or timm/vit_base_patch16_224.orig_in21k)"),
    "vit-b-in1k": ViTSpec("vit_base_patch16_224.augreg_in1k", "timm/vit_base_patch16_224.augreg_in1k"),
    "vit-tiny": ViTSpec("vit_base_patch16_224", None, dict(embed_dim=64, depth=4, num_heads=4)),
    "vit-l": ViTSpec("vit_large_patch16_224.orig_in21k", "timm/vit_large_patch16_224.orig_in21k"),
    "dinov2-b": ViTSpec("vit_base_patch14_dinov2.lvd142m", "timm/vit_base_patch14_dinov2.lvd142m"),
    "clip-b": ViTSpec("vit_base_patch16_clip_224.openai", "timm/vit_base_patch16_clip_224.openai"),
    "vit-mini": ViTSpec("vit_base_patch16_224", None,
                        dict(embed_dim=64, depth=8, num_heads=4, patch_size=8, img_size=32), shipped=True),
}
TIMM_PREFIX = "timm:"


class UnmappableBackbone(UserError, ValueError):
    """A model whose blocks do not have the modules that adapter sites are made of."""


def timm_spec(name: str) -> ViTSpec:
    """The spec of `timm:<model name>[.<tag>]`; an unknown model or tag raises one clear UnknownName."""
    model_name = name.removeprefix(TIMM_PREFIX)
    arch, _, tag = model_name.partition(".")
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=3)
        raise UnknownName(f"unknown timm model {arch!r}" + (f"; did you mean {close}?" if close else "") +
                       " (timm.list_models('*vit*') lists them)")
    if tag and model_name not in timm.list_pretrained(f"{arch}.*"):
        raise UnknownName(f"timm model {arch!r} has no pretrained tag {tag!r}; it has "
                          f"{timm.list_pretrained(arch + '.*')}")
    return ViTSpec(model_name, f"timm/{model_name} (a .safetensors or .pth file)")


def check_timm_model(name: str) -> None:
    """Refuse a timm model whose blocks cannot be mapped to sites, before anything is built or written:
    the model is built on the meta device (no memory, no weights)."""
    spec = timm_spec(name)
    try:
        with torch.device("meta"):
            model = timm.create_model(spec.timm_name, pretrained=False)
    except Exception:  # a model that cannot be built on meta is checked when it is built for real
        return
    _call_qkv_as_module(model)
    vit_sites(model, name)




def vit_patch_size(name: str) -> int | None:
    """The side of a ViT's square patches, read from the model built on the meta device (no memory, no
    weights); None for a model without a patch embedding that says."""
    spec = VIT_SPECS[name] if name in VIT_SPECS else timm_spec(name)
    if "patch_size" in spec.kwargs:
        return spec.kwargs["patch_size"]
    try:
        with torch.device("meta"):
            model = timm.create_model(spec.timm_name, pretrained=False, **spec.kwargs)
    except Exception:  # a model that cannot be built on meta is checked when it is built for real
        return None
    size = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    return size[0] if isinstance(size, tuple) else size


def create_vit(name: str, num_classes: int, pretrained: bool = True, weights: str | None = None,
               drop_path_rate: float = 0.1, **kwargs) -> nn.Module:
    spec = VIT_SPECS[name] if name in VIT_SPECS else timm_spec(name)
    model = _timm_model(name, spec, num_classes, pretrained, weights, drop_path_rate, **kwargs)
    _call_qkv_as_module(model)
    return model


def _timm_model(name, spec, num_classes, pretrained, weights, drop_path_rate, **kwargs) -> nn.Module:
    args = {"num_classes": num_classes, "drop_path_rate": drop_path_rate, **spec.kwargs, **kwargs}
    if weights is None and pretrained and spec.shipped:
        weights = shipped_weights(name)
    if weights is not None:
        model = timm.create_model(spec.timm_name, pretrained=False, **args)
        load_vit_weights(model, weights)
        return model
    if not pretrained or spec.hub_file is None:
        return timm.create_model(spec.timm_name, pretrained=False, **args)
    def fetch() -> nn.Module:
        model = timm.create_model(spec.timm_name, pretrained=True, **args)
        model.head_loaded = model.pretrained_cfg.get("num_classes") == num_classes
        return model
    return from_hub(f"the pretrained weights of {name!r} ({spec.timm_name}, {spec.hub_file})", fetch,
                    "; .npz, .safetensors and .pth are accepted")


def vit_hub_file(name: str) -> tuple[str, str] | None:
    """(Hugging Face repo, file) of the backbone's pretrained weights; None for random-only backbones."""
    spec = VIT_SPECS[name] if name in VIT_SPECS else timm_spec(name)
    if spec.hub_file is None:
        return None
    return timm.models.get_pretrained_cfg(spec.timm_name).hf_hub_id, "model.safetensors"


def load_vit_weights(model: nn.Module, path: str | os.PathLike) -> None:
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


def _load_file(model: nn.Module, path: Path) -> None:
    if path.suffix == ".npz":
        model.load_pretrained(str(path))  # keeps the file's head when its class count matches
        with np.load(path) as w:
            model.head_loaded = "head/bias" in w and w["head/bias"].shape[-1] == model.num_classes
        return
    with torch_file(path):  # a .pth is read as data, never as code
        state = timm.models.load_state_dict(str(path), weights_only=True)
    state = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", checkpoint_filter_fn)(state, model)
    head = {k: v for k, v in model.state_dict().items() if k.startswith("head.")}
    if any(k in state and state[k].shape != v.shape for k, v in head.items()):
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
    model.head_loaded = bool(head) and all(k in state for k in head)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("head.")]
    if missing or unexpected:
        raise WeightsError(f"{path} does not fit {type(model).__name__}: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}; pass weights of the same architecture")


def vit_sites(model: nn.Module, name: str | None = None) -> list[LayerSites]:
    """Per block, derived from its modules: q, k, v (slices of a fused `attn.qkv`, or the separate
    `attn.q_proj`, `k_proj`, `v_proj`), qkv (fused only), proj, fc1, fc2; parallel sites `mlp` (reads the MLP
    input after norm2, adds to the MLP output, inside layer scale and drop_path), `mlp_residual` (reads
    the block's stream before norm2, adds after drop_path2: AdaptFormer's placement), `attn` (reads the
    attention's input after norm1, adds to its output, inside layer scale and drop_path: ConvPass),
    `proj_parallel` and `fc2_parallel` (read the input of attn.proj / mlp.fc2, add after its dropout, so that a
    serial branch on the same Linear reads its plain output: Hydra's parallel branch); serial sites `norm1`,
    `norm2` (the norms' outputs), `attn_out` and `mlp_out` (each branch's output after its drop_path, before
    the residual sum) and `block` (the block's output, after both residual sums: Adapter+); stream site
    `after_attn` (the stream after the attention's residual sum, which norm2 and the MLP's residual read: SCT's
    placement). A model without such blocks raises UnmappableBackbone naming what is missing."""
    blocks = getattr(model, "blocks", None)
    label = f"{name or type(model).__name__} ({type(model).__name__})"
    if not isinstance(blocks, (nn.Sequential, nn.ModuleList)) or len(blocks) == 0:
        raise UnmappableBackbone(f"{label} cannot be adapted: it has no `blocks` list of transformer blocks, "
                                 "so there is nothing to map to adapter sites")
    layers = []
    for i, block in enumerate(blocks):
        missing = _missing_modules(block)
        if missing:
            raise UnmappableBackbone(f"{label} cannot be adapted: block {i} ({type(block).__name__}) has no "
                                     f"{', no '.join(missing)}")
        attn, mlp = block.attn, block.mlp
        linear = _attention_sites(attn)
        d = linear["q"].d_in
        linear.update(proj=LinearSite(attn, "proj", d, slice(0, d)),
                      fc1=LinearSite(mlp, "fc1", d, slice(0, mlp.fc1.out_features)),
                      fc2=LinearSite(mlp, "fc2", mlp.fc2.in_features, slice(0, d)))
        parallel = {"mlp": ParallelSite(block, "mlp", "mlp", d, d),
                    "mlp_residual": ParallelSite(block, "norm2", "drop_path2", d, d),
                    "attn": ParallelSite(block, "attn", "attn", d, d)}
        for site, parent, read, write in (("proj_parallel", attn, "proj", "proj_drop"),
                                          ("fc2_parallel", mlp, "fc2", "drop2")):
            if isinstance(getattr(parent, write, None), nn.Module):
                parallel[site] = ParallelSite(parent, read, write, linear[read].d_in, d)
        layers.append(LayerSites(
            index=i, linear=linear, parallel=parallel,
            serial={"norm1": OutputSite(block, "norm1", d), "norm2": OutputSite(block, "norm2", d),
                    "attn_out": OutputSite(block, "drop_path1", d), "mlp_out": OutputSite(block, "drop_path2", d),
                    "block": OutputSite(blocks, str(i), d)},
            stream={"after_attn": StreamSite(block, "norm1", "drop_path1", d)},
        ))
    return layers


def _is_linear(module: nn.Module, path: str) -> bool:
    for attr in path.split("."):
        module = getattr(module, attr, None)
    return isinstance(module, nn.Linear)


def _missing_modules(block: nn.Module) -> list[str]:
    qkv = _is_linear(block, "attn.qkv") or all(_is_linear(block, f"attn.{n}_proj") for n in "qkv")
    missing = [] if qkv else ["attn.qkv (a fused Linear) nor attn.q_proj/k_proj/v_proj (Linears)"]
    if _qkv_bypassed(getattr(block, "attn", None)):
        missing.append("attn.qkv called as a module (it applies F.linear to qkv.weight; set attn.qkv_bias_separate)")
    missing += [f"{p} (Linear)" for p in ("attn.proj", "mlp.fc1", "mlp.fc2") if not _is_linear(block, p)]
    return missing + [f"{m} (module)" for m in ("norm1", "norm2", "drop_path1", "drop_path2")
                      if not isinstance(getattr(block, m, None), nn.Module)]


def _qkv_bypassed(attn) -> bool:
    """EVA's fused qkv with separate q/k/v biases runs F.linear on qkv.weight, skipping any wrapper."""
    return getattr(attn, "q_bias", None) is not None and getattr(attn, "qkv_bias_separate", True) is False


def _call_qkv_as_module(model: nn.Module) -> None:
    """Switch EVA's attention to its `qkv_bias_separate` path, qkv(x) + bias: the same computation, through
    the qkv module, so that adapters wrapping it run."""
    for m in model.modules():
        if _qkv_bypassed(m):
            m.qkv_bias_separate = True


def _attention_sites(attn: nn.Module) -> dict[str, LinearSite]:
    if isinstance(getattr(attn, "qkv", None), nn.Linear):
        d = attn.qkv.in_features
        spans = {"q": (0, d), "k": (d, 2 * d), "v": (2 * d, 3 * d), "qkv": (0, 3 * d)}
        return {n: LinearSite(attn, "qkv", d, slice(*span)) for n, span in spans.items()}
    return {n: LinearSite(attn, f"{n}_proj", getattr(attn, f"{n}_proj").in_features,
                          slice(0, getattr(attn, f"{n}_proj").out_features)) for n in "qkv"}


def vit_model_sites(model: nn.Module) -> dict:
    """`patch_embed` (the patch tokens before the class token and positions), `norm` (the final norm's
    output) and `blocks` (the token sequence through the blocks)."""
    d = model.embed_dim
    return {"patch_embed": OutputSite(model, "patch_embed", d), "norm": OutputSite(model, "norm", d),
            "blocks": TokenSite(model, "blocks", d, model.num_prefix_tokens, model.patch_embed.patch_size[0])}


def vit_head(model: nn.Module) -> nn.Module:
    return model.get_classifier()
