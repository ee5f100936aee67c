"""The Python API: build a backbone with a PEFT method, count, disable, save and load adapters."""
from __future__ import annotations

import json
import os
from contextlib import contextmanager

import torch
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from backbones import WeightsError, create_backbone, head_of

from .adapters import adapted_modules, get_method, make_config
from .adapters.base import FROM_FILE, SELECTION, TrainingData, attaching, config_dict, training_data
from .adapters.peft_tuners import tuner_layers
from .errors import UserError, write_errors
from .fileio import atomic_path
from .provenance import weights_provenance


def build_model(backbone: str, method: str, num_classes: int, *, pretrained: bool = True,
                weights: str | None = None, drop_path_rate: float | None = None,
                backbone_options: dict | None = None, seed: int | None = None, provenance: dict | None = None,
                data: TrainingData | str | None = None, **options) -> nn.Module:
    """Backbone + method, with requires_grad set: the backbone is frozen before the method attaches, so
    what trains is the method's parameters (those it leaves with requires_grad), the head, and, for
    full fine-tuning (trains_backbone), everything.

    `options` are the method's config fields (Lily: r, s, ne_1, ne_2, targets, ...); an unknown one
    raises an error listing the valid ones. A composition (`method="lora+bitfit"`) takes them prefixed by
    their method: `**{"lora.r": 4}`; a clash between its methods is one SiteConflict (adapters/compose.py).
    pretrained=False builds random weights and never downloads.
    `seed`: torch is seeded with it first, so random weights (backbone, adapter, head) follow from it; it
    is saved with the adapter, so `load_model` rebuilds the same random backbone. `provenance`: the weights'
    provenance as the run resolved it (`run` passes the hub file it fetched as `weights`, so the file alone
    would read as a local one); by default it is computed from `weights` / `pretrained`. Saved with the
    adapter, for `load_model`. `data`: the training split, for a method with a pre-pass on it (SCT, GPS: see
    adapters/base.TrainingData); `run` passes it. Its selection is kept in buffers named `selection`, saved with
    the adapter, and its summary in `model.prepass` (the run's record keeps it).
    """
    cfg = make_config(method, options, backbone)
    if seed is not None:
        torch.manual_seed(seed)
    model = create_backbone(backbone, num_classes, pretrained=pretrained, weights=weights,
                            drop_path_rate=drop_path_rate, **(backbone_options or {}))
    model.requires_grad_(False)
    spec = get_method(method)
    with attaching(method, model), training_data(data):
        spec.attach(model, cfg)
    head = head_ids(model)
    for p in model.parameters():
        p.requires_grad = spec.trains_backbone or p.requires_grad or id(p) in head
    model.peft_config = {"backbone": backbone, "method": method, "num_classes": num_classes,
                         "options": config_dict(cfg), "seed": seed,
                         "backbone_options": dict(backbone_options or {}),
                         "weights": provenance or weights_provenance(backbone, weights, pretrained, seed)[0]}
    return model


