"""Tables 4, 5 and 15 from run records, side by side with the paper; the `runs` table; the offline
mini-benchmark's table.

    python -m vtab_lily.tables [--table 4|5|15|extended|mambapeft|vim|mini|all|runs] [--protocol paper|vtab]
        [--epoch best|final] [--runs DIR] [--out DIR]
    python -m vtab_lily.tables --paper-only [--table 4|5|15|extended|all]     # the published numbers only

A paper table's row takes the records of its backbone and method whose config has the row's values
(`Row.filters`) and whose recipe is the one its preset trains with (the backbone's recipe with the preset
row's recipe settings, e.g. SSF's per-task lr): a smoke run with other epochs is in no row. Records in no
row are listed ("not in any row"), never pooled. `--table runs` has one row per backbone, method, origin
and recipe found in the records (built-in, peft:<tuner> and your own methods), and one column per task
present in them, grouped by benchmark (VTAB-1K, mini); it has no paper numbers to compare with.

One cell per (row, task): the mean over seeds (+- std and n when there are several). `paper` protocol:
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
Vim method of the suite under the recipe its sweep named. The published numbers are package data
(vtab_lily/paper/).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import UserError, cli
from .fileio import atomic_path
from .options import check_writable_folder
from .recipes import MINI_VIM, PRESETS, RECIPE_FIELDS, RECIPE_NAMES, NoTaskSetting, for_task
from .records import VAL_SELECTION, load_records, recipe_identity, selection_order
from .run import split_settings
from .tasks import GROUPS, MINI_TASKS, TASKS, VTAB_TASKS

# vtab_lily/paper/ (package data): the Lily paper's Tables 4, 5 and 15, and the classic baselines' own
# published numbers (the `extended` table)
PAPER_FILES = ("paper_tables.csv", "extended.csv", "mambapeft.csv")
PAPER_TOLERANCE = 0.1  # points between a printed Mean and the Mean recomputed from its row (inclusive)


class TableError(UserError):
    """Nothing to tabulate, or a selection that cannot be made."""


class ProvenanceConflict(TableError):
    """Records that would be pooled into one cell were made on different weights, data or precision."""


@dataclass(frozen=True)
class Row:
    backbone: str
    label: str  # the paper's row label (column `method` of paper_tables.csv)
    method: str
    filters: dict = field(default_factory=dict)  # method-config values a record must have
    origin: str | None = None  # the records' origin label (records.load_records), when it must match
    recipe: str | None = None  # the records' recipe (JSON, `runs` rows); None: the table's preset's


def _lily15(targets):
    return Row("vit-b", f"lily-{''.join(targets)}", "lily", {"targets": list(targets), "ne_1": 12})


TABLES = {
    "4": [Row("vit-b", "fft", "fft"), Row("vit-b", "linear", "linear"),
          Row("vit-b", "adaptformer", "adaptformer", {"width": 32}), Row("vit-b", "bilora", "bilora", {"r": 32}),
          Row("vit-b", "lora", "lora", {"r": 32}), Row("vit-b", "fourierft", "fourierft"),
          Row("vit-b", "mora", "mora"), Row("vit-b", "lily", "lily", {"targets": ["k", "v", "mlp"], "r": 16})],
    "5": [Row("vim-s", "fft", "fft"), Row("vit-b-in1k", "fft", "fft"), Row("vim-s", "linear", "linear"),
          Row("vit-b-in1k", "linear", "linear"), Row("vit-b-in1k", "adaptformer", "adaptformer", {"width": 8}),
          Row("vit-b-in1k", "lora", "lora", {"r": 8}),
          Row("vim-s", "lora", "lora", {"r": 1, "targets": ("in_proj",)}),
          Row("vim-s", "lily-s", "lily", {"preset": "lily-s"}), Row("vim-s", "lily-l", "lily", {"preset": "lily-l"})],
    "15": [_lily15(("q", "v")), _lily15(("mlp",)), _lily15(("q", "v", "mlp")), _lily15(("k", "v", "mlp"))],
    # the classic VTAB-1K baselines beside their own papers' numbers (vtab_lily/paper/extended.csv)
    "extended": [Row("vit-b", "vpt-shallow", "vpt", {"deep": False}), Row("vit-b", "vpt-deep", "vpt", {"deep": True}),
                 Row("vit-b", "bitfit", "bitfit"),
                 Row("vit-b", "adapter", "adapter", {"width": 8, "placement": "mlp", "init": "trunc_normal"}),
                 Row("vit-b", "ssf", "ssf", {"init": "official"}), Row("vit-b", "fact-tt", "fact", {"type": "tt"}),
                 Row("vit-b", "fact-tk", "fact", {"type": "tk"})],
    # the `mini` preset's rows (vtab_lily/recipes.py)
    "mini": [Row("vit-mini", "fft", "fft"), Row("vit-mini", "linear", "linear"),
             Row("vit-mini", "adaptformer", "adaptformer", {"width": 8}), Row("vit-mini", "bilora", "bilora", {"r": 8}),
             Row("vit-mini", "lora", "lora", {"r": 8}), Row("vit-mini", "fourierft", "fourierft", {"n": 256}),
             Row("vit-mini", "mora", "mora", {"r": 8}), Row("vit-mini", "lily", "lily", {"r": 8}),
             Row("vit-mini", "hydra", "hydra", {"r": 2}), Row("vit-mini", "sct", "sct", {"k": 8}),
             Row("vit-mini", "dtl", "dtl", {"r": 2}), Row("vit-mini", "gps", "gps", {"k": 1}),
             Row("vim-mini", "fft", "fft"), Row("vim-mini", "linear", "linear"),
             Row("vim-mini", "lora", "lora", {"r": 1, "targets": ("in_proj",)}),
             Row("vim-mini", "lily-s", "lily", {"preset": "lily-s"}),
             Row("vim-mini", "lily-l", "lily", {"preset": "lily-l"})],
}


def preset_label(method: str, fixed: dict) -> str:
    """A MambaPEFT-style row's label (the `method` column of vtab_lily/paper/mambapeft.csv)."""
    if method == "partial":
        return f"partial-{'+'.join(fixed['parts'])}"
    if method in ("prompt", "affix"):
        return method + ("" if fixed.get("project", True) else "-noproj")
    if method == "lora" and "targets" in fixed:
        return f"lora-{fixed['targets'][0]}"
    if method == "lorap":
        return f"lorap-{'+'.join(fixed['targets'])}" + ("-dora" if fixed.get("dora") else "")
    return fixed.get("preset") or method


