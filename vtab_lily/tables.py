"""Tables 4, 5 and 15 from run records, side by side with the paper; the `runs` table; the offline
mini-benchmark's table.

    python -m vtab_lily.tables [--table 4|5|15|extended|mambapeft|vim|mini|all|runs] [--protocol paper|vtab]
        [--epoch best|final] [--ci none|std|ci95] [--runs DIR] [--out DIR]
    python -m vtab_lily.tables --paper-only [--table 4|5|15|extended|all]     # the published numbers only
    python -m vtab_lily.tables --table T --compare A B [C ...]   # paired tests, ranks (docs/comparisons.md)
    python -m vtab_lily.tables --table cost --cost FILE.csv [--runs DIR]       # python -m vtab_lily.cost's CSV

A paper table's row takes the records of its backbone and method whose config has the row's values
(`Row.filters`) and whose recipe is the one its preset trains with (the backbone's recipe with the preset
row's recipe settings, e.g. SSF's per-task lr): a smoke run with other epochs is in no row. Records in no
row are listed ("not in any row"), never pooled. `--table runs` has one row per backbone, method, origin
and recipe found in the records (built-in, peft:<tuner> and your own methods), and one column per task
present in them, grouped by benchmark (VTAB-1K, mini); it has no paper numbers to compare with.

One cell per (row, task): the mean over seeds, with its 95% interval from the runs' test predictions (a
two-way bootstrap over test images and seeds, vtab_lily/intervals.py; `--ci std`: +- std and n; a table
whose records have no predictions prints that), a protocol card above the table. `paper` protocol:
per seed, the best test accuracy of the best configuration (selected on the test set, as the paper).
`vtab` protocol: per seed, the configuration with the best final val200 accuracy (records.VAL_SELECTION;
ties: the smaller run id), and the final test accuracy of its retrain on train800val200 (the record with
the same identity but the splits). Group means (Natural 7, Specialized 4, Structured 8), Mean = mean of
the group means (the paper's definition), Mean19 = plain mean over the 19 tasks, params (M) = mean over
tasks of the chosen configurations, storage (KB) likewise (fp32, but 1 bit per Bi-LoRA weight). Missing
cells stay empty. Records pooled into one row share their weights and precision per backbone and their
data per (backbone, task, eval split). Writes Markdown (also printed), LaTeX, CSV and a heat map of ours
minus paper per table, and checks the paper's own printed Means. Table `mini`: Table 4's methods on
vit-mini and Table 5's on vim-mini over the mini VTAB (groups of 2-3 tasks, Mean7 the plain mean); it has
no paper numbers, so its heat map shows our accuracies; its vim section adds BitFit and MambaPEFT's methods on
vim-mini. `--epoch final` reports the accuracy after the last epoch instead of the best evaluation (the
`vtab` protocol's default; `cell_results` says what each rule means under each protocol). Table `mambapeft`:
MambaPEFT's Vim-S rows beside their published group means and 19-task Avg (no per-task numbers); `vim`: every
Vim method of the suite under the recipe its sweep named. Table `vpetl`: V-PETL Bench's VTAB-1K rows of the
methods the suite has beside theirs, with PPT (`ppt`); `cost`: the cost CSV beside the records' Means and PPT
(docs/cost.md). The published numbers are package data (vtab_lily/paper/).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd

from . import intervals
from .errors import UserError, cli
from .fileio import atomic_path
from .options import check_writable_folder
from .recipes import MINI_BACKBONES, RECIPE_NAMES, NoTaskSetting, Recipe, for_task
from .records import VAL_SELECTION, load_records, recipe_identity, selection_order
from .rows import PRESETS, TABLE_PRESET, TABLES, Row
from .tasks import GROUPS, MINI_TASKS, TASKS, VTAB_TASKS

# vtab_lily/paper/ (package data): the Lily paper's Tables 4, 5 and 15, and the classic baselines' own
# published numbers (the `extended` table)
PAPER_FILES = ("paper_tables.csv", "extended.csv", "mambapeft.csv", "vpetl.csv")
PAPER_TOLERANCE = 0.1  # points between a printed Mean and the Mean recomputed from its row (inclusive)


class TableError(UserError):
    """Nothing to tabulate, or a selection that cannot be made."""


class ProvenanceConflict(TableError):
    """Records that would be pooled into one cell were made on different weights, data or precision."""


PPT_C = 1e7  # V-PETL Bench's normalisation constant C of PPT (ppt)


def ppt(acc, params):
    """V-PETL Bench's Performance-Parameter Trade-off, PPT = M / 100 * exp(-log10(P / C + 1)): M the plain 19-task
    mean accuracy (%), P the trainable parameters without the head, C = 10^7 (PPT_C). The formula is the V-PETL
    Bench paper's (Xin et al., NeurIPS 2024 Datasets and Benchmarks; its text is not stored here); C is the one
    constant among 10^6 ... 10^8 that reproduces the PPT column of its README's VTAB table (github
    synbol/Parameter-Efficient-Transfer-Learning-Benchmark README.md L415-434, commit c188fad): 16 of its 19
    printed values to two decimals, BitFit, RepAdapter and DTL 0.01 off (docs/cost.md)."""
    return np.asarray(acc, dtype=float) / 100 * np.exp(-np.log10(np.asarray(params, dtype=float) / PPT_C + 1))


RUNS_TABLE = "runs"  # not a paper table: one row per backbone, method, origin and recipe in the records
BENCHMARKS = {"VTAB-1K": VTAB_TASKS, "mini": MINI_TASKS}  # a table's columns are grouped by these


def _same(a, b) -> bool:
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def preset_recipe(table: str, row: Row) -> dict:
    """The recipe settings (e.g. SSF's per-task lr, VPT's drop_path 0) of the preset row that sweeps `row`:
    same backbone and method, fixed options agreeing with the row's filters."""
    from .run import split_settings  # the method registry loads torch: here, so that importing tables does not
    found = []
    for backbone, method, fixed, _ in PRESETS.get(TABLE_PRESET.get(table), []):
        if (backbone, method) == (row.backbone, row.method):
            options, recipe = split_settings(method, fixed)
            if all(_same(options[k], v) for k, v in row.filters.items() if k in options):
                found.append(recipe)
    if any(not _same(r, found[0]) for r in found):
        raise RuntimeError(f"Table {table} row {row.label}: its preset rows differ in their recipe; add a filter")
    return found[0] if found else {}


