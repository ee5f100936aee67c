"""vtab-lily: a VTAB-1K benchmark suite for parameter-efficient fine-tuning (Lily and baselines)."""
from .model import (
    adapter_config,
    build_model,
    count_params,
    disable_adapters,
    load_adapter,
    load_model,
    save_adapter,
    storage_bytes,
)

__all__ = ["adapter_config", "build_model", "count_params", "disable_adapters", "load_adapter", "load_model",
           "save_adapter", "storage_bytes"]
