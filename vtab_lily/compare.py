"""Comparisons of a table's rows (`python -m vtab_lily.tables --table T --compare A B [C ...]`), on the records'
per-example test predictions (vtab_lily/predictions.py) where they have them. docs/comparisons.md says what each
number is, why it was chosen, and how well the intervals cover in simulation.

Two rows, per task: the paired difference A - B (points) on the same test images and seeds, with a 95% interval
and a p-value from one estimator. x[s, i] = 100 (A right - B right) on image i in seed s; d = mean of x. Its
variance (a new test set and new seeds: the law of total variance, as Bouthillier et al. 2021, "Accounting for
Variance in Machine Learning Benchmarks", MLSys) is estimated under the crossed random-effects model
x = mu + seed + image + residual by the ANOVA mean squares (Searle, Casella & McCulloch 1992, Variance Components):
var(d) = images + seeds - residual, where
- images = var over i of the seed-averaged x / N: the paired bootstrap's variance over test images (Koehn 2004;
  Efron & Tibshirani 1993), images resampled jointly across seeds since every seed sees the same images, in
  closed form with the n-1 correction (no Monte Carlo noise; tests/test_compare.py checks a bootstrap against it);
- seeds = var over s of the per-seed differences / S, less residual = the interaction mean square / (S N), which
  the images' part already holds; both drop out where the seeds spread no more than the residuals explain.
The interval is d ± t_{0.975, df} se with Welch-Satterthwaite df (Satterthwaite 1946); the p-value the two-sided
test of the same t, so p < 0.05 exactly when the interval excludes 0 (`win`/`loss`; `tie` otherwise). With one
seed it is the paired t-test on the images (scipy.stats.ttest_rel). The Mean difference (mean of the group means,
as the tables' Mean) is the same weighted sum of the task differences, its variance components the weighted
squares of theirs (tasks are separate runs on disjoint test sets). Across tasks: the sign test
(scipy.stats.binomtest) and the Wilcoxon signed-rank test (scipy.stats.wilcoxon) of the task differences
(Demsar 2006, "Statistical Comparisons of Classifiers over Multiple Data Sets", JMLR 7, §3.1.3-3.1.4).

More rows: average ranks over the tasks where every row has a cell (rank 1 = best cell mean, ties averaged),
the Friedman test (scipy.stats.friedmanchisquare) with Iman and Davenport's F, and the Nemenyi test: two rows
differ when their average ranks differ by at least CD = q_alpha sqrt(k (k + 1) / (6 N)) (Demsar 2006, §3.2.2;
q_alpha = the studentized range quantile / sqrt(2)), drawn as Demsar's critical-difference diagram. These use
cell means only, so they work on records without predictions too.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from .fileio import atomic_path
from .predictions import read_predictions
from .tables import TableError, _groups, benchmarks, card_lines, protocol_card

LEVEL = 0.95  # the intervals' coverage; the tests' alpha is 1 - LEVEL
ACC_TOLERANCE = 1e-3  # points between a record's accuracy and the one its predictions give


def resolve_rows(names: list[str], rows: list[str], table: str) -> list[str]:
    """The table's row names ('<backbone> <label>') of `names`: each a full row name or a label; a label on
    several backbones takes the one backbone of the other names (`lily lora` on the mini table: vit-mini's)."""
    if len(names) < 2:
        raise TableError(f"--compare needs two rows or more, got {names}")
    found = {name: [name] if name in rows else [r for r in rows if r.split(" ", 1)[1] == name] for name in names}
    for name, hits in found.items():
        if not hits:
            raise TableError(f"--compare {name!r}: table {table} has no such row; its rows: {', '.join(rows)}")
    backbones = {hits[0].split(" ", 1)[0] for hits in found.values() if len(hits) == 1}
    resolved = []
    for name, hits in found.items():
        narrowed = [h for h in hits if h.split(" ", 1)[0] in backbones] if len(backbones) == 1 else hits
        if len(hits) > 1 and len(narrowed) != 1:
            raise TableError(f"--compare {name!r}: table {table} has it on {len(hits)} backbones "
                             f"({', '.join(hits)}); name one as '<backbone> {name}', e.g. {hits[0]!r}")
        resolved.append(hits[0] if len(hits) == 1 else narrowed[0])
    if len(set(resolved)) < len(resolved):
        raise TableError(f"--compare names a row twice: {' '.join(names)}")
    return resolved


# ---- the estimator of one paired difference (vectorised over leading axes, for the tests' simulations) ----

def difference_components(x: np.ndarray) -> tuple[np.ndarray, list[tuple[np.ndarray, int]]]:
    """x [..., S, N]: per seed and test image, A's correctness minus B's (points: -100, 0, 100). Returns the
    difference (mean over seeds and images) and the unbiased variance components [(variance, degrees of
    freedom)] of it under the crossed model x = mu + seed + image + residual (the ANOVA mean squares over S N):
    the images' (var of the seed-averaged per-image differences / N), the seeds' (var of the per-seed
    differences / S) and, negative, the residual's (it is in both)."""
    s, n = x.shape[-2:]
    by_image, by_seed = x.mean(axis=-2), x.mean(axis=-1)
    images = by_image.var(axis=-1, ddof=1) / n
    if s == 1:
        return by_seed[..., 0], [(images, n - 1)]
    seeds = by_seed.var(axis=-1, ddof=1) / s
    residual = x - by_image[..., None, :] - by_seed[..., :, None] + x.mean(axis=(-2, -1))[..., None, None]
    residual = (residual ** 2).sum(axis=(-2, -1)) / ((s - 1) * (n - 1)) / (s * n)
    keep = seeds >= residual  # else the seeds spread less than the residuals explain: their share is 0
    return by_seed.mean(axis=-1), [(images, n - 1), (np.where(keep, seeds, 0.0), s - 1),
                                   (np.where(keep, -residual, 0.0), (s - 1) * (n - 1))]


def t_interval(d, components, level: float = LEVEL):
    """(se, df, low, high, p) of a difference d with independent variance components [(variance, df)]:
    Welch-Satterthwaite df, d ± t * se, the two-sided p of d / se. Zero variance: the interval is d itself,
    p = 1 where d = 0, else 0."""
    d = np.asarray(d, dtype=float)
    var = sum(np.asarray(v, dtype=float) for v, _ in components)
    denominator = sum(np.asarray(v, dtype=float) ** 2 / k for v, k in components)
    with np.errstate(divide="ignore", invalid="ignore"):
        df = np.where(denominator > 0, var ** 2 / np.where(denominator > 0, denominator, 1), np.inf)
        se = np.sqrt(var)
        half = stats.t.ppf(0.5 + level / 2, df) * se
        p = np.where(se > 0, 2 * stats.t.sf(np.abs(d) / np.where(se > 0, se, 1), df), np.where(d == 0, 1.0, 0.0))
    return se, df, d - half, d + half, p


# ---- two rows ----

def _correct(path: str, epoch: int, acc: float):
    """[N] bool of the record at `path` at `epoch` and its eval split's hash; None without predictions."""
    preds = read_predictions(path)
    if preds is None:
        return None
    try:
        correct = preds.correct(int(epoch))
    except KeyError as e:
        raise TableError(f"predictions of {path}: {e.args[0]}; its record reports epoch {epoch}. Delete the "
                         ".preds.npz file (the record then tabulates without it) or run the run again") from None
    if abs(100 * correct.mean() - acc) > ACC_TOLERANCE:
        raise TableError(f"predictions of {path} give {100 * correct.mean():.3f}% at epoch {epoch}, its record "
                         f"{acc:.3f}%: they are not this run's. Delete the .preds.npz file or run the run again")
    return correct, preds.eval_sha256


def paired_task(a: pd.DataFrame, b: pd.DataFrame, names: tuple[str, str], task: str) -> dict:
    """One task's comparison of two rows' cells (cell_results' frames of that task): the seeds both have, the
    difference of their accuracies and, where both have predictions on the same images, its interval."""
    a, b = a.set_index("seed"), b.set_index("seed")
    seeds = sorted(set(a.index) & set(b.index))
    out = {"task": task, "seeds": len(seeds), "A": a["acc"].mean(), "B": b["acc"].mean()}
    if not seeds:
        return {**out, "diff": np.nan, "note": "no common seed" if len(a) and len(b) else "no cell"}
    out.update(A=a.loc[seeds, "acc"].mean(), B=b.loc[seeds, "acc"].mean())  # on the seeds compared
    out["diff"] = float(np.mean([a.loc[s, "acc"] - b.loc[s, "acc"] for s in seeds]))
    x, hashes = [], {}
    for seed in seeds:
        got = [_correct(rows.loc[seed, "path"], rows.loc[seed, "epoch"], rows.loc[seed, "acc"]) for rows in (a, b)]
        if any(g is None for g in got):
            return {**out, "note": "no predictions"}
        for (_, sha), rows in zip(got, (a, b)):
            hashes.setdefault(sha, rows.loc[seed, "path"])
        x.append(100.0 * (got[0][0].astype(float) - got[1][0]))
    if len(hashes) > 1:
        listed = "; ".join(f"{sha[:12]} ({path})" for sha, path in hashes.items())
        raise TableError(f"{names[0]} and {names[1]} on {task}: the records were evaluated on different test "
                         f"images (eval_sha256 {listed}); a paired comparison needs the same split list. Compare "
                         "records made on the same prepared data (tables --select data_id=<prefix>)")
    d, components = difference_components(np.stack(x))
    se, df, low, high, p = t_interval(d, components)
    out.update(diff=float(d), se=float(se), df=float(df), low=float(low), high=float(high), p=float(p),
               images=len(x[0]), note="win" if low > 0 else "loss" if high < 0 else "tie")
    return out


def mean_differences(per_task: pd.DataFrame, tasks: list[str]) -> list[dict]:
    """Per benchmark the tables' Mean (mean of the group means) of the task differences, with an interval
    where every task has one; NaN where a task has no difference (as the tables' Mean)."""
    rows = []
    by_task = per_task.set_index("task")
    for prefix, members in benchmarks(tasks):
        groups = [ts for _, ts in _groups(members)]
        name = f"{prefix}Mean"
        if not all(groups) or by_task.loc[members, "diff"].isna().any():
            rows.append({"task": name, "diff": np.nan, "note": "incomplete"})
            continue
        weights = {t: 1 / (len(groups) * len(ts)) for ts in groups for t in ts}
        d = sum(w * by_task.loc[t, "diff"] for t, w in weights.items())
        row = {"task": name, "A": sum(w * by_task.loc[t, "A"] for t, w in weights.items()),
               "B": sum(w * by_task.loc[t, "B"] for t, w in weights.items()), "diff": d}
        if by_task.loc[members, "se"].notna().all():
            components = [(w ** 2 * by_task.loc[t, "se"] ** 2, by_task.loc[t, "df"]) for t, w in weights.items()]
            se, df, low, high, p = t_interval(d, components)
            row.update(se=float(se), df=float(df), low=float(low), high=float(high), p=float(p),
                       note="win" if low > 0 else "loss" if high < 0 else "tie")
        else:
            row["note"] = "no predictions"
        rows.append(row)
    return rows


def across_tasks(diffs: np.ndarray) -> dict:
    """The sign test and the Wilcoxon signed-rank test of the task differences (two-sided; zeros dropped,
    as both tests do)."""
    diffs = diffs[np.isfinite(diffs)]
    wins, losses = int((diffs > 0).sum()), int((diffs < 0).sum())
    sign = stats.binomtest(wins, wins + losses, 0.5).pvalue if wins + losses else np.nan
    wilcoxon = stats.wilcoxon(diffs).pvalue if wins + losses else np.nan
    return {"tasks": len(diffs), "positive": wins, "negative": losses, "sign_p": float(sign),
            "wilcoxon_p": float(wilcoxon)}


def compare_two(result: dict, names: tuple[str, str]) -> dict:
    """The comparison of two rows of a built table (tables.build_table's result)."""
    tasks = result["tasks"]
    a, b = (result["cells"][n] for n in names)
    per_task = pd.DataFrame([paired_task(a[a["task"] == t], b[b["task"] == t], names, t) for t in tasks])
    for column in ("se", "df", "low", "high", "p", "images"):
        if column not in per_task:
            per_task[column] = np.nan
    means = pd.DataFrame(mean_differences(per_task, tasks))
    counts = {k: int((per_task["note"] == k).sum()) for k in ("win", "tie", "loss")}
    return {"names": names, "tasks": per_task, "means": means, "counts": counts,
            "across": across_tasks(per_task["diff"].to_numpy(float))}


def _p(p) -> str:
    return "" if pd.isna(p) else f"{p:.2g}" if p >= 1e-4 else "<1e-4"


def _num(v, sign=False) -> str:
    return "" if pd.isna(v) else f"{v:+.2f}" if sign else f"{v:.2f}"


def two_markdown(cmp: dict, table: str, cells: str) -> str:
    a, b = cmp["names"]
    c, across = cmp["counts"], cmp["across"]
    lines = [f"Table {table}: {a} (A) vs {b} (B), paired on the same test images and seeds. Cells: {cells}.",
             "diff = A - B (points); 95% interval and p: images (paired, closed-form bootstrap variance) plus seed "
             "spread, Welch-Satterthwaite t (docs/comparisons.md). win/loss: the interval excludes 0; tie: it "
             "contains it.", "",
             "| task | seeds | A | B | diff | 95% interval | p | |", "|---|---|---|---|---|---|---|---|"]
    for r in (*cmp["tasks"].to_dict("records"), *cmp["means"].to_dict("records")):
        interval = "" if pd.isna(r.get("low")) else f"[{r['low']:+.2f}, {r['high']:+.2f}]"
        seeds = "" if pd.isna(r.get("seeds", np.nan)) else str(int(r["seeds"]))
        lines.append(f"| {r['task']} | {seeds} | {_num(r.get('A'))} | {_num(r.get('B'))} | "
                     f"{_num(r['diff'], sign=True)} | {interval} | {_p(r.get('p'))} | {r.get('note', '')} |")
    lines += ["", f"win/tie/loss (A vs B, tasks with an interval): {c['win']}/{c['tie']}/{c['loss']}"
              + (f"; {len(cmp['tasks']) - sum(c.values())} task(s) without one" if len(cmp["tasks"]) > sum(c.values())
                 else ""),
              f"across {across['tasks']} tasks ({across['positive']} A > B, {across['negative']} A < B): sign test "
              f"p = {_p(across['sign_p'])}, Wilcoxon signed-rank p = {_p(across['wilcoxon_p'])} (two-sided)"]
    return "\n".join(lines) + "\n"


def plot_forest(cmp: dict, table: str, path: Path) -> None:
    """One line per task and Mean: the difference and its 95% interval (a hollow marker: no interval)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = pd.concat([cmp["tasks"], cmp["means"]], ignore_index=True)
    y = np.arange(len(rows))[::-1]
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(rows) + 1.5))
    ax.axvline(0, color="grey", lw=1)
    for yi, r in zip(y, rows.to_dict("records")):
        mean = r["task"].endswith("Mean")
        colour = {"win": "tab:blue", "loss": "tab:red"}.get(r.get("note"), "black")
        if not pd.isna(r.get("low")):
            ax.plot([r["low"], r["high"]], [yi, yi], color=colour, lw=2.5 if mean else 1.5)
        if not pd.isna(r["diff"]):
            filled = not pd.isna(r.get("low"))
            ax.plot(r["diff"], yi, "D" if mean else "o", color=colour, mfc=colour if filled else "white")
    ax.set_yticks(y, rows["task"])
    a, b = cmp["names"]
    hollow = rows["low"].isna() & rows["diff"].notna()
    ax.set_xlabel(f"{a} - {b} (points), 95% interval" + ("; hollow: no interval (no predictions)" if hollow.any()
                                                          else ""))
    ax.set_title(f"Table {table}: {a} vs {b}")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


# ---- more rows: ranks ----

def nemenyi_cd(k: int, n: int, alpha: float = 1 - LEVEL) -> float:
    """Demsar's critical difference of average ranks: q_alpha sqrt(k (k+1) / (6 N)), q_alpha the studentized
    range quantile for k groups and infinite df over sqrt(2) (Demsar 2006, Table 5a)."""
    q = stats.studentized_range.ppf(1 - alpha, k, np.inf) / np.sqrt(2)
    return float(q * np.sqrt(k * (k + 1) / (6 * n)))


def iman_davenport(chi2: float, n: int, k: int) -> tuple[float, float]:
    """Iman and Davenport's F from Friedman's chi2 and its p (F(k-1, (k-1)(N-1))); Demsar 2006, §3.2.2."""
    f = (n - 1) * chi2 / (n * (k - 1) - chi2) if n * (k - 1) > chi2 else np.inf
    return float(f), float(stats.f.sf(f, k - 1, (k - 1) * (n - 1)))


@dataclass
class Ranks:
    names: list[str]
    ranks: pd.DataFrame  # tasks x rows, 1 = best
    average: pd.Series  # per row, best first
    chi2: float
    p: float
    f: float
    f_p: float
    cd: float
    left_out: list[str]  # tasks where some row has no cell


def rank_rows(result: dict, names: list[str]) -> Ranks:
    means = result["mean"].loc[names, result["tasks"]].T.astype(float)  # tasks x rows
    complete = means.dropna()
    if len(complete) < 2:
        raise TableError(f"--compare {' '.join(names)}: {len(complete)} task(s) where every row has a cell; ranks "
                         "need two or more")
    ranks = complete.apply(lambda r: pd.Series(stats.rankdata(-r.to_numpy()), index=r.index), axis=1)
    n, k = ranks.shape
    chi2, p = stats.friedmanchisquare(*complete.to_numpy().T)
    f, f_p = iman_davenport(chi2, n, k)
    return Ranks(names, ranks, ranks.mean().sort_values(), float(chi2), float(p), f, f_p, nemenyi_cd(k, n),
                 [t for t in means.index if t not in complete.index])


def cliques(average: pd.Series, cd: float) -> list[tuple[int, int]]:
    """(first, last) positions in `average` (sorted) of the maximal runs of rows whose ranks differ by less
    than cd: Demsar's bars of rows not significantly different."""
    r = average.to_numpy()
    spans = [(i, max(j for j in range(i, len(r)) if r[j] - r[i] < cd)) for i in range(len(r))]
    spans = [(i, j) for i, j in spans if j > i]
    return [s for s in spans if not any(o[0] <= s[0] and s[1] <= o[1] and o != s for o in spans)]


def ranks_markdown(rk: Ranks, table: str, cells: str) -> str:
    k, n = len(rk.names), len(rk.ranks)
    lines = [f"Table {table}: {k} rows ranked on {n} tasks (1 = best cell mean; ties share the average rank). "
             f"Cells: {cells}." + (f" Left out (a row has no cell): {', '.join(rk.left_out)}." if rk.left_out else ""),
             "", "| row | average rank |", "|---|---|", *(f"| {name} | {r:.2f} |" for name, r in rk.average.items()),
             "", f"Friedman chi2 = {rk.chi2:.3f}, p = {_p(rk.p)}; Iman-Davenport F = {rk.f:.3f}, p = {_p(rk.f_p)} "
             f"(df {k - 1}, {(k - 1) * (n - 1)}).",
             f"Nemenyi critical difference (alpha 0.05, k = {k}, N = {n}): CD = {rk.cd:.3f}; pairs whose average "
             "ranks differ by at least CD:"]
    order = list(rk.average.index)
    pairs = [(a, b, rk.average[b] - rk.average[a]) for i, a in enumerate(order) for b in order[i + 1:]]
    significant = [f"  {a} better than {b} (rank difference {d:.2f})" for a, b, d in pairs if d >= rk.cd]
    lines += significant or ["  none"]
    return "\n".join(lines) + "\n"


def plot_cd(rk: Ranks, table: str, path: Path) -> None:
    """Demsar's critical-difference diagram: the rank axis (1 at the left), each row at its average rank,
    the CD as a bar, thick bars joining rows not significantly different."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    k, avg = len(rk.names), rk.average
    half = (k + 1) // 2
    fig, ax = plt.subplots(figsize=(8, 1.6 + 0.3 * half + 0.25 * len(cliques(avg, rk.cd))))
    ax.set_xlim(0.5, k + 0.5)
    ax.hlines(0, 1, k, color="black")
    for r in range(1, k + 1):
        ax.vlines(r, 0, 0.08, color="black")
        ax.text(r, 0.12, str(r), ha="center", va="bottom", fontsize=9)
    ax.hlines(0.45, 1, 1 + rk.cd, color="black", lw=2)
    ax.text(1 + rk.cd / 2, 0.5, f"CD = {rk.cd:.2f}", ha="center", va="bottom", fontsize=9)
    for i, (name, r) in enumerate(avg.items()):
        left = i < half
        level = -0.35 * ((i if left else k - 1 - i) + 1) - 0.25 * len(cliques(avg, rk.cd))
        end = 0.6 if left else k + 0.4
        ax.plot([r, r, end], [0, level, level], color="black", lw=1)
        ax.text(end + (-0.05 if left else 0.05), level, f"{name} ({r:.2f})", ha="right" if left else "left",
                va="center", fontsize=9)
    for j, (first, last) in enumerate(cliques(avg, rk.cd)):
        y = -0.12 - 0.2 * j
        ax.hlines(y, avg.iloc[first] - 0.03, avg.iloc[last] + 0.03, color="tab:red", lw=4)
    ax.set_ylim(-0.35 * (half + 1) - 0.25 * len(cliques(avg, rk.cd)), 0.8)
    ax.axis("off")
    ax.set_title(f"Table {table}: average ranks over {len(rk.ranks)} tasks, Nemenyi test (alpha 0.05)", fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", name).strip("-")


def write_comparison(result: dict, table: str, names: list[str], stem: Path, cells: str) -> tuple[str, list[Path]]:
    """Two rows: the paired comparison (<stem>_compare_<A>_vs_<B>.{md,csv,png}, the forest plot); more: the
    ranks (<stem>_ranks_<rows>.{md,csv,png}, the CD diagram). Returns the markdown and the paths written."""
    # every compared row comes from one table built from one record selection under one protocol: one card
    card = "\n".join(["Protocol card:", *(f"- {line}" for line in card_lines(protocol_card(result))), "", ""])
    if len(names) == 2:
        cmp = compare_two(result, (names[0], names[1]))
        text, frame = two_markdown(cmp, table, cells), pd.concat([cmp["tasks"], cmp["means"]], ignore_index=True)
        base = f"{stem.name}_compare_{_slug(names[0])}_vs_{_slug(names[1])}"
    else:
        rk = rank_rows(result, names)
        text = ranks_markdown(rk, table, cells)
        frame = rk.ranks.T.assign(average_rank=rk.ranks.mean()).loc[rk.average.index]
        base = f"{stem.name}_ranks_{'_'.join(_slug(n) for n in names)}"
    text = card + text
    paths = [stem.parent / f"{base}{suffix}" for suffix in (".md", ".csv", ".png")]
    for path, content in zip(paths, (text, frame.to_csv(index=len(names) > 2, index_label="row"))):
        with atomic_path(path) as tmp:
            tmp.write_text(content)
    if len(names) == 2:
        plot_forest(cmp, table, paths[2])
    else:
        plot_cd(rk, table, paths[2])
    return text, paths
