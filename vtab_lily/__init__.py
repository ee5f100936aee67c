"""vtab-lily: a VTAB-1K benchmark suite for parameter-efficient fine-tuning (Lily and baselines).

The public API lives in vtab_lily/model.py and is imported on first use, so that `vtab_lily.tasks`,
`.records` and `.tables` load without torch."""
from __future__ import annotations

import importlib

__all__ = ["adapter_config", "build_model", "count_params", "disable_adapters", "load_adapter", "load_model",
           "save_adapter", "storage_bytes"]


def __getattr__(name: str):
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(".model", __name__), name)
    globals()[name] = value
    return value
