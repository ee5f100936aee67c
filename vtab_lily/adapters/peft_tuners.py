"""HuggingFace peft's tuners as methods: `peft:<tuner>` (peft:lora, peft:dora, peft:loha, peft:vera, ...).

The config is peft's own config dataclass with `target_modules` replaced by `targets`, our site names
(default qkv on ViT, in_proj on Vim), each mapped to the whole module it belongs to: peft adapts whole
Linear layers, so it cannot adapt the q, k or v slice of a fused qkv (use `qkv`; on a timm model with
separate q/k/v projections `q`, `k`, `v` are whole modules). Parallel sites (`mlp`) are refused.
IA3's `feedforward_modules` takes site names too. Every other peft option keeps peft's default and can be
set with `--set` (e.g. `--set r=16 --set lora_alpha=32`). The tuner is injected in place by peft's own
tuner class, so tuners with state shared across layers (VeRA, VBLoRA, ...) work; parameters shared across
layers appear once in the model. Tuners that cannot run here are listed in UNSUPPORTED with the reason.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from backbones import LinearSite, adapter_sites

from ..errors import UnknownName, UserError
from ..options import OptionError, option
from .method import Method, split_targets
from .wrappers import Switch, conflict, module_path

# peft config fields that the suite sets itself, or that name modules / configure other libraries
EXCLUDED = {"task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
            "inference_mode", "target_modules", "exclude_modules", "modules_to_save", "layers_to_transform",
            "layers_pattern", "megatron_config", "megatron_core", "target_parameters", "trainable_token_indices"}
SITE_FIELDS = ("feedforward_modules",)  # peft fields listing modules, given as site names here
ALIASES = {"dora": ("LORA", {"use_dora": True})}  # tuner name -> (peft type, changed defaults)
UNSUPPORTED = {
    "ADALORA": "its rank allocation needs a call to update_and_allocate in every training step",
    "ADAPTION_PROMPT": "it adapts LLaMA-style attention modules, not Linear sites",
    "SHADOW": "it wraps a whole language-model backbone, not Linear sites",
    "LN_TUNING": "it tunes LayerNorm modules, not Linear sites",
    "POLY": "it needs task ids in every forward pass",
    "TRAINABLE_TOKENS": "it adapts token embeddings",
    "XLORA": "it mixes already trained LoRA adapters",
}


def _peft():
    try:
        import peft
        from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
    except ImportError as e:
        raise UserError("peft:<tuner> methods need HuggingFace peft: pip install peft") from e
    return peft, PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING


def tuners() -> dict[str, tuple[str, dict]]:
    """Tuner name -> (peft type, changed defaults), for every tuner of the installed peft that injects
    into Linear modules by `target_modules` (prompt-learning methods have no target modules)."""
    _, configs, tuner_classes = _peft()
    names = {}
    for peft_type in tuner_classes:
        fields = {f.name for f in dataclasses.fields(configs[peft_type])}
        if "target_modules" in fields and peft_type.value not in UNSUPPORTED:
            names[peft_type.value.lower()] = (peft_type.value, {})
    return {**names, **ALIASES}


@dataclass
class PeftOptions:
    """Base of the generated config classes: site names instead of peft's target_modules."""

    targets: tuple[str, ...] | None = option(None, "the sites whose Linear modules peft adapts, joined by '+'")
    FAMILY_DEFAULTS: ClassVar[dict] = {"vit": {"targets": ("qkv",)}, "vim": {"targets": ("in_proj",)}}
    PEFT_TYPE: ClassVar[str] = ""

    def __post_init__(self):
        self.targets = split_targets(self.targets)
        for name in SITE_FIELDS:
            if hasattr(self, name):
                setattr(self, name, split_targets(getattr(self, name)) or ())
        try:
            self.peft_config(["site"])  # peft checks its options here, before a run starts
        except (TypeError, ValueError) as e:  # peft's own checks of the values
            raise OptionError(f"peft:{self.PEFT_TYPE.lower()}: {e}") from e

    def peft_config(self, target_modules: list[str], modules: dict[str, list[str]] | None = None):
        """peft's config for these options, adapting `target_modules` (and site fields mapped in `modules`)."""
        peft, configs, _ = _peft()
        options = {k: v for k, v in dataclasses.asdict(self).items() if k != "targets"}
        options.update({k: list(v) for k, v in (modules or {}).items()})
        for name in SITE_FIELDS:
            if name in options and modules is None:
                options[name] = []
        return configs[peft.PeftType[self.PEFT_TYPE]](target_modules=target_modules, **options)