def row_recipe(table: str, row: Row, task: str, recipe: str | None = None) -> str | None:
    """The recipe (JSON, as load_records gives it) of the row's records of `task`; None when its preset
    has no setting for the task. `recipe` (tables --recipe): the named base recipe of rows whose preset row
    names none (the `vim` preset's, swept with --set recipe=...)."""
    if row.recipe is not None:
        return row.recipe
    try:
        overrides = {**({"recipe": recipe} if recipe else {}), **for_task(preset_recipe(table, row), task)}
    except NoTaskSetting:
        return None
    return json.dumps(recipe_identity(row.backbone, overrides), sort_keys=True)


def recipe_difference(backbone: str, recipe: str) -> str:
    """'epochs=1, lr=0.01': where a record's recipe (JSON) differs from the backbone's own recipe."""
    ours, base = json.loads(recipe), recipe_identity(backbone, {})
    return ", ".join(f"{k}={ours.get(k)}" for k in sorted(set(ours) | set(base)) if ours.get(k) != base.get(k))


def rows_from_records(records: pd.DataFrame) -> list[Row]:
    """The rows of the `runs` table: every (backbone, method, origin, recipe) in the records, the suite's
    methods and outside ones alike; a method name with several origins gets one row per origin, labelled
    with it, and one with several recipes one row per recipe, labelled with its difference to the
    backbone's recipe."""
    if records.empty:
        return []
    keys = records[["backbone", "method", "origin", "recipe"]].drop_duplicates().sort_values(
        ["backbone", "method", "origin", "recipe"])
    origins = keys.groupby(["backbone", "method"])["origin"].transform("nunique") > 1
    recipes = keys.groupby(["backbone", "method", "origin"])["recipe"].transform("size") > 1
    rows = []
    for (b, m, o, r), many_origins, many_recipes in zip(keys.itertuples(index=False), origins, recipes):
        label = m + (f" [{o}]" if many_origins else "")
        label += f" [{recipe_difference(b, r) or 'its recipe'}]" if many_recipes else ""
        rows.append(Row(b, label, m, origin=o, recipe=r))
    return rows


def table_rows(table: str, records: pd.DataFrame) -> list[Row]:
    return rows_from_records(records) if table == RUNS_TABLE else TABLES[table]


TABLE_TASKS = {"mini": MINI_TASKS}  # a table's tasks (others: the 19 of VTAB-1K; `runs`: those recorded)


def table_tasks(table: str, records: pd.DataFrame | None = None) -> list[str]:
    if table == RUNS_TABLE:
        present = set(records["task"]) if records is not None and not records.empty else set()
        return [t for t in TASKS if t in present]
    return list(TABLE_TASKS.get(table, VTAB_TASKS))


def benchmarks(tasks) -> list[tuple[str, list[str]]]:
    """(prefix, tasks) per benchmark the tasks span, in column order; the prefix ('mini ') names the
    benchmark in the summary columns when there are several, else it is ''."""
    present = [(name, [t for t in members if t in tasks]) for name, members in BENCHMARKS.items()]
    present = [(name, members) for name, members in present if members]
    return [(f"{name} " if len(present) > 1 else "", members) for name, members in present]


def _groups(members) -> list[tuple[str, list[str]]]:
    return [(g, [t for t in members if TASKS[t].group == g]) for g in GROUPS]


def summary_columns(tasks) -> list[str]:
    """Per benchmark: the means of its groups present, Mean (of the three group means), the plain mean
    (Mean19 on VTAB-1K)."""
    return [name for prefix, members in benchmarks(tasks) for name in
            (*(prefix + g for g, ts in _groups(members) if ts), f"{prefix}Mean", f"{prefix}Mean{len(members)}")]


def add_means(frame: pd.DataFrame, tasks=VTAB_TASKS) -> pd.DataFrame:
    """Group means, Mean (of the three group means: NaN when a group has no task) and the plain mean for
    complete rows, per benchmark; else NaN."""
    out = frame.copy()
    for prefix, members in benchmarks(tasks):
        groups = pd.DataFrame({g: frame[ts].mean(axis=1, skipna=False) if ts else np.nan
                               for g, ts in _groups(members)}, index=frame.index)
        for g, ts in _groups(members):
            if ts:
                out[prefix + g] = groups[g]
        out[f"{prefix}Mean"] = groups.mean(axis=1, skipna=False)
        out[f"{prefix}Mean{len(members)}"] = frame[members].mean(axis=1, skipna=False)
    return out


def read_paper(*paths: str | Path) -> pd.DataFrame:
    """The published rows of one or more CSVs (default: the package's vtab_lily/paper/ files). A row's
    `mean_of` says which Mean it prints: `groups` (mean of the group means, the default) or `tasks`."""
    sources = [Path(p) for p in paths] or [resources.files("vtab_lily") / "paper" / name for name in PAPER_FILES]
    frames = []
    for source in sources:
        with source.open() as f:
            frames.append(pd.read_csv(f, dtype={"table": str}))
    return pd.concat(frames).rename(columns={"method": "label"}).set_index(["table", "backbone", "label"])


def _mean_of_tasks(paper: pd.DataFrame) -> pd.Series:
    return paper["mean_of"] == "tasks" if "mean_of" in paper else pd.Series(False, index=paper.index)


def check_paper(paper: pd.DataFrame, tolerance: float = PAPER_TOLERANCE) -> pd.DataFrame:
    """Recomputed vs printed Mean of every paper row (by the row's own definition of its Mean); `flag`
    where they differ by more than `tolerance` (a difference of exactly `tolerance` is within it)."""
    means = add_means(paper[list(VTAB_TASKS)])
    recomputed = means["Mean"].where(~_mean_of_tasks(paper), means["Mean19"])
    # a source printing group means only: its plain 19-task mean is the task-weighted mean of the groups (7/4/8)
    groups = published_groups(paper, list(paper.index)).set_axis(paper.index)
    weights = pd.Series({g: sum(TASKS[t].group == g for t in VTAB_TASKS) for g in GROUPS})
    weighted = (groups * weights).sum(axis=1, min_count=len(GROUPS)) / weights.sum()
    recomputed = recomputed.fillna(weighted.where(_mean_of_tasks(paper), groups.mean(axis=1, skipna=False)))
    out = pd.DataFrame({"printed": paper["mean"], "recomputed": recomputed.round(2)})
    out["flag"] = (out["printed"] - out["recomputed"]).abs().round(6) > tolerance  # 50.1 - 50.0 is 0.1000...01
    return out