def param_groups(model: nn.Module, weight_decay: float, no_decay_1d: bool, no_decay=()) -> list[dict]:
    """AdamW parameter groups of the trainable parameters. Without `no_decay_1d` and `no_decay` one group decays
    everything (the Lily / FacT code: plain `AdamW(params, weight_decay=wd)`, PETL-ViT `FacT/fact_tt.py` L195).
    With `no_decay_1d`, as timm's `create_optimizer` (filter_bias_and_bn, the NOAH / SSF / Vim trainers): no
    decay on 1-d tensors, biases and the backbone's `no_weight_decay()` names (Vim: pos_embed and cls_token,
    hustvl/Vim `vim/models_mamba.py` L378-379, `vim/main.py` L391). `no_decay`: parameter names (the last part
    of a dotted name) without decay, as mmengine's custom_keys with decay_mult 0 (MambaPEFT: A_log, D, ...).
    A tensor that carries a `wd_mult` attribute (set by a method: partial's wd_mult) decays at
    weight_decay * wd_mult in a group of its own, whatever the rules above say (as mmengine's custom_keys)."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    mults = sorted({p.wd_mult for _, p in params if hasattr(p, "wd_mult")})
    scaled = [{"params": [p for _, p in params if getattr(p, "wd_mult", None) == m], "weight_decay": weight_decay * m}
              for m in mults]
    params = [(n, p) for n, p in params if not hasattr(p, "wd_mult")]
    if not no_decay_1d and not no_decay:
        return [{"params": [p for _, p in params], "weight_decay": weight_decay}, *scaled]
    skip = set(model.no_weight_decay()) if no_decay_1d and hasattr(model, "no_weight_decay") else set()
    exempt = [n.rsplit(".", 1)[-1] in no_decay or (no_decay_1d and (p.ndim <= 1 or n.endswith(".bias") or n in skip))
              for n, p in params]
    return [{"params": [p for (_, p), e in zip(params, exempt) if e], "weight_decay": 0.0},
            {"params": [p for (_, p), e in zip(params, exempt) if not e], "weight_decay": weight_decay}, *scaled]


def head_ids(model: nn.Module) -> set[int]:
    """The ids of the classification head's parameters (what trains beside a method, and what counts exclude)."""
    return {id(p) for p in head_of(model).parameters()}


def count_params(model: nn.Module) -> int:
    """Trainable parameters excluding the classification head; shared tensors counted once."""
    head = head_ids(model)
    return sum(p.numel() for p in model.parameters() if p.requires_grad and id(p) not in head)


def storage_bytes(model: nn.Module) -> int:
    """Bytes to store the trainable parameters without the head: fp32, except modules that define their
    own `storage_bytes()` (Bi-LoRA's 1-bit matrices); shared tensors counted once."""
    head = head_ids(model)
    custom = {id(m): m for m in model.modules() if hasattr(m, "storage_bytes")}
    owned = {id(p) for m in custom.values() for p in m.parameters(recurse=False)}
    fp32 = sum(4 * p.numel() for p in model.parameters()
               if p.requires_grad and id(p) not in head and id(p) not in owned)
    return fp32 + sum(m.storage_bytes() for m in custom.values() if any(p.requires_grad for p in m.parameters()))


