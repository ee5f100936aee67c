"""What --backbone, --method and --task accept, listed from the registries for the commands' --help."""
from __future__ import annotations

from backbones import BACKBONES

from .adapters import METHODS
from .tasks import ALIASES, TASKS


def choices_help(kind: str, prefix: str = "") -> str:
    """'<prefix>one of: a, b, ...' for kind 'backbone', 'method' or 'task' (tasks also name their aliases)."""
    names = {"backbone": lambda: sorted(BACKBONES), "method": lambda: sorted(METHODS), "task": lambda: list(TASKS)}
    text = f"{prefix}one of: {', '.join(names[kind]())}"
    if kind == "task":
        text += f" (community folder names also work: {', '.join(sorted(ALIASES))})"
    return text
