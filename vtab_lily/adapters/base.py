"""Shared machinery of all methods: wrappers that add branches to a backbone's modules, and the
method registry.

A method never replaces a library module's forward: it wraps the module (`Adapted`), so timm's fused
attention, its keyword arguments and future signature changes keep working.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from backbones import ConvSite, HookSite, LinearSite, OutputSite, ParallelSite, StreamSite, adapter_sites, family

from ..data import IMAGENET_MEAN, IMAGENET_STD
from ..errors import UnknownName, UserError
from ..options import OptionError, check_fields


class SiteConflict(UserError, ValueError):
    """Two methods (or two targets of one method) adapt one module in ways that cannot combine."""


_ATTACHING: list[tuple[str, nn.Module]] = []  # (method, model) being attached, innermost last


@contextmanager
def attaching(name: str, model: nn.Module):
    """Within the block, branches added to `model` belong to method `name` (named in conflicts)."""
    _ATTACHING.append((name, model))
    try:
        yield
    finally:
        _ATTACHING.pop()


def current_method() -> str | None:
    return _ATTACHING[-1][0] if _ATTACHING else None


def module_path(module: nn.Module, attr: str | None = None) -> str:
    """`module`'s dotted path in the model being attached (its `attr` child with `attr`)."""
    model = _ATTACHING[-1][1] if _ATTACHING else None
    path = next((n for n, m in model.named_modules() if m is module), None) if model is not None else None
    return ".".join(p for p in (path, attr) if p) or type(module).__name__


def conflict(owner: str | None, where: str, why: str) -> SiteConflict:
    """One line naming the method that adapted `where` first, the one adapting it now, and why they clash."""
    first, now = owner or "a method", current_method() or "a method"
    who = f"{now}'s targets" if first == now else f"methods {first} and {now}"
    return SiteConflict(f"{who} both adapt {where}: {why}; give one of them other targets")


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
    `serial=True` of the base's own output) to a slice of the base output's features (dim -1; dim 1 for a
    channel-first conv). Branches on identical slices are summed in the order they were added (two methods
    on one site); slices that partly overlap are refused. `enabled = False` makes it compute as the plain
    base module."""

    def __init__(self, base: nn.Module, tap: Tap | None = None, serial: bool = False, dim: int = -1):
        super().__init__()
        self.base = base
        self.branches = nn.ModuleList()
        self.slices: list[slice] = []
        self.owners: list[str | None] = []  # the method that added each branch
        self.enabled = True
        self.serial = serial
        self.dim = dim
        object.__setattr__(self, "tap", tap)  # lives in the model tree at the read site, not here

    def overlap(self, out: slice) -> tuple[slice, str | None] | None:
        """The (slice, owner) of a branch whose slice partly overlaps `out`, if any."""
        for s, owner in zip(self.slices, self.owners):
            if out != s and out.start < s.stop and s.start < out.stop:
                return s, owner
        return None

    def add(self, branch: nn.Module, out: slice, owner: str | None = None) -> None:
        """Add a branch writing to output columns `out`; branches stay sorted by their slice, a branch on
        an identical slice after the ones already there."""
        clash = self.overlap(out)
        if clash is not None:
            raise ValueError(f"adapter output slices overlap: {clash[0]} and {out}")
        at = sum(s.start <= out.start for s in self.slices)
        self.branches.insert(at, branch)
        self.slices.insert(at, out)
        self.owners.insert(at, owner)

    def forward(self, x, *args, **kwargs):
        y = self.base(x, *args, **kwargs)
        src = self.tap.pop() if self.tap is not None else y if self.serial else x
        if not self.enabled:
            return y
        pieces, pos, d = [], 0, self.dim
        for out, branch in zip(self.slices, self.branches):
            if out.start < pos:  # the same slice as the previous branch: sum
                pieces[-1] = pieces[-1] + branch(src)
                continue
            if out.start > pos:
                pieces.append(y.narrow(d, pos, out.start - pos))
            pieces.append(y.narrow(d, out.start, out.stop - out.start) + branch(src))
            pos = out.stop
        if pos < y.shape[d]:
            pieces.append(y.narrow(d, pos, y.shape[d] - pos))
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=d)


def _wrapped(parent: nn.Module, attr: str, kind: type, **kw) -> nn.Module:
    module = getattr(parent, attr)
    if not isinstance(module, kind):
        module = kind(module, **kw)
        setattr(parent, attr, module)
    return module


def _tap(parent: nn.Module, attr: str) -> Tap:
    """The Tap on parent.<attr> (inside a serial wrapper another method put there later), made on first use."""
    module = getattr(parent, attr)
    while isinstance(module, Adapted):
        module = module.base
    return module if isinstance(module, Tap) else _wrapped(parent, attr, Tap)


def _add(parent: nn.Module, attr: str, branch: nn.Module, out: slice, serial: bool = False,
         tap: Tap | None = None, dim: int = -1) -> None:
    """Add `branch` to the Adapted wrapper of parent.<attr> (made on first use); a SiteConflict when the
    branches already there read another source (serial vs parallel, another Tap) or write partly
    overlapping columns."""
    wrapper = _wrapped(parent, attr, Adapted, serial=serial, tap=tap, dim=dim)
    if wrapper.serial != serial:
        kinds = {True: "a serial branch (reads its output)", False: "a parallel branch (reads its input)"}
        raise conflict(wrapper.owners[0], module_path(parent, attr), f"{kinds[wrapper.serial]} and "
                       f"{kinds[serial]}: serial and parallel branches cannot share a module")
    if wrapper.tap is not tap:
        raise conflict(wrapper.owners[0], module_path(parent, attr), "their branches read different modules' "
                       "inputs, and one wrapper has one source")
    clash = wrapper.overlap(out)
    if clash is not None:
        s, owner = clash
        raise conflict(owner, module_path(parent, attr), f"adapter output slices overlap ({s.start}:{s.stop} and "
                       f"{out.start}:{out.stop}; identical or disjoint slices combine)")
    wrapper.add(branch, out, current_method())


def site_module(site: LinearSite | ConvSite) -> nn.Module:
    """The backbone module a site names, under the wrappers methods may have added to it (its frozen weight)."""
    module = getattr(site.parent, site.attr)
    while isinstance(module, (Adapted, Tap)):
        module = module.base
    return module


def add_branch(site: LinearSite | ParallelSite | ConvSite, branch: nn.Module) -> None:
    """Attach `branch` at `site`: its output is added to the site's output (slice; a conv's channels)."""
    if isinstance(site, LinearSite):
        _add(site.parent, site.attr, branch, site.out)
    elif isinstance(site, ConvSite):
        _add(site.parent, site.attr, branch, slice(0, site.d_out), dim=1)
    elif site.read_attr == site.write_attr:
        _add(site.parent, site.write_attr, branch, slice(0, site.d_out))
    else:
        _add(site.parent, site.write_attr, branch, slice(0, site.d_out), tap=_tap(site.parent, site.read_attr))


def add_serial(site: LinearSite | OutputSite, branch: nn.Module) -> None:
    """Attach `branch` after the site's module: it reads the module's whole output and its result is added
    to the site's columns of that output (y -> y + branch(y) for an OutputSite)."""
    out = site.out if isinstance(site, LinearSite) else slice(0, site.d_out)
    _add(site.parent, site.attr, branch, out, serial=True)


