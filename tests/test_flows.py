"""Every flow of the README end to end on the offline mini benchmark, driven through the CLIs' main(argv):
prepare -> run -> sweep (paper and vtab protocols) -> every table kind -> the analysis CLIs -> load_model
-> a plugin and a peft tuner through run, sweep and `tables --table runs`. Each step asserts the artefact's
content (records, cells, n, the chosen configuration), computed again here from the records.

Data: two mini tasks prepared with `--limit 64` (train800 64, val200 64, train800val200 128, test 64), so a
run of the mini recipe (10 epochs, batch 64, 32 px) takes about a second. The expensive steps are
module-scoped fixtures; each test reads what it needs.
"""
from __future__ import annotations

import ast
import contextlib
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from analysis import attention, features, granularity, rank, routers
from vtab_lily import intervals, load_model
from vtab_lily import prepare as prepare_cli
from vtab_lily import run as run_cli
from vtab_lily import sweep as sweep_cli
from vtab_lily import tables as tables_cli
from vtab_lily.data import Batches, load_split
from vtab_lily.intervals import bootstrap
from vtab_lily.predictions import read_predictions
from vtab_lily.recipes import PerTask, recipe_for
from vtab_lily.records import load_records, read_record
from vtab_lily.rows import PRESETS
from vtab_lily.tables import TABLES, Row
from vtab_lily.tasks import MINI_TASKS, VTAB_TASKS
from vtab_lily.train import evaluate

pytestmark = pytest.mark.slow  # end-to-end flows: each module fixture runs sweeps

TASKS = ["digits", "mini_ori"]
SEEDS = [1, 2]
LIMIT = 64
TIED = "examples.tied_lora:tied_lora"
SWEEP = ["--backbones", "vit-mini", "--methods", "lily", "lora", "--tasks", *TASKS, "--seeds", *map(str, SEEDS),
         "--grid", "r=8", "lily.ne=2,4"]  # the mini preset's Lily (r 8, ne 2 or 4) and LoRA (r 8) rows


def call(main, argv) -> tuple[int, str, str]:
    """main(argv) in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def ok(main, argv) -> str:
    code, out, err = call(main, argv)
    assert code == 0, f"exit {code}\n{out}\n{err}"
    return out


def adapter(record_path) -> Path:
    return Path(record_path).with_suffix(".safetensors")


def csv_table(folder: Path, name: str) -> pd.DataFrame:
    return pd.read_csv(folder / f"{name}.csv", index_col="row")


def md_cells(folder: Path, name: str) -> dict[str, dict[str, str]]:
    """The Markdown table as {row: {column: cell}}."""
    lines = [line for line in (folder / f"{name}.md").read_text().splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0]:
            rows[cells[0]] = dict(zip(header, cells))
    return rows


def cell(values) -> str:
    """A table cell as tables.py prints it: mean, and ± std (n=...) over several seeds."""
    values = pd.Series(values, dtype=float)
    return f"{values.mean():.1f} ± {values.std():.1f} (n={len(values)})" if len(values) > 1 else f"{values.mean():.1f}"


def paper_choice(records: pd.DataFrame) -> pd.Series:
    """Paper protocol per (task, seed): the best test accuracy over the configurations."""
    return records[records.eval_split == "test"].groupby(["task", "seed"])["best_acc"].max()


def png(path: Path) -> np.ndarray:
    """The PNG's pixels, checked: a real figure (not tiny, not blank)."""
    with Image.open(path) as im:
        assert im.format == "PNG"
        pixels = np.asarray(im.convert("RGB")).astype(int)
    h, w, _ = pixels.shape
    assert h >= 200 and w >= 200, (h, w)
    ink = (pixels.sum(-1) < 3 * 250).mean()  # share of non-white pixels
    assert 0.02 < ink < 0.98, ink
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20  # colour maps, text and axes, not one flat fill
    return pixels


# ---------------------------------------------------------------- fixtures: each flow's expensive step once

@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """prepare: the two mini tasks, 64 images per split, through the CLI."""
    root = tmp_path_factory.mktemp("flows") / "vtab-1k"
    for task in TASKS:
        out = ok(prepare_cli.main, ["--task", task, "--root", root, "--limit", LIMIT])
        assert f"{task}: {{'train800': 64, 'val200': 64, 'train800val200': 128, 'test': 64}}" in out
    return root


@pytest.fixture(scope="module")
def paper(data):
    """sweep, paper protocol: 2 methods (Lily over ne 2, 4; LoRA) x 2 tasks x 2 seeds = 12 runs."""
    runs = data.parent / "runs-paper"
    out = ok(sweep_cli.main, [*SWEEP, "--data-root", data, "--runs", runs])
    return runs, out


