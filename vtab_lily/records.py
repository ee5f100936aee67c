"""Run records: one JSON file per run, written atomically, loaded together as a pandas DataFrame.

Path: <runs>/<backbone>/<method>/<task>/<run-id>.json, where run-id is s<seed>-<hash of the identity>:
backbone, task, method, the full method config and recipe (except result-neutral fields such as
checkpoint_every), seed, splits, and the provenance (weights, data lists, precision; see provenance.py).
Beside it: <run-id>.safetensors (the adapter), <run-id>.state.pt (resumable state while running),
<run-id>.lock (held by the process running it). A record lacking a field the tables or the runner read
(e.g. a hand-edited one without `best_acc`) is damaged: named in a warning, skipped, and rerun.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import platform
import socket
import subprocess
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .errors import UserError
from .fileio import write_json
from .options import OptionError
from .recipes import Recipe, recipe_for
from .tasks import get_task

EVAL_SPLITS = {"test": "train800val200", "val200": "train800"}  # eval split -> train split
# The fields of a run's identity (RunSpec.identity; `origin` only for a method from outside the suite).
IDENTITY = ("backbone", "task", "method", "seed", "method_config", "train_split", "eval_split", "recipe",
            "provenance", "origin")
SPLIT_FIELDS = ("train_split", "eval_split")
# What every record holds, and what a finished one holds besides (read by tables, sweep and run's summary).
REQUIRED = ("run_id", "status", *(k for k in IDENTITY if k != "origin"))
REQUIRED_DONE = ("params", "storage_bytes", "best_acc", "best_epoch", "final_acc", "wall_time_s", "images_per_s")
# The vtab protocol's choice on val200 (sweep's retrain and the tables): the accuracy after the last epoch,
# as VTAB scores a hyper-parameter setting (best_acc would pick an epoch the retrain never stops at).
VAL_SELECTION = "final_acc"


def recipe_identity(backbone: str, overrides: dict) -> dict:
    """The recipe as a run's identity holds it: the backbone's recipe with `overrides`, without the fields
    that do not change results (Recipe.NOT_IN_ID) and those added later while at their default
    (Recipe.ID_IF_SET: a run id made before they existed stays as it was)."""
    recipe = dataclasses.asdict(recipe_for(backbone, **overrides))
    defaults = {f.name: f.default for f in dataclasses.fields(Recipe)}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in recipe.items()
            if k not in Recipe.NOT_IN_ID and not (k in Recipe.ID_IF_SET and v == defaults[k])}


def digest(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def selection_point(record: dict) -> str:
    """The record's identity without its splits (and the hash of the split lists they read): a val200 run
    and its retrain on train800val200 share it, runs of any other config, recipe, seed or provenance do not."""
    point = {k: record.get(k) for k in IDENTITY if k not in SPLIT_FIELDS}
    provenance = dict(point["provenance"] or {})
    provenance["data"] = {k: v for k, v in (provenance.get("data") or {}).items() if k != "lists_sha256"}
    return digest({**point, "provenance": provenance})[:16]


def selection_order(record) -> tuple:
    """Sort key of the vtab protocol's candidates on val200 (first = chosen): the higher VAL_SELECTION,
    then the smaller run id, so that a tie is broken the same way by the sweep and by the tables."""
    return (-float(record[VAL_SELECTION]), str(record["run_id"]))


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
    provenance: dict | None = None  # weights, data, precision: set by `resolve` before the run id exists

    def __post_init__(self):
        # the method registry and the backbones load torch: imported by the specs that need them, so that
        # importing records (tables) does not
        from backbones import check_backbone

        from .adapters.config import make_config
        check_backbone(self.backbone)
        self.task = get_task(self.task).name
        if self.eval_split not in EVAL_SPLITS:
            raise OptionError(f"eval split must be one of {sorted(EVAL_SPLITS)}, got {self.eval_split!r}")
        make_config(self.method, self.options, self.backbone)  # bad options fail here, before anything is written
        self.full_recipe()

    @property
    def train_split(self) -> str:
        return EVAL_SPLITS[self.eval_split]

    def full_recipe(self) -> Recipe:
        return recipe_for(self.backbone, **self.recipe)

    def identity(self) -> dict:
        """The run's defining fields; a method from outside the suite adds its `origin` (module and version
        or file hash), so two methods of the same name, or two versions of one, never share a run id.
        Computed once per resolved spec (a spec's fields are not changed after `resolve`: it is replaced)."""
        return self._identity

    @functools.cached_property
    def _identity(self) -> dict:
        from .adapters.config import config_dict, make_config
        from .adapters.plugins import method_origin
        if self.provenance is None:
            raise RuntimeError("resolve the spec's provenance first (vtab_lily.run.resolve)")
        recipe = recipe_identity(self.backbone, self.recipe)
        origin = method_origin(self.method)
        return {"backbone": self.backbone, "task": self.task, "method": self.method, "seed": self.seed,
                "method_config": config_dict(make_config(self.method, self.options, self.backbone)),
                "train_split": self.train_split, "eval_split": self.eval_split, "recipe": recipe,
                "provenance": self.provenance, **({"origin": origin} if origin else {})}

    @functools.cached_property
    def run_id(self) -> str:
        return f"s{self.seed}-{digest(self._identity)[:10]}"

    def unresolved(self) -> RunSpec:
        """The same run before provenance (e.g. to retarget it at another eval split)."""
        return dataclasses.replace(self, provenance=None)

    def path(self, runs: str | Path, suffix: str = ".json") -> Path:
        return Path(runs) / self.backbone / self.method / self.task / f"{self.run_id}{suffix}"


def short(provenance: dict, key: str) -> str:
    """A short label: the first 12 hex digits of the weights or data hash, or 'random'."""
    part = provenance.get(key, {})
    digest = part.get("sha256") or part.get("lists_sha256")
    return digest[:12] if digest else part.get("source", "")


def origin_label(origin: dict | None) -> str:
    """'' for built-in methods, 'module version' or 'module sha256:<12 hex>' otherwise; a composition's
    parts' labels joined by ' + '."""
    if not origin:
        return ""
    if "module" not in origin:
        return " + ".join(origin_label(o) for o in origin.values())
    tag = origin.get("version") or f"sha256:{(origin.get('sha256') or '')[:12]}"
    return f"{origin['module']} {tag}"


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


class RecordError(UserError, ValueError):
    """A record file that cannot be read as a run record; the message names it."""


class NotARecord(RecordError):
    """A JSON file under a runs folder that is not a run record (no run_id / status): not ours."""


def _missing(record: dict) -> list[str]:
    """The required fields `record` lacks (or, for the numbers of a finished run, holds as no number)."""
    missing = [k for k in REQUIRED if k not in record]
    if record.get("status") == "done":
        missing += [k for k in REQUIRED_DONE if isinstance(record.get(k), bool)
                    or not isinstance(record.get(k), (int, float))]
    return missing


def read_record(path: str | Path) -> dict:
    """The record at `path`; RecordError naming the file when it is damaged (unreadable, not JSON, or
    without a required field), NotARecord when it is not a run record."""
    try:
        record = json.loads(Path(path).read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise RecordError(f"damaged run record {path} ({type(e).__name__}: {e}); it counts as not run: "
                          "run it again (the rerun overwrites it) or delete it") from None
    except OSError as e:  # a dangling symlink, a folder named *.json, no permission
        raise RecordError(f"unreadable run record {path} ({e.strerror or e}); it counts as not run") from None
    if not isinstance(record, dict) or "run_id" not in record or "status" not in record:
        raise NotARecord(f"{path} is not a run record (no run_id / status)")
    missing = _missing(record)
    if missing:
        raise RecordError(f"damaged run record {path} (missing or invalid: {', '.join(missing)}); it counts as "
                          "not run: run it again (the rerun overwrites it) or delete it")
    return record


def finished(path: str | Path) -> dict | None:
    """The record at `path` if it exists and its run is done, else None. A damaged record counts as not
    done (with a warning naming it), so a rerun replaces it."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        record = read_record(path)
    except RecordError as e:
        warnings.warn(str(e), stacklevel=2)
        return None
    return record if record.get("status") == "done" else None


def load_records(runs: str | Path = "results/runs", include_failed: bool = False) -> pd.DataFrame:
    """All records under `runs`, one row each: identity columns, the method's origin ('' for built-in
    methods, else 'module version' or 'module sha256:...'), flattened method options (opt.<name>),
    provenance (weights_id, data_id: 12 hex digits of their SHA-256, or 'random'; precision), the recipe
    (JSON), the selection point (`point`: the identity without the splits), params, best/final accuracy,
    the accuracy of every evaluation (`acc_by_epoch`, JSON {epoch: acc}) and the last one's epoch
    (`final_epoch`).
    Failed runs are left out unless `include_failed`; damaged records (and dangling links, folders named
    *.json) are skipped with a warning naming them; JSON files that are not run records are ignored."""
    rows = []
    for path in sorted(Path(runs).glob("*/*/*/*.json")):
        try:
            r = read_record(path)
        except NotARecord:  # other JSON files are not ours: ignore them quietly
            continue
        except RecordError as e:
            warnings.warn(f"skipped {e}", stacklevel=2)
            continue
        if r.get("status") != "done" and not include_failed:
            continue
        row = {k: r.get(k) for k in ("run_id", "backbone", "method", "task", "seed", "train_split", "eval_split",
                                     "status", "params", "storage_bytes", "best_acc", "best_epoch", "final_acc",
                                     "wall_time_s", "images_per_s")}
        row["origin"] = origin_label(r.get("origin"))
        row.update({f"opt.{k}": json.dumps(v) if isinstance(v, (list, dict)) else v
                    for k, v in r.get("method_config", {}).items()})
        prov = r["provenance"] or {}
        row.update(weights_id=short(prov, "weights") or "unknown", data_id=short(prov, "data") or "unknown",
                   precision=prov.get("precision", "unknown"))
        row["acc_by_epoch"] = json.dumps({str(e["epoch"]): e["acc"] for e in r.get("evaluations") or []})
        row["final_epoch"] = (r.get("evaluations") or [{}])[-1].get("epoch")
        row["recipe"] = json.dumps(r["recipe"], sort_keys=True)
        row["point"] = selection_point(r)
        row["path"] = str(path)
        rows.append(row)
    return pd.DataFrame(rows)
