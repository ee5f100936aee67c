"""Reading VTAB-1K folders (ours and the community's JPEG copies), the decode-once cache, loaders.

The first read of a split decodes and resizes every image once (PIL bicubic to 224 x 224, as the
official pipeline's Resize) into a uint8 array cached on disk and memory-mapped afterwards. The cache
is keyed by a checksum of the list file and every image file (memoised under their sizes and mtimes), the
size and the interpolation.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from .errors import UserError
from .fileio import atomic_path, remove_stale_temps, warn, write_json
from .recipes import INTERPOLATIONS
from .tasks import SPLITS, Task, get_task

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DataError(UserError, RuntimeError):
    """A VTAB-1K folder is missing or broken; the message names the file (and line) and what to do."""


def task_dir(root: str | Path, task: Task) -> Path:
    """<root>/<task name or a community alias>."""
    for name in (task.name, *task.aliases):
        if (Path(root) / name).is_dir():
            return Path(root) / name
    raise DataError(f"no folder for task {task.name!r} under {root}; prepare it with "
                    f"`python -m vtab_lily.prepare --task {task.name} --root {root}` (or pass --prepare)")


def read_list(folder: Path, split: str, num_classes: int) -> tuple[list[Path], np.ndarray]:
    """Parse <folder>/<split>.txt: image paths and labels, validated."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose one of {SPLITS}")
    list_file = folder / f"{split}.txt"
    if not list_file.is_file():
        raise DataError(f"missing list file {list_file}; prepare the task again")
    paths, labels = [], []
    for n, line in enumerate(list_file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise DataError(f"{list_file}:{n}: expected '<image path> <integer label>', got {line!r}")
        label = int(parts[1])
        if not 0 <= label < num_classes:
            raise DataError(f"{list_file}:{n}: label {label} outside 0..{num_classes - 1}")
        path = folder / parts[0]
        if not path.is_file():
            raise DataError(f"{list_file}:{n}: image {path} does not exist")
        paths.append(path)
        labels.append(label)
    if not paths:
        raise DataError(f"{list_file} lists no images")
    return paths, np.asarray(labels, dtype=np.int64)


def decode(path: Path, size: int, interpolation: str) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB").resize((size, size), INTERPOLATIONS[interpolation]))
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(f"corrupt image {path}: {e}; re-prepare the task or replace the file") from e


def _checksum(list_file: Path, paths: list[Path]) -> str:
    """blake2b of the list file and every image's bytes. Memoised in <task>/.cache/<split>.checksum under a
    signature of (path relative to the task folder, size, mtime) of each file, so an unchanged split is not
    read again, in place or in a copy that keeps mtimes. The memo is written only when it changes, and a
    memo that cannot be written (a read-only data root) costs a rehash, not the run."""
    folder = list_file.parent
    stats = [(os.path.relpath(p, folder), p.stat().st_size, p.stat().st_mtime_ns) for p in [list_file, *paths]]
    signature = hashlib.blake2b(json.dumps(stats).encode(), digest_size=16).hexdigest()
    memo = list_file.parent / ".cache" / f"{list_file.stem}.checksum"
    if memo.exists():
        try:
            known = json.loads(memo.read_text())
            if known["signature"] == signature:
                return str(known["checksum"])
        except (ValueError, KeyError, TypeError, OSError) as e:
            warn(f"{memo} is damaged ({type(e).__name__}: {e}); hashing the split again")
    h = hashlib.blake2b(digest_size=16)
    h.update(list_file.read_bytes())
    for p in paths:
        h.update(p.read_bytes())
    try:
        write_json(memo, {"signature": signature, "checksum": h.hexdigest()})
    except OSError as e:
        warn(f"could not write the checksum memo {memo} ({e.strerror or e}); the split is hashed again next time")
    return h.hexdigest()


def _open_cache(cache: Path, shape: tuple) -> np.ndarray | None:
    """The memory-mapped cache, or None when it is missing or damaged (then it is removed, with a warning)."""
    if not cache.exists():
        return None
    try:
        arr = np.load(cache, mmap_mode="r")
        if arr.shape == shape and arr.dtype == np.uint8:
            return arr
        problem = f"holds {arr.dtype} {arr.shape}, expected uint8 {shape}"
    except (ValueError, OSError, EOFError) as e:
        problem = f"{type(e).__name__}: {e}"
    warn(f"decoded-image cache {cache} is damaged ({problem}); rebuilding it")
    cache.unlink(missing_ok=True)
    return None


def preallocate(tmp: Path, cache: Path) -> None:
    """Reserve the disk blocks of a (sparse) memory-mapped file before it is written: on a full disk, writing
    into an unbacked page kills the process with SIGBUS ("Bus error"); this turns it into one OSError naming
    the cache, before any image is decoded. Where the call or the file system lacks preallocation, nothing."""
    if not hasattr(os, "posix_fallocate"):
        return
    size = tmp.stat().st_size
    fd = os.open(tmp, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.EINVAL):
            return
        raise OSError(e.errno, f"{e.strerror} (the decoded-image cache needs {size / 1e6:.0f} MB; free space "
                      f"there or pass another --data-root)", str(cache)) from None
    finally:
        os.close(fd)


@dataclass
class Split:
    images: np.ndarray  # (N, size, size, 3) uint8, memory-mapped
    labels: np.ndarray  # (N,) int64
    cache: Path


def load_split(root: str | Path, task: str, split: str, size: int = 224, interpolation: str = "bicubic",
               progress: bool = True) -> Split:
    """Images and labels of one split, decoded once into <task>/.cache and memory-mapped."""
    if interpolation not in INTERPOLATIONS:
        raise DataError(f"unknown interpolation {interpolation!r}; choose one of {sorted(INTERPOLATIONS)}")
    spec = get_task(task)
    folder = task_dir(root, spec)
    paths, labels = read_list(folder, split, spec.num_classes)
    key = _checksum(folder / f"{split}.txt", paths)
    cache = folder / ".cache" / f"{split}-{size}-{interpolation}-{key}.npy"
    shape = (len(paths), size, size, 3)
    images = _open_cache(cache, shape)
    if images is None:
        remove_stale_temps(cache.parent)
        with atomic_path(cache) as tmp:
            arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
            preallocate(tmp, cache)
            with ThreadPoolExecutor(os.cpu_count()) as pool:  # PIL decodes and resizes without the GIL
                decoded = pool.map(decode, paths, repeat(size), repeat(interpolation))
                for i, img in enumerate(tqdm(decoded, total=len(paths), desc=f"decode {spec.name}/{split}",
                                             disable=not progress)):
                    arr[i] = img
            arr.flush()
            del arr
        for stale in cache.parent.glob(f"{split}-{size}-{interpolation}-*.npy"):
            if stale != cache:
                stale.unlink()
        images = np.load(cache, mmap_mode="r")
    return Split(images, labels, cache)


class Batches:
    """Batches of uint8 images (B, 3, H, W) and labels, from a decoded split.

    Images stay uint8 until they are on the model's device: `to_float` converts (and optionally
    ImageNet-normalises) there, so a GPU does the conversion and transfers carry 4x fewer bytes.
    `resident=True` keeps the whole uint8 split on `device` (a 1,000-image training set is 150 MB).
    No step waits for a copy: the labels live on `device`, the epoch's order goes there in one copy, and
    on CUDA the host gathers and pins batch b + 1 and queues its asynchronous copy before batch b is handed
    out, so that host work overlaps the device's compute (the copy itself runs in the stream's order).
    Shuffling uses a generator seeded by (seed, epoch), so runs are reproducible."""

    def __init__(self, split: Split, batch_size: int, shuffle: bool = False, drop_last: bool = False,
                 device: str | torch.device = "cpu", resident: bool = False, seed: int = 0):
        self.split, self.batch_size, self.shuffle, self.drop_last = split, batch_size, shuffle, drop_last
        self.device = torch.device(device)
        self.seed, self.epoch = seed, 0
        self.labels = torch.from_numpy(split.labels).to(self.device)
        self.images = torch.from_numpy(np.ascontiguousarray(split.images)).to(self.device) if resident else None

    def __len__(self):
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        """An asynchronous copy on CUDA (from pinned memory), a plain one elsewhere."""
        cuda = self.device.type == "cuda"
        return (t.pin_memory() if cuda else t).to(self.device, non_blocking=cuda)

    def __iter__(self):
        n = len(self.labels)
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 100_003 + self.epoch))
        else:
            order = torch.arange(n)
        on_device = self._to_device(order)
        pending = None
        for b in range(len(self)):
            rows = slice(b * self.batch_size, (b + 1) * self.batch_size)
            idx = on_device[rows]
            if self.images is not None:
                x = self.images[idx]
            else:
                x = self._to_device(torch.from_numpy(self.split.images[order[rows].numpy()]))
            if pending is not None:
                yield pending  # batch b is queued before batch b - 1 is computed
            pending = x.permute(0, 3, 1, 2), self.labels[idx]
        if pending is not None:
            yield pending


def to_float(x: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float in [0, 1], ImageNet-normalised when `normalize`."""
    x = x.float().div_(255)
    if normalize:
        mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
        x = (x - mean) / std
    return x
