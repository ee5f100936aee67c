"""Run records: one JSON file per run, written atomically, loaded together as a pandas DataFrame.

Path: <runs>/<backbone>/<method>/<task>/<run-id>.json, where run-id is s<seed>-<hash of the config>.
Beside it: <run-id>.safetensors (the adapter), <run-id>.state.pt (resumable state while running),
<run-id>.lock (held by the process running it).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from backbones import check_backbone

from .adapters import get_method, make_config, origin
from .adapters.plugins import origin_label
from .fileio import write_json
from .recipes import Recipe, recipe_for
from .tasks import get_task

EVAL_SPLITS = {"test": "train800val200", "val200": "train800"}  # eval split -> train split


@dataclass
class RunSpec:
    """Everything that defines a run's result (the run id hashes it)."""

    backbone: str
    task: str
    method: str = "lily"
    options: dict = field(default_factory=dict)
    seed: int = 42
    eval_split: str = "test"
    recipe: dict = field(default_factory=dict)  # overrides of the backbone's paper recipe

    def __post_init__(self):
        check_backbone(self.backbone)
        self.task = get_task(self.task).name
        if self.eval_split not in EVAL_SPLITS:
            raise ValueError(f"eval split must be one of {sorted(EVAL_SPLITS)}, got {self.eval_split!r}")
        make_config(self.method, self.options)  # unknown options fail here, before anything is written

    @property
    def train_split(self) -> str:
        return EVAL_SPLITS[self.eval_split]

    def full_recipe(self) -> Recipe:
        return recipe_for(self.backbone, **self.recipe)

    def identity(self) -> dict:
        """The run's defining fields; a method from outside the suite adds its `origin` (module and version
        or file hash), so two methods of the same name, or two versions of one, never share a run id."""
        method_origin = origin(get_method(self.method).module)
        return {"backbone": self.backbone, "task": self.task, "method": self.method, "seed": self.seed,
                "method_config": dataclasses.asdict(make_config(self.method, self.options, self.backbone)),
                "train_split": self.train_split, "eval_split": self.eval_split,
                "recipe": dataclasses.asdict(self.full_recipe()),
                **({"origin": method_origin} if method_origin else {})}

    @property
    def run_id(self) -> str:
        digest = hashlib.sha1(json.dumps(self.identity(), sort_keys=True, default=str).encode()).hexdigest()
        return f"s{self.seed}-{digest[:10]}"

    def path(self, runs: str | Path, suffix: str = ".json") -> Path:
        return Path(runs) / self.backbone / self.method / self.task / f"{self.run_id}{suffix}"


def code_version() -> dict:
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "-C", str(root), "status", "--porcelain", "-uno"], capture_output=True,
                                    text=True, check=True).stdout.strip())
        return {"git_sha": sha, "dirty": dirty}
    except (OSError, subprocess.CalledProcessError):
        return {"git_sha": None, "dirty": None}


def environment(device: str) -> dict:
    import timm
    import torch
    env = {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
           "host": socket.gethostname(), "device": device}
    if device.startswith("cuda") and torch.cuda.is_available():
        env["device_name"] = torch.cuda.get_device_name()
    return env


def write_record(spec: RunSpec, runs: str | Path, **result) -> Path:
    path = spec.path(runs)
    record = {"run_id": spec.run_id, "spec": dataclasses.asdict(spec), **spec.identity(),
              "code": code_version(), **result}
    write_json(path, record)
    return path


def read_record(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def finished(path: str | Path) -> dict | None:
    """The record at `path` if it exists and its run is done, else None."""
    path = Path(path)
    record = read_record(path) if path.exists() else None
    return record if record and record.get("status") == "done" else None


def load_records(runs: str | Path = "results/runs", include_failed: bool = False) -> pd.DataFrame:
    """All records under `runs`, one row each: identity columns, the method's origin ('' for built-in
    methods, else 'module version' or 'module sha256:...'), flattened method options (opt.<name>), params,
    best/final accuracy. Failed runs are left out unless `include_failed`."""
    rows = []
    for path in sorted(Path(runs).glob("*/*/*/*.json")):
        r = read_record(path)
        if r.get("status") != "done" and not include_failed:
            continue
        row = {k: r.get(k) for k in ("run_id", "backbone", "method", "task", "seed", "train_split", "eval_split",
                                     "status", "params", "storage_bytes", "best_acc", "best_epoch", "final_acc",
                                     "wall_time_s", "images_per_s")}
        row["origin"] = origin_label(r.get("origin"))
        row.update({f"opt.{k}": json.dumps(v) if isinstance(v, (list, dict)) else v
                    for k, v in r.get("method_config", {}).items()})
        row["path"] = str(path)
        rows.append(row)
    return pd.DataFrame(rows)


class RunLock:
    """An exclusive claim on one run (O_EXCL lock file holding host and pid); a lock left by a dead
    process on this host is taken over."""

    def __init__(self, path: Path):
        self.path = path
        self.held = False

    def acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                if not self._stale():
                    return False
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(f"{socket.gethostname()} {os.getpid()}\n")
            self.held = True
            return True
        return False

    def _stale(self) -> bool:
        try:
            host, pid = self.path.read_text().split()
        except (OSError, ValueError):
            return False  # being written right now
        if host != socket.gethostname():
            return False
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()