class StreamBranch(nn.Module):
    """A serial branch on a block's branch output a that also reads the stream x entering the branch (from a
    Tap): it returns f(x + a), so the stream x + a becomes x + a + f(x + a) (a StreamSite)."""

    def __init__(self, f: nn.Module, tap: Tap):
        super().__init__()
        self.f = f
        object.__setattr__(self, "tap", tap)  # lives in the model tree at the read site

    def forward(self, a):
        return self.f(self.tap.pop() + a)


def add_stream(site: StreamSite, branch: nn.Module) -> None:
    """Attach `branch` on the residual stream `site`: the stream s becomes s + branch(s)."""
    _add(site.parent, site.write_attr, StreamBranch(branch, _tap(site.parent, site.read_attr)), slice(0, site.d),
         serial=True)


def set_hook(site: HookSite, module: nn.Module) -> None:
    """Install `module` as the backbone's hook at `site`; a hook holds one module, so a second method asking
    for the same hook is refused (UserError)."""
    taken = getattr(site.parent, site.attr)
    if taken is not None:
        raise UserError(f"the backbone's {site.attr} hook already holds {type(taken).__name__}: two methods cannot "
                        "both set it; compose methods that use different sites")
    setattr(site.parent, site.attr, module)


class NeedsTrainingData(UserError, ValueError):
    """A method with a pre-pass on the training split was built without the split."""


@dataclass(frozen=True)
class TrainingData:
    """The training split for a method's pre-pass at attach time (SCT's salient channels, GPS's gradient
    selection). `batches(batch_size, shuffle)` iterates (x, y) over the whole split once: x float (B, 3, H, W)
    in [0, 1] at the run's image size (no augmentation; `inputs(x)` normalises it as training does), y int64
    labels; with `shuffle`, the order follows `seed` (so does any other randomness of a pre-pass); `device`:
    where the batches are (a pre-pass runs the model there, `TrainingData.on`)."""

    batches: Callable[[int, bool], Any]
    seed: int = 0
    device: str = "cpu"
    normalize: bool = False

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        """x in [0, 1] as the model reads it in training (ImageNet-normalised when the run normalises)."""
        if not self.normalize:
            return x
        mean, std = (torch.tensor(v, device=x.device, dtype=x.dtype).view(1, 3, 1, 1) for v in (IMAGENET_MEAN,
                                                                                               IMAGENET_STD))
        return (x - mean) / std

    @contextmanager
    def on(self, model: nn.Module, train: bool = False):
        """Within the block the model (in eval mode, or train mode with `train`) is on the batches' device; then
        back as it was."""
        device, training = next(model.parameters()).device, model.training
        model.to(self.device).train(train)
        try:
            yield
        finally:
            model.to(device).train(training)


