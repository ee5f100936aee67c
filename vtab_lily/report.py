"""One static page to look at: `python -m vtab_lily.report --runs DIR --out DIR [--cost FILE.csv] [--compare ROW
ROW ...]` writes <out>/index.html (no server, no external URL: it opens from disk) with every table that has records
(the paper tables and `runs`, built by tables.build_table), each with its protocol card, its cells with their 95%
intervals and its heat map; the comparisons of the --compare rows in every table that has them (compare.py: a
forest plot for two rows, ranks and a CD diagram for more); without --compare, the CD diagram of all rows with
cells of each table that has three or more; the cost table (--cost); and one page per reported run
(<out>/runs/*.html) with its learning curves (train loss, lr, test accuracy and loss per evaluation: inline SVG)
and its numbers. Every task cell links to the page of each run it reports. docs/report.md.
"""
from __future__ import annotations

import argparse
import html
import json
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from .compare import _slug, resolve_rows, write_comparison
from .errors import UserError, cli
from .fileio import atomic_path
from .options import check_writable_folder
from .records import load_records, read_record
from .tables import (
    COST_SHOWN,
    DEFAULT_CI,
    DEFAULT_EPOCH,
    EPOCH_RULES,
    PROTOCOLS,
    RUNS_TABLE,
    TABLES,
    TableError,
    _bound,
    _cell,
    _fmt,
    build_table,
    card_lines,
    ci_shown,
    cost_table,
    output_stem,
    plot_difference,
    protocol_card,
    read_cost,
    read_paper,
    summary_columns,
)

STYLE = """body{font-family:sans-serif;margin:1.5em;color:#222}table{border-collapse:collapse;font-size:12px;
margin:.5em 0}td,th{border:1px solid #bbb;padding:2px 5px;text-align:right}td.cell{white-space:nowrap}
th{background:#eee}
td:first-child,th:first-child{text-align:left}a{color:#036}img{max-width:100%}pre{background:#f6f6f6;padding:.5em;
font-size:12px;overflow-x:auto}.card{font-size:12px;color:#444}sup a{font-size:9px}svg{border:1px solid #ccc;
margin:4px}"""


def run_page(path: str) -> str:
    """A record's page, relative to the report's folder: runs/<backbone>_<method>_<task>_<run id>.html."""
    p = Path(path)
    return f"runs/{_slug('_'.join([*p.parts[-4:-1], p.stem]))}.html"


def _e(value) -> str:
    return html.escape(str(value))


def _page(title: str, body: list[str]) -> str:
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{_e(title)}</title><style>{STYLE}</style>"
            f"</head><body>\n<h1>{_e(title)}</h1>\n" + "\n".join(body) + "\n</body></html>\n")


def _write(path: Path, text: str, durable: bool = False) -> None:
    """The run pages are many small files: not durable one by one; os.sync() before index.html, which is."""
    with atomic_path(path, durable) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _frame_html(frame: pd.DataFrame, table_id: str) -> str:
    """A data frame as an HTML table, every value escaped; floats to 4 significant digits."""
    def text(v):
        return "" if pd.isna(v) else f"{v:.4g}" if isinstance(v, float) else str(v)
    head = "".join(f"<th>{_e(c)}</th>" for c in frame.columns)
    rows = "".join("<tr>" + "".join(f"<td>{_e(text(v))}</td>" for v in r) + "</tr>" for r in frame.itertuples(False))
    return f'<table id="{_e(table_id)}"><tr>{head}</tr>{rows}</table>'


