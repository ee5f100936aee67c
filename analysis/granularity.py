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
    recipes = [json.loads(r) for r in lily["recipe"]]  # load_records' JSON of each record's recipe
    differ = sorted(k for k in recipes[0] if len({r.get(k) for r in recipes}) > 1)
    several_weights = lily.groupby("backbone")["weights_id"].transform("nunique") > 1
    lily = lily.assign(curve=[b + (f" [{w}]" if sw else "") + "".join(f" {k}={r[k]}" for k in differ)
                              for b, w, sw, r in zip(lily["backbone"], lily["weights_id"], several_weights, recipes)])
    return lily.pivot_table(index=["curve", "task"], columns="opt.ne_2", values=metric, aggfunc="max")


def plot_granularity(table: pd.DataFrame, title: str = ""):
    fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
    one = table.index.get_level_values("curve").nunique() == 1
    for (curve, task), row in table.iterrows():
        ax.plot(row.index.astype(int), row.values, marker="o", label=task if one else f"{curve}: {task}")
    ax.set_xlabel("ne (LPs = HP experts)")
    ax.set_ylabel("accuracy (%)")
    ax.set_xticks(sorted(table.columns.astype(int)))
    ax.legend(fontsize=7, ncol=2, title="task" if one else "curve: task", title_fontsize=7)
    ax.set_title(title or "Accuracy against ne (best over the other settings)"
                 + (f", {table.index[0][0]}" if one else ""), fontsize=10)
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
