"""What a method module imports: the wrappers that add branches at a backbone's sites (wrappers.py),
the Method record and shared target options (method.py), the registry (registry.py) and config building
(config.py), in one place. Nothing is defined here."""
from .config import config_dict, make_config, option_names
from .method import Method, TargetedConfig, split_names, split_targets
from .registry import METHODS, get_method, merges, register
from .wrappers import (
    Adapted,
    SiteConflict,
    Switch,
    Tap,
    adapted_modules,
    add_branch,
    add_serial,
    attach_each,
    attaching,
    conflict,
    current_method,
    fold_linear,
    module_path,
    set_hook,
    site_module,
    unwrapped,
)

__all__ = ["METHODS", "Adapted", "Method", "SiteConflict", "Switch", "Tap", "TargetedConfig", "adapted_modules",
           "add_branch", "add_serial", "attach_each", "attaching", "conflict", "config_dict", "current_method",
           "fold_linear", "get_method", "make_config", "merges", "module_path", "option_names", "register",
           "set_hook", "site_module", "split_names", "split_targets", "unwrapped"]