@pytest.fixture(scope="module")
def vtab(data, paper):
    """sweep, vtab protocol, over a copy of the paper sweep's folder: 12 val200 runs, then the chosen point
    per task and seed retrained on train800val200, which the paper sweep has already run."""
    runs = data.parent / "runs-vtab"
    shutil.copytree(paper[0], runs)
    out = ok(sweep_cli.main, [*SWEEP, "--protocol", "vtab", "--data-root", data, "--runs", runs])
    return runs, out


def single_run(data, folder: str, *args) -> tuple[Path, str]:
    runs = data.parent / folder
    out = ok(run_cli.main, ["--backbone", "vit-mini", "--task", "digits", "--seed", 1, "--data-root", data,
                            "--runs", runs, "--device", "cpu", "--no-progress", *args])
    path = Path(re.search(r"^record: (.*)$", out, re.M).group(1))
    return path, out


@pytest.fixture(scope="module")
def smoke(data):
    """run: a one-epoch Lily run (a smoke test, not the mini recipe) on the pretrained vit-mini."""
    return single_run(data, "runs-smoke", "--method", "lily", "--set", "r=8", "--epochs", 1)


@pytest.fixture(scope="module")
def random_init(data):
    """run --random-init: Lily on a random vit-mini, one epoch."""
    return single_run(data, "runs-random", "--method", "lily", "--set", "r=8", "--epochs", 1, "--random-init")


@pytest.fixture(scope="module")
def outside(data):
    """A plugin (examples/tied_lora.py) and a peft tuner: run each at r=4, then sweep both over r=4,8."""
    runs = data.parent / "runs-outside"
    ran = {m: single_run(data, "runs-outside", "--method", m, "--set", "r=4") for m in (TIED, "peft:lora")}
    out = ok(sweep_cli.main, ["--backbones", "vit-mini", "--methods", TIED, "peft:lora", "--tasks", "digits",
                              "--seeds", 1, "--grid", "r=4,8", "--data-root", data, "--runs", runs])
    return runs, ran, out


FACT_R = PerTask({"digits": 4, "mini_ori": 8})
FACT_S = PerTask({"digits": 1.0, "mini_ori": 10.0})
BITFIT_LR = PerTask({"digits": 3e-3, "mini_ori": 1e-2})


@pytest.fixture(scope="module")
def extended(data):
    """sweep of a per-task preset in the style of `extended` (recipes.PerTask values per task), built here:
    the suite's `extended` preset and table are ViT-B on the 19 VTAB-1K tasks only. mini_loc is not covered
    by its PerTask values, so those points fail alone."""
    runs = data.parent / "runs-extended"
    preset = [("vit-mini", "fact", {"type": "tt", "r": FACT_R, "s": FACT_S}, {}),
              ("vit-mini", "bitfit", {"lr": BITFIT_LR}, {})]
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(PRESETS, "mini-extended", preset)
        code, out, err = call(sweep_cli.main, ["--preset", "mini-extended", "--tasks", *TASKS, "mini_loc",
                                               "--seeds", 1, "--data-root", data, "--runs", runs])
    assert code == 1, out + err
    return runs, out


# ---------------------------------------------------------------- prepare and run

def test_prepare_writes_the_limited_mini_tasks(data):
    for task in TASKS:
        manifest = json.loads((data / task / "manifest.json").read_text())
        assert manifest["limit"] == LIMIT
        assert manifest["counts"] == {"train800": 64, "val200": 64, "train800val200": 128, "test": 64}
        for split, n in manifest["counts"].items():
            lines = (data / task / f"{split}.txt").read_text().splitlines()
            assert len(lines) == n and all((data / task / line.split()[0]).is_file() for line in lines)


def test_run_writes_a_record_and_prints_its_numbers(smoke):
    path, out = smoke
    record = read_record(path)
    assert record["status"] == "done" and record["method"] == "lily" and record["task"] == "digits"
    assert record["method_config"]["r"] == 8 and record["recipe"]["epochs"] == 1 and record["seed"] == 1
    assert record["split_sizes"] == {"train800val200": 128, "test": 64}
    assert [e["epoch"] for e in record["evaluations"]] == [1]
    assert record["provenance"]["weights"]["source"] == "shipped"  # the vit-mini weights in backbones/weights
    row = (f"| vit-mini | lily | digits | {record['params']:,} | {record['best_acc']:.2f} (1) | "
           f"{record['final_acc']:.2f} |")
    assert row in out
    assert adapter(path).is_file()
    again = ok(run_cli.main, ["--backbone", "vit-mini", "--task", "digits", "--seed", 1, "--method", "lily",
                              "--set", "r=8", "--epochs", 1, "--data-root", path.parents[4] / "vtab-1k",
                              "--runs", path.parents[3], "--device", "cpu", "--no-progress"])
    assert f"skipped: this run is already finished ({path})" in again


