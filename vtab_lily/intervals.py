"""95% intervals for the tables' cells: a bootstrap over the test images combined with the spread over seeds.

A cell is the mean over S seeds of a run's test accuracy, and every seed is scored on the same test images:
seeds and images are crossed, not nested. Two things would change the number if the experiment were repeated:
the test set (a sample of the task's images) and the training randomness (the seed). The estimator is a
two-way bootstrap over both (Owen 2007, "The pigeonhole bootstrap", Ann. Appl. Stat. 1(2):386-411; Davison &
Hinkley 1997, "Bootstrap Methods and their Application", section 3.8, for resampling hierarchical data):

  each draw b resamples the N test images with replacement ONCE (the same images for every seed, as the test
  set is shared) and, independently, the S seeds with replacement; per seed it scores the run's predictions
  on the resampled images, and the draw's value is the all-seed mean of those accuracies plus the resampled
  seeds' deviation from it, scaled by sqrt(S / (S - 1)).

The scaling removes the resampled mean's small-sample bias: the mean of S values drawn with replacement from S
has variance (S - 1) / S x s^2 / S, s^2 the seeds' sample variance; scaled, s^2 / S, the unbiased estimate of
a mean of S seeds' variance (Davison & Hinkley discuss this bias for resampled clusters in section 3.8).
With S = 1 the seed spread is unknown and the interval is the test images' alone (the ordinary percentile
bootstrap of an accuracy, Efron & Tibshirani 1993, ch. 13). The interval: the 2.5 and 97.5 percentiles of
DRAWS draws. No bootstrap of a crossed design is exactly unbiased (McCullagh 2000, "Resampling and
exchangeable arrays", Bernoulli 6(2):285-301); this one counts the seed x image interaction twice (in the
image and in the seed part), so it is conservative where the test images dominate, and like any interval
from few seeds it is short where the seeds dominate: with 3 seeds its seed part rests on 3 values
(docs/statistics.md gives the coverage measured on simulated cells).

Fast and exact: an image enters a draw only through its pattern of right and wrong over the S seeds, so
resampling N images is a multinomial draw over the (at most 2^S) patterns present: O(2^S) per draw, whatever N.
Reproducible: the generator is seeded with SEED and the cell's task; the seed indices of a draw depend on S
only, so the cells of one row with the same seeds use the same seed draws and the row's means (group means,
Mean, Mean19), computed per draw from its cells' draws, keep the seeds' pairing across tasks.
"""
from __future__ import annotations

import zlib

import numpy as np
import pandas as pd

from .fileio import warn
from .predictions import read_predictions

DRAWS = 2000
SEED = 21  # the generator's seed: the same records give the same intervals
LEVEL = 0.95
ESTIMATOR = (f"two-way percentile bootstrap, {LEVEL:.0%}: test images resampled once per draw for all seeds, seeds "
             f"resampled with their deviation scaled by sqrt(S/(S-1)); {DRAWS} draws, generator seed {SEED} "
             "(vtab_lily/intervals.py)")
ACC_TOLERANCE = 1e-6  # points: a record's accuracy and its predictions' agree to rounding


def seed_draws(n_seeds: int, draws: int = DRAWS, seed: int = SEED) -> np.ndarray:
    """[draws, S] indices of the seeds each draw takes (with replacement); a function of S only."""
    return np.random.default_rng([seed, n_seeds]).integers(0, n_seeds, size=(draws, n_seeds))


def bootstrap(correct: np.ndarray, key: str = "", draws: int = DRAWS, seed: int = SEED) -> np.ndarray:
    """[draws] accuracies (percent) of the two-way bootstrap (module docstring) of a cell whose seeds'
    predictions are right where `correct` ([S, N] bool: seed, test image) is; `key` (the task) seeds the
    images' generator with `seed`."""
    correct = np.asarray(correct, dtype=bool)
    n_seeds, n = correct.shape
    if n_seeds <= 62:  # a pattern as the bits of one integer: a hundred times faster than unique rows
        codes, counts = np.unique((1 << np.arange(n_seeds)) @ correct, return_counts=True)
        patterns = (codes[:, None] >> np.arange(n_seeds)) & 1  # [K, S], [K]
    else:
        patterns, counts = np.unique(correct.T, axis=0, return_counts=True)
    rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
    resampled = rng.multinomial(n, counts / n, size=draws)  # [draws, K] images of each pattern
    acc = resampled @ patterns.astype(np.float64) / n  # [draws, S] per-seed accuracy on the resampled images
    if n_seeds == 1:
        return 100.0 * acc[:, 0]
    mean = acc.mean(axis=1)
    chosen = np.take_along_axis(acc, seed_draws(n_seeds, draws, seed), axis=1).mean(axis=1)
    return 100.0 * (mean + np.sqrt(n_seeds / (n_seeds - 1)) * (chosen - mean))


def bounds(draws: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
    """The lower and upper percentiles (LEVEL) of each column's draws; NaN where a column has none."""
    tail = (1 - LEVEL) / 2
    return draws.quantile(tail), draws.quantile(1 - tail)


def cell_correct(cell: pd.DataFrame) -> np.ndarray | None:
    """[S, N] bool (seeds in order) of the cell's records (rows of tables.cell_results for one task: seed,
    acc, epoch, path), from their predictions at the evaluation each reports. None (no CI) when a record
    has no predictions, or when they disagree with it or with each other (named in a warning)."""
    rows = []
    for r in cell.sort_values("seed").itertuples(index=False):
        p = read_predictions(r.path)
        if p is None or pd.isna(r.epoch):  # no predictions; a record without evaluations names no epoch
            return None
        try:
            right = p.correct(int(r.epoch))
        except KeyError as e:
            warn(f"the predictions of {r.path} have {e}; its cell has no CI")
            return None
        if abs(100.0 * right.mean() - r.acc) > ACC_TOLERANCE:
            warn(f"the predictions of {r.path} give {100.0 * right.mean():.4f}% at epoch {r.epoch}, its record "
                 f"{r.acc:.4f}% (written by another run of it?); its cell has no CI: run it again with --force")
            return None
        rows.append((p.eval_sha256, right))
    if len({sha for sha, _ in rows}) > 1 or len({len(right) for _, right in rows}) > 1:
        warn(f"the seeds of {cell['path'].iloc[0]}'s cell were scored on different test lists; it has no CI")
        return None
    return np.stack([right for _, right in rows])