def table_html(result: dict, name: str) -> str:
    """The table's cells (tables._cell: mean [lo, hi] (n)), each task cell followed by a link per run it
    reports (its seed, to run_page)."""
    mean, std, n, tasks = result["mean"], result["std"], result["n"], result["tasks"]
    ci = ci_shown(result, DEFAULT_CI)
    summary = summary_columns(tasks)
    paper = bool(mean["paper_Mean"].notna().any())  # as tables.to_markdown: published Means only where some are
    paper19 = bool(mean.get("paper_Mean19", pd.Series(dtype=float)).notna().any())
    header = ["row", "params (M)", "storage (KB)", *tasks, *summary, *(["paper Mean", "diff"] if paper else []),
              *(["paper Mean19", "diff19"] if paper19 else []), *(["PPT"] if "ppt" in mean else [])]
    lines = ["<table><tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr>"]
    for row, r in mean.iterrows():
        cells = result["cells"][row]
        out = [f"<td>{_e(row)}</td>", f"<td>{_e(_fmt(r['params_m'], digits=3))}</td>",
               f"<td>{_e(_fmt(r['storage_kb'], digits=0))}</td>"]
        for t in tasks:
            text = _cell(r[t], std.loc[row, t], n.loc[row, t], _bound(result, row, t), ci)
            runs = cells[cells["task"] == t].sort_values("seed")
            links = " ".join(f'<a href="{_e(run_page(p))}" title="{_e(Path(p).stem)}">s{_e(s)}</a>'
                             for s, p in zip(runs["seed"], runs["path"]))
            out.append(f"<td class=\"cell\">{_e(text)}" + (f"<sup>{links}</sup>" if links else "") + "</td>")
        out += [f"<td>{_e(_cell(r[c], np.nan, 1, _bound(result, row, c), ci))}</td>" for c in summary]
        if paper:
            diff = "" if pd.isna(r["diff_Mean"]) else f"{r['diff_Mean']:+.1f}"
            out += [f"<td>{_e(_fmt(r['paper_Mean']))}</td>", f"<td>{_e(diff)}</td>"]
        if paper19:
            diff = "" if pd.isna(r["diff_Mean19"]) else f"{r['diff_Mean19']:+.1f}"
            out += [f"<td>{_e(_fmt(r['paper_Mean19']))}</td>", f"<td>{_e(diff)}</td>"]
        if "ppt" in mean:
            out.append(f"<td>{_e(_fmt(r['ppt'], digits=2))}</td>")
        lines.append("<tr>" + "".join(out) + "</tr>")
    lines.append("</table>")
    return "\n".join(lines)


def svg_curve(title: str, series: dict[str, tuple[list, list]], width: int = 300, height: int = 160) -> str:
    """An inline SVG line plot of series {label: (x, y)} with its y range printed, one colour per series."""
    colors = ("#1f77b4", "#d62728", "#2ca02c")
    pts = [(x, y) for xs, ys in series.values() for x, y in zip(xs, ys) if y is not None and np.isfinite(y)]
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img">'
             f'<text x="6" y="14" font-size="12">{_e(title)}</text>']
    if pts:
        x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
        y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
        sx = (width - 50) / ((x1 - x0) or 1)
        sy = (height - 45) / ((y1 - y0) or 1)
        for (label, (xs, ys)), color, k in zip(series.items(), colors, range(len(series))):
            coords = " ".join(f"{40 + (x - x0) * sx:.1f},{height - 20 - (y - y0) * sy:.1f}" for x, y in zip(xs, ys))
            parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{coords}"/>'
                         f'<text x="{width - 60}" y="{30 + 12 * k}" font-size="10" fill="{color}">{_e(label)}</text>')
        parts.append(f'<text x="2" y="{height - 20}" font-size="9">{y0:.3g}</text><text x="2" y="32" font-size="9">'
                     f'{y1:.3g}</text><text x="40" y="{height - 5}" font-size="9">epoch {x0:g}</text>'
                     f'<text x="{width - 60}" y="{height - 5}" font-size="9">{x1:g}</text>')
    return "".join(parts) + "</svg>"


RUN_FIELDS = ("run_id", "backbone", "method", "task", "seed", "train_split", "eval_split", "params", "storage_bytes",
              "best_acc", "best_epoch", "final_acc", "wall_time_s", "images_per_s")


