"""Weights that ship with the repository: the mini backbones, pretrained by `python -m backbones.pretrain`.

Each file's SHA-256 is recorded here; a file that is missing or differs is refused (never silently used),
with a one-line message saying how to restore or rebuild it.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from .errors import UserError

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
SHIPPED = {  # backbone -> SHA-256 of backbones/weights/<backbone>.safetensors
    "vit-mini": "8e5f4fba6c9935d3080b07fe13d8bea5449b0fea48b41b505b03fbe35a954134",
    "vim-mini": "6d04de2ac7e13e170626aba747b4f1beed143e860a6e981124455c896a1ffa8c",
}


class WeightsError(UserError, RuntimeError):
    """Pretrained weights could not be loaded; the message says what to bring and how to pass it."""


def sha256(path: str | os.PathLike) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def shipped_path(name: str) -> Path:
    return WEIGHTS_DIR / f"{name}.safetensors"


def shipped_weights(name: str) -> Path:
    """The verified path of a backbone's shipped weights."""
    path = shipped_path(name)
    fix = (f"restore it with `git checkout -- backbones/weights/{path.name}` or rebuild it with "
           f"`python -m backbones.pretrain --backbone {name}`")
    if not path.is_file():
        raise WeightsError(f"the shipped weights of {name!r} are missing ({path}); {fix}")
    digest = sha256(path)
    if digest != SHIPPED[name]:
        raise WeightsError(f"the shipped weights of {name!r} are damaged ({path}: SHA-256 {digest[:12]}..., "
                           f"expected {SHIPPED[name][:12]}...); {fix}")
    return path
