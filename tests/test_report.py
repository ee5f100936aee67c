"""python -m vtab_lily.report: the page's cells link to existing run pages whose numbers are the records', and
headless Chromium renders it (a screenshot that is not blank, no console errors)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_tables import _record

from vtab_lily import report, tables
from vtab_lily.predictions import Predictions, write_predictions
from vtab_lily.records import load_records
from vtab_lily.tasks import MINI_TASKS

CHANCE = {"lily": 0.8, "lora": 0.7, "fft": 0.75}
HOSTILE = "<script>alert('x')</script> & \"q\""  # a string from a record: escaped wherever it is shown


def _records(runs: Path, seeds=(1, 2)) -> dict:
    """vit-mini records of three mini rows on every mini task, with two evaluations (epochs 5, 10), per-epoch
    lrs and train losses, and predictions that give their accuracies; returns {path: record}."""
    options = {r.method: dict(r.filters) for r in tables.TABLES["mini"] if r.backbone == "vit-mini"}
    rng = np.random.default_rng(5)
    out = {}
    for task in MINI_TASKS:
        labels = rng.integers(0, 4, 60)
        for method, chance in CHANCE.items():
            for seed in seeds:
                right = rng.random((2, 60)) < [[chance - 0.2], [chance]]
                preds = np.where(right, labels, (labels + 1) % 4)
                acc = [100.0 * r.mean() for r in right]
                path = _record(runs, "vit-mini", method, task, seed, max(acc), options[method], final=acc[1])
                record = json.loads(path.read_text())
                record["best_epoch"] = 5 if acc[0] > acc[1] else 10
                record["evaluations"] = [{"epoch": e, "acc": a, "loss": float(rng.random())}
                                         for e, a in zip((5, 10), acc)]
                record["lrs"] = [float(v) for v in np.linspace(1e-3, 1e-5, 10)]
                record["train_losses"] = [float(v) for v in np.sort(rng.random(10))[::-1]]
                record["provenance"]["weights"]["source"] = HOSTILE
                path.write_text(json.dumps(record))
                write_predictions(path, Predictions(labels, np.array([5, 10]), preds, f"sha-{task}"))
                out[str(path)] = record
    return out


class Page(HTMLParser):
    """The links, the table cells (their text and links) and the tables (id -> rows of cell texts)."""

    def __init__(self):
        super().__init__()
        self.links, self.cells, self.tables, self.fields, self.imgs = [], [], {}, {}, []
        self._cell = self._table = self._field = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "a":
            self.links.append(attrs["href"])
            if self._cell is not None:
                self._cell["links"].append(attrs["href"])
        elif tag == "img":
            self.imgs.append(attrs["src"])
        elif tag == "table":
            self._table = self.tables.setdefault(attrs.get("id"), [])
        elif tag == "tr" and self._table is not None:
            self._table.append([])
        elif tag == "td":
            self._cell = {"text": "", "links": [], "class": attrs.get("class")}
            self._field = attrs.get("id")

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            self.cells.append(self._cell)
            if self._table is not None:
                self._table[-1].append(self._cell["text"])
            if self._field:
                self.fields[self._field] = self._cell["text"]
            self._cell = self._field = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell["text"] += data


def _parse(path: Path) -> Page:
    page = Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


@pytest.mark.slow
def test_every_cell_links_to_its_runs_and_their_pages_hold_the_records_numbers(tmp_path, capsys):
    records = _records(tmp_path / "runs")
    out = tmp_path / "report"
    assert report.main(["--runs", str(tmp_path / "runs"), "--out", str(out), "--compare", "lily", "lora"]) == 0
    assert capsys.readouterr().out == f"wrote {out / 'index.html'}\n"
    index = _parse(out / "index.html")
    assert "<script>" not in (out / "index.html").read_text()
    cells = [c for c in index.cells if c["class"] == "cell"]
    built = tables.build_table("mini", load_records(tmp_path / "runs"), "paper", tables.read_paper())
    # the mini table (17 rows x 7 tasks) and the runs table (3 rows x 7 tasks): a cell per row and task
    assert len(cells) == (len(tables.TABLES["mini"]) + 3) * len(MINI_TASKS)
    filled = [c for c in cells if c["text"]]
    assert len(filled) == 2 * 3 * len(MINI_TASKS)
    linked = set()
    for cell in filled:
        assert len(cell["links"]) == 2 and "[" in cell["text"]  # two seeds, a 95% interval
        for link in cell["links"]:
            assert (out / link).is_file()
            linked.add(link)
    lily = built["cells"]["vit-mini lily"]
    assert {report.run_page(p) for p in lily["path"]} <= linked
    assert linked == {report.run_page(p) for p in records}  # every run a cell reports, and only those
    for img in index.imgs:
        assert (out / img).is_file()
    assert any("compare_vit-mini-lily_vs_vit-mini-lora" in i for i in index.imgs)
    for path, record in records.items():
        page = _parse(out / report.run_page(path))
        text = (out / report.run_page(path)).read_text()
        assert HOSTILE not in text and "&lt;script&gt;" in text
        for key in ("best_acc", "final_acc", "params", "storage_bytes", "best_epoch", "seed"):
            assert float(page.fields[key]) == record[key], key
        evals = [[float(v) for v in r] for r in page.tables["evaluations"][1:]]
        assert evals == [[e["epoch"], e["acc"], e["loss"]] for e in record["evaluations"]]
        epochs = [[float(v) for v in r] for r in page.tables["epochs"][1:]]
        assert epochs == [[k + 1, lr, loss] for k, (lr, loss) in enumerate(zip(record["lrs"],
                                                                              record["train_losses"]))]
        assert text.count("<polyline") == 4  # train and test loss, lr, accuracy
        assert "../index.html" in page.links


@pytest.mark.slow
def test_mistakes_are_one_error_line(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    _records(tmp_path / "runs", seeds=(1,))
    for argv, words in ((["--runs", str(tmp_path / "none"), "--out", str(tmp_path / "o")], "no finished run"),
                        (["--runs", str(tmp_path), "--out", str(tmp_path / "file" / "o")], "cannot write"),
                        (["--runs", str(tmp_path), "--out", str(tmp_path / "o"), "--compare", "lily"], "two rows"),
                        (["--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "o"), "--compare", "lily", "mora"],
                         "no table has these rows with records"),
                        (["--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "o"), "--cost",
                          str(tmp_path / "file")], "not a")):
        assert report.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and words in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="no chromium (Debian's package; .ci/run installs it)")
def test_headless_chromium_renders_the_page_without_errors(tmp_path):
    from PIL import Image
    _records(tmp_path / "runs", seeds=(1,))
    out = tmp_path / "report"
    index = report.write_report(load_records(tmp_path / "runs"), out)
    shot = tmp_path / "shot.png"
    args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
            "--window-size=1200,900"]

    def run(*extra, page=index):
        return subprocess.run([*args, *extra, page.as_uri()], capture_output=True, text=True, timeout=60,
                              env={**os.environ, "HOME": str(tmp_path)})

    shown = run(f"--screenshot={shot}")
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.shape == (900, 1200) and pixels.std() > 20  # text and tables on white, not a blank page
    assert [line for line in shown.stderr.splitlines() if ":CONSOLE" in line] == []  # no console message
    dom = run("--dump-dom").stdout  # the page as Chromium parsed it: the mini and runs tables, their cells
    assert dom.count('<td class="cell">') == (len(tables.TABLES["mini"]) + 3) * len(MINI_TASKS)
    assert 'id="table-mini"' in dom and 'id="table-runs"' in dom
    # the check sees errors: a page whose script logs one
    broken = out / "broken.html"
    broken.write_text('<html><body><script>console.error("boom-21")</script><p>x</p></body></html>')
    assert any(":CONSOLE" in line and "boom-21" in line for line in run("--dump-dom", page=broken).stderr.splitlines())


@pytest.mark.slow
def test_default_ranks_and_the_cost_table(tmp_path):
    from vtab_lily.cost import COLUMNS
    _records(tmp_path / "runs", seeds=(1,))
    cost = pd.DataFrame([{c: 1.0 for c in COLUMNS} | {"backbone": "vit-mini", "method": m, "options": "{}",
                                                      "params": 1000 * (k + 1), "merges": False}
                         for k, m in enumerate(CHANCE)])
    cost.to_csv(tmp_path / "cost.csv", index=False)
    out = tmp_path / "report"
    assert report.main(["--runs", str(tmp_path / "runs"), "--out", str(out), "--cost", str(tmp_path / "cost.csv")]) == 0
    index = _parse(out / "index.html")
    # no --compare: the ranks of the three rows with records, with their CD diagram, in the mini and runs tables
    assert sum("_ranks_" in i for i in index.imgs) == 2 and all((out / i).is_file() for i in index.imgs)
    records = load_records(tmp_path / "runs")
    want = tables.cost_table(cost, records, "paper", tables.read_paper())
    rows = index.tables["cost-table"]
    assert rows[0][:2] == [] and len(rows) == 4  # the header row (th cells), one row per method
    for row, (_, w) in zip(rows[1:], want.iterrows()):
        assert row[:2] == ["vit-mini", w["method"]] and np.isfinite(w["Mean"])
        assert float(row[-3]) == pytest.approx(w["Mean"], rel=1e-3) and float(row[-1]) == pytest.approx(w["ppt"],
                                                                                                      rel=1e-3)
