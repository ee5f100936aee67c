"""The two reference points: full fine-tuning (every weight trains) and linear probing (head only)."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .base import register


@dataclass
class FullConfig:
    pass


@dataclass
class LinearConfig:
    pass


@register("fft", FullConfig, trains_backbone=True)
def attach_full(model: nn.Module, cfg: FullConfig) -> None:
    """Nothing to attach: build_model leaves every parameter trainable."""


@register("linear", LinearConfig)
def attach_linear(model: nn.Module, cfg: LinearConfig) -> None:
    """Nothing to attach: build_model freezes everything but the head."""