FROM_FILE = "from-file"  # load_model: the selection is read from the adapter file, no pre-pass
SELECTION = "selection"  # the buffer name of a pre-pass's selection: saved and loaded with the adapter
_DATA: list[TrainingData | str | None] = [None]


@contextmanager
def training_data(data: TrainingData | str | None):
    """Within the block, methods attaching read `data` (TrainingData, or FROM_FILE while load_model rebuilds)."""
    _DATA.append(data)
    try:
        yield
    finally:
        _DATA.pop()


def prepass_data(what: str) -> TrainingData | None:
    """The training split for the current method's pre-pass (`what` it selects, for the error); None while
    load_model rebuilds a saved model (the selection buffers are then loaded from the adapter file)."""
    data = _DATA[-1]
    if data == FROM_FILE:
        return None
    if data is None:
        raise NeedsTrainingData(f"{current_method() or 'this method'} selects {what} from the training split before "
                                "it trains: build it through `python -m vtab_lily.run` (or pass "
                                "data=TrainingData(...) to build_model)")
    return data


def record_prepass(model: nn.Module, summary: dict) -> None:
    """Keep a pre-pass's summary (what it selected: counts, a hash) on the model, for the run's record."""
    if not hasattr(model, "prepass"):
        model.prepass = {}
    model.prepass[current_method() or "method"] = summary


def adapted_modules(model: nn.Module) -> list[Switch]:
    """Every wrapper a method added (Adapted modules, VPT's prompted blocks)."""
    return [m for m in model.modules() if isinstance(m, Switch)]


@dataclass(frozen=True)
class Method:
    """A PEFT method: its config dataclass, the function that attaches it, whether the backbone's own
    weights train (full fine-tuning), and the module that defines it (its origin in run records).
    A composition (`a+b`, adapters/compose.py) names its methods in `parts`."""

    config: type
    attach: Callable[[nn.Module, Any], None]
    trains_backbone: bool = False
    module: str = __name__
    parts: tuple[str, ...] = ()


METHODS: dict[str, Method] = {}


def register(name: str, config: type, trains_backbone: bool = False):
    """Decorator: register `attach(model, cfg)` as method `name` with its config dataclass. The public
    way to add a method, inside the suite or in your own module (see README, "Add your method")."""
    def wrap(attach):
        if "+" in name:
            raise UserError(f"method name {name!r} contains '+', which joins methods into a composition "
                            "(--method a+b); register it under a name without '+'")
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
    which registers it) or the name of an entry point in the group `vtab_lily.methods`; `a+b` composes
    them (adapters/compose.py)."""
    if "+" in name:
        from .compose import composition
        return composition(name)
    if name not in METHODS:
        from .plugins import resolve
        METHODS[name] = resolve(name)
    return METHODS[name]


def make_config(method: str, options: dict[str, Any], backbone: str | None = None):
    """The method's config from keyword options; unknown methods or options raise one clear error.
    With a backbone, options left None take the defaults of its family (config.FAMILY_DEFAULTS).
    A composition's options are prefixed by their method (`lora.r`; adapters/compose.py)."""
    if "+" in method:
        from .compose import composed_config
        return composed_config(method, options, backbone)
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


def option_names(method: str) -> list[str]:
    """The options `method` takes: its config's fields; a composition's as `<method>.<field>`."""
    spec = get_method(method)
    if spec.parts:
        return [f"{part}.{name}" for part in spec.parts for name in option_names(part)]
    return [f.name for f in dataclasses.fields(spec.config)]


def config_dict(cfg) -> dict[str, Any]:
    """A method's config as the options that rebuild it (build_model(**options)), for records and adapter
    files: the config's fields; a composition's flat, as `<method>.<field>`."""
    from .compose import ComposedConfig
    return cfg.options() if isinstance(cfg, ComposedConfig) else dataclasses.asdict(cfg)


def split_targets(targets):
    """'q+v+mlp' -> ('q', 'v', 'mlp'); tuples and lists pass through as tuples; None stays None."""
    if targets is None:
        return None
    if isinstance(targets, str):
        return tuple(targets.split("+"))
    if isinstance(targets, (list, tuple)) and all(isinstance(t, str) for t in targets):
        return tuple(targets)
    raise OptionError(f"targets must be site names joined by '+' (e.g. q+v), got {targets!r}")


def split_names(value, known, what: str) -> tuple[str, ...]:
    """`value` as distinct '+'-joined names among `known` (an OptionError naming `what` otherwise)."""
    names = split_targets(value)
    if sorted(set(names) - set(known)) or len(set(names)) < len(names):
        raise OptionError(f"{what} must be distinct names among {list(known)} joined by '+', got {'+'.join(names)!r}")
    return names


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