def published(paper: pd.DataFrame, keys: list[tuple], tasks: list[str]) -> tuple[pd.DataFrame, list]:
    """The paper's per-task numbers of `keys` ((table, backbone, label); NaN where absent) and the Mean to
    compare ours with: the printed Mean, or for a source printing the plain task mean (mean_of `tasks`),
    the mean of the group means of its own tasks (the Mean of Table 4)."""
    cells = pd.DataFrame([paper.loc[k].reindex(tasks) if k in paper.index else pd.Series(np.nan, index=tasks)
                          for k in keys]).astype(float)
    groups_mean = add_means(cells, tasks)["Mean"].round(2) if "Mean" in summary_columns(tasks) else None
    by_tasks = _mean_of_tasks(paper)
    groups = published_groups(paper, keys)
    printed = [np.nan if k not in paper.index else groups.iloc[i].mean().round(2) if groups.iloc[i].notna().all()
               else groups_mean.iloc[i] if by_tasks.get(k, False) else paper.loc[k, "mean"] for i, k in enumerate(keys)]
    return cells, printed


def published_groups(paper: pd.DataFrame, keys: list[tuple]) -> pd.DataFrame:
    """The group means a source prints without its per-task numbers (MambaPEFT's), NaN elsewhere."""
    cols = [g for g in GROUPS if g in paper]
    return pd.DataFrame([paper.loc[k, cols] if k in paper.index else pd.Series(np.nan, index=cols) for k in keys],
                        columns=list(GROUPS)).astype(float).reset_index(drop=True)


def published_mean19(paper: pd.DataFrame, keys: list[tuple]) -> list:
    """The printed plain 19-task mean of the sources that print it (mean_of `tasks`), NaN elsewhere."""
    by_tasks = _mean_of_tasks(paper)
    return [paper.loc[k, "mean"] if k in paper.index and by_tasks.get(k, False) else np.nan for k in keys]


def _matching(records: pd.DataFrame, table: str, row: Row, recipe: str | None = None) -> pd.DataFrame:
    """The records of `row`: its backbone, method (origin), filtered config values and recipe."""
    if records.empty:
        return records
    mask = (records["backbone"] == row.backbone) & (records["method"] == row.method)
    if row.origin is not None:
        mask &= records["origin"] == row.origin
    for key, value in row.filters.items():
        col = f"opt.{key}"
        if col not in records:
            return records.iloc[0:0]
        if isinstance(value, tuple):  # a preset's '+'-joined names: records hold them as a list
            value = list(value)
        want = json.dumps(value) if isinstance(value, (list, dict)) else value
        mask &= records[col] == want
    rec = records[mask]
    recipes = {t: row_recipe(table, row, t, recipe) for t in rec["task"].unique()}
    return rec[rec["recipe"] == rec["task"].map(recipes)]


PROVENANCE = ("weights_id", "data_id", "precision")


def check_provenance(records: pd.DataFrame) -> None:
    """Refuse to pool: per backbone one weights id and one precision, per (backbone, task, eval split)
    one data id (a val200 run and a test run read different split lists). The message names the
    disagreeing records and how to select."""
    if records.empty:
        return
    for keys, column, option in ((["backbone"], "weights_id", "weights"), (["backbone"], "precision", "precision"),
                                 (["backbone", "task", "eval_split"], "data_id", "data")):
        for key, group in records.groupby(keys):
            values = group[column].value_counts()
            if len(values) > 1:
                where = " ".join(map(str, key if isinstance(key, tuple) else (key,)))
                listed = "; ".join(f"{v} ({n} records, e.g. {group[group[column] == v]['path'].iloc[0]})"
                                   for v, n in values.items())
                raise ProvenanceConflict(
                    f"records of {where} differ in {option}: {listed}. Select one with --select {column}=<prefix> "
                    f"(or keep them in separate --runs folders)")


def select(records: pd.DataFrame, selections: list[str]) -> pd.DataFrame:
    """Keep records whose column starts with the given prefix, for each 'column=prefix'."""
    for item in selections:
        column, sep, prefix = item.partition("=")
        if not sep or column not in PROVENANCE:
            raise TableError(f"--select expects one of {list(PROVENANCE)}=<prefix>, got {item!r}")
        if not records.empty:
            records = records[records[column].astype(str).str.startswith(prefix)]
    return records


CELL = ["task", "seed", "acc", "epoch", "params", "storage_bytes", *PROVENANCE, "backbone", "recipe", "path"]


EPOCH_RULES = ("best", "final")  # tables --epoch: which evaluation of a run a cell reports
DEFAULT_EPOCH = {"paper": "best", "vtab": "final"}  # the Lily paper's rule; VTAB's (and MambaPEFT's)


