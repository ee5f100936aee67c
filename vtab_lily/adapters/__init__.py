"""PEFT methods: one module per method, all registered in METHODS (name -> config + attach)."""
from . import adapter, adaptformer, bilora, bitfit, fact, fourierft, full, lily, lora, mora, ssf, vpt  # noqa: F401
from .base import METHODS, Adapted, adapted_modules, make_config

__all__ = ["METHODS", "Adapted", "adapted_modules", "make_config"]
