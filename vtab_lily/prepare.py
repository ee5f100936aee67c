"""Prepare VTAB-1K from tensorflow-datasets into the community folder layout.

    python -m vtab_lily.prepare --task cifar100 --root data/vtab-1k [--format png|jpeg] [--data-dir DIR]
    python -m vtab_lily.prepare --task mini --root data/vtab-1k      # the mini VTAB, generated offline

writes <root>/<task>/images/<split>/NNNNNN.png and <root>/<task>/{train800,val200,train800val200,test}.txt
(lines `images/<split>/000000.png <label>`) plus manifest.json (counts, tfds version, checksums).
Lossless PNG by default; `--format jpeg` writes PIL quality-75 JPEGs like the community copy.
Resumable: images are written atomically and skipped when present; a task is done when its manifest
is readable and every list it names is present with its recorded checksum (else it is prepared again).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from importlib import metadata
from pathlib import Path
from urllib.parse import urlparse

from PIL import Image
from tqdm import tqdm

from backbones.hub import reachable
from backbones.weights import sha256

from .data import DataError, task_dir
from .errors import UserError, cli
from .fileio import atomic_path, remove_stale_temps, warn, write_json
from .options import OptionError
from .tasks import SPLITS, TASK_SETS, TASKS, Task, get_task

FORMATS = {"png": ("png", {}), "jpeg": ("jpg", {"quality": 75})}


class PrepareError(UserError, RuntimeError):
    """A dataset could not be prepared; the message says what to do."""


def open_source(task: Task, split: str, data_dir: str | None = None, download: bool = True):
    """A random-access sequence of examples (dicts) of one source split. Offline, a split that tfds has
    not prepared yet fails in seconds with advice, instead of after minutes of download retries."""
    if task.offline is not None:
        return task.offline(split)
    try:
        import tensorflow_datasets as tfds
        from absl import logging as absl_logging
    except ImportError as e:
        raise PrepareError("preparing VTAB-1K needs tensorflow-datasets: pip install -e '.[data]'") from e
    name = f"{task.builder}:{task.version}"
    tfds_dir = tfds_data_dir(data_dir)
    verbosity = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)  # tfds warns of every folder it looks into
    try:
        try:
            return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
        except Exception:
            if not download:
                raise
        check_sources(task, tfds.builder(name, data_dir=data_dir), tfds_dir)  # not prepared yet
        return tfds.data_source(name, split=split, data_dir=data_dir, download=True)
    except PrepareError:
        raise
    except Exception as e:
        if isinstance(e, ImportError):
            missing = e.name or str(e)
            raise PrepareError(f"{task.name}: tfds needs the module {missing!r}, which is not installed: pip install "
                               f"{missing} (and tell us: the '.[data]' extra should have brought it)") from e
        if network_error(e):
            raise PrepareError(f"{task.name}: downloading {name} failed: {type(e).__name__}: "
                               f"{str(e).splitlines()[0] if str(e) else ''}; {offline_advice(task, tfds_dir)}") from e
        raise PrepareError(f"{task.name}: could not load tfds {name} split {split!r}: {type(e).__name__}: {e}") from e
    finally:
        absl_logging.set_verbosity(verbosity)


def tfds_data_dir(data_dir: str | None = None) -> Path:
    """tfds' data dir: `data_dir` (--data-dir), else $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
    return Path(data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")).expanduser()


def manual_download(task: Task, tfds_dir: Path) -> str | None:
    """For a task that tfds cannot download by itself and whose manual folder is still empty: what to put
    where; else None."""
    manual_dir = tfds_dir / "downloads" / "manual"
    if task.manual and not (manual_dir.is_dir() and any(manual_dir.iterdir())):
        return f"{task.name}: tfds cannot download {task.builder} by itself: {task.manual} (here: {manual_dir})"
    return None


def check_sources(task: Task, builder, tfds_dir: Path) -> None:
    """Before a download: a manual-download task has its files, and the download host answers."""
    if task.manual:
        if (missing := manual_download(task, tfds_dir)) is not None:
            raise PrepareError(f"{missing}, then run again")
        return
    urls = list(builder.url_infos or {})
    if urls and not reachable(urls[0]):
        host = urlparse(urls[0]).hostname
        raise PrepareError(f"{task.name}: no network (cannot reach {host}) and tfds has not prepared "
                           f"{builder.name} {builder.version} in {tfds_dir}; {offline_advice(task, tfds_dir)}")


def offline_advice(task: Task, tfds_dir: Path) -> str:
    return (f"on a connected machine run `python -m vtab_lily.prepare --task {task.name} --root DIR` and copy "
            f"DIR/{task.name} into your --root (or copy its tensorflow_datasets folder to {tfds_dir} or pass "
            "--data-dir), or use an existing community VTAB-1K folder as the root (--data-root for run)")


def network_error(e: BaseException) -> bool:
    """Whether `e` (or what caused it) is a failure to reach a server."""
    import urllib.error

    import requests
    kinds = (requests.ConnectionError, requests.Timeout, urllib.error.URLError, socket.gaierror, ConnectionError,
             TimeoutError)
    while e is not None:
        if isinstance(e, kinds):
            return True
        e = e.__cause__ or e.__context__
    return False


def prepare_task(name: str, root: str | Path, fmt: str = "png", data_dir: str | None = None,
                 download: bool = True, limit: int | None = None) -> dict:
    """Write one task's VTAB-1K folder; return its manifest. A finished task (same format and limit) is
    skipped. `limit` keeps the first N examples of each split: a quick smoke-test subset, not VTAB-1K."""
    task = get_task(name)
    if fmt not in FORMATS:
        raise PrepareError(f"unknown format {fmt!r}; choose one of {sorted(FORMATS)}")
    check_limit(limit)
    ext, save_kw = FORMATS[fmt]
    out = Path(root) / task.name
    manifest_path = out / "manifest.json"
    remove_stale_temps(out)  # lists and manifest of a killed prepare; image temps go split by split below
    if manifest_path.exists():
        manifest, problem = read_manifest(manifest_path)
        if problem is None and (manifest["format"], manifest["limit"]) == (fmt, limit):
            return manifest
        if problem is not None:
            warn(f"{out} is not fully prepared ({problem}); preparing it again")
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
        remove_stale_temps(folder)
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
                with atomic_path(out / rel, durable=False) as tmp:  # made durable by the sync below
                    Image.fromarray(task.image(example)).save(tmp, format="PNG" if ext == "png" else "JPEG",
                                                              **save_kw)
            lines[split].append(f"{rel} {label}")
    lines["train800val200"] = lines["train800"] + lines["val200"]
    os.sync()  # every image on the disk before the lists and the manifest that declare the task complete
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
        "sha256": {f"{s}.txt": sha256(out / f"{s}.txt") for s in SPLITS},
    }
    write_json(manifest_path, manifest)
    return manifest