@contextmanager
def disable_adapters(model: nn.Module):
    """Within the block the model computes as its plain backbone (the head stays as it is); for
    peft's tuners through their own switch (enable_adapters), keeping every requires_grad as it was."""
    wrappers, peft_layers = adapted_modules(model), tuner_layers(model)
    previous = [w.enabled for w in wrappers]
    trainable = [p.requires_grad for p in model.parameters()]
    for w in wrappers:
        w.enabled = False
    for layer in peft_layers:
        layer.enable_adapters(False)
    try:
        yield model
    finally:
        for w, e in zip(wrappers, previous):
            w.enabled = e
        for layer in peft_layers:
            layer.enable_adapters(True)
        for p, t in zip(model.parameters(), trainable):
            p.requires_grad = t


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable tensors by name (named_parameters lists a shared tensor once)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What an adapter file holds: the trainable tensors and the selections of pre-passes (buffers named
    `selection`: which channels or weights a method adapts, chosen from the training data)."""
    selections = {n: b for n, b in model.named_buffers() if n.rsplit(".", 1)[-1] == SELECTION}
    return {**trainable_state(model), **selections}


def save_adapter(model: nn.Module, path: str | os.PathLike) -> None:
    """Write the trainable tensors (head included) and the pre-passes' selections as safetensors, with the
    build config as JSON metadata under the key `vtab_lily`. Atomic."""
    tensors = {n: p.detach().cpu().contiguous() for n, p in adapter_state(model).items()}
    with atomic_path(path) as tmp, write_errors(path):
        save_file(tensors, str(tmp), metadata={"vtab_lily": json.dumps(model.peft_config)})


def adapter_config(path: str | os.PathLike) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["vtab_lily"])


class ProvenanceError(WeightsError):
    """An adapter asked to load on other backbone weights or another image size than it was trained with."""


def load_model(path: str | os.PathLike, weights: str | None = None, pretrained: bool | None = None,
               backbone_options: dict | None = None) -> nn.Module:
    """Rebuild the model an adapter file was saved from (backbone, method, options, classes), on the weights
    it was trained on, load its tensors, and return it in eval mode. The caller's torch random state is left
    as it was.

    Weights follow the saved provenance: a random backbone is redrawn from its seed; a local file must be
    passed as `weights` and have the saved SHA-256; a pretrained (hub or shipped) backbone must give the
    saved SHA-256. The backbone options (the image size) default to the saved ones. Anything else raises
    ProvenanceError (one line). Adapter files saved before provenance was kept build as `weights` /
    `pretrained` (default True) / `backbone_options` say."""
    cfg = adapter_config(path)
    saved, options = cfg.get("weights"), cfg.get("backbone_options")
    if options is not None and backbone_options is not None and backbone_options != options:
        raise ProvenanceError(f"{path} was trained with backbone options {options}, not {backbone_options}; "
                              "load it with its own (leave them out)")
    backbone_options = options if backbone_options is None else backbone_options
    if saved is not None:
        pretrained = _check_weights(path, cfg, saved, weights, pretrained)
    with torch.random.fork_rng(devices=[]):
        model = build_model(cfg["backbone"], cfg["method"], cfg["num_classes"],
                            pretrained=True if pretrained is None else pretrained, weights=weights,
                            backbone_options=backbone_options, seed=cfg.get("seed"), data=FROM_FILE,
                            **cfg["options"])
    load_adapter(model, path)
    return model.eval()


def _check_weights(path, cfg: dict, saved: dict, weights: str | None, pretrained: bool | None) -> bool:
    """`pretrained` for rebuilding on the saved weights; ProvenanceError when the caller's weights differ."""
    source, backbone, seed = saved.get("source"), cfg["backbone"], cfg.get("seed")
    if source == "random":
        if weights is not None or pretrained:
            raise ProvenanceError(f"{path} was trained on a random-init {backbone} (seed {seed}); load it without "
                                  "weights or pretrained")
        if seed is None and pretrained is None and not get_method(cfg["method"]).trains_backbone:
            raise ProvenanceError(f"{path} was trained on a random-init {backbone} drawn without a seed, so its "
                                  "frozen weights cannot be redrawn (pass pretrained=False to load it on a fresh "
                                  "random draw)")
        return False
    if source == "file" and weights is None:
        raise ProvenanceError(f"{path} was trained on a local weights file (sha256 {saved['sha256'][:12]}...); "
                              "pass that file as weights")
    if pretrained is False:
        raise ProvenanceError(f"{path} was trained on pretrained {backbone} weights; load it with pretrained")
    actual = weights_provenance(backbone, weights, True, seed)[0]
    if actual.get("sha256") != saved.get("sha256"):
        given = f"weights file {weights}" if weights is not None else f"{backbone}'s {source} weights"
        raise ProvenanceError(f"{path} was trained on weights with sha256 {str(saved.get('sha256'))[:12]}..., "
                              f"but {given} has sha256 {str(actual.get('sha256'))[:12]}...; pass the file it was "
                              "trained on")
    return True


def load_adapter(model: nn.Module, path: str | os.PathLike) -> None:
    """Copy a saved adapter into a model built with the same backbone, method and options."""
    saved = adapter_config(path)
    if {k: saved[k] for k in ("backbone", "method", "options")} != {
            k: json.loads(json.dumps(model.peft_config[k])) for k in ("backbone", "method", "options")}:
        raise UserError(f"{path} was saved from {saved}, which does not fit this model "
                         f"({model.peft_config}); build the model with the saved backbone, method and options")
    tensors = load_file(str(path))
    own = adapter_state(model)
    if set(tensors) != set(own):
        raise UserError(f"{path} holds tensors {sorted(set(tensors) ^ set(own))[:5]} that do not match "
                         "this model's trainable parameters")
    with torch.no_grad():
        for name, p in own.items():
            if tensors[name].shape != p.shape:
                raise UserError(f"{path}: {name} has shape {tuple(tensors[name].shape)}, model expects "
                                 f"{tuple(p.shape)}")
            p.copy_(tensors[name])
