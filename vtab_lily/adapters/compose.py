"""Composition: `--method a+b` attaches several methods to one model, in the order given (MambaPEFT's
Hybrid rows are compositions: `lorap+partial`).

- Options are prefixed by their method (`lora.r=4`, `partial.parts=conv1d`): the method name and the
  options stay separate, so a '+' inside a value (`lora.targets=q+v`) is never read as a composition.
  An unprefixed option is an error that lists the prefixed ones. Each part's config is built and checked
  as for the method alone (family defaults included); the composed config's options are flat
  (`{"lora.r": 4, ...}`), which is what records hold and what `load_model` rebuilds from.
- A method appears once in a composition (its options would be ambiguous); one method's `targets` already
  cover several sites.
- The parts attach one after the other, each under its own name (`wrappers.attaching`), so a clash names both:
  branches on one module that read different sources (a serial and a parallel one, or parallel ones
  reading different modules' inputs) or write partly overlapping output columns (wrappers._add), two methods
  owning the same parameter (both replace or unfreeze it), a peft tuner asked to wrap a module another
  method already wraps (peft_tuners.module_names), and a wrapper of one method that a later one replaces
  (two methods rebuilding one stack of blocks: the first one's prompts would no longer run). Parallel
  branches on one module with identical or disjoint slices are no conflict: Adapted sums them in order.
  A later part never freezes an earlier part's tensors (peft's injection freezes every tensor but its own:
  those are made trainable again).
- trains_backbone when any part trains the backbone; counting, saving and disable_adapters need nothing
  special (they see the parameters and wrappers of all parts).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from torch import nn

from backbones import UnmappableBackbone, adapter_sites, model_sites

from ..errors import UnknownName
from .method import Method
from .wrappers import Switch, attaching, conflict


@dataclass
class ComposedConfig:
    """The configs of a composition's methods, by method name, in attaching order."""

    parts: dict[str, Any]

    def options(self) -> dict[str, Any]:
        return {f"{name}.{k}": v for name, cfg in self.parts.items() for k, v in dataclasses.asdict(cfg).items()}


def parts_of(name: str) -> tuple[str, ...]:
    parts = tuple(name.split("+"))
    if any(not p for p in parts):
        raise UnknownName(f"method {name!r}: a composition joins method names with '+' (e.g. lora+bitfit)")
    twice = sorted({p for p in parts if parts.count(p) > 1})
    if twice:
        raise UnknownName(f"method {name!r} names {', '.join(twice)} twice; a method appears once in a composition "
                          "(give one method several targets instead, e.g. --set lora.targets=q+v)")
    return parts


def composition(parts: tuple[str, ...], methods: list[Method]) -> Method:
    """The Method `a+b+...` from its parts' names (parts_of) and their Methods (the registry resolves them)."""

    def attach(model: nn.Module, cfg: ComposedConfig) -> None:
        for sites in (adapter_sites, model_sites):  # the plain backbone's sites, before any part wraps a module
            try:
                sites(model)
            except UnmappableBackbone:  # a part that needs sites says so when it asks
                pass
        owners: dict[tuple[int, str], str] = {}
        wrappers: dict[int, tuple[str, str]] = {}  # id of a wrapper -> (its path, the part that made it)
        for part, method in zip(parts, methods):
            before = {key: (p, p.requires_grad) for key, (_, p) in _slots(model).items()}
            with attaching(part, model):
                method.attach(model, cfg.parts[part])
                now = {id(m): path for path, m in model.named_modules() if isinstance(m, Switch)}
                for key, (path, owner) in wrappers.items():
                    if key not in now:  # e.g. a second method rebuilding the stack of blocks another prompts
                        raise conflict(owner, path, "the later one replaced the earlier one's wrapper, which no "
                                       "longer runs")
                wrappers.update({k: (path, part) for k, path in now.items() if k not in wrappers})
                for key, (where, p) in _slots(model).items():
                    old, trainable = before.get(key, (None, False))
                    if old is p and trainable and not p.requires_grad:
                        p.requires_grad = True  # frozen by this part (peft's injection); an earlier part's
                    elif old is not p or (p.requires_grad and not trainable):  # this part owns it now
                        if key in owners:
                            raise conflict(owners[key], where, "both take the parameter as their own")
                        owners[key] = part

    return Method(ComposedConfig, attach, any(m.trains_backbone for m in methods), __name__, parts)


def _slots(model: nn.Module) -> dict[tuple[int, str], tuple[str, nn.Parameter]]:
    """(id of module, parameter name) -> (dotted path, parameter) for every parameter slot of `model`."""
    return {(id(m), n): (f"{path}.{n}" if path else n, p) for path, m in model.named_modules()
            for n, p in m._parameters.items() if p is not None}