def record_html(record: dict) -> str:
    """A run's page: its fields (numbers as repr: the record's exactly), method config and recipe, its learning
    curves and the table of its evaluations and per-epoch lr and train loss."""
    evals = record.get("evaluations") or []
    lrs, losses = record.get("lrs") or [], record.get("train_losses") or []
    epochs = list(range(1, len(lrs) + 1))
    fields = "".join(f'<tr><th>{_e(k)}</th><td id="{_e(k)}">{_e(record.get(k))}</td></tr>' for k in RUN_FIELDS)
    body = ["<p><a href=\"../index.html\">back to the tables</a></p>", f"<table>{fields}</table>",
            f"<p class=\"card\">method_config: {_e(json.dumps(record.get('method_config'), sort_keys=True))}<br>"
            f"recipe: {_e(json.dumps(record.get('recipe'), sort_keys=True))}<br>"
            f"provenance: {_e(json.dumps(record.get('provenance'), sort_keys=True))}</p>",
            "<h2>Learning curves</h2><div>",
            svg_curve("train loss (per epoch), test loss (per evaluation)",
                      {"train": (epochs, losses), "test": ([e["epoch"] for e in evals],
                                                           [e.get("loss") for e in evals])}),
            svg_curve("learning rate", {"lr": (epochs, lrs)}),
            svg_curve("test accuracy (%)", {"acc": ([e["epoch"] for e in evals], [e["acc"] for e in evals])}),
            "</div><h2>Evaluations</h2>",
            '<table id="evaluations"><tr><th>epoch</th><th>acc</th><th>loss</th></tr>' + "".join(
                f"<tr><td>{_e(e['epoch'])}</td><td>{_e(e['acc'])}</td><td>{_e(e.get('loss', ''))}</td></tr>"
                for e in evals) + "</table>",
            "<h2>Per epoch</h2>", '<table id="epochs"><tr><th>epoch</th><th>lr</th><th>train loss</th></tr>' + "".join(
                f"<tr><td>{k}</td><td>{_e(lr)}</td><td>{_e(loss)}</td></tr>"
                for k, lr, loss in zip(epochs, lrs, losses)) + "</table>"]
    return _page(f"{record.get('backbone')} {record.get('method')} {record.get('task')} seed {record.get('seed')}",
                 body)


def _figure(path: Path, out: Path, alt: str) -> str:
    return f'<p><img src="{_e(path.relative_to(out).as_posix())}" alt="{_e(alt)}"></p>'


def comparison_html(result: dict, table: str, names: list[str], out: Path, protocol: str) -> str:
    """The comparison of `names` in the table (compare.write_comparison's files under <out>/files): its text
    without the card (the table's own is above it) and its plot."""
    stem = output_stem(result, table, protocol, out / "files")
    text, paths = write_comparison(result, table, names, stem, PROTOCOLS[protocol, result["epoch"]])
    text = text.split("\n\n", 1)[1] if text.startswith("Protocol card:") else text
    return (f"<h3>{_e(' vs '.join(names))}</h3><pre>{_e(text)}</pre>" +
            _figure(paths[2], out, "forest plot" if len(names) == 2 else "critical-difference diagram"))


def table_section(result: dict, table: str, out: Path, protocol: str, compare: list[str] | None) -> str:
    name = f"the `{RUNS_TABLE}` table" if table == RUNS_TABLE else f"Table {table}"
    heat = output_stem(result, table, protocol, out / "files").with_suffix(".png")
    plot_difference(result, table, heat)
    parts = [f'<h2 id="table-{_e(table)}">{_e(name)}</h2>',
             '<ul class="card">' + "".join(f"<li>{_e(line)}</li>" for line in card_lines(protocol_card(result)))
             + "</ul>", table_html(result, table), _figure(heat, out, f"heat map of {name}")]
    rows = rows_with_records(result)
    if compare:
        try:
            names = resolve_rows(compare, rows, table)
        except TableError:
            names = []  # this table does not have the rows: no comparison here
        if names:
            parts += ["<h3>Comparison</h3>", comparison_html(result, table, names, out, protocol)]
    elif len(rows) >= 3 and result["mean"].loc[rows, result["tasks"]].notna().all().sum() >= 2:
        parts += ["<h3>Ranks of the rows with records (no --compare)</h3>",
                  comparison_html(result, table, rows, out, protocol)]
    return "\n".join(parts)