def _json_simple(value) -> bool:
    try:
        return json.loads(json.dumps(value)) == value
    except (TypeError, ValueError):
        return False


def _options_fields(config_cls, changed: dict) -> list[tuple]:
    """(name, type, field) of peft's options, with peft's own help text. Types for the suite's option checks:
    int and float where peft's default is one (any value: OFT's r=0 is valid, peft checks the ranges),
    anything else as object (peft accepts True or "gaussian" for init_lora_weights); peft's config checks the
    values."""
    out = []
    for f in dataclasses.fields(config_cls):
        if not f.init or f.name in EXCLUDED or f.name.endswith("_config"):
            continue
        help = " ".join(f.metadata.get("help", "").split())  # peft's help, on one line
        if f.name in SITE_FIELDS:
            out.append((f.name, tuple[str, ...], option((), f"site names joined by '+' ({help})")))
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        default = changed.get(f.name, default)
        if default is dataclasses.MISSING or not _json_simple(default):
            continue
        kind = type(default) if type(default) in (int, float) else object | None
        numbers = (None, None) if kind in (int, float) else None
        out.append((f.name, kind, option(default_factory=lambda d=default: type(d)(d), help=help, range=numbers)
                    if isinstance(default, (dict, list)) else option(default, help, numbers)))
    return out


@functools.cache  # one config class per tuner and process (configs built from it stay of one type)
def peft_method(tuner: str) -> Method:
    """The Method for `peft:<tuner>`: a config class generated from peft's, and an attach function."""
    known = tuners()
    if tuner not in known:
        why = UNSUPPORTED.get(tuner.upper())
        raise UnknownName(f"peft tuner {tuner!r} is not usable here: {why}" if why else
                       f"unknown peft tuner {tuner!r}; the installed peft offers {sorted(known)}")
    peft, configs, tuner_classes = _peft()
    peft_type, changed = known[tuner]
    config_cls = configs[peft.PeftType[peft_type]]
    fields = _options_fields(config_cls, changed)
    cls = dataclasses.make_dataclass(f"Peft{tuner.title()}Options", fields, bases=(PeftOptions,),
                                     namespace={"PEFT_TYPE": peft_type})
    tuner_cls = tuner_classes[peft.PeftType[peft_type]]

    def attach(model: nn.Module, cfg: PeftOptions) -> None:
        modules = {name: module_names(model, getattr(cfg, name)) for name in SITE_FIELDS if hasattr(cfg, name)}
        tuner_cls(model, cfg.peft_config(module_names(model, cfg.targets), modules), "default")
        del model.peft_config  # peft copies its config dict onto the model; build_model writes ours

    return Method(cls, attach, module="peft")


def module_names(model: nn.Module, targets) -> list[str]:
    """The names of the whole modules behind site names, in every layer; slices and parallel sites fail."""
    names = {id(m): n for n, m in model.named_modules()}
    out = []
    for layer in adapter_sites(model):
        for t in targets:
            site = layer.get(t)
            if not isinstance(site, LinearSite):
                raise OptionError(f"site {t!r} is a parallel site; peft adapts whole Linear modules only")
            module = getattr(site.parent, site.attr)
            if isinstance(module, Switch):  # another method of a composition wraps it
                raise conflict(next(iter(getattr(module, "owners", ())), None), module_path(site.parent, site.attr),
                               "peft replaces the whole module and cannot wrap another method's branches (list the "
                               "peft tuner first: the other method then wraps peft's layer)")
            if site.out != slice(0, module.out_features):
                raise OptionError(f"site {t!r} is a slice of {site.attr}; peft adapts whole modules and cannot adapt "
                                 f"the slice alone: use {site.attr!r} as the target")
            out.append(f"{names[id(site.parent)]}.{site.attr}")
    return out


def tuner_layers(model: nn.Module) -> list[nn.Module]:
    """peft's tuner layers in `model` (none when peft was never imported)."""
    import sys
    peft = sys.modules.get("peft")
    if peft is None:
        return []
    from peft.tuners.tuners_utils import BaseTunerLayer
    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
