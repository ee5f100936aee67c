"""Wrappers that add a method's branches to a backbone's modules, at the sites the backbone names.

A method never replaces a library module's forward: it wraps the module (`Adapted`), so timm's fused
attention, its keyword arguments and future signature changes keep working. Branches record the method
that added them (`attaching`), so two methods that clash on one module are named in one error.
"""
from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import torch
from torch import nn

from backbones import ConvSite, HookSite, LinearSite, OutputSite, ParallelSite, StreamSite, adapter_sites, model_sites

from ..errors import UnknownName, UserError


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


def unwrapped(module: nn.Module) -> nn.Module:
    """The backbone's own module under the wrappers (Adapted, Tap) methods may have put around it."""
    while isinstance(module, (Adapted, Tap)):
        module = module.base
    return module


def site_module(site: LinearSite | ConvSite) -> nn.Module:
    """The backbone module a site names, under the wrappers methods may have added to it (its frozen weight)."""
    return unwrapped(getattr(site.parent, site.attr))


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


def adapted_modules(model: nn.Module) -> list[Switch]:
    """Every wrapper a method added (Adapted modules, VPT's prompted blocks)."""
    return [m for m in model.modules() if isinstance(m, Switch)]


def attach_each(model: nn.Module, targets, make_branch: Callable[[LinearSite | ParallelSite], nn.Module]) -> None:
    """One branch per layer and target, made from its site."""
    for layer in adapter_sites(model):
        for t in targets:
            site = layer.get(t)
            add_branch(site, make_branch(site))


def fold_linear(model: nn.Module, kinds: tuple[type, ...]) -> int:
    """Fold every parallel branch of the given kinds into the nn.Linear it adapts and unwrap it, for branches
    that are linear maps without bias (LoRA, FacT): in eval mode the branch applied to the identity is its
    increment's transpose, so W[out] += branch(I).T. Only wrappers whose branches are all of `kinds` are folded
    (another method's branch on the same module keeps the wrapper). Returns how many modules were folded."""
    folded = 0
    for parent in list(model.modules()):
        for name, wrapper in list(parent.named_children()):
            if not (isinstance(wrapper, Adapted) and not wrapper.serial and wrapper.tap is None
                    and isinstance(wrapper.base, nn.Linear) and wrapper.branches
                    and all(isinstance(b, kinds) for b in wrapper.branches)):
                continue
            base, training = wrapper.base, wrapper.training
            wrapper.eval()
            with torch.no_grad():
                eye = torch.eye(base.in_features, dtype=base.weight.dtype, device=base.weight.device)
                for out, branch in zip(wrapper.slices, wrapper.branches):
                    base.weight[out] += branch(eye).t().to(base.weight.dtype)
            wrapper.train(training)
            setattr(parent, name, base)
            folded += 1
    return folded


def model_site(model: nn.Module, name: str, what: str, hint: str = ""):
    """The model-level site `name` (backbones.model_sites) the method being attached needs, or one UnknownName
    line naming the method, what the site is (`what`), a `hint` and the backbone."""
    site = model_sites(model).get(name)
    if site is None:
        raise UnknownName(f"{current_method() or 'this method'} needs {what} {name!r}{hint}; backbone "
                          f"{model.backbone_name!r} has none")
    return site
