"""Where a method's code comes from, for run records: None for the suite's own methods, else the module
and its installed version or its file's SHA-256. (Methods from outside the suite are found by the
registry, adapters/registry.py.)
"""
from __future__ import annotations

import functools
import importlib.metadata
import sys
from pathlib import Path

from backbones.weights import sha256

from .registry import get_method


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
    return {"module": module, "sha256": sha256(path) if path else None}


def _installed_version(module: str, path: str | None) -> str | None:
    for dist in importlib.metadata.packages_distributions().get(module.split(".")[0], []):
        files = importlib.metadata.distribution(dist).files or []
        if path is None or any(Path(f.locate()).resolve() == Path(path).resolve() for f in files):
            return importlib.metadata.version(dist)
    return None


def method_origin(name: str) -> dict | None:
    """The origin of method `name` (None for the suite's own); a composition's is {part: origin} of its
    parts from outside the suite."""
    method = get_method(name)
    if not method.parts:
        return origin(method.module)
    return {part: found for part in method.parts if (found := method_origin(part))} or None