def preset_rows(rows) -> list[Row]:
    """Table rows of preset rows: labelled by preset_label (with -r<rank> where two would share one),
    filtered on the method options they fix."""
    labels = [preset_label(method, fixed) for _, method, fixed, _ in rows]
    return [Row(backbone, f"{label}-r{fixed['r']}" if labels.count(label) > 1 else label, method,
                {k: v for k, v in fixed.items() if k not in RECIPE_FIELDS})
            for (backbone, method, fixed, _), label in zip(rows, labels)]


# MambaPEFT's Vim-S rows beside their published numbers (vtab_lily/paper/mambapeft.csv), and every Vim method
# of the suite under one recipe (`sweep --preset vim --set recipe=...`)
TABLES["mambapeft"] = preset_rows(PRESETS["mambapeft"])
TABLES["vim"] = preset_rows(PRESETS["vim"])
TABLES["mini"] += preset_rows(MINI_VIM)
RUNS_TABLE = "runs"  # not a paper table: one row per backbone, method, origin and recipe in the records


TABLE_PRESET = {"4": "table4", "5": "table5", "15": "table15", "extended": "extended", "mini": "mini",
                "mambapeft": "mambapeft", "vim": "vim"}
BENCHMARKS = {"VTAB-1K": VTAB_TASKS, "mini": MINI_TASKS}  # a table's columns are grouped by these


def _same(a, b) -> bool:
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def preset_recipe(table: str, row: Row) -> dict:
    """The recipe settings (e.g. SSF's per-task lr, VPT's drop_path 0) of the preset row that sweeps `row`:
    same backbone and method, fixed options agreeing with the row's filters."""
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