def cost_html(cost: pd.DataFrame, meta: dict | None, records: pd.DataFrame, protocol: str, paper: pd.DataFrame,
              epoch: str | None) -> str:
    table = cost_table(cost, records, protocol, paper, epoch)
    memory = (meta or {}).get("memory", "see the CSV's metadata")
    return ("<h2 id=\"cost\">Cost</h2><p class=\"card\">python -m vtab_lily.cost: ratios over `linear` (the frozen "
            f"backbone); memory: {_e(memory)}; Mean and mean_plain from the `runs` table; PPT = V-PETL Bench's "
            "score (docs/cost.md)</p>" +
            _frame_html(table[["backbone", "method", "options", *COST_SHOWN, "Mean", "mean_plain", "ppt"]],
                        "cost-table"))


def write_report(records: pd.DataFrame, out: Path, protocol: str = "paper", epoch: str | None = None,
                 cost: tuple[pd.DataFrame, dict | None] | None = None, compare: list[str] | None = None) -> Path:
    """Write the report under `out`; returns index.html's path. TableError when no table has a record."""
    paper = read_paper()
    results = {}
    for table in [*TABLES, RUNS_TABLE]:
        result = build_table(table, records, protocol, paper, epoch)
        if result["n"].values.sum() > 0:
            results[table] = result
    if not results:
        raise TableError(f"no table has a cell from the {len(records)} records under protocol {protocol} (e.g. only "
                         "val200 runs under the paper protocol: pass --protocol vtab)")
    if compare and not any(_has_rows(r, t, compare) for t, r in results.items()):
        raise TableError(f"--compare {' '.join(compare)}: no table has these rows with records")
    sections = [table_section(r, t, out, protocol, compare) for t, r in results.items()]
    if cost is not None:
        sections.append(cost_html(*cost, records, protocol, paper, epoch))
    reported = sorted({p for r in results.values() for c in r["cells"].values() for p in c["path"]})
    for path in reported:
        _write(out / run_page(path), record_html(read_record(path)))
    nav = " · ".join(f'<a href="#table-{_e(t)}">{_e(t)}</a>' for t in results) + (
        ' · <a href="#cost">cost</a>' if cost is not None else "")
    intro = (f"<p>{len(records)} records, {len(reported)} reported in some cell (each task cell links to its runs: "
             f"s&lt;seed&gt;). Protocol {_e(protocol)}, epoch rule {_e(epoch or DEFAULT_EPOCH[protocol])}. "
             f"Tables: {nav}</p>")
    index = out / "index.html"
    os.sync()
    _write(index, _page("vtab-lily report", [intro, *sections]), durable=True)
    return index


def rows_with_records(result: dict) -> list[str]:
    return [r for r in result["mean"].index if result["n"].loc[r].sum() > 0]


def _has_rows(result: dict, table: str, names: list[str]) -> bool:
    try:
        resolve_rows(names, rows_with_records(result), table)
    except TableError:
        return False
    return True


@cli
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vtab_lily.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="results/runs")
    parser.add_argument("--out", default="results/report")
    parser.add_argument("--protocol", default="paper", choices=["paper", "vtab"])
    parser.add_argument("--epoch", choices=EPOCH_RULES, help="as tables --epoch")
    parser.add_argument("--cost", metavar="FILE.csv", help="the CSV python -m vtab_lily.cost wrote")
    parser.add_argument("--compare", nargs="+", metavar="ROW", help="rows to compare in every table that has them "
                        "(as tables --compare); default: the ranks of all rows of each table with three or more")
    args = parser.parse_args(argv)
    if args.compare and len(args.compare) < 2:
        raise UserError("--compare needs two rows or more")
    check_writable_folder(args.out, "the report", "--out")
    cost = read_cost(args.cost) if args.cost else None
    records = load_records(args.runs)
    if records.empty:
        raise TableError(f"no finished run records under {args.runs}" + ("" if Path(args.runs).is_dir() else
                         " (no such folder)") + "; pass the folder your runs wrote with --runs")
    index = write_report(records, Path(args.out), args.protocol, args.epoch, cost, args.compare)
    print(f"wrote {index}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