# ---------------------------------------------------------------- sweeps

def test_paper_sweep_runs_every_point(paper):
    runs, out = paper
    df = load_records(runs)
    assert len(df) == 12 and set(df.eval_split) == {"test"} and set(df.task) == set(TASKS)
    lily = df[df.method == "lily"]
    assert sorted(lily.groupby(["task", "seed"])["opt.ne_2"].apply(sorted).tolist()) == [[2, 4]] * 4
    assert set(df["opt.r"]) == {8} and set(df.seed) == set(SEEDS)
    assert "12 jobs: 12 ran, 0 already done, 0 run elsewhere, 0 failed" in out
    assert len(re.findall(r": ran\b", out)) == 12


def test_sweep_ran_lines_show_best_and_final_accuracy(paper):
    runs, out = paper
    for _, r in load_records(runs).iterrows():
        point = f"'lily.ne': {int(r['opt.ne_2'])}" if r.method == "lily" else ""
        (line,) = [line for line in out.splitlines() if f"vit-mini {r.method} {r.task} seed {r.seed} " in line
                   and point in line and ": ran" in line]
        assert "best" in line and "final" in line, line
        assert f"{r.best_acc:.2f}" in line and f"{r.final_acc:.2f}" in line, line


def test_dry_run_of_the_mini_preset_finds_the_hand_made_sweep_done(paper, data):
    """`sweep --preset mini` over the same tasks and seeds shares the records of the equivalent hand-made
    sweep (same identities): its Lily and LoRA points are done, the other rows' points are to run."""
    runs, _ = paper
    code, out, _ = call(sweep_cli.main, ["--preset", "mini", "--tasks", *TASKS, "--seeds", *SEEDS, "--dry-run",
                                         "--data-root", data, "--runs", runs])
    points = len(PRESETS["mini"]) + 1  # Lily's row is two points (ne 2, 4)
    assert code == 0
    assert f"{points * 4} runs: 12 done, {points * 4 - 12} to run, 0 failed" in out
    done = [line for line in out.splitlines() if line.endswith(": done")]
    assert len(done) == 12 and all(line.startswith(("vit-mini lily ", "vit-mini lora ")) for line in done)
    ids = {Path(p).stem for p in load_records(runs).path}
    to_run = re.findall(r": to run \((s\d+-[0-9a-f]{10})\)$", out, re.M)
    assert len(to_run) == points * 4 - 12 and not ids & set(to_run)


def test_preset_with_methods_keeps_only_those_rows(data, tmp_path):
    code, out, err = call(sweep_cli.main, ["--preset", "mini", "--methods", "lily", "--tasks", "digits",
                                           "--dry-run", "--data-root", data, "--runs", tmp_path])
    if code == 2:  # refused: one line
        assert err.startswith("error: ") and err.count("\n") == 1
    else:
        labels = [line for line in out.splitlines() if " seed " in line]
        assert labels and all(line.split()[1] == "lily" for line in labels), out


def test_sweep_set_is_scoped_by_method_prefix(data, tmp_path):
    code, out, err = call(sweep_cli.main, ["--backbones", "vit-mini", "--methods", "lily", "lora", "--tasks",
                                           "digits", "--set", "lily.r=4", "--dry-run", "--data-root", data,
                                           "--runs", tmp_path])
    assert code == 0 and "2 runs: 0 done, 2 to run, 0 failed" in out, out + err


def vtab_choices(out: str) -> dict[tuple, dict]:
    """The retrained (chosen) configuration per (method, task, seed), from the vtab sweep's second stage."""
    chosen = {}
    for method, task, seed, options in re.findall(r"vit-mini (\S+) (\S+) seed (\d+) (\{.*\}) eval test: (?:ran|done)",
                                                  out):
        chosen[method, task, int(seed)] = ast.literal_eval(options)
    return chosen


def test_vtab_sweep_selects_per_seed_on_val200_and_retrains(vtab):
    runs, out = vtab
    df = load_records(runs)
    val = df[df.eval_split == "val200"]
    assert len(val) == 12 and set(val.train_split) == {"train800"}
    assert "20 jobs: 12 ran, 8 already done, 0 run elsewhere, 0 failed" in out
    chosen = vtab_choices(out)
    assert sorted(chosen) == sorted((m, t, s) for m in ("lily", "lora") for t in TASKS for s in SEEDS)
    for (method, task, seed), options in chosen.items():
        points = val[(val.method == method) & (val.task == task) & (val.seed == seed)]
        assert len(points) == (2 if method == "lily" else 1)
        if method == "lily":  # the chosen ne has the best final val200 accuracy of this seed's points
            best = points["final_acc"].max()
            assert points.loc[points["opt.ne_2"] == options["ne"], "final_acc"].item() == best


