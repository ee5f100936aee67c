"""Methods from outside the suite: found by name, and where they came from.

A method name is one of
- a registered name (the built-in methods, and any method whose module was imported),
- `peft:<tuner>`: a HuggingFace peft tuner (adapters/peft_tuners.py),
- `<module>:<name>`: imports `module`, which registers `name` with `vtab_lily.adapters.register`,
- the name of an entry point in the group `vtab_lily.methods` whose value is the module that registers it
  (an installed package declares `[project.entry-points."vtab_lily.methods"] name = "my_pkg.my_module"`).
The name the user gives is the name everywhere (records, paths, tables), so any process can resolve it.
"""
from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.metadata
import sys
from pathlib import Path

from ..errors import UnknownName, UserError

ENTRY_POINTS = "vtab_lily.methods"


def resolve(name: str):
    """The Method called `name` (not yet registered): peft tuner, `<module>:<name>` or entry point."""
    from .base import METHODS
    if name.startswith("peft:"):
        from .peft_tuners import peft_method
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


def origin(module: str) -> dict | None:
    """Where a method's code comes from: None for the suite's own methods (the record's git sha covers
    them); else the module and the version of the installed distribution that holds its file, or, for a
    module that is not installed (or installed editable), the SHA-256 of its file (as first seen by this
    process, which runs the code it imported)."""
    found = _origin(module)
    return dict(found) if found else None


@functools.cache
def _origin(module: str) -> dict | None:
    if module.split(".")[0] == "vtab_lily":
        return None
    path = getattr(sys.modules.get(module), "__file__", None)
    version = _installed_version(module, path)
    if version is not None:
        return {"module": module, "version": version}
    return {"module": module, "sha256": hashlib.sha256(Path(path).read_bytes()).hexdigest() if path else None}


def _installed_version(module: str, path: str | None) -> str | None:
    for dist in importlib.metadata.packages_distributions().get(module.split(".")[0], []):
        files = importlib.metadata.distribution(dist).files or []
        if path is None or any(Path(f.locate()).resolve() == Path(path).resolve() for f in files):
            return importlib.metadata.version(dist)
    return None


def method_origin(name: str) -> dict | None:
    """The origin of method `name` (None for the suite's own); a composition's is {part: origin} of its
    parts from outside the suite."""
    from .base import get_method
    method = get_method(name)
    if not method.parts:
        return origin(method.module)
    return {part: found for part in method.parts if (found := method_origin(part))} or None


def origin_label(origin: dict | None) -> str:
    """'' for built-in methods, 'module version' or 'module sha256:<12 hex>' otherwise; a composition's
    parts' labels joined by ' + '."""
    if not origin:
        return ""
    if "module" not in origin:
        return " + ".join(origin_label(o) for o in origin.values())
    tag = origin.get("version") or f"sha256:{(origin.get('sha256') or '')[:12]}"
    return f"{origin['module']} {tag}"
