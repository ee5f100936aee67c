"""Attention granularity (paper Fig. 5): accuracy against the number of Lily experts ne per task, from
sweep records (the best accuracy over the other hyper-parameters at each ne); one curve per backbone,
weights and recipe (records of different ones are never pooled into one point).

    python -m analysis.granularity --runs results/runs --backbone vit-b --out granularity.png
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from vtab_lily.choices import choices_help
from vtab_lily.errors import cli
from vtab_lily.records import load_records

from .common import UsageError, check_out, save_figure


def accuracy_vs_ne(records: pd.DataFrame, backbone: str | None = None, metric: str = "best_acc") -> pd.DataFrame:
    """Rows: one curve per (backbone, weights, recipe, task); columns: ne_2; values: the best `metric` over
    the records with that ne_2 (test evals). Records of different backbones, weights or recipes are never
    pooled into one point. Index levels: `curve` (the backbone, with the weights id and the recipe fields
    that differ where several are present) and `task`."""
    lily = records[(records["method"] == "lily") & (records["eval_split"] == "test")] if len(records) else records
    if backbone:
        lily = lily[lily["backbone"] == backbone]
    if lily.empty:
        raise UsageError(f"no finished Lily test records{f' of {backbone}' if backbone else ''}: run a sweep "
                         "over ne first (python -m vtab_lily.sweep ... --grid lily.ne=2,3,4)")
    curve = pd.Series(lily["backbone"], index=lily.index)
    for b, group in lily.groupby("backbone"):  # label only what differs within one backbone's records
        recipes = {i: json.loads(r) for i, r in group["recipe"].items()}  # load_records' JSON of the recipe
        differ = sorted(k for k in set().union(*recipes.values())
                        if len({json.dumps(r.get(k)) for r in recipes.values()}) > 1)
        several_weights = group["weights_id"].nunique() > 1
        for i, w in group["weights_id"].items():
            curve[i] = b + (f" [{w}]" if several_weights else "") + "".join(f" {k}={recipes[i].get(k)}" for k in differ)
    lily = lily.assign(curve=curve)
    return lily.pivot_table(index=["curve", "task"], columns="opt.ne_2", values=metric, aggfunc="max")


def plot_granularity(table: pd.DataFrame, title: str = ""):
    """One panel per curve (backbone, weights, recipe), one line per task over the ne values it has."""
    curves = list(dict.fromkeys(table.index.get_level_values("curve")))
    tasks = list(dict.fromkeys(table.index.get_level_values("task")))
    colour = {task: f"C{i % 10}" for i, task in enumerate(tasks)}
    fig, axes = plt.subplots(1, len(curves), figsize=(4.5 * len(curves) + 1.5, 3.8), layout="constrained",
                             squeeze=False, sharey=True)
    for ax, name in zip(axes[0], curves):
        part = table.loc[name].dropna(axis=1, how="all")
        for task, row in part.iterrows():
            row = row.dropna()  # a line through the ne values this task was run at
            ax.plot(row.index.astype(int), row.values, marker="o", color=colour[task], label=task)
        ax.set_xticks(sorted(part.columns.astype(int)))
        ax.set_xlabel("ne (LPs = HP experts)")
        ax.set_title(name, fontsize=8)
    axes[0][0].set_ylabel("accuracy (%)")
    handles = [plt.Line2D([], [], color=colour[t], marker="o", label=t) for t in tasks]
    fig.legend(handles=handles, fontsize=7, title="task", title_fontsize=7, loc="outside right center")
    fig.suptitle(title or "Accuracy against ne (best over the other settings)", fontsize=10)
    return fig


@cli
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.granularity", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="results/runs", help="the run records (a sweep over lily.ne)")
    parser.add_argument("--backbone", help=choices_help("backbone", "only this backbone's records; "))
    parser.add_argument("--out", required=True, help="figure path (.png or .pdf)")
    args = parser.parse_args(argv)
    check_out(args.out)
    if not Path(args.runs).is_dir():
        raise UsageError(f"--runs {args.runs} is not a folder of run records")
    table = accuracy_vs_ne(load_records(args.runs), args.backbone)
    print(table.round(2).to_string())
    title = f"Accuracy against ne{f' on {args.backbone}' if args.backbone else ''} (best over the other settings)"
    print(f"wrote {save_figure(plot_granularity(table, title), args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