# ---------------------------------------------------------------- tables

def test_mini_table_cells_are_the_paper_protocol_choice_per_seed(paper, tmp_path):
    runs, _ = paper
    out = ok(tables_cli.main, ["--table", "mini", "--runs", runs, "--out", tmp_path, "--ci", "std"])
    df = load_records(runs)
    table, md = csv_table(tmp_path, "tablemini_paper"), md_cells(tmp_path, "tablemini_paper")
    assert "| vit-mini lily |" in out
    for row, method in (("vit-mini lily", "lily"), ("vit-mini lora", "lora")):
        best = paper_choice(df[df.method == method])
        for task in TASKS:
            per_seed = best.loc[task]
            assert sorted(per_seed.index) == SEEDS
            assert table.loc[row, task] == pytest.approx(per_seed.mean(), rel=1e-9)
            assert md[row][task] == cell(per_seed)
        for task in set(MINI_TASKS) - set(TASKS):
            assert md[row][task] == "" and np.isnan(table.loc[row, task])
        assert np.isnan(table.loc[row, "Mean"])  # incomplete rows have no Mean
    lily = df[df.method == "lily"]
    chosen = lily.loc[lily[lily.eval_split == "test"].groupby(["task", "seed"])["best_acc"].idxmax()]
    assert table.loc["vit-mini lily", "params_m"] == pytest.approx(chosen.params.mean() / 1e6, rel=1e-9)
    assert all(md[row]["digits"] == "" for row in md if row not in ("vit-mini lily", "vit-mini lora"))
    png(tmp_path / "tablemini_paper.png")
    assert (tmp_path / "tablemini_paper.tex").read_text().count(r"\\") >= 13 + 2


def test_mini_table_intervals_are_the_bootstrap_of_the_chosen_runs_predictions(paper, tmp_path):
    runs, _ = paper
    ok(tables_cli.main, ["--table", "mini", "--runs", runs, "--out", tmp_path])  # --ci ci95, the default
    table, md = csv_table(tmp_path, "tablemini_paper"), md_cells(tmp_path, "tablemini_paper")
    test = load_records(runs).query("method == 'lily' and eval_split == 'test'")
    chosen = test.loc[test.groupby(["task", "seed"])["best_acc"].idxmax()]
    for task, group in chosen.groupby("task"):
        correct = np.stack([read_predictions(r.path).correct(r.best_epoch)
                            for r in group.sort_values("seed").itertuples()])
        lo, hi = np.quantile(bootstrap(correct, task), [0.025, 0.975])
        assert (table.loc["vit-mini lily", f"{task}_lo"], table.loc["vit-mini lily", f"{task}_hi"]) == \
            pytest.approx((lo, hi), rel=1e-12)
        assert md["vit-mini lily"][task] == f"{group.best_acc.mean():.1f} [{lo:.1f}, {hi:.1f}] (n={len(group)})"
    card = json.loads((tmp_path / "tablemini_paper.json").read_text())["protocol_card"]
    assert card["seeds"] == SEEDS and card["image_size"] == [32] and card["ci"] == intervals.ESTIMATOR


def test_mini_table_row_takes_only_its_recipe(smoke, tmp_path):
    path, _ = smoke
    code, out, err = call(tables_cli.main, ["--table", "mini", "--runs", path.parents[3], "--out", tmp_path])
    md = md_cells(tmp_path, "tablemini_paper") if (tmp_path / "tablemini_paper.md").exists() else {}
    assert md.get("vit-mini lily", {}).get("digits", "") == ""
    assert "not in any row" in out + err


def test_vtab_tables_use_the_per_seed_choice_and_its_retrain(vtab, tmp_path):
    runs, out = vtab
    chosen = vtab_choices(out)
    df = load_records(runs)
    test = df[df.eval_split == "test"]
    ok(tables_cli.main, ["--table", "mini", "--protocol", "vtab", "--runs", runs, "--out", tmp_path, "--ci", "std"])
    table, md = csv_table(tmp_path, "tablemini_vtab"), md_cells(tmp_path, "tablemini_vtab")
    for row, method in (("vit-mini lily", "lily"), ("vit-mini lora", "lora")):
        for task in TASKS:
            accs = []
            for seed in SEEDS:
                retrain = test[(test.method == method) & (test.task == task) & (test.seed == seed)]
                if method == "lily":
                    retrain = retrain[retrain["opt.ne_2"] == chosen[method, task, seed]["ne"]]
                accs.append(retrain.final_acc.item())
            assert table.loc[row, task] == pytest.approx(np.mean(accs), rel=1e-9)
            assert md[row][task] == cell(accs)  # n=2: one retrain per seed, nothing else joins


