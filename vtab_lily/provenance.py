"""Provenance: what a run's result depends on beyond its config, resolved before the run starts.

- weights: the SHA-256 of the backbone's weights file (a local `--weights` file, or the hub file of a
  pretrained backbone, fetched into the Hugging Face cache), or "random" with the seed that drew them;
- data: the SHA-256 of the split lists the run reads (which images, which labels) and, where the task was
  prepared by `prepare`, the manifest's format and tfds version;
- precision: what the run computes in ("fp32" on the CPU whatever the recipe asks).
Paths are recorded beside it but are not part of it: moving a file does not change a run's identity.
"""
from __future__ import annotations

import hashlib
import json
import os
from functools import lru_cache
from pathlib import Path

from backbones import WeightsError, pretrained_file
from backbones.weights import sha256

from .data import DataError, task_dir
from .tasks import get_task


@lru_cache(maxsize=64)
def _sha256(path: str, size: int, mtime_ns: int, inode: tuple[int, int]) -> str:
    return sha256(path)


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, memoised in this process while its path, size, mtime and inode are
    unchanged (a file rewritten in place changes its mtime; one replaced by another, its inode)."""
    st = os.stat(path)
    return _sha256(str(Path(path).resolve()), st.st_size, st.st_mtime_ns, (st.st_dev, st.st_ino))


def weights_provenance(backbone: str, weights: str | None, pretrained: bool, seed: int) -> tuple[dict, str | None]:
    """(provenance, local file to load or None). A hub backbone's file is fetched here, once."""
    if weights is not None:
        if not Path(weights).is_file():
            raise WeightsError(f"weights file {weights} does not exist; pass an existing .npz, .safetensors or "
                               ".pth with --weights")
        return {"source": "file", "sha256": file_sha256(weights)}, str(weights)
    hub = pretrained_file(backbone) if pretrained else None
    if hub is None:
        return {"source": "random", "seed": seed}, None
    path, origin = hub
    return {"source": "hub", "sha256": file_sha256(path), **origin}, path


def data_provenance(data_root: str | Path, task: str, splits: tuple[str, ...]) -> dict:
    """SHA-256 over the split lists (in order), and the manifest's source, dataset version, preparing
    library (tfds) version and format, if any."""
    folder = task_dir(data_root, get_task(task))
    h = hashlib.sha256()
    for split in splits:
        lst = folder / f"{split}.txt"
        if not lst.is_file():
            raise DataError(f"missing list file {lst}; prepare the task again (python -m vtab_lily.prepare "
                            f"--task {task} --root {data_root})")
        h.update(split.encode() + b"\0" + lst.read_bytes() + b"\0")
    out = {"lists_sha256": h.hexdigest()}
    manifest = folder / "manifest.json"
    if manifest.is_file():
        try:
            m = json.loads(manifest.read_text())
            out.update({k: m[k] for k in ("source", "version_used", "library", "format") if k in m})
        except (ValueError, AttributeError):
            raise DataError(f"damaged manifest {manifest}; prepare the task again") from None
    return out