def cell_results(records: pd.DataFrame, table: str, row: Row, protocol: str, epoch: str | None = None,
                 recipe: str | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per (task, seed): the reported accuracy, the epoch of the evaluation it comes from, params and record
    of the chosen configuration; the row's records). `epoch` (default DEFAULT_EPOCH[protocol]): `paper`
    protocol, the configuration with the highest test accuracy by that rule (best: over its evaluations;
    final: after the last epoch), its accuracy by the rule; `vtab` protocol, the configuration the sweep
    retrained (best final val200 accuracy), and of its retrain the final test accuracy, or (best) the test
    accuracy at the epoch where its val200 run peaked."""
    epoch = epoch or DEFAULT_EPOCH[protocol]
    rec = _matching(records, table, row, recipe)
    if rec.empty:
        return pd.DataFrame(columns=CELL), rec
    check_provenance(rec)
    test = rec[rec["eval_split"] == "test"]
    if protocol == "paper":
        column = f"{epoch}_acc"
        best = test.loc[test.groupby(["task", "seed"])[column].idxmax()]
        return best.rename(columns={column: "acc"}).assign(epoch=best[f"{epoch}_epoch"])[CELL], rec
    val = rec[rec["eval_split"] == "val200"]
    chosen = val.loc[sorted(val.index, key=lambda i: selection_order(val.loc[i]))].drop_duplicates(["task", "seed"])
    final = test[test["point"].isin(set(chosen["point"]))]
    if epoch == "final":
        return final.rename(columns={"final_acc": "acc"}).assign(epoch=final["final_epoch"])[CELL], rec
    peak = dict(zip(chosen["point"], chosen["best_epoch"]))  # the val200 run's best evaluation
    acc = [json.loads(evals).get(str(peak[point]), np.nan)
           for point, evals in zip(final["point"], final["acc_by_epoch"])]
    return final.assign(acc=acc, epoch=[peak[point] for point in final["point"]]).dropna(subset=["acc"])[CELL], rec


def build_table(table: str, records: pd.DataFrame, protocol: str, paper: pd.DataFrame,
                epoch: str | None = None, recipe: str | None = None) -> dict:
    """Returns mean, std and n frames (rows x tasks + means), the 95% intervals' bounds (`lo`, `hi`: rows x
    tasks + means, NaN where a cell has no CI) and their bootstrap draws per row (`draws`: draws x tasks +
    means, vtab_lily/intervals.py), params (M), the paper's printed Mean, the reported records per row
    (`cells`), the paths of the records in some row (`used`), the table, protocol and epoch rule."""
    epoch = epoch or DEFAULT_EPOCH[protocol]
    tasks = table_tasks(table, records)
    means, stds, counts, params, storage, prov, cells, used = {}, {}, {}, {}, {}, {}, {}, set()
    lows, highs, draws = {}, {}, {}
    rows = table_rows(table, records)
    for row in rows:
        res, rec = cell_results(records, table, row, protocol, epoch, recipe)
        used |= set(rec["path"]) if len(rec) else set()
        name = f"{row.backbone} {row.label}"
        cells[name] = res
        agg = res.groupby("task")["acc"].agg(["mean", "std", "count"]) if len(res) else None
        means[name] = {t: agg["mean"].get(t, np.nan) if agg is not None else np.nan for t in tasks}
        stds[name] = {t: agg["std"].get(t, np.nan) if agg is not None else np.nan for t in tasks}
        counts[name] = {t: int(agg["count"].get(t, 0)) if agg is not None else 0 for t in tasks}
        draws[name] = add_means(pd.DataFrame({t: cell_draws(res[res["task"] == t], t) for t in tasks}), tasks)
        lows[name], highs[name] = intervals.bounds(draws[name])
        params[name] = res["params"].mean() / 1e6 if len(res) else np.nan
        storage[name] = res["storage_bytes"].astype(float).mean() / 1024 if len(res) else np.nan
        prov[name] = {"weights_id": "|".join(sorted(set(res["weights_id"]))), "precision": "|".join(
            sorted(set(res["precision"]))), "data_ids": " ".join(f"{t}:{d}" for t, d in sorted(
                set(zip(res["task"], res["data_id"]))))}
    mean = add_means(pd.DataFrame.from_dict(means, orient="index", columns=tasks), tasks)
    paper_tasks, printed = published(paper, [(table, r.backbone, r.label) for r in rows], tasks)
    paper_tasks.index = mean.index
    mean["params_m"] = pd.Series(params)
    mean["storage_kb"] = pd.Series(storage)
    mean["paper_Mean"] = printed
    for key in ("weights_id", "precision", "data_ids"):
        mean[key] = pd.Series({name: p[key] for name, p in prov.items()})
    mean["diff_Mean"] = mean["Mean"] - mean["paper_Mean"] if "Mean" in mean else np.nan
    mean["paper_Mean19"] = published_mean19(paper, [(table, r.backbone, r.label) for r in rows])
    mean["diff_Mean19"] = mean["Mean19"] - mean["paper_Mean19"] if "Mean19" in mean else np.nan
    if table == "vpetl":
        mean["ppt"] = ppt(mean["Mean19"], mean["params_m"] * 1e6)
        keys = [(table, r.backbone, r.label) for r in rows]
        mean["paper_ppt"] = [float(paper.loc[k, "ppt"]) if k in paper.index else np.nan for k in keys]
    return {"mean": mean, "std": pd.DataFrame.from_dict(stds, orient="index"), "tasks": tasks,
            "n": pd.DataFrame.from_dict(counts, orient="index"), "paper": paper_tasks, "cells": cells, "used": used,
            "epoch": epoch, "recipe": recipe, "table": table, "protocol": protocol,
            "lo": pd.DataFrame.from_dict(lows, orient="index"), "hi": pd.DataFrame.from_dict(highs, orient="index"),
            "draws": draws}


def cell_draws(cell: pd.DataFrame, task: str) -> np.ndarray:
    """The bootstrap draws of one cell (its rows of cell_results); NaN draws where it has no CI."""
    correct = intervals.cell_correct(cell) if len(cell) else None
    return intervals.bootstrap(correct, task) if correct is not None else np.full(intervals.DRAWS, np.nan)


def paper_result(table: str, paper: pd.DataFrame) -> dict | None:
    """The published rows of `table` in the layout of build_table (None: the table has none)."""
    if table not in paper.index.get_level_values("table"):
        return None
    keys = [k for k in paper.index if k[0] == table]
    tasks = list(VTAB_TASKS)
    cells, printed = published(paper, keys, tasks)
    cells.index = [f"{b} {label}" for _, b, label in keys]
    mean = add_means(cells, tasks)
    mean["params_m"] = pd.to_numeric(paper.loc[keys, "params_m"], errors="coerce").values
    mean["storage_kb"] = np.nan
    groups = published_groups(paper, keys).set_axis(mean.index)
    for g in GROUPS:  # a source printing group means only (MambaPEFT)
        mean[g] = mean[g].fillna(groups[g])
    mean["Mean"] = mean["Mean"].fillna(groups.mean(axis=1, skipna=False))
    mean["paper_Mean"] = printed
    mean["diff_Mean"] = mean["Mean"] - mean["paper_Mean"]
    mean["paper_Mean19"] = published_mean19(paper, keys)
    mean["Mean19"] = mean["Mean19"].fillna(mean["paper_Mean19"])
    mean["diff_Mean19"] = mean["Mean19"] - mean["paper_Mean19"]
    printed_ppt = pd.to_numeric(paper.loc[keys, "ppt"], errors="coerce").values if "ppt" in paper else []
    if np.isfinite(printed_ppt).any():  # V-PETL Bench's, as printed
        mean["ppt"] = printed_ppt
    return {"mean": mean, "std": cells * np.nan, "n": cells.notna().astype(int), "paper": cells, "tasks": tasks}


PROTOCOLS = {  # what a cell holds, per protocol and epoch rule
    ("paper", "best"): "per seed, the best test accuracy (over the run's evaluations) of the best configuration, "
                       "chosen on the test set as the paper did; mean over seeds",
    ("paper", "final"): "per seed, the test accuracy after the last epoch of the configuration where it is "
                        "highest (chosen on the test set); mean over seeds",
    ("vtab", "final"): f"per seed, the configuration with the best {VAL_SELECTION.removesuffix('_acc')} val200 "
                       "accuracy (trained on train800; ties: the smaller run id), retrained on train800val200: its "
                       "final test accuracy; mean over seeds",
    ("vtab", "best"): f"per seed, the configuration with the best {VAL_SELECTION.removesuffix('_acc')} val200 "
                      "accuracy (trained on train800; ties: the smaller run id), retrained on train800val200: its "
                      "test accuracy at the epoch where the val200 run's accuracy was best; mean over seeds",
    ("published", None): "the published numbers (vtab_lily/paper/); the means recomputed from them",
}


def _fmt(value, std=np.nan, n=1, digits=1) -> str:
    if pd.isna(value):
        return ""
    text = f"{value:.{digits}f}"
    return f"{text} ± {std:.1f} (n={n})" if n > 1 and not pd.isna(std) else text


CI_CHOICES = ("none", "std", "ci95")  # tables --ci: what a cell prints beside its mean
DEFAULT_CI = "ci95"  # a table whose records have no predictions prints today's mean +- std (ci_shown)
NO_CI = "no CI"


def ci_shown(result: dict, ci: str) -> str:
    """The --ci a table prints: ci95 falls back to std when none of its cells has an interval (records
    made before predictions were kept, or the published numbers)."""
    lo = result.get("lo")
    return "std" if ci == "ci95" and (lo is None or not lo.notna().any().any()) else ci


def _bound(result: dict, name: str, column: str) -> tuple[float, float]:
    lo, hi = result.get("lo"), result.get("hi")
    if lo is None or name not in lo.index or column not in lo:
        return np.nan, np.nan
    return lo.loc[name, column], hi.loc[name, column]


def _cell(value, std, n, bound: tuple[float, float], ci: str, digits: int = 1) -> str:
    """A cell's text under `ci`: the mean; with ± std (n) (std); with [lo, hi] (n) (ci95; 'no CI' where the
    cell has no interval)."""
    if pd.isna(value) or ci == "none":
        return _fmt(value, digits=digits)
    if ci == "std":
        return _fmt(value, std, n, digits)
    lo, hi = bound
    if pd.isna(lo):
        return f"{_fmt(value, std, n, digits)} {NO_CI}"
    return f"{value:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]" + (f" (n={n})" if n > 1 else "")


def _sorted(values) -> list:
    return sorted({v for v in values if not pd.isna(v)})


def aggregation(tasks) -> dict:
    """What each summary column (summary_columns) is the mean of."""
    out = {}
    for prefix, members in benchmarks(tasks):
        out.update({prefix + g: "mean of the group's tasks" for g, ts in _groups(members) if ts})
        out[f"{prefix}Mean"] = "mean of the group means"
        out[f"{prefix}Mean{len(members)}"] = "plain mean of the tasks"
    return out


def protocol_card(result: dict) -> dict:
    """What a table's numbers mean and rest on (build_table's result): the table, protocol, selection split,
    epoch rule, aggregation, input normalisation, image size, epochs, recipe names, seeds, n per cell (min,
    max, over the cells with records), precision, weights ids per backbone, data ids per task, the interval
    estimator. Two tables whose cards differ (card_differences) do not measure the same thing."""
    from backbones import family  # here: importing the tables does not import torch (backbones does)
    cells = pd.concat([c for c in result["cells"].values() if len(c)] or [pd.DataFrame(columns=CELL)])
    recipes = [(b, json.loads(r)) for b, r in zip(cells["backbone"], cells["recipe"])]
    defaults = {f.name: f.default for f in dataclasses.fields(Recipe)}

    def field_of(key: str) -> list:  # a recipe field's values over the cells (a field at its default is absent)
        return _sorted(r.get(key, defaults[key]) for _, r in recipes)

    n = result["n"].values
    protocol, epoch = result["protocol"], result["epoch"]
    return {
        "table": result["table"], "protocol": protocol,
        "selection_split": "test" if protocol == "paper" else "val200",
        "epoch_rule": epoch, "cells": PROTOCOLS[protocol, epoch],
        "aggregation": aggregation(result["tasks"]),
        "normalization": ["ImageNet mean/std" if v else "none (pixels in [0, 1])" for v in field_of("normalize")],
        "image_size": field_of("image_size"), "epochs": field_of("epochs"),
        "recipes": _sorted((r.get("recipe") or family(b)) + ("-mini" if b in MINI_BACKBONES else "")
                           for b, r in recipes),
        "seeds": [int(v) for v in _sorted(cells["seed"])],
        "n_per_cell": {"min": int(n[n > 0].min()), "max": int(n.max())} if (n > 0).any() else {},
        "precision": _sorted(cells["precision"]),
        "weights_ids": {b: _sorted(g["weights_id"]) for b, g in cells.groupby("backbone")},
        "data_ids": {t: _sorted(g["data_id"]) for t, g in cells.groupby("task")},
        "ci": intervals.ESTIMATOR if ci_shown(result, "ci95") == "ci95" else f"{NO_CI}: the records have no "
              "per-example predictions (made before they were kept)",
    }


def card_differences(a: dict, b: dict) -> list[str]:
    """'key: A vs B' for each field (but the table's name) where two protocol cards differ."""
    return [f"{k}: {a.get(k)} vs {b.get(k)}" for k in dict.fromkeys([*a, *b]) if k != "table" and a.get(k) != b.get(k)]


def _card_text(value) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {_card_text(v)}" for k, v in value.items())
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def card_lines(card: dict) -> list[str]:
    """The card as 'key: value' lines (printed above a table, LaTeX comments)."""
    return [f"{key}: {_card_text(value)}" for key, value in card.items()]


def _group_label(tasks) -> dict:
    """task -> its group, prefixed with the benchmark when the table spans several."""
    return {t: prefix + TASKS[t].group for prefix, members in benchmarks(tasks) for t in members}


def to_markdown(result: dict, table: str, protocol: str, ci: str = DEFAULT_CI) -> str:
    """The table in Markdown: its protocol card (not for the published numbers) above it, cells by `ci`."""
    mean, std, n, tasks = result["mean"], result["std"], result["n"], result["tasks"]
    ci = ci_shown(result, ci)
    summary = summary_columns(tasks)
    plain = ", ".join(f"{prefix}Mean{len(ts)} = mean over {len(ts)} tasks" for prefix, ts in benchmarks(tasks))
    paper = bool(mean["paper_Mean"].notna().any())  # columns of published Means only where there are some
    paper19 = bool(mean.get("paper_Mean19", pd.Series(dtype=float)).notna().any())
    header = ["row", "params (M)", "storage (KB)", *tasks, *summary, *(["paper Mean", "diff"] if paper else []),
              *(["paper Mean19", "diff19"] if paper19 else []), *(["PPT"] if "ppt" in mean else [])]
    groups = _group_label(tasks)
    kind = "published" if protocol == "published" else f"{protocol} protocol"
    lines = [f"Table {table} ({kind}): top-1 accuracy (%). Mean = mean of the group means; {plain}; empty = no "
             "record.", f"Cells: {PROTOCOLS[protocol, result.get('epoch')]}.",
             *([f"Intervals: [lo, hi] = {intervals.LEVEL:.0%} interval (the card's ci); {NO_CI} = records without "
                "per-example predictions."] if ci == "ci95" else []), "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header),
             "| " + " | ".join(["", "", "", *(groups[t] for t in tasks), *[""] * (len(header) - 3 - len(tasks))])
             + " |"]
    for name, r in mean.iterrows():
        cells = [name, _fmt(r["params_m"], digits=3), _fmt(r["storage_kb"], digits=0)]
        cells += [_cell(r[t], std.loc[name, t], n.loc[name, t], _bound(result, name, t), ci) for t in tasks]
        cells += [_cell(r[c], np.nan, 1, _bound(result, name, c), ci) for c in summary]
        if paper:
            cells += [_fmt(r["paper_Mean"]), "" if pd.isna(r["diff_Mean"]) else f"{r['diff_Mean']:+.1f}"]
        if paper19:
            cells += [_fmt(r["paper_Mean19"]), "" if pd.isna(r["diff_Mean19"]) else f"{r['diff_Mean19']:+.1f}"]
        if "ppt" in mean:
            cells.append(_fmt(r["ppt"], digits=2))
        lines.append("| " + " | ".join(cells) + " |")
    card = [] if protocol == "published" else ["Protocol card:", *(f"- {line}" for line in card_lines(
        protocol_card(result))), ""]
    return "\n".join(card + lines) + "\n"


def to_latex(result: dict, ci: str = DEFAULT_CI) -> str:
    """The table in LaTeX (booktabs), its protocol card as comments above it; with ci95, each cell's interval
    in small type after its mean (a cell without one: the mean alone, see the card's `ci`)."""
    mean, tasks = result["mean"], result["tasks"]
    ci = ci_shown(result, ci)
    means = [c for c in summary_columns(tasks) if c.endswith("Mean")]
    cols = ["params_m", *tasks, *means]
    groups = _group_label(tasks)
    spans = [(g, sum(groups[t] == g for t in tasks)) for g in dict.fromkeys(groups[t] for t in tasks)]
    lines = [f"% {line}" for line in ["protocol card", *card_lines(protocol_card(result))]]
    lines += [r"\begin{tabular}{l" + "r" * len(cols) + "}", r"\toprule",
             " & & " + " & ".join(rf"\multicolumn{{{k}}}{{c}}{{{g}}}" for g, k in spans) + " & " * len(means) + r"\\",
             "Method & Params (M) & " + " & ".join(t.replace("_", r"\_") for t in (*tasks, *means)) + r" \\",
             r"\midrule"]
    for name, r in mean.iterrows():
        vals = [_fmt(r[c], digits=3 if c == "params_m" else 1) or "--" for c in cols]
        if ci == "ci95":
            vals = [v + (rf" {{\scriptsize[{lo:.1f}, {hi:.1f}]}}" if not pd.isna(lo) else "")
                    for v, (lo, hi) in zip(vals, (_bound(result, name, c) for c in cols))]
        lines.append(name.replace("_", r"\_") + " & " + " & ".join(vals) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def plot_difference(result: dict, table: str, path: Path) -> None:
    """Heat map of ours minus the paper per task; of our accuracy for a table without paper numbers."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tasks = result["tasks"]
    ours = result["mean"][tasks].astype(float)
    has_paper = np.isfinite(result["paper"].values).any()
    diff = ours - result["paper"].values if has_paper else ours
    fig, ax = plt.subplots(figsize=(12, 0.5 * len(diff) + 2))
    lim = max(1.0, float(np.nanmax(np.abs(diff.values))) if np.isfinite(diff.values).any() else 1.0)
    im = ax.imshow(np.ma.masked_invalid(diff.values), cmap="RdBu" if has_paper else "viridis",
                   vmin=-lim if has_paper else 0, vmax=lim if has_paper else 100, aspect="auto")
    ax.set_xticks(range(len(tasks)), tasks, rotation=60, ha="right")
    ax.set_yticks(range(len(diff)), diff.index)
    for i, j in zip(*np.where(np.isfinite(diff.values))):
        ax.text(j, i, f"{diff.values[i, j]:+.1f}" if has_paper else f"{diff.values[i, j]:.1f}", ha="center",
                va="center", fontsize=7)
    fig.colorbar(im, ax=ax, label="ours - paper (points)" if has_paper else "top-1 accuracy (%)")
    ax.set_title(f"Table {table}: our accuracy minus the paper's (blank: no record)" if has_paper else
                 f"Table {table}: our accuracy (blank: no record)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def output_stem(result: dict, table: str, protocol: str, out: Path) -> Path:
    """<out>/table<table>_<protocol>[_<epoch rule> where not the protocol's default][_<--recipe>]"""
    rule = "" if result["epoch"] == DEFAULT_EPOCH[protocol] else f"_{result['epoch']}"
    rule += f"_{result['recipe']}" if result.get("recipe") else ""
    return out / (f"{table}_{protocol}{rule}" if table == RUNS_TABLE else f"table{table}_{protocol}{rule}")


def to_csv(result: dict) -> str:
    """The mean frame, then the 95% interval's bounds of every task and mean: columns <column>_lo and
    <column>_hi (empty: no CI, whatever --ci prints)."""
    columns = [*result["tasks"], *summary_columns(result["tasks"])]
    bounds = [result[side][columns].add_suffix(f"_{side}") for side in ("lo", "hi")]
    order = [f"{c}_{side}" for c in columns for side in ("lo", "hi")]
    return pd.concat([result["mean"], *bounds], axis=1)[[*result["mean"].columns, *order]].to_csv(index_label="row")


def write_outputs(result: dict, table: str, protocol: str, out: Path, ci: str = DEFAULT_CI) -> list[Path]:
    """output_stem(...).{md,tex,csv,json,png}: the .json is the CSV's metadata, {"protocol_card":
    protocol_card(result), "bounds": ...}."""
    stem = output_stem(result, table, protocol, out)
    written = []
    meta = {"protocol_card": protocol_card(result), "bounds": f"<column>_lo, <column>_hi in {stem.name}.csv: "
            f"the {intervals.LEVEL:.0%} interval of the column's mean; empty: {NO_CI}"}
    for suffix, text in ((".md", to_markdown(result, table, protocol, ci)), (".tex", to_latex(result, ci)),
                         (".csv", to_csv(result)), (".json", json.dumps(meta, indent=1) + "\n")):
        with atomic_path(stem.with_suffix(suffix)) as tmp:
            tmp.write_text(text)
        written.append(stem.with_suffix(suffix))
    plot_difference(result, table, stem.with_suffix(".png"))
    return [*written, stem.with_suffix(".png")]


COST_TABLE = "cost"  # the measured costs (python -m vtab_lily.cost --out FILE) beside the accuracy Means
COST_SHOWN = ["params", "storage_bytes", "step_ms", "step_ratio", "memory_mb", "latency_ratio", "merges",
              "merged_latency_ratio"]


def cost_table(cost: pd.DataFrame, records: pd.DataFrame, protocol: str, paper: pd.DataFrame,
               epoch: str | None = None) -> pd.DataFrame:
    """The cost CSV's rows with the accuracy of the `runs` table's row of the same backbone and method (the one
    labelled with the method: a single origin and recipe), its Mean (of the group means) and plain mean, and
    V-PETL Bench's PPT from that plain mean and the cost row's trainable parameters."""
    out = cost.copy()
    out["Mean"] = out["mean_plain"] = np.nan
    if not records.empty:
        result = build_table(RUNS_TABLE, records, protocol, paper, epoch)
        members = benchmarks(result["tasks"])
        if members:
            prefix, tasks = members[0]
            means = result["mean"]
            for i, r in out.iterrows():
                name = f"{r['backbone']} {r['method']}"
                if name in means.index:
                    columns = [f"{prefix}Mean", f"{prefix}Mean{len(tasks)}"]
                    out.loc[i, ["Mean", "mean_plain"]] = means.loc[name, columns].to_numpy(dtype=float)
    out["ppt"] = ppt(out["mean_plain"], out["params"])
    return out


def cost_markdown(table: pd.DataFrame, meta: dict | None) -> str:
    header = ["backbone", "method", "options", *COST_SHOWN, "Mean", "plain mean", "PPT"]
    lines = ["Cost (python -m vtab_lily.cost): step_ratio and latency ratios over `linear` (the frozen backbone); "
             "memory: " + (meta or {}).get("memory", "see the CSV's metadata") + ". Mean = mean of the group means "
             "of the `runs` table's row, plain mean = over its tasks, PPT = V-PETL Bench's score of the plain mean "
             "(tables.ppt).", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, r in table.iterrows():
        cells = [r["backbone"], r["method"], str(r["options"]), f"{int(r['params']):,}", f"{int(r['storage_bytes']):,}",
                 _fmt(r["step_ms"]), _fmt(r["step_ratio"], digits=2), _fmt(r["memory_mb"]),
                 _fmt(r["latency_ratio"], digits=2), "yes" if r["merges"] else "no",
                 _fmt(r["merged_latency_ratio"], digits=2), _fmt(r["Mean"]), _fmt(r["mean_plain"]),
                 _fmt(r["ppt"], digits=2)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def read_cost(path: str) -> tuple[pd.DataFrame, dict | None]:
    """A cost CSV and its metadata (`<path>.json`, None when absent); TableError when it is not one."""
    from .cost import COLUMNS
    if not Path(path).is_file():
        raise TableError(f"--cost {path}: no such file; write one with python -m vtab_lily.cost --out {path}")
    try:
        cost = pd.read_csv(path)
    except (ValueError, pd.errors.ParserError) as e:
        raise TableError(f"--cost {path}: not a CSV ({e})") from None
    missing = [c for c in COLUMNS if c not in cost]
    if missing:
        raise TableError(f"--cost {path}: not a cost table (no columns {missing}); write one with python -m "
                         "vtab_lily.cost --out FILE")
    meta = Path(f"{path}.json")
    return cost, json.loads(meta.read_text()) if meta.is_file() else None


def not_in_rows(records: pd.DataFrame, used: set[str]) -> list[str]:
    """One line per (backbone, method, recipe) of the records in no row: how many, where the recipe differs
    from the backbone's own, and one of them."""
    rest = records[~records["path"].isin(used)]
    lines = []
    for (backbone, method, recipe), group in rest.groupby(["backbone", "method", "recipe"]):
        diff = recipe_difference(backbone, recipe)
        lines.append(f"  {backbone} {method}" + (f" [recipe: {diff}]" if diff else "") +
                     f": {len(group)} record(s), e.g. {group['path'].iloc[0]}")
    return lines


def report_paper_check(paper: pd.DataFrame, tables: list[str], out: Path | None) -> None:
    """Print the check of the printed Means of `tables` (nothing for tables without paper numbers) and
    write it under `out` (unless None)."""
    check = check_paper(paper)
    check = check[check.index.get_level_values("table").isin(tables)]
    if check.empty:
        return
    flagged = check[check["flag"]]
    print(f"Paper check: {len(check)} printed Means recomputed from their per-task numbers (or group means); "
          f"{len(flagged)} differ by more than {PAPER_TOLERANCE}:")
    for (table, backbone, label), r in flagged.iterrows():
        print(f"  Table {table} {backbone} {label}: printed {r['printed']}, recomputed {r['recomputed']:.2f}")
    if out is not None:
        check_path = out / ("paper_check.csv" if len(tables) > 1 else f"paper_check_table{tables[0]}.csv")
        with atomic_path(check_path) as tmp:
            check.to_csv(tmp)
        print(f"wrote {check_path}")


@cli
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vtab_lily.tables", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", default="all", choices=[*TABLES, RUNS_TABLE, COST_TABLE, "all"],
                        help="a paper table, all of them, or `runs`: one row per backbone, method, origin and "
                             "recipe in the records (your own methods included), one column per recorded task")
    parser.add_argument("--protocol", default="paper", choices=["paper", "vtab"])
    parser.add_argument("--epoch", choices=EPOCH_RULES, help="the epoch rule: best = the best of a run's "
                        "evaluations (the Lily paper; under --protocol vtab the epoch where the val200 run peaked), "
                        "final = after the last epoch (MambaPEFT, VTAB); default best for paper, final for vtab")
    parser.add_argument("--recipe", choices=RECIPE_NAMES, help="the named recipe the rows take where their preset "
                        "names none (e.g. --table vim --recipe mambapeft after sweep --preset vim --set "
                        "recipe=mambapeft); default: the backbone's own")
    parser.add_argument("--ci", default=DEFAULT_CI, choices=CI_CHOICES, help="what a cell prints beside its mean: "
                        "none; std = +- the std over seeds (n); ci95 = the 95%% interval [lo, hi] of a bootstrap over "
                        "test images and seeds (docs/statistics.md); default ci95 (a table whose records have no "
                        "predictions prints std); the CSV carries the bounds whatever it prints")
    parser.add_argument("--runs", default="results/runs")
    parser.add_argument("--out", default="results/tables")
    parser.add_argument("--paper", nargs="+", help="the published numbers (CSV files; default: the package's "
                        "vtab_lily/paper/paper_tables.csv, extended.csv and mambapeft.csv)")
    parser.add_argument("--paper-only", action="store_true",
                        help="print the published tables and the check of their printed Means; read no records, "
                             "write nothing")
    parser.add_argument("--select", action="append", default=[], metavar="COLUMN=PREFIX",
                        help="keep records whose weights_id, data_id or precision starts with PREFIX")
    parser.add_argument("--compare", nargs="+", metavar="ROW", help="compare rows of --table instead of writing "
                        "it: two (a row label, e.g. lily, or '<backbone> <label>' where the label is on several "
                        "backbones): paired differences per task with intervals, tests across tasks, a forest plot; "
                        "more: average ranks, Friedman and Nemenyi tests, a critical-difference diagram "
                        "(docs/comparisons.md)")
    parser.add_argument("--cost", metavar="FILE.csv", help="--table cost: the CSV python -m vtab_lily.cost wrote "
                        "(its accuracy columns come from the records under --runs, when there are any)")
    args = parser.parse_args(argv)
    if args.table == COST_TABLE:
        return write_cost(args)
    names = list(TABLES) if args.table == "all" else [args.table]
    if args.compare and (args.table == "all" or args.paper_only or len(args.compare) < 2):
        raise UserError("--compare needs one --table (not all), no --paper-only, and two rows or more")
    missing = [p for p in args.paper or [] if not Path(p).is_file()]
    if missing:
        raise UserError(f"--paper {' '.join(missing)}: no such file; give CSV files of published numbers")
    if not args.paper_only:
        check_writable_folder(args.out, "tables", "--out")
    try:
        paper = read_paper(*(args.paper or []))
    except (ValueError, KeyError) as e:  # pandas' parser errors, a CSV without the table/backbone/method columns
        raise UserError(f"--paper {' '.join(args.paper)}: not a table of published numbers ({type(e).__name__}: "
                        f"{e})") from None
    if args.paper_only:
        shown = []
        for table in names:
            result = paper_result(table, paper)
            if result is not None:
                print(to_markdown(result, table, "published"))
                shown.append(table)
        if not shown:
            raise TableError(f"--paper-only: no published numbers for table {args.table}")
        report_paper_check(paper, shown, None)
        return 0
    records = load_records(args.runs)
    if records.empty:
        raise TableError(f"no finished run records under {args.runs}" + ("" if Path(args.runs).is_dir() else
                         " (no such folder)") + "; pass the folder your runs wrote with --runs")
    records = select(records, args.select)
    if records.empty:
        raise TableError(f"no records under {args.runs} match {' '.join(args.select)}")
    if args.compare:
        from .compare import resolve_rows, write_comparison
        rows = resolve_rows(args.compare, [f"{r.backbone} {r.label}" for r in table_rows(args.table, records)],
                            args.table)
        result = build_table(args.table, records, args.protocol, paper, args.epoch, args.recipe)
        text, paths = write_comparison(result, args.table, rows, output_stem(result, args.table, args.protocol,
                                       Path(args.out)), PROTOCOLS[args.protocol, result["epoch"]])
        print(text, *(f"wrote {p}" for p in paths), sep="\n")
        return 0
    results = {table: build_table(table, records, args.protocol, paper, args.epoch, args.recipe) for table in names}
    out = Path(args.out)
    for table, result in results.items():
        print(to_markdown(result, table, args.protocol, args.ci))
        for path in write_outputs(result, table, args.protocol, out, args.ci):
            print(f"wrote {path}")
        print()
    lines = not_in_rows(records, set().union(*(r["used"] for r in results.values())))
    if lines:
        print(f"not in any row of table {', '.join(names)} (other backbones, methods, configurations or recipes; "
              "never pooled):", *lines, sep="\n")
    report_paper_check(paper, names, out)
    return 0


def write_cost(args) -> int:
    """--table cost: the cost CSV beside the records' accuracy, to <out>/cost.{md,csv}."""
    if not args.cost:
        raise TableError("--table cost needs --cost FILE.csv (written by python -m vtab_lily.cost --out FILE.csv)")
    cost, meta = read_cost(args.cost)
    check_writable_folder(args.out, "tables", "--out")
    records = select(load_records(args.runs), args.select) if Path(args.runs).is_dir() else pd.DataFrame()
    table = cost_table(cost, records, args.protocol, read_paper(*(args.paper or [])), args.epoch)
    text = cost_markdown(table, meta)
    print(text)
    out = Path(args.out)
    for path, content in ((out / "cost.md", text), (out / "cost.csv", table.to_csv(index=False))):
        with atomic_path(path) as tmp:
            tmp.write_text(content)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
