"""PEFT methods: one module per method, all registered in METHODS (name -> config + attach)."""
from . import adaptformer, bilora, fourierft, full, lily, lora, mora  # noqa: F401  (registration)
from .base import METHODS, Adapted, adapted_modules, make_config

__all__ = ["METHODS", "Adapted", "adapted_modules", "make_config"]