CELL = ["task", "seed", "acc", "epoch", "params", "storage_bytes", *PROVENANCE, "path"]


EPOCH_RULES = ("best", "final")  # tables --epoch: which evaluation of a run a cell reports
DEFAULT_EPOCH = {"paper": "best", "vtab": "final"}  # the Lily paper's rule; VTAB's (and MambaPEFT's)


def cell_results(records: pd.DataFrame, table: str, row: Row, protocol: str, epoch: str | None = None,
                 recipe: str | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per (task, seed): the reported accuracy, the epoch of the evaluation it comes from, params and record
    of the chosen configuration; the row's records). `epoch` (default DEFAULT_EPOCH[protocol]): `paper` protocol, the configuration with the highest
    test accuracy by that rule (best: over its evaluations; final: after the last epoch), its accuracy by the
    rule; `vtab` protocol, the configuration the sweep retrained (best final val200 accuracy), and of its
    retrain the final test accuracy, or (best) the test accuracy at the epoch where its val200 run peaked."""
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
    """Returns mean, std and n frames (rows x tasks + means), params (M), the paper's printed Mean, the
    reported records per row (`cells`), the paths of the records in some row (`used`) and the epoch rule."""
    epoch = epoch or DEFAULT_EPOCH[protocol]
    tasks = table_tasks(table, records)
    means, stds, counts, params, storage, prov, cells, used = {}, {}, {}, {}, {}, {}, {}, set()
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
    return {"mean": mean, "std": pd.DataFrame.from_dict(stds, orient="index"), "tasks": tasks,
            "n": pd.DataFrame.from_dict(counts, orient="index"), "paper": paper_tasks, "cells": cells, "used": used,
            "epoch": epoch, "recipe": recipe}


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


def _group_label(tasks) -> dict:
    """task -> its group, prefixed with the benchmark when the table spans several."""
    return {t: prefix + TASKS[t].group for prefix, members in benchmarks(tasks) for t in members}


def to_markdown(result: dict, table: str, protocol: str) -> str:
    mean, std, n, tasks = result["mean"], result["std"], result["n"], result["tasks"]
    summary = summary_columns(tasks)
    plain = ", ".join(f"{prefix}Mean{len(ts)} = mean over {len(ts)} tasks" for prefix, ts in benchmarks(tasks))
    paper = bool(mean["paper_Mean"].notna().any())  # columns of published Means only where there are some
    paper19 = bool(mean.get("paper_Mean19", pd.Series(dtype=float)).notna().any())
    header = ["row", "params (M)", "storage (KB)", *tasks, *summary, *(["paper Mean", "diff"] if paper else []),
              *(["paper Mean19", "diff19"] if paper19 else [])]
    groups = _group_label(tasks)
    kind = "published" if protocol == "published" else f"{protocol} protocol"
    lines = [f"Table {table} ({kind}): top-1 accuracy (%). Mean = mean of the group means; {plain}; empty = no "
             "record.", f"Cells: {PROTOCOLS[protocol, result.get('epoch')]}.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header),
             "| " + " | ".join(["", "", "", *(groups[t] for t in tasks), *[""] * (len(header) - 3 - len(tasks))])
             + " |"]
    for name, r in mean.iterrows():
        cells = [name, _fmt(r["params_m"], digits=3), _fmt(r["storage_kb"], digits=0)]
        cells += [_fmt(r[t], std.loc[name, t], n.loc[name, t]) for t in tasks]
        cells += [_fmt(r[c]) for c in summary]
        if paper:
            cells += [_fmt(r["paper_Mean"]), "" if pd.isna(r["diff_Mean"]) else f"{r['diff_Mean']:+.1f}"]
        if paper19:
            cells += [_fmt(r["paper_Mean19"]), "" if pd.isna(r["diff_Mean19"]) else f"{r['diff_Mean19']:+.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def to_latex(result: dict) -> str:
    mean, tasks = result["mean"], result["tasks"]
    means = [c for c in summary_columns(tasks) if c.endswith("Mean")]
    cols = ["params_m", *tasks, *means]
    groups = _group_label(tasks)
    spans = [(g, sum(groups[t] == g for t in tasks)) for g in dict.fromkeys(groups[t] for t in tasks)]
    lines = [r"\begin{tabular}{l" + "r" * len(cols) + "}", r"\toprule",
             " & & " + " & ".join(rf"\multicolumn{{{k}}}{{c}}{{{g}}}" for g, k in spans) + " & " * len(means) + r"\\",
             "Method & Params (M) & " + " & ".join(t.replace("_", r"\_") for t in (*tasks, *means)) + r" \\",
             r"\midrule"]
    for name, r in mean.iterrows():
        vals = [_fmt(r[c], digits=3 if c == "params_m" else 1) or "--" for c in cols]
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


def write_outputs(result: dict, table: str, protocol: str, out: Path) -> list[Path]:
    """<out>/table<table>_<protocol>[_<epoch rule> where not the protocol's default][_<--recipe>].{md,tex,csv,png}"""
    rule = "" if result["epoch"] == DEFAULT_EPOCH[protocol] else f"_{result['epoch']}"
    rule += f"_{result['recipe']}" if result.get("recipe") else ""
    stem = out / (f"{table}_{protocol}{rule}" if table == RUNS_TABLE else f"table{table}_{protocol}{rule}")
    written = []
    for suffix, text in ((".md", to_markdown(result, table, protocol)), (".tex", to_latex(result)),
                         (".csv", result["mean"].to_csv(index_label="row"))):
        with atomic_path(stem.with_suffix(suffix)) as tmp:
            tmp.write_text(text)
        written.append(stem.with_suffix(suffix))
    plot_difference(result, table, stem.with_suffix(".png"))
    return [*written, stem.with_suffix(".png")]


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
    parser.add_argument("--table", default="all", choices=[*TABLES, RUNS_TABLE, "all"],
                        help="a paper table, all of them, or `runs`: one row per backbone, method, origin and "
                             "recipe in the records (your own methods included), one column per recorded task")
    parser.add_argument("--protocol", default="paper", choices=["paper", "vtab"])
    parser.add_argument("--epoch", choices=EPOCH_RULES, help="the epoch rule: best = the best of a run's "
                        "evaluations (the Lily paper; under --protocol vtab the epoch where the val200 run peaked), "
                        "final = after the last epoch (MambaPEFT, VTAB); default best for paper, final for vtab")
    parser.add_argument("--recipe", choices=RECIPE_NAMES, help="the named recipe the rows take where their preset "
                        "names none (e.g. --table vim --recipe mambapeft after sweep --preset vim --set "
                        "recipe=mambapeft); default: the backbone's own")
    parser.add_argument("--runs", default="results/runs")
    parser.add_argument("--out", default="results/tables")
    parser.add_argument("--paper", nargs="+", help="the published numbers (CSV files; default: the package's "
                        "vtab_lily/paper/paper_tables.csv, extended.csv and mambapeft.csv)")
    parser.add_argument("--paper-only", action="store_true",
                        help="print the published tables and the check of their printed Means; read no records, "
                             "write nothing")
    parser.add_argument("--select", action="append", default=[], metavar="COLUMN=PREFIX",
                        help="keep records whose weights_id, data_id or precision starts with PREFIX")
    args = parser.parse_args(argv)
    names = list(TABLES) if args.table == "all" else [args.table]
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
    results = {table: build_table(table, records, args.protocol, paper, args.epoch, args.recipe) for table in names}
    out = Path(args.out)
    for table, result in results.items():
        print(to_markdown(result, table, args.protocol))
        for path in write_outputs(result, table, args.protocol, out):
            print(f"wrote {path}")
        print()
    lines = not_in_rows(records, set().union(*(r["used"] for r in results.values())))
    if lines:
        print(f"not in any row of table {', '.join(names)} (other backbones, methods, configurations or recipes; "
              "never pooled):", *lines, sep="\n")
    report_paper_check(paper, names, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