def test_paper_tables_of_a_vtab_folder_take_its_test_records(vtab, tmp_path):
    runs, _ = vtab
    ok(tables_cli.main, ["--table", "mini", "--runs", runs, "--out", tmp_path])
    table = csv_table(tmp_path, "tablemini_paper")
    best = paper_choice(load_records(runs).query("method == 'lily'"))
    for task in TASKS:
        assert table.loc["vit-mini lily", task] == pytest.approx(best.loc[task].mean(), rel=1e-9)


def test_table4_with_a_paper_file_made_here(paper, tmp_path):
    runs, _ = paper
    published = {t: 50.0 for t in VTAB_TASKS}
    published["cifar100"] = 69.0  # group means 50 + 19/7, 50, 50: Mean 50.905
    csv = tmp_path / "mine.csv"
    pd.DataFrame([{"table": "4", "backbone": "vit-b", "method": "lily", "params_m": 1.0, "mean": 52.0,
                   **published}]).to_csv(csv, index=False)
    out = ok(tables_cli.main, ["--table", "4", "--paper", csv, "--runs", runs, "--out", tmp_path / "t"])
    table = csv_table(tmp_path / "t", "table4_paper")
    assert table.loc["vit-b lily", "paper_Mean"] == 52.0
    assert table["paper_Mean"].drop("vit-b lily").isna().all()  # only the rows of the file given
    assert table[list(VTAB_TASKS)].isna().all().all()  # our records are vit-mini ones: no Table 4 cell
    check = pd.read_csv(tmp_path / "t" / "paper_check_table4.csv")
    assert check[["table", "backbone", "label", "printed"]].values.tolist() == [[4, "vit-b", "lily", 52.0]]
    assert check.recomputed.item() == pytest.approx(50 + 19 / 21, abs=0.005) and bool(check.flag.item())
    assert "Table 4 vit-b lily: printed 52.0, recomputed 50.90" in out


def test_runs_table_has_a_column_per_task_present(paper, tmp_path):
    runs, _ = paper
    ok(tables_cli.main, ["--table", "runs", "--runs", runs, "--out", tmp_path, "--ci", "std"])
    table, md = csv_table(tmp_path, "runs_paper"), md_cells(tmp_path, "runs_paper")
    tasks = [c for c in next(iter(md.values())) if c in MINI_TASKS or c in VTAB_TASKS]
    assert tasks == TASKS  # the mini tasks present, in the mini benchmark's order, and no others
    best = paper_choice(load_records(runs).query("method == 'lily'"))
    for task in TASKS:
        assert table.loc["vit-mini lily", task] == pytest.approx(best.loc[task].mean(), rel=1e-9)
        assert md["vit-mini lily"][task] == cell(best.loc[task])


def test_tables_without_paper_numbers_write_no_paper_check(paper, tmp_path):
    runs, _ = paper
    for table in ("mini", "runs"):
        out = ok(tables_cli.main, ["--table", table, "--runs", runs, "--out", tmp_path])
        assert "Paper check" not in out and not list(tmp_path.glob("paper_check*"))


def test_extended_style_preset_resolves_per_task_values_and_tabulates(extended, tmp_path):
    runs, out = extended
    assert "6 jobs: 4 ran, 0 already done, 0 run elsewhere, 2 failed" in out
    assert len(re.findall(r"mini_loc .*: failed: no per-task setting of \[.*\] for task 'mini_loc'", out)) == 2
    df = load_records(runs)
    assert sorted(zip(df.method, df.task)) == [(m, t) for m in ("bitfit", "fact") for t in TASKS]
    for r in df.itertuples():
        record = read_record(r.path)
        if r.method == "fact":
            assert (record["method_config"]["r"], record["method_config"]["s"]) == (FACT_R[r.task], FACT_S[r.task])
        else:
            assert record["recipe"]["lr"] == BITFIT_LR[r.task]
    rows = [Row("vit-mini", "fact-tt", "fact", {"type": "tt"}), Row("vit-mini", "bitfit", "bitfit")]
    with pytest.MonkeyPatch.context() as mp:  # the suite's `extended` table is ViT-B on VTAB-1K: its mini twin
        mp.setitem(tables_cli.TABLES, "mini-extended", rows)
        mp.setitem(tables_cli.TABLE_TASKS, "mini-extended", MINI_TASKS)
        ok(tables_cli.main, ["--table", "mini-extended", "--runs", runs, "--out", tmp_path])
    table = csv_table(tmp_path, "tablemini-extended_paper")
    fact = df[df.method == "fact"].set_index("task")
    for task in TASKS:
        assert table.loc["vit-mini fact-tt", task] == fact.loc[task, "best_acc"]
    # params (M): the mean over tasks of each task's own configuration (FacT-TT's rank 4 on digits, 8 on mini_ori)
    assert fact.loc["digits", "params"] < fact.loc["mini_ori", "params"]
    assert table.loc["vit-mini fact-tt", "params_m"] == pytest.approx(fact.params.mean() / 1e6, rel=1e-9)
    ok(tables_cli.main, ["--table", "extended", "--runs", runs, "--out", tmp_path])  # the suite's: ViT-B rows
    assert csv_table(tmp_path, "tableextended_paper")[list(VTAB_TASKS)].isna().all().all()


