"""Weights files: the shipped mini backbones, and reading a pickled checkpoint without running it.

The mini backbones' weights (pretrained by `python -m backbones.pretrain`) ship with the repository; each
file's SHA-256 is recorded here, and a file that is missing or differs is refused (never silently used),
with a one-line message saying how to restore or rebuild it.

A `.pth` / `.pt` file is a pickle: unpickled freely, it can run any code. Every such file the suite reads
(a user's `--weights`, a run's resumable state) goes through `torch_file`: `torch.load(weights_only=True)`,
which builds tensors and plain containers only, plus an explicit allow-list of the few classes that
official checkpoints hold (CHECKPOINT_GLOBALS). A file that needs anything else is refused, naming it.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import pickle
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import torch

from .errors import UserError
from .hub import hub_access

T = TypeVar("T")

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
SHIPPED = {  # backbone -> SHA-256 of backbones/weights/<backbone>.safetensors
    "vit-mini": "8e5f4fba6c9935d3080b07fe13d8bea5449b0fea48b41b505b03fbe35a954134",
    "vim-mini": "6d04de2ac7e13e170626aba747b4f1beed143e860a6e981124455c896a1ffa8c",
}


class WeightsError(UserError, RuntimeError):
    """Pretrained weights could not be loaded; the message says what to bring and how to pass it."""


def from_hub(what: str, fetch: Callable[[], T], accepted: str = "") -> T:
    """`fetch()` (a Hugging Face hub download of `what`) under hub_access, so it fails in seconds offline;
    any failure is one WeightsError that says why and how to pass a local file instead."""
    with hub_access() as offline:
        try:
            return fetch()
        except Exception as e:  # network, hub or cache failures all end here
            why = f"{offline}, and it is not in the local hub cache" if offline else f"{type(e).__name__}: {e}"
            raise WeightsError(f"could not fetch {what} from the Hugging Face hub ({why}). Offline, download it on "
                               f"a connected machine and pass it with --weights PATH (Python: weights=PATH){accepted}"
                               ) from e


# What official training checkpoints hold beyond tensors and plain containers: hustvl/Vim `vim/main.py`
# (commit dd0358a, lines 496-503) saves {'model', 'optimizer', 'lr_scheduler', 'epoch', 'model_ema', 'scaler',
# 'args'}, where `args` is the script's argparse.Namespace of plain values (and 'scaler' a dict or the
# string 'none'); timm's CheckpointSaver (timm/utils/checkpoint_saver.py, 1.0.31, line 108) stores `args` the same way.
CHECKPOINT_GLOBALS = (argparse.Namespace,)


class UnsafeCheckpoint(WeightsError):
    """A pickled file needs a global outside the allow-list to load: it could run code, so it is not loaded."""


def _global_name(g) -> str:
    return f"{g.__module__}.{g.__qualname__}"


@contextmanager
def torch_file(path: str | os.PathLike, allowed=CHECKPOINT_GLOBALS):
    """Around a `torch.load(path, weights_only=True)` (ours or timm's): `allowed` globals may be built; a file
    that needs another one raises UnsafeCheckpoint naming the file and what it asked for."""
    try:
        with torch.serialization.safe_globals(list(allowed)):
            yield
    except (pickle.UnpicklingError, RuntimeError) as e:  # timm rewraps torch's UnpicklingError as RuntimeError
        allow = {_global_name(g) for g in allowed}
        try:
            refused = [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(path) if g not in allow]
        except Exception:  # not even a readable archive: the original error says what is wrong
            raise e from None
        if not refused:
            raise
        raise UnsafeCheckpoint(f"refused to load {path}: unpickling it would call {', '.join(refused)} (allowed "
                               f"beyond tensors and plain values: {', '.join(sorted(allow)) or 'nothing'}), which "
                               "can run code; a weights file needs none of that, so get the file from its official "
                               "source (or convert it to .safetensors where you trust it)") from None


def load_torch_file(path: str | os.PathLike, allowed=CHECKPOINT_GLOBALS):
    """torch.load a file as data, never as code (see torch_file)."""
    with torch_file(path, allowed):
        return torch.load(path, map_location="cpu", weights_only=True)


def sha256(path: str | os.PathLike) -> str:
    """The SHA-256 (hex) of a file's bytes, read in 4 MiB blocks: the one file hash of the suite (weights,
    split lists, method modules)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


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