def check_limit(limit) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise OptionError(f"--limit must be an integer >= 1 (the examples kept per split), got {limit!r}")


def read_manifest(path: Path) -> tuple[dict | None, str | None]:
    """(manifest, None) when the task it describes is done: readable, and every list it names present with
    the checksum it recorded; else (None or the manifest, what is wrong)."""
    try:
        manifest = json.loads(path.read_text())
        lists = manifest["sha256"]
        if not (isinstance(manifest, dict) and isinstance(lists, dict) and {"format", "limit"} <= set(manifest)):
            raise TypeError("not a manifest")
    except (ValueError, KeyError, TypeError) as e:
        return None, f"its manifest {path} is damaged ({type(e).__name__}: {e})"
    for name, digest in lists.items():
        lst = path.parent / name
        if not lst.is_file():
            return manifest, f"{lst}, named in its manifest, is missing"
        if digest is not None and sha256(lst) != digest:
            return manifest, f"{lst} differs from the checksum in its manifest"
    return manifest, None


def ensure_prepared(task: str, root: str | Path, prepare: bool) -> None:
    """Raise DataError (saying how to prepare) when the task has no folder under `root`; with `prepare`,
    prepare it instead, and also finish a half-prepared one (a prepare that was killed: lists missing)."""
    spec = get_task(task)
    try:
        folder = task_dir(root, spec)
        if not prepare or all((folder / f"{split}.txt").is_file() for split in SPLITS):
            return
    except DataError:
        if not prepare:
            raise
    prepare_task(spec.name, root)


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


@cli
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
    for name in names:
        get_task(name)
    check_limit(args.limit)
    for name in names:
        m = prepare_task(name, args.root, args.format, args.data_dir, limit=args.limit)
        print(f"{m['task']}: {m['counts']} -> {Path(args.root) / m['task']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
