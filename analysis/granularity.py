"""Attention granularity (paper Fig. 5): accuracy against the number of Lily experts ne per task, from
sweep records (the best accuracy over the other hyper-parameters at each ne).

    python -m analysis.granularity --runs results/runs --backbone vit-b --out granularity.png
"""
from __future__ import annotations

import argparse

import matplotlib.pyplot as plt
import pandas as pd

from vtab_lily.records import load_records

from .common import save_figure


def accuracy_vs_ne(records: pd.DataFrame, backbone: str | None = None, metric: str = "best_acc") -> pd.DataFrame:
    """Rows: task; columns: ne_2; values: the best `metric` over the records with that ne_2 (test evals)."""
    lily = records[(records["method"] == "lily") & (records["eval_split"] == "test")]
    if backbone:
        lily = lily[lily["backbone"] == backbone]
    if lily.empty:
        raise ValueError("no finished Lily test records: run a sweep over ne first "
                         "(python -m vtab_lily.sweep ... --grid lily.ne=2,3,4)")
    return lily.pivot_table(index="task", columns="opt.ne_2", values=metric, aggfunc="max")


def plot_granularity(table: pd.DataFrame):
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for task, row in table.iterrows():
        ax.plot(row.index.astype(int), row.values, marker="o", label=task)
    ax.set_xlabel("ne (LPs = HP experts)")
    ax.set_ylabel("accuracy (%)")
    ax.set_xticks(sorted(table.columns.astype(int)))
    ax.legend(fontsize=7, ncol=2)
    return fig


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.granularity", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="results/runs")
    parser.add_argument("--backbone")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    table = accuracy_vs_ne(load_records(args.runs), args.backbone)
    print(table.round(2).to_string())
    print(f"wrote {save_figure(plot_granularity(table), args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
