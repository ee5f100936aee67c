"""Shared machinery of all methods: wrappers that add branches to a backbone's modules, and the
method registry.

A method never replaces a library module's forward: it wraps the module (`Adapted`), so timm's fused
attention, its keyword arguments and future signature changes keep working.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from backbones import HookSite, LinearSite, OutputSite, ParallelSite, adapter_sites, family

from ..errors import UnknownName, UserError
from ..options import OptionError, check_fields


class Switch:
    """A wrapper that computes as the plain backbone while `enabled` is False (see disable_adapters)."""

    enabled: bool = True


class Tap(nn.Module):
    """Wraps a module and keeps its last input for a parallel branch that writes elsewhere."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.last: torch.Tensor | None = None

    def forward(self, x, *args, **kwargs):
        self.last = x
        return self.base(x, *args, **kwargs)

    def pop(self) -> torch.Tensor:
        x, self.last = self.last, None
        if x is None:
            raise RuntimeError("a parallel adapter branch ran before the module it reads from")
        return x


class Adapted(Switch, nn.Module):
    """Wraps `base`; adds each branch's output (a function of the input, or of a Tap's input, or with
    `serial=True` of the base's own output) to a slice of the base output. `enabled = False` makes it
    compute as the plain base module."""

    def __init__(self, base: nn.Module, tap: Tap | None = None, serial: bool = False):
        super().__init__()
        self.base = base
        self.branches = nn.ModuleList()
        self.slices: list[slice] = []
        self.enabled = True
        self.serial = serial
        object.__setattr__(self, "tap", tap)  # lives in the model tree at the read site, not here

    def add(self, branch: nn.Module, out: slice) -> None:
        """Add a branch writing to output columns `out`; branches stay sorted by their slice."""
        for s in self.slices:
            if out.start < s.stop and s.start < out.stop:
                raise ValueError(f"adapter output slices overlap: {s} and {out}")
        at = sum(s.start < out.start for s in self.slices)
        self.branches.insert(at, branch)
        self.slices.insert(at, out)

    def forward(self, x, *args, **kwargs):
        y = self.base(x, *args, **kwargs)
        src = self.tap.pop() if self.tap is not None else y if self.serial else x
        if not self.enabled:
            return y
        pieces, pos = [], 0
        for out, branch in zip(self.slices, self.branches):
            if out.start > pos:
                pieces.append(y[..., pos:out.start])
            pieces.append(y[..., out] + branch(src))
            pos = out.stop
        if pos < y.shape[-1]:
            pieces.append(y[..., pos:])
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=-1)


def _wrapped(parent: nn.Module, attr: str, kind: type, **kw) -> nn.Module:
    module = getattr(parent, attr)
    if not isinstance(module, kind):
        module = kind(module, **kw)
        setattr(parent, attr, module)
    return module


def _adapted(parent: nn.Module, attr: str, serial: bool = False, **kw) -> Adapted:
    wrapper = _wrapped(parent, attr, Adapted, serial=serial, **kw)
    if wrapper.serial != serial:
        raise ValueError(f"{attr} already carries branches that read its {'output' if wrapper.serial else 'input'}; "
                         "serial and parallel branches cannot share a module")
    return wrapper


def add_branch(site: LinearSite | ParallelSite, branch: nn.Module) -> None:
    """Attach `branch` at `site`: its output is added to the site's output (slice)."""
    if isinstance(site, LinearSite):
        _adapted(site.parent, site.attr).add(branch, site.out)
    elif site.read_attr == site.write_attr:
        _adapted(site.parent, site.write_attr).add(branch, slice(0, site.d_out))
    else:
        tap = _wrapped(site.parent, site.read_attr, Tap)
        _adapted(site.parent, site.write_attr, tap=tap).add(branch, slice(0, site.d_out))


def add_serial(site: LinearSite | OutputSite, branch: nn.Module) -> None:
    """Attach `branch` after the site's module: it reads the module's whole output and its result is added
    to the site's columns of that output (y -> y + branch(y) for an OutputSite)."""
    out = site.out if isinstance(site, LinearSite) else slice(0, site.d_out)
    _adapted(site.parent, site.attr, serial=True).add(branch, out)


