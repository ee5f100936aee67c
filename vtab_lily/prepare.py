"""Prepare VTAB-1K from tensorflow-datasets into the community folder layout.

    python -m vtab_lily.prepare --task cifar100 --root data/vtab-1k [--format png|jpeg] [--data-dir DIR]
    python -m vtab_lily.prepare --task mini --root data/vtab-1k      # the mini VTAB, generated offline

writes <root>/<task>/images/<split>/NNNNNN.png and <root>/<task>/{train800,val200,train800val200,test}.txt
(lines `images/<split>/000000.png <label>`) plus manifest.json (counts, tfds version, checksums).
Lossless PNG by default; `--format jpeg` writes PIL quality-75 JPEGs like the community copy.
Resumable: images are written atomically and skipped when present; a task with a manifest is done.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from importlib import metadata
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from .fileio import atomic_path, write_json
from .tasks import SPLITS, TASK_SETS, TASKS, Task, get_task

FORMATS = {"png": ("png", {}), "jpeg": ("jpg", {"quality": 75})}


class PrepareError(RuntimeError):
    """A dataset could not be prepared; the message says what to do."""


def open_source(task: Task, split: str, data_dir: str | None = None, download: bool = True):
    """A random-access sequence of examples (dicts) of one source split."""
    if task.offline is not None:
        return task.offline(split)
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise PrepareError("preparing VTAB-1K needs tensorflow-datasets: pip install -e '.[data]'") from e
    name = f"{task.builder}:{task.version}"
    try:
        return tfds.data_source(name, split=split, data_dir=data_dir, download=download)
    except Exception as e:
        manual_dir = Path(data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")).expanduser()
        manual_dir = manual_dir / "downloads" / "manual"
        if task.manual and not (manual_dir.is_dir() and any(manual_dir.iterdir())):
            raise PrepareError(f"{task.name}: tfds cannot download {task.builder} by itself: {task.manual} "
                               f"(here: {manual_dir}), then run again") from e
        hint = " (preparing needs TensorFlow: pip install -e '.[data]')" if isinstance(e, ImportError) else ""
        raise PrepareError(f"{task.name}: could not load tfds {name} split {split!r}: "
                           f"{type(e).__name__}: {e}{hint}") from e


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def prepare_task(name: str, root: str | Path, fmt: str = "png", data_dir: str | None = None,
                 download: bool = True, limit: int | None = None) -> dict:
    """Write one task's VTAB-1K folder; return its manifest. A finished task (same format and limit) is
    skipped. `limit` keeps the first N examples of each split: a quick smoke-test subset, not VTAB-1K."""
    task = get_task(name)
    if fmt not in FORMATS:
        raise PrepareError(f"unknown format {fmt!r}; choose one of {sorted(FORMATS)}")
    ext, save_kw = FORMATS[fmt]
    out = Path(root) / task.name
    manifest_path = out / "manifest.json"
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        if (manifest["format"], manifest["limit"]) == (fmt, limit):
            return manifest
        manifest_path.unlink()
    sources: dict[str, object] = {}
    lines: dict[str, list[str]] = {}
    for split in ("train800", "val200", "test"):
        (sl,) = task.slices[split]
        if sl.split not in sources:
            sources[sl.split] = open_source(task, sl.split, data_dir, download)
        source = sources[sl.split]
        folder = out / "images" / split
        folder.mkdir(parents=True, exist_ok=True)
        lines[split] = []
        indices = sl.indices(len(source))
        expected = (sl.stop or len(source)) - sl.start
        if len(indices) < expected or not indices:
            raise PrepareError(f"{task.name}: {task.builder} split {sl.split!r} holds {len(source)} examples; "
                               f"VTAB's {split} needs examples {sl.start}..{sl.stop or 'end'}")
        for i, idx in enumerate(tqdm(indices[:limit], desc=f"{task.name}/{split}", unit="img")):
            rel = f"images/{split}/{i:06d}.{ext}"
            example = source[idx]
            label = task.label(example)
            if not 0 <= label < task.num_classes:
                raise PrepareError(f"{task.name}: example {idx} of {task.builder} split {sl.split!r} has label "
                                   f"{label}, outside 0..{task.num_classes - 1}; the source data is not what VTAB "
                                   "expects")
            if not (out / rel).exists():
                with atomic_path(out / rel) as tmp:
                    Image.fromarray(task.image(example)).save(tmp, format="PNG" if ext == "png" else "JPEG",
                                                              **save_kw)
            lines[split].append(f"{rel} {label}")
    lines["train800val200"] = lines["train800"] + lines["val200"]
    for split in SPLITS:
        with atomic_path(out / f"{split}.txt") as tmp:
            tmp.write_text("".join(f"{line}\n" for line in lines[split]))
    info = getattr(next(iter(sources.values())), "dataset_info", None)
    manifest = {
        "task": task.name, "group": task.group, "num_classes": task.num_classes,
        "source": task.builder, "version_requested": task.version,
        "version_used": str(info.version) if info is not None else task.version,
        "library": {lib: _version(lib) for lib in
                    (["numpy", "scikit-learn"] if task.offline else ["tensorflow-datasets"])},
        "format": fmt, "limit": limit, "note": task.note,
        "counts": {s: len(lines[s]) for s in SPLITS},
        "sha256": {f"{s}.txt": _sha256(out / f"{s}.txt") for s in SPLITS},
    }
    write_json(manifest_path, manifest)
    return manifest


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vtab_lily.prepare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", required=True, help=f"a task name, 'all' for the 19 VTAB-1K tasks or 'mini' "
                        f"for the mini VTAB: {', '.join(TASKS)}")
    parser.add_argument("--root", required=True, help="the VTAB-1K folder to write")
    parser.add_argument("--format", default="png", choices=sorted(FORMATS))
    parser.add_argument("--data-dir", default=None, help="tfds data dir (default ~/tensorflow_datasets)")
    parser.add_argument("--limit", type=int, default=None,
                        help="keep only the first N examples per split (a smoke-test subset, not VTAB-1K)")
    args = parser.parse_args(argv)
    names = TASK_SETS.get(args.task, [args.task])
    try:
        for name in names:
            m = prepare_task(name, args.root, args.format, args.data_dir, limit=args.limit)
            print(f"{m['task']}: {m['counts']} -> {Path(args.root) / m['task']}")
    except (PrepareError, KeyError) as e:
        print(f"error: {e.args[0]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