# ---------------------------------------------------------------- analysis CLIs on sweep records

def lily_and_lora(runs) -> tuple[Path, Path]:
    df = load_records(runs).query("task == 'digits' and seed == 1 and eval_split == 'test'")
    lily = df[(df.method == "lily") & (df["opt.ne_2"] == 2)].path.item()
    return adapter(lily), adapter(df[df.method == "lora"].path.item())


@pytest.mark.parametrize("cli,extra", [(attention, ["--layers", 0, 7]), (features, []),
                                       (routers, ["--target", "k", "--layers", 0, 3, 7]), (rank, [])])
def test_analysis_figures_of_sweep_adapters(paper, data, tmp_path, cli, extra):
    lily, lora = lily_and_lora(paper[0])
    adapters = ["--adapter", lily] + ([] if cli is routers else ["--adapter", lora])
    out_png = tmp_path / "fig.png"
    out = ok(cli.main, [*adapters, "--task", "digits", "--data-root", data, "--n", 4, "--image-size", 32,
                        "--out", out_png, *extra])
    assert f"wrote {out_png}" in out
    png(out_png)
    if cli is rank:  # the printed numbers are the effective ranks of the updates, measured again here
        images = load_split(data, "digits", "test", 32, progress=False).images[:4]
        x = torch.from_numpy(images.copy()).permute(0, 3, 1, 2).float() / 255
        for path in (lily, lora):
            ups = rank.updates(load_model(path), x)
            ranks = [rank.effective_rank(u) for u in ups.values()]
            line = f"{read_record(path.with_suffix('.json'))['method']} ({path.stem}): {len(ups)} updates, "
            assert f"{line}effective rank mean {sum(ranks) / len(ranks):.2f}, numerical rank max " \
                   f"{max(rank.numerical_rank(u) for u in ups.values())}" in out


def test_analysis_default_image_size_is_the_runs(paper, data, tmp_path):
    lily, _ = lily_and_lora(paper[0])
    common = ["--adapter", lily, "--task", "digits", "--data-root", data, "--n", 2, "--layers", 0, 7]
    ok(attention.main, [*common, "--image-size", 32, "--out", tmp_path / "explicit.png"])
    ok(attention.main, [*common, "--out", tmp_path / "default.png"])
    assert (tmp_path / "default.png").read_bytes() == (tmp_path / "explicit.png").read_bytes()


def test_granularity_prints_the_best_accuracy_per_task_and_ne(paper, tmp_path):
    runs, _ = paper
    out = ok(granularity.main, ["--runs", runs, "--backbone", "vit-mini", "--out", tmp_path / "g.png"])
    png(tmp_path / "g.png")
    lily = load_records(runs).query("method == 'lily'")
    for task in TASKS:
        (line,) = [line for line in out.splitlines() if task in line.split()]  # the row: [curve] task acc(ne)...
        best = lily[lily.task == task].groupby("opt.ne_2")["best_acc"].max()
        assert [float(v) for v in line.split()[-2:]] == [round(best[2], 2), round(best[4], 2)]


# ---------------------------------------------------------------- load_model reproduces the records

def reevaluate(record_path, data, **load) -> float:
    record = read_record(record_path)
    recipe = recipe_for(record["backbone"], **record["spec"]["recipe"])
    device = record["device"]  # where the run evaluated (a sweep on a GPU machine trains there)
    model = load_model(adapter(record_path), **load).to(device)
    test = Batches(load_split(data, record["task"], record["eval_split"], recipe.image_size, progress=False),
                   recipe.eval_batch_size, device=device)
    return evaluate(model, test, recipe)[0]


def test_load_model_reproduces_a_pretrained_run(smoke, paper, data):
    from vtab_lily import adapter_config
    saved = adapter_config(adapter(smoke[0]))["weights"]  # the run's own provenance, not "a local file"
    assert saved == read_record(smoke[0])["provenance"]["weights"] and saved["source"] != "file"
    assert reevaluate(smoke[0], data) == read_record(smoke[0])["final_acc"]
    lily, lora = lily_and_lora(paper[0])
    for path in (lily, lora):
        assert reevaluate(path.with_suffix(".json"), data) == read_record(path.with_suffix(".json"))["final_acc"]


