"""The method registry: names -> Methods.

A method name is one of
- a registered name (the built-in methods, and any method whose module was imported),
- `peft:<tuner>`: a HuggingFace peft tuner (adapters/peft_tuners.py),
- `<module>:<name>`: imports `module`, which registers `name` with `vtab_lily.adapters.register`,
- the name of an entry point in the group `vtab_lily.methods` whose value is the module that registers it
  (an installed package declares `[project.entry-points."vtab_lily.methods"] name = "my_pkg.my_module"`),
- `a+b`: a composition of any of these (adapters/compose.py).
The name the user gives is the name everywhere (records, paths, tables), so any process can resolve it.
`METHODS` holds what was registered and nothing else: resolving a name never adds to it, so a listing
of the methods is the same before and after a run.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.metadata
from collections.abc import Callable

from ..errors import UnknownName, UserError
from .compose import composition, parts_of
from .method import Method
from .peft_tuners import peft_method

ENTRY_POINTS = "vtab_lily.methods"

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


def merges(name: str):
    """Decorator: register `merge(model)` as the inference form of the registered method `name` (Method.merge)."""
    def wrap(merge):
        METHODS[name] = dataclasses.replace(METHODS[name], merge=merge)
        return merge
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
    """The method called `name` (see the module's docstring for the forms a name takes)."""
    if "+" in name:
        parts = parts_of(name)
        return composition(parts, [get_method(p) for p in parts])
    if name in METHODS:
        return METHODS[name]
    if name.startswith("peft:"):
        return peft_method(name.removeprefix("peft:"))
    if ":" in name:
        module, _, short = name.rpartition(":")
    else:
        found = importlib.metadata.entry_points(group=ENTRY_POINTS, name=name)
        if not found:
            builtin = sorted(n for n, m in METHODS.items() if m.module.startswith("vtab_lily."))
            raise UnknownName(f"unknown method {name!r}; choose one of {builtin}, peft:<tuner> (e.g. peft:lora), "
                              f"<module>:<name> (your own method) or an installed entry point "
                              f"{sorted(e.name for e in importlib.metadata.entry_points(group=ENTRY_POINTS))}")
        module, short = next(iter(found)).module, name
    import_plugin(module)
    method = METHODS.get(short)
    if method is None or method.module != module:
        own = sorted(n for n, m in METHODS.items() if m.module == module)
        raise UnknownName(f"module {module!r} does not register a method named {short!r} (it registers {own}); "
                          "decorate its attach function with @vtab_lily.adapters.register(name, Config)")
    return method


class PluginNotFound(UserError, ImportError):
    """A method module that cannot be found (a typo, or not on PYTHONPATH / not installed)."""


def import_plugin(module: str) -> None:
    """Import a method's module. A module that does not exist is one UserError line; a module that fails
    while it runs (a bug in it, or its own sys.exit()) is a RuntimeError naming it, with its traceback."""
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name is not None and (module == e.name or module.startswith(f"{e.name}.")):
            raise PluginNotFound(f"could not import method module {module!r}: ModuleNotFoundError: no module "
                                 f"named {e.name!r} (is it on PYTHONPATH or installed?)") from None
        raise PluginNotFound(f"method module {module!r} imports {e.name or e}, which is not installed") from e
    except UserError:
        raise
    except (Exception, SystemExit) as e:  # a bug in the plugin: its traceback is what its author needs
        what = f"called sys.exit({e.code!r})" if isinstance(e, SystemExit) else f"raised {type(e).__name__}: {e}"
        raise RuntimeError(f"method module {module!r} {what} while importing") from e
