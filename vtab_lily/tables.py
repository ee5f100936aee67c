"""Tables 4, 5 and 15 from run records, side by side with the paper; the `runs` table; the offline
mini-benchmark's table.

    python -m vtab_lily.tables [--table 4|5|15|extended|mini|all|runs] [--protocol paper|vtab] [--runs DIR] [--out DIR]

`--table runs` has one row per backbone, method and origin found in the records (built-in, peft:<tuner>
and your own methods), chosen and averaged as the paper rows; it has no paper numbers to compare with.

One cell per (row, task): the mean over seeds (+- std and n when there are several). `paper` protocol:
per seed, the best test accuracy of the best configuration (selected on the test set, as the paper).
`vtab` protocol: per seed, the configuration with the best final val200 accuracy, and the final test
accuracy of its retrain on train800val200. Group means (Natural 7, Specialized 4, Structured 8), Mean =
mean of the group means (the paper's definition), Mean19 = plain mean over the 19 tasks, params (M) = mean
over tasks of the chosen configurations, storage (KB) likewise (fp32, but 1 bit per Bi-LoRA weight).
Missing cells stay empty. Writes Markdown (also printed), LaTeX,
CSV and a heat map of ours minus paper per table, and checks the paper's own printed Means. Table `mini`:
Table 4's methods on vit-mini and Table 5's on vim-mini over the mini VTAB (groups of 2-3 tasks, Mean7 the
plain mean); it has no paper numbers, so its heat map shows our accuracies.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .fileio import atomic_path
from .records import load_records
from .tasks import GROUPS, MINI_TASKS, TASKS, VTAB_TASKS

PAPER_CSV = Path(__file__).resolve().parent.parent / "results" / "paper" / "paper_tables.csv"
EXTENDED_CSV = PAPER_CSV.with_name("extended.csv")  # the classic baselines' own published numbers


@dataclass(frozen=True)
class Row:
    backbone: str
    label: str  # the paper's row label (column `method` of paper_tables.csv)
    method: str
    filters: dict = field(default_factory=dict)  # method-config values a record must have
    origin: str | None = None  # the records' origin label (records.load_records), when it must match


def _lily15(targets):
    return Row("vit-b", f"lily-{''.join(targets)}", "lily", {"targets": list(targets), "ne_1": 12})


TABLES = {
    "4": [Row("vit-b", "fft", "fft"), Row("vit-b", "linear", "linear"),
          Row("vit-b", "adaptformer", "adaptformer", {"width": 32}), Row("vit-b", "bilora", "bilora", {"r": 32}),
          Row("vit-b", "lora", "lora", {"r": 32}), Row("vit-b", "fourierft", "fourierft"),
          Row("vit-b", "mora", "mora"), Row("vit-b", "lily", "lily", {"targets": ["k", "v", "mlp"], "r": 16})],
    "5": [Row("vim-s", "fft", "fft"), Row("vit-b-in1k", "fft", "fft"), Row("vim-s", "linear", "linear"),
          Row("vit-b-in1k", "linear", "linear"), Row("vit-b-in1k", "adaptformer", "adaptformer", {"width": 8}),
          Row("vit-b-in1k", "lora", "lora", {"r": 8}), Row("vim-s", "lora", "lora"),
          Row("vim-s", "lily-s", "lily", {"preset": "lily-s"}), Row("vim-s", "lily-l", "lily", {"preset": "lily-l"})],
    "15": [_lily15(("q", "v")), _lily15(("mlp",)), _lily15(("q", "v", "mlp")), _lily15(("k", "v", "mlp"))],
    # the classic VTAB-1K baselines beside their own papers' numbers (results/paper/extended.csv)
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
             Row("vim-mini", "fft", "fft"), Row("vim-mini", "linear", "linear"), Row("vim-mini", "lora", "lora"),
             Row("vim-mini", "lily-s", "lily", {"preset": "lily-s"}),
             Row("vim-mini", "lily-l", "lily", {"preset": "lily-l"})],
}
RUNS_TABLE = "runs"  # not a paper table: one row per backbone, method and origin found in the records


def rows_from_records(records: pd.DataFrame) -> list[Row]:
    """The rows of the `runs` table: every (backbone, method, origin) in the records, the suite's methods
    and outside ones alike; a method name with several origins gets one row per origin, labelled with it."""
    if records.empty:
        return []
    keys = records[["backbone", "method", "origin"]].drop_duplicates().sort_values(["backbone", "method", "origin"])
    several = keys.groupby(["backbone", "method"])["origin"].transform("size") > 1
    return [Row(b, f"{m} [{o}]" if many else m, m, origin=o)
            for (b, m, o), many in zip(keys.itertuples(index=False), several)]


def table_rows(table: str, records: pd.DataFrame) -> list[Row]:
    return rows_from_records(records) if table == RUNS_TABLE else TABLES[table]


TABLE_TASKS = {"mini": MINI_TASKS}  # a table's tasks (others: the 19 of VTAB-1K)


def table_tasks(table: str) -> list[str]:
    return list(TABLE_TASKS.get(table, VTAB_TASKS))


def plain_mean(tasks) -> str:
    """The plain-mean column: Mean19 on VTAB-1K."""
    return f"Mean{len(tasks)}"


def add_means(frame: pd.DataFrame, tasks=VTAB_TASKS) -> pd.DataFrame:
    """Group means, Mean (of the three group means) and the plain mean (Mean19) for complete rows; else NaN."""
    out = frame.copy()
    for g in GROUPS:
        out[g] = frame[[t for t in tasks if TASKS[t].group == g]].mean(axis=1, skipna=False)
    out["Mean"] = out[list(GROUPS)].mean(axis=1, skipna=False)
    out[plain_mean(tasks)] = frame[list(tasks)].mean(axis=1, skipna=False)
    return out


def read_paper(*paths: str | Path) -> pd.DataFrame:
    """The published rows of one or more CSVs (default: the Lily paper's tables and extended.csv). A row's
    `mean_of` says which Mean it prints: `groups` (mean of the group means, the default) or `tasks`."""
    df = pd.concat([pd.read_csv(p, dtype={"table": str}) for p in paths or (PAPER_CSV, EXTENDED_CSV)])
    return df.rename(columns={"method": "label"}).set_index(["table", "backbone", "label"])


def _mean_of_tasks(paper: pd.DataFrame) -> pd.Series:
    return paper["mean_of"] == "tasks" if "mean_of" in paper else pd.Series(False, index=paper.index)


def check_paper(paper: pd.DataFrame, tolerance: float = 0.1) -> pd.DataFrame:
    """Recomputed vs printed Mean of every paper row (by the row's own definition of its Mean); `flag`
    where they differ by more than `tolerance`."""
    means = add_means(paper[list(VTAB_TASKS)])
    recomputed = means["Mean"].where(~_mean_of_tasks(paper), means["Mean19"])
    out = pd.DataFrame({"printed": paper["mean"], "recomputed": recomputed.round(2)})
    out["flag"] = (out["printed"] - out["recomputed"]).abs() > tolerance
    return out


def _matching(records: pd.DataFrame, row: Row) -> pd.DataFrame:
    if records.empty:
        return records
    mask = (records["backbone"] == row.backbone) & (records["method"] == row.method)
    if row.origin is not None:
        mask &= records["origin"] == row.origin
    for key, value in row.filters.items():
        col = f"opt.{key}"
        if col not in records:
            return records.iloc[0:0]
        want = json.dumps(value) if isinstance(value, (list, dict)) else value
        mask &= records[col] == want
    return records[mask]


def _config_key(frame: pd.DataFrame) -> pd.Series:
    cols = sorted(c for c in frame.columns if c.startswith("opt."))
    return frame[cols].apply(lambda r: "|".join(map(str, r)), axis=1) if cols else pd.Series("", index=frame.index)


class ProvenanceConflict(ValueError):
    """Records that would be pooled into one cell were made on different weights, data or precision."""


PROVENANCE = ("weights_id", "data_id", "precision")


def check_provenance(records: pd.DataFrame) -> None:
    """Refuse to pool: per backbone one weights id and one precision, per (backbone, task) one data id.
    The message names the disagreeing records and how to select."""
    if records.empty:
        return
    for keys, column, option in ((["backbone"], "weights_id", "weights"), (["backbone"], "precision", "precision"),
                                 (["backbone", "task"], "data_id", "data")):
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
            raise ValueError(f"--select expects one of {list(PROVENANCE)}=<prefix>, got {item!r}")
        if not records.empty:
            records = records[records[column].astype(str).str.startswith(prefix)]
    return records


def cell_results(records: pd.DataFrame, row: Row, protocol: str) -> pd.DataFrame:
    """Per (task, seed): the reported accuracy and the params of the chosen configuration."""
    rec = _matching(records, row)
    if rec.empty:
        return pd.DataFrame(columns=["task", "seed", "acc", "params", "storage_bytes", *PROVENANCE])
    rec = rec.assign(config=_config_key(rec))
    check_provenance(rec)
    test = rec[rec["eval_split"] == "test"]
    if protocol == "paper":
        best = test.loc[test.groupby(["task", "seed"])["best_acc"].idxmax()]
        return best.rename(columns={"best_acc": "acc"})[["task", "seed", "acc", "params", "storage_bytes", *PROVENANCE]]
    val = rec[rec["eval_split"] == "val200"]
    chosen = val.loc[val.groupby(["task", "seed"])["final_acc"].idxmax()][["task", "seed", "config"]]
    final = chosen.merge(test, on=["task", "seed", "config"])
    return final.rename(columns={"final_acc": "acc"})[["task", "seed", "acc", "params", "storage_bytes", *PROVENANCE]]


def build_table(table: str, records: pd.DataFrame, protocol: str, paper: pd.DataFrame) -> dict:
    """Returns mean, std and n frames (rows x tasks + means), params (M) and the paper's printed Mean."""
    tasks = table_tasks(table)
    means, stds, counts, params, storage, prov = {}, {}, {}, {}, {}, {}
    rows = table_rows(table, records)
    for row in rows:
        res = cell_results(records, row, protocol)
        name = f"{row.backbone} {row.label}"
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
    paper_rows = [(table, r.backbone, r.label) for r in rows]
    paper_tasks = pd.DataFrame([paper.loc[k, tasks] if k in paper.index else
                                pd.Series(np.nan, index=tasks) for k in paper_rows], index=mean.index)
    # a source printing the 19-task mean is shown with the Mean of Table 4 (groups), from its own tasks
    groups_mean = add_means(paper_tasks.astype(float), tasks)["Mean"].round(2)
    by_tasks = _mean_of_tasks(paper)
    printed = [np.nan if k not in paper.index else groups_mean.iloc[i] if by_tasks.get(k, False)
               else paper.loc[k, "mean"] for i, k in enumerate(paper_rows)]
    mean["params_m"] = pd.Series(params)
    mean["storage_kb"] = pd.Series(storage)
    mean["paper_Mean"] = printed
    for key in ("weights_id", "precision", "data_ids"):
        mean[key] = pd.Series({name: p[key] for name, p in prov.items()})
    mean["diff_Mean"] = mean["Mean"] - mean["paper_Mean"]
    return {"mean": mean, "std": pd.DataFrame.from_dict(stds, orient="index"),
            "n": pd.DataFrame.from_dict(counts, orient="index"), "paper": paper_tasks.astype(float)}


def _fmt(value, std=np.nan, n=1, digits=1) -> str:
    if pd.isna(value):
        return ""
    text = f"{value:.{digits}f}"
    return f"{text} ± {std:.1f} (n={n})" if n > 1 and not pd.isna(std) else text


def to_markdown(result: dict, table: str, protocol: str) -> str:
    mean, std, n = result["mean"], result["std"], result["n"]
    tasks = table_tasks(table)
    plain = plain_mean(tasks)
    header = ["row", "params (M)", "storage (KB)", *tasks, *GROUPS, "Mean", plain, "paper Mean", "diff"]
    groups = ["", "", ""] + [TASKS[t].group for t in tasks] + ["", "", "", "", "", ""]
    lines = [f"Table {table} ({protocol} protocol): top-1 accuracy (%). Mean = mean of the group means; "
             f"{plain} = mean over {len(tasks)} tasks; empty = no record.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header),
             "| " + " | ".join(groups) + " |"]
    for name, r in mean.iterrows():
        cells = [name, _fmt(r["params_m"], digits=3), _fmt(r["storage_kb"], digits=0)]
        cells += [_fmt(r[t], std.loc[name, t], n.loc[name, t]) for t in tasks]
        cells += [_fmt(r[c]) for c in (*GROUPS, "Mean", plain, "paper_Mean")]
        cells.append("" if pd.isna(r["diff_Mean"]) else f"{r['diff_Mean']:+.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def to_latex(result: dict, table: str) -> str:
    mean = result["mean"]
    tasks = table_tasks(table)
    cols = ["params_m", *tasks, "Mean"]
    spans = [(g, sum(TASKS[t].group == g for t in tasks)) for g in GROUPS]
    lines = [r"\begin{tabular}{l" + "r" * len(cols) + "}", r"\toprule",
             " & & " + " & ".join(rf"\multicolumn{{{k}}}{{c}}{{{g}}}" for g, k in spans) + r" & \\",
             "Method & Params (M) & " + " & ".join(t.replace("_", r"\_") for t in tasks) + r" & Mean \\",
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
    tasks = table_tasks(table)
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
    stem = out / (f"{table}_{protocol}" if table == RUNS_TABLE else f"table{table}_{protocol}")
    written = []
    for suffix, text in ((".md", to_markdown(result, table, protocol)), (".tex", to_latex(result, table)),
                         (".csv", result["mean"].to_csv(index_label="row"))):
        with atomic_path(stem.with_suffix(suffix)) as tmp:
            tmp.write_text(text)
        written.append(stem.with_suffix(suffix))
    plot_difference(result, table, stem.with_suffix(".png"))
    return [*written, stem.with_suffix(".png")]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vtab_lily.tables", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", default="all", choices=[*TABLES, RUNS_TABLE, "all"],
                        help="a paper table, all of them, or `runs`: one row per backbone, method and origin in "
                             "the records (your own methods included)")
    parser.add_argument("--protocol", default="paper", choices=["paper", "vtab"])
    parser.add_argument("--runs", default="results/runs")
    parser.add_argument("--out", default="results/tables")
    parser.add_argument("--paper", nargs="+", default=[str(PAPER_CSV), str(EXTENDED_CSV)],
                        help="the published numbers (CSV files)")
    parser.add_argument("--select", action="append", default=[], metavar="COLUMN=PREFIX",
                        help="keep records whose weights_id, data_id or precision starts with PREFIX")
    args = parser.parse_args(argv)
    paper = read_paper(*args.paper)
    out = Path(args.out)
    try:
        records = select(load_records(args.runs), args.select)
        results = {table: build_table(table, records, args.protocol, paper)
                   for table in (TABLES if args.table == "all" else [args.table])}
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for table, result in results.items():
        if result["mean"].empty:
            print(f"Table {table}: no records under {args.runs}")
            continue
        print(to_markdown(result, table, args.protocol))
        for path in write_outputs(result, table, args.protocol, out):
            print(f"wrote {path}")
        print()
    check = check_paper(paper)
    if args.table != "all":
        check = check[check.index.get_level_values("table") == args.table]
    flagged = check[check["flag"]]
    print(f"Paper check: {len(check)} printed Means recomputed from their per-task numbers; "
          f"{len(flagged)} differ by more than 0.1:")
    for (table, backbone, label), r in flagged.iterrows():
        print(f"  Table {table} {backbone} {label}: printed {r['printed']}, recomputed {r['recomputed']:.2f}")
    check_path = out / ("paper_check.csv" if args.table == "all" else f"paper_check_table{args.table}.csv")
    with atomic_path(check_path) as tmp:
        check.to_csv(tmp)
    print(f"wrote {check_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
