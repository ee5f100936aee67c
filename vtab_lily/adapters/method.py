"""What a method is (`Method`: a config dataclass and an attach function) and the target options that
methods share. The registry (registry.py), compositions (compose.py) and peft's tuners (peft_tuners.py)
all make `Method`s; nothing here imports them.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from ..options import OptionError, option


@dataclass(frozen=True)
class Method:
    """A PEFT method: its config dataclass, the function that attaches it, whether the backbone's own
    weights train (full fine-tuning), and the module that defines it (its origin in run records).
    A composition (`a+b`, adapters/compose.py) names its methods in `parts`. `merge(model)`, for the methods
    whose papers fold them into the backbone for inference (registered with `merges`): folds the method's
    trained tensors into the frozen weights in place, so the model computes the same outputs with the plain
    backbone's modules; None for the others."""

    config: type
    attach: Callable[[nn.Module, Any], None]
    trains_backbone: bool = False
    module: str = __name__
    parts: tuple[str, ...] = ()
    merge: Callable[[nn.Module], Any] | None = None


def split_targets(targets):
    """'q+v+mlp' -> ('q', 'v', 'mlp'); tuples and lists pass through as tuples; None stays None."""
    if targets is None:
        return None
    if isinstance(targets, str):
        return tuple(targets.split("+"))
    if isinstance(targets, (list, tuple)) and all(isinstance(t, str) for t in targets):
        return tuple(targets)
    raise OptionError(f"targets must be site names joined by '+' (e.g. q+v), got {targets!r}")


def split_names(value, known, what: str) -> tuple[str, ...]:
    """`value` as distinct '+'-joined names among `known` (an OptionError naming `what` otherwise)."""
    names = split_targets(value)
    if sorted(set(names) - set(known)) or len(set(names)) < len(names):
        raise OptionError(f"{what} must be distinct names among {list(known)} joined by '+', got {'+'.join(names)!r}")
    return names


@dataclass
class TargetedConfig:
    """Base of the per-target methods: `targets` default to q, v on ViT and in_proj on Vim."""

    targets: tuple[str, ...] | None = option(None, "adapted sites joined by '+'")
    FAMILY_DEFAULTS: ClassVar[dict] = {"vit": {"targets": ("q", "v")}, "vim": {"targets": ("in_proj",)}}

    def __post_init__(self):
        self.targets = split_targets(self.targets)
