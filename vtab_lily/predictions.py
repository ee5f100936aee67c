"""Per-example test predictions beside a record (`<run_id>.preds.npz`), so that any statistic (intervals, paired
tests across methods) can be computed later from the records alone. Data, never code: loaded without pickle."""
from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .fileio import atomic_path, warn

SUFFIX = ".preds.npz"


@dataclass(frozen=True)
class Predictions:
    labels: np.ndarray  # [N] the eval split's labels, in the order of its list file
    epochs: np.ndarray  # [E] the epoch of each evaluation
    preds: np.ndarray  # [E, N] the predicted label of each image at each evaluation
    eval_sha256: str  # SHA-256 of the eval split's list file: equal hashes, same images in the same order

    def __post_init__(self):
        if self.preds.shape != (len(self.epochs), len(self.labels)):
            raise ValueError(f"preds has shape {self.preds.shape}, expected ({len(self.epochs)}, {len(self.labels)})")

    def correct(self, epoch: int) -> np.ndarray:
        """[N] bool: which images the evaluation after `epoch` classified correctly."""
        where = np.flatnonzero(self.epochs == epoch)
        if not len(where):
            raise KeyError(f"no evaluation after epoch {epoch} (evaluated after {self.epochs.tolist()})")
        return self.preds[where[0]] == self.labels


def predictions_path(record_path: str | Path) -> Path:
    path = Path(record_path)
    return path.with_name(path.name.removesuffix(".json") + SUFFIX)


def write_predictions(record_path: str | Path, p: Predictions) -> Path:
    path = predictions_path(record_path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, labels=p.labels.astype(np.int32), epochs=p.epochs.astype(np.int32),
                                preds=p.preds.astype(np.int32), eval_sha256=np.array(p.eval_sha256))
    return path


def read_predictions(record_path: str | Path) -> Predictions | None:
    """The predictions of the record at `record_path`; None when it has none (an older record) or when the
    file is damaged (named in a warning; the record then tabulates without them)."""
    path = predictions_path(record_path)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            return Predictions(labels=z["labels"], epochs=z["epochs"], preds=z["preds"],
                               eval_sha256=str(z["eval_sha256"]))
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as e:
        warn(f"damaged predictions file {path} ({e}); its record is used without them. Delete the file, or run "
             "the run again to write it anew")
        return None