def set_hook(site: HookSite, module: nn.Module) -> None:
    """Install `module` as the backbone's hook at `site`; a hook holds one module, so a second method asking
    for the same hook is refused (UserError)."""
    taken = getattr(site.parent, site.attr)
    if taken is not None:
        raise UserError(f"the backbone's {site.attr} hook already holds {type(taken).__name__}: two methods cannot "
                        "both set it; compose methods that use different sites")
    setattr(site.parent, site.attr, module)


def adapted_modules(model: nn.Module) -> list[Switch]:
    """Every wrapper a method added (Adapted modules, VPT's prompted blocks)."""
    return [m for m in model.modules() if isinstance(m, Switch)]


@dataclass(frozen=True)
class Method:
    """A PEFT method: its config dataclass, the function that attaches it, whether the backbone's own
    weights train (full fine-tuning), and the module that defines it (its origin in run records)."""

    config: type
    attach: Callable[[nn.Module, Any], None]
    trains_backbone: bool = False
    module: str = __name__


METHODS: dict[str, Method] = {}


def register(name: str, config: type, trains_backbone: bool = False):
    """Decorator: register `attach(model, cfg)` as method `name` with its config dataclass. The public
    way to add a method, inside the suite or in your own module (see README, "Add your method")."""
    def wrap(attach):
        known = METHODS.get(name)
        if known is not None and known.module != attach.__module__:
            raise UserError(f"method name {name!r} is already taken by {known.module}; register yours under "
                            "another name")
        METHODS[name] = Method(config, guarded(name, attach), trains_backbone, attach.__module__)
        return attach
    return wrap


def guarded(name: str, attach: Callable) -> Callable:
    """`attach` with a SystemExit (a method's `sys.exit()`) turned into a RuntimeError that names the method
    and keeps the traceback: a method may not end the runner silently with its own exit code."""
    @functools.wraps(attach)
    def call(model, cfg):
        try:
            return attach(model, cfg)
        except SystemExit as e:
            raise RuntimeError(f"method {name!r} ({attach.__module__}) called sys.exit({e.code!r}) while "
                               "attaching; a method must raise an exception instead") from e
    return call


def get_method(name: str) -> Method:
    """The method called `name`: a registered one, `peft:<tuner>`, `<module>:<name>` (imports the module,
    which registers it) or the name of an entry point in the group `vtab_lily.methods`."""
    if name not in METHODS:
        from .plugins import resolve
        METHODS[name] = resolve(name)
    return METHODS[name]


def make_config(method: str, options: dict[str, Any], backbone: str | None = None):
    """The method's config from keyword options; unknown methods or options raise one clear error.
    With a backbone, options left None take the defaults of its family (config.FAMILY_DEFAULTS)."""
    cls = get_method(method).config
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise UnknownName(f"unknown option(s) {unknown} for method {method!r}; valid options: {valid}")
    cfg = cls(**options)
    check_fields(cfg, f"{method} ", first=options)
    defaults = getattr(cls, "FAMILY_DEFAULTS", {}).get(family(backbone)) if backbone else None
    for key, value in (defaults or {}).items():
        if getattr(cfg, key) is None:
            setattr(cfg, key, value)
    if hasattr(cfg, "__post_init__"):
        cfg.__post_init__()
    return cfg


def split_targets(targets):
    """'q+v+mlp' -> ('q', 'v', 'mlp'); tuples and lists pass through as tuples; None stays None."""
    if targets is None:
        return None
    if isinstance(targets, str):
        return tuple(targets.split("+"))
    if isinstance(targets, (list, tuple)) and all(isinstance(t, str) for t in targets):
        return tuple(targets)
    raise OptionError(f"targets must be site names joined by '+' (e.g. q+v), got {targets!r}")


@dataclass
class TargetedConfig:
    """Base of the per-target methods: `targets` default to q, v on ViT and in_proj on Vim."""

    targets: tuple[str, ...] | None = None
    FAMILY_DEFAULTS: ClassVar[dict] = {"vit": {"targets": ("q", "v")}, "vim": {"targets": ("in_proj",)}}

    def __post_init__(self):
        self.targets = split_targets(self.targets)


def attach_each(model: nn.Module, targets, make_branch: Callable[[LinearSite | ParallelSite], nn.Module]) -> None:
    """One branch per layer and target, made from its site."""
    for layer in adapter_sites(model):
        for t in targets:
            site = layer.get(t)
            add_branch(site, make_branch(site))