def test_load_model_of_a_random_init_run_with_pretrained_false(random_init, data):
    path, _ = random_init
    record = read_record(path)
    assert record["provenance"]["weights"] == {"source": "random", "seed": 1}
    assert reevaluate(path, data, pretrained=False) == record["final_acc"]


def test_load_model_follows_the_runs_random_init(random_init, data):
    path, _ = random_init
    assert reevaluate(path, data) == read_record(path)["final_acc"]


# ---------------------------------------------------------------- methods from outside the suite

def test_plugin_and_peft_tuner_through_run_and_sweep(outside):
    runs, ran, out = outside
    for method, (path, summary) in ran.items():
        record = read_record(path)
        assert record["method"] == method and record["method_config"]["r"] == 4 and record["status"] == "done"
        assert record["origin"]["module"] == ("examples.tied_lora" if method == TIED else "peft")
        assert f"| vit-mini | {method} | digits | {record['params']:,} | {record['best_acc']:.2f} " in summary
    assert "4 jobs: 2 ran, 2 already done, 0 run elsewhere, 0 failed" in out
    for method in (TIED, "peft:lora"):
        assert re.search(rf"vit-mini {re.escape(method)} digits seed 1 {{'r': 4}} eval test: done", out)
        assert re.search(rf"vit-mini {re.escape(method)} digits seed 1 {{'r': 8}} eval test: ran", out)
    df = load_records(runs)
    assert sorted(zip(df.method, df["opt.r"])) == [(TIED, 4), (TIED, 8), ("peft:lora", 4), ("peft:lora", 8)]
    params = df.set_index(["method", "opt.r"]).params
    assert params[TIED, 8] > params[TIED, 4] and params["peft:lora", 8] == 2 * params["peft:lora", 4]


def test_plugin_and_peft_tuner_in_the_runs_table(outside, tmp_path):
    runs, _, _ = outside
    ok(tables_cli.main, ["--table", "runs", "--runs", runs, "--out", tmp_path, "--ci", "std"])
    table, md = csv_table(tmp_path, "runs_paper"), md_cells(tmp_path, "runs_paper")
    df = load_records(runs)
    for method in (TIED, "peft:lora"):
        mine = df[df.method == method]
        best = mine.loc[mine.best_acc.idxmax()]
        assert table.loc[f"vit-mini {method}", "digits"] == best.best_acc
        assert md[f"vit-mini {method}"]["digits"] == f"{best.best_acc:.1f}"
        assert table.loc[f"vit-mini {method}", "params_m"] == pytest.approx(best.params / 1e6, rel=1e-9)


# ---------------------------------------------------------------- Vision Mamba's methods (MambaPEFT's, composed)

VIM_METHODS = sorted({row[1] for row in PRESETS["mini"] if row[0] == "vim-mini"} - {"fft", "linear", "lora", "lily"})


@pytest.fixture(scope="module")
def vim_methods(data):
    """sweep --preset mini: the vim section's MambaPEFT rows and their composition (lorap+partial), and the
    preset's two vim-mini LoRA rows (Table 5's on in_proj, MambaPEFT's on out_proj), on digits, seed 1."""
    runs = data.parent / "runs-vim"
    out = ok(sweep_cli.main, ["--preset", "mini", "--backbones", "vim-mini", "--methods", *VIM_METHODS, "lora",
                              "--tasks", "digits", "--seeds", 1, "--data-root", data, "--runs", runs])
    return runs, out


def test_vim_methods_sweep_runs_every_row_of_the_vim_section(vim_methods):
    runs, out = vim_methods
    rows = [row for row in PRESETS["mini"] if row[0] == "vim-mini" and row[1] in VIM_METHODS + ["lora"]]
    assert f"{len(rows)} jobs: {len(rows)} ran, 0 already done, 0 run elsewhere, 0 failed" in out
    df = load_records(runs)
    assert len(df) == len(rows) and set(df.method) == {*VIM_METHODS, "lora"} and (df.status == "done").all()
    assert sorted(df[df.method == "lora"]["opt.targets"].map(json.loads)) == [["in_proj"], ["out_proj"]]
    composed = read_record(df[df.method == "lorap+partial"].path.iloc[0])
    assert composed["method_config"]["lorap.targets"] == ["x"] and composed["method_config"]["partial.parts"] == [
        "conv1d"]
    params = df.set_index("method").params
    parts = [read_record(p) for p in df.path if read_record(p)["method"] in ("lorap", "partial")]
    assert params["lorap+partial"] == sum(r["params"] for r in parts)  # lorap-x at r 4 and partial conv1d


