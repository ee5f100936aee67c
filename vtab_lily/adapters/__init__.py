"""PEFT methods: one module per method, all registered in METHODS (name -> config + attach).

The public API to add a method: a config dataclass and an attach function on sites, registered with
`register` (see README, "Add your method"); `get_method` also finds `peft:<tuner>`, `<module>:<name>`
and entry points of the group `vtab_lily.methods`, and compositions `a+b` (adapters/registry.py).
"""
from . import (  # noqa: F401
    adapter,
    adapterplus,
    adaptformer,
    addscan,
    affix,
    bilora,
    bitfit,
    convpass,
    dtl,
    fact,
    fourierft,
    full,
    gps,
    hydra,
    lily,
    lntune,
    lora,
    lorap,
    mora,
    partial,
    prompt,
    repadapter,
    sct,
    ssf,
    vpt,
)
from .base import (
    METHODS,
    Adapted,
    Method,
    SiteConflict,
    TargetedConfig,
    adapted_modules,
    add_branch,
    attach_each,
    get_method,
    make_config,
    option_names,
    register,
    set_hook,
    split_targets,
)
from .plugins import origin

__all__ = ["METHODS", "Adapted", "Method", "SiteConflict", "TargetedConfig", "add_branch", "adapted_modules",
           "attach_each", "get_method", "make_config", "option_names", "origin", "register", "set_hook",
           "split_targets"]
