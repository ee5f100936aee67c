"""PEFT methods: one module per method, all registered in METHODS (name -> config + attach)."""
from . import adaptformer, full, lily, lora  # noqa: F401  (registration)
from .base import METHODS, Adapted, adapted_modules, make_config

__all__ = ["METHODS", "Adapted", "adapted_modules", "make_config"]
