"""Building a method's config from options, and back: `make_config` (options -> checked config, family
defaults filled in), `config_dict` (config -> the options that rebuild it), `option_names`, and
`option_table` (each option's type, default per family, range or choices and help: `run --list-options`)."""
from __future__ import annotations

import dataclasses
from typing import Any

from backbones import BACKBONES, family

from ..errors import UnknownName
from ..options import check_fields, describe
from .compose import ComposedConfig, parts_of
from .registry import get_method


def make_config(method: str, options: dict[str, Any], backbone: str | None = None):
    """The method's config from keyword options; unknown methods or options raise one clear error.
    With a backbone, options that are still None after the config's own `__post_init__` take the defaults
    of its family (config.FAMILY_DEFAULTS); `__post_init__` runs once, on the options as given.
    A composition's options are prefixed by their method (`lora.r`; adapters/compose.py)."""
    if "+" in method:
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
    return cfg


def composed_config(name: str, options: dict[str, Any], backbone: str | None = None) -> ComposedConfig:
    """Each part's config from its `<part>.<field>` options (the longest matching part name wins, so
    `peft:lora.r` and `my.module:m.r` work), built and checked as the part alone."""
    parts = parts_of(name)
    own: dict[str, dict] = {p: {} for p in parts}
    for key, value in options.items():
        part = max((p for p in parts if key.startswith(f"{p}.")), key=len, default=None)
        if part is None:
            raise UnknownName(f"option {key!r} of the composition {name!r} needs its method's prefix; valid options "
                              f"are {option_names(name)}")
        own[part][key[len(part) + 1:]] = value
    return ComposedConfig({p: make_config(p, own[p], backbone) for p in parts})


def option_names(method: str) -> list[str]:
    """The options `method` takes: its config's fields; a composition's as `<method>.<field>`."""
    spec = get_method(method)
    if spec.parts:
        return [f"{part}.{name}" for part in spec.parts for name in option_names(part)]
    return [f.name for f in dataclasses.fields(spec.config)]


def config_dict(cfg) -> dict[str, Any]:
    """A method's config as the options that rebuild it (build_model(**options)), for records and adapter
    files: the config's fields; a composition's flat, as `<method>.<field>`."""
    return cfg.options() if isinstance(cfg, ComposedConfig) else dataclasses.asdict(cfg)


def families() -> tuple[str, ...]:
    """The backbone families, in the order the registry first names them ('vit', 'vim')."""
    return tuple(dict.fromkeys(spec.family for spec in BACKBONES.values()))


def option_table(method: str, backbone: str | None = None) -> list[dict]:
    """`method`'s options as options.describe gives them, each with `defaults`: {family: default} for every
    family (only the backbone's with `backbone`), or {None: default} where no family sets its own; a
    composition's options are prefixed by their method, as `--set` takes them."""
    spec = get_method(method)
    if spec.parts:
        return [{**row, "name": f"{part}.{row['name']}"} for part in spec.parts for row in option_table(part, backbone)]
    per_family = getattr(spec.config, "FAMILY_DEFAULTS", {})
    shown = (family(backbone),) if backbone else families()
    rows = describe(spec.config)
    for row in rows:
        if any(row["name"] in per_family.get(f, {}) for f in families()):
            row["defaults"] = {f: per_family.get(f, {}).get(row["name"], row["default"]) for f in shown}
        else:
            row["defaults"] = {None: row["default"]}
    return rows