def test_vim_methods_in_the_mini_table(vim_methods, tmp_path):
    runs, _ = vim_methods
    ok(tables_cli.main, ["--table", "mini", "--runs", runs, "--out", tmp_path, "--ci", "std"])
    md, table = md_cells(tmp_path, "tablemini_paper"), csv_table(tmp_path, "tablemini_paper")
    rows = {r.label: r for r in TABLES["mini"] if r.backbone == "vim-mini"}
    df = load_records(runs)
    for label, row in rows.items():
        mine = df[df.method == row.method]
        if row.method == "lora":  # two rows: Table 5's LoRA (r 1 on in_proj) and LoRA(out_proj)
            mine = mine[[json.loads(t) == list(row.filters["targets"]) for t in mine["opt.targets"]]]
        if mine.empty:
            assert md[f"vim-mini {label}"]["digits"] == "" and row.method not in {*VIM_METHODS, "lora"}, label
            continue
        assert len(mine) == 1, label
        assert table.loc[f"vim-mini {label}", "digits"] == mine.best_acc.iloc[0]
        assert md[f"vim-mini {label}"]["digits"] == f"{mine.best_acc.iloc[0]:.1f}"
        assert table.loc[f"vim-mini {label}", "params_m"] == pytest.approx(mine.params.iloc[0] / 1e6, rel=1e-9)


def test_load_model_reproduces_every_vim_methods_run(vim_methods, data):
    runs, _ = vim_methods
    for path in load_records(runs).path:
        assert reevaluate(path, data) == read_record(path)["final_acc"], path


# ---------------------------------------------------------------- ViT's newer methods (mini rows beyond Table 4's)

VIT_METHODS_B = ["hydra", "sct", "dtl", "gps"]  # issue 23's part b: V-PETL Bench's Hydra, SCT, DTL, GPS
VIT_METHODS = sorted({row[1] for row in PRESETS["mini"] if row[0] == "vit-mini"}  # those of part a
                     - {row[1] for row in PRESETS["table4"]} - set(VIT_METHODS_B))


@pytest.mark.parametrize("method", VIT_METHODS)
def test_vit_method_runs_and_load_model_reproduces_its_record(data, method):
    """run: one epoch of each on digits (its default options, as its mini row); load_model rebuilds the adapter
    on the shipped vit-mini and gives the record's test accuracy."""
    path, out = single_run(data, f"runs-{method}", "--method", method, "--epochs", 1)
    record = read_record(path)
    assert record["method"] == method and record["status"] == "done" and record["params"] > 0
    assert f"| vit-mini | {method} | digits | {record['params']:,} | {record['best_acc']:.2f} " in out
    assert reevaluate(path, data) == record["final_acc"]



@pytest.fixture(scope="module")
def vit_methods_b(data):
    """sweep --preset mini: the vit section's Hydra, SCT, DTL and GPS rows on digits, seed 1 (SCT and GPS run their
    pre-pass on the training split at attach time)."""
    runs = data.parent / "runs-vit-b"
    out = ok(sweep_cli.main, ["--preset", "mini", "--backbones", "vit-mini", "--methods", *VIT_METHODS_B,
                              "--tasks", "digits", "--seeds", 1, "--data-root", data, "--runs", runs])
    return runs, out


def test_vit_methods_b_run_record_their_pre_pass_tabulate_and_reload(vit_methods_b, data, tmp_path):
    runs, out = vit_methods_b
    assert "4 jobs: 4 ran, 0 already done, 0 run elsewhere, 0 failed" in out
    df = load_records(runs).set_index("method")
    assert sorted(df.index) == sorted(VIT_METHODS_B) and (df.status == "done").all()
    # vit-mini: 8 blocks of width 64 (MLP 256); SCT k 8, GPS k 1 (rows: 64 patch + 8 x (192 + 64 + 256 + 64))
    assert df.params.to_dict() == {"hydra": 8 * (2 * (64 * 2 + 2 + 2 * 64 + 64) + (256 * 2 + 2 + 2 * 64 + 64)
                                                 + (64 * 2 + 2 + 2 * 64 + 64)),
                                   "sct": 8 * (8 * 8 + 8), "dtl": 8 * 2 * 2 * 64, "gps": 2 * (64 + 8 * 576)}
    sct, gps = (read_record(df.path[m])["prepass"][m] for m in ("sct", "gps"))
    assert (sct["count"], gps["count"]) == (8 * 8, 64 + 8 * 576) and len(sct["sha256"]) == len(gps["sha256"]) == 64
    assert "prepass" not in read_record(df.path["hydra"])
    ok(tables_cli.main, ["--table", "mini", "--runs", runs, "--out", tmp_path, "--ci", "std"])
    md = md_cells(tmp_path, "tablemini_paper")
    for method in VIT_METHODS_B:
        assert md[f"vit-mini {method}"]["digits"] == f"{df.best_acc[method]:.1f}", method
        assert reevaluate(df.path[method], data) == read_record(df.path[method])["final_acc"], method
