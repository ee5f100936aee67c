"""What a method module imports: the wrappers that add branches at a backbone's sites (wrappers.py),
the Method record and shared target options (method.py), the registry (registry.py) and config building
(config.py) and a pre-pass's training data (prepass.py), in one place. Nothing is defined here."""
from .config import config_dict, make_config, option_names
from .method import Method, TargetedConfig, split_names, split_targets
from .prepass import (
    FROM_FILE,
    SELECTION,
    NeedsTrainingData,
    TrainingData,
    prepass_data,
    record_prepass,
    training_data,
)
from .registry import METHODS, get_method, merges, register
from .wrappers import (
    Adapted,
    SiteConflict,
    StreamBranch,
    Switch,
    Tap,
    adapted_modules,
    add_branch,
    add_serial,
    add_stream,
    attach_each,
    attaching,
    conflict,
    current_method,
    fold_linear,
    model_site,
    module_path,
    set_hook,
    site_module,
    unwrapped,
)

__all__ = ["FROM_FILE", "METHODS", "SELECTION", "Adapted", "Method", "NeedsTrainingData", "SiteConflict",
           "StreamBranch", "Switch", "Tap", "TargetedConfig", "TrainingData", "adapted_modules", "add_branch",
           "add_serial", "add_stream", "attach_each", "attaching", "conflict", "config_dict", "current_method",
           "fold_linear", "get_method", "make_config", "merges", "model_site", "module_path", "option_names",
           "prepass_data", "record_prepass", "register", "set_hook", "site_module", "split_names", "split_targets",
           "training_data", "unwrapped"]
