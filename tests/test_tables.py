"""Tables from records: the paper's numbers fed back in, seeds, missing cells, failed runs, outputs; rows
that take only their own recipe; the vtab protocol's choice per seed; provenance per field; damaged
records; the run id's provenance fields."""
import dataclasses
import hashlib
import json
import os
import sys

import numpy as np
import pandas as pd
import pytest

from vtab_lily import run as run_cli
from vtab_lily import sweep as sweep_cli
from vtab_lily import tables
from vtab_lily.adapters import plugins, registry
from vtab_lily.fileio import write_json
from vtab_lily.provenance import file_sha256
from vtab_lily.records import RunSpec, digest, finished, load_records, read_record, recipe_identity
from vtab_lily.run import resolve
from vtab_lily.tasks import GROUPS, MINI_TASKS, TASKS, VTAB_TASKS

PAPER = tables.read_paper()


def _record(runs, backbone, method, task, seed, acc, config, status="done", eval_split="test", params=1000,
            final=None, recipe=None, weights="a", precision="fp32", data=None):
    """A complete record as `run` writes it (best_acc `acc`, final_acc `final`, default acc - 0.5); its data
    id hashes the two split lists of its eval split, as data_provenance does."""
    train_split = "train800val200" if eval_split == "test" else "train800"
    lists = data or hashlib.sha256(f"{task}:{train_split}:{eval_split}".encode()).hexdigest()
    identity = {"backbone": backbone, "task": task, "method": method, "seed": seed, "method_config": config,
                "train_split": train_split, "eval_split": eval_split,
                "recipe": recipe_identity(backbone, {}) if recipe is None else recipe,
                "provenance": {"weights": {"source": "hub", "sha256": weights * 64}, "data": {"lists_sha256": lists},
                               "precision": precision}}
    run_id = f"s{seed}-{digest(identity)[:10]}"
    path = runs / backbone / method / task / f"{run_id}.json"
    write_json(path, {"run_id": run_id, **identity, "status": status, "params": params, "storage_bytes": 4 * params,
                      **({"best_acc": acc, "best_epoch": 10, "final_acc": acc - 0.5 if final is None else final,
                          "wall_time_s": 1.0, "images_per_s": 1.0} if status == "done" else {})})
    return path


def _feed_paper(runs):
    for table, rows in tables.TABLES.items():
        for row in rows:
            if (table, row.backbone, row.label) not in PAPER.index:
                continue  # no published numbers (e.g. FacT-TT)
            paper = PAPER.loc[(table, row.backbone, row.label)]
            if paper[list(VTAB_TASKS)].isna().all():
                continue  # group means only (MambaPEFT): nothing per task to feed back
            for task in VTAB_TASKS:
                _record(runs, row.backbone, row.method, task, 42, float(paper[task]), dict(row.filters),
                        params=int(float(paper["params_m"] or 0) * 1e6) if not pd.isna(paper["params_m"]) else 0,
                        recipe=json.loads(tables.row_recipe(table, row, task)))


@pytest.mark.slow
def test_paper_numbers_fed_back_reproduce_every_printed_mean(tmp_path):
    _feed_paper(tmp_path)
    records = tables.load_records(tmp_path)
    flagged = []
    for table in tables.TABLES:
        result = tables.build_table(table, records, "paper", PAPER)["mean"]
        for name, row in result.iterrows():
            if abs(row["Mean"] - row["paper_Mean"]) > 0.1:
                flagged.append((table, name, row["paper_Mean"], round(row["Mean"], 2)))
    assert flagged == [("5", "vit-b-in1k linear", 66.4, 57.23)]
    check = tables.check_paper(PAPER)
    assert check["flag"].sum() == 2 and check.loc[("5", "vit-b-in1k", "linear"), "recomputed"] == 57.23
    assert check.loc[("mambapeft", "vim-s", "fft"), "recomputed"] == 50.82  # their Full row, as printed
    lily = tables.build_table("4", records, "paper", PAPER)["mean"].loc["vit-b lily"]
    assert lily["Mean"] == pytest.approx(77.31, abs=0.01) and lily["Mean19"] == pytest.approx(75.23, abs=0.01)


def test_rows_take_the_recipe_of_their_preset_row():
    """SSF's row takes its per-task recipe, VPT's drop_path 0, Lily's the ViT recipe (vtab_lily/recipes.py)."""
    ssf = next(r for r in tables.TABLES["extended"] if r.label == "ssf")
    recipe = json.loads(tables.row_recipe("extended", ssf, "dtd"))
    assert (recipe["lr"], recipe["weight_decay"], recipe["no_decay_1d"]) == (5e-3, 5e-5, True)
    assert json.loads(tables.row_recipe("extended", ssf, "svhn"))["lr"] == 1e-2
    deep = next(r for r in tables.TABLES["extended"] if r.label == "vpt-deep")
    assert json.loads(tables.row_recipe("extended", deep, "dtd"))["drop_path"] == 0.0
    lily = next(r for r in tables.TABLES["4"] if r.label == "lily")
    assert json.loads(tables.row_recipe("4", lily, "dtd")) == recipe_identity("vit-b", {})
    assert tables.row_recipe("extended", ssf, "digits") is None  # no SSF setting for a mini task


def test_seeds_aggregate_missing_cells_stay_empty_failed_runs_never_count(tmp_path):
    for seed, acc in ((1, 70.0), (2, 72.0), (3, 74.0)):
        _record(tmp_path, "vit-b", "lora", "cifar100", seed, acc, {"r": 32})
        _record(tmp_path, "vit-b", "lora", "cifar100", seed, acc - 10, {"r": 32, "s": 0.1})  # worse config
    _record(tmp_path, "vit-b", "lora", "dtd", 1, 99.0, {"r": 32}, status="failed")
    _record(tmp_path, "vit-b", "lora", "dtd", 1, 99.0, {"r": 8})  # not Table 4's LoRA (r=32)
    result = tables.build_table("4", tables.load_records(tmp_path), "paper", PAPER)
    row = "vit-b lora"
    assert result["mean"].loc[row, "cifar100"] == pytest.approx(72.0)
    assert result["std"].loc[row, "cifar100"] == pytest.approx(2.0)
    assert result["n"].loc[row, "cifar100"] == 3
    assert np.isnan(result["mean"].loc[row, "dtd"]) and result["n"].loc[row, "dtd"] == 0
    assert np.isnan(result["mean"].loc[row, "Mean"]) and np.isnan(result["mean"].loc[row, "Natural"])
    md = tables.to_markdown(result, "4", "paper")
    assert "| vit-b lora | 0.001 | 4 | 72.0 ± 2.0 (n=3) |  |" in md


def test_vtab_protocol_uses_the_val_selected_config_and_final_accuracy(tmp_path):
    _record(tmp_path, "vit-b", "lora", "dtd", 1, 60.0, {"r": 32, "s": 1.0}, eval_split="val200")
    _record(tmp_path, "vit-b", "lora", "dtd", 1, 65.0, {"r": 32, "s": 0.1}, eval_split="val200")
    _record(tmp_path, "vit-b", "lora", "dtd", 1, 80.0, {"r": 32, "s": 1.0})  # best on test, not chosen
    _record(tmp_path, "vit-b", "lora", "dtd", 1, 70.0, {"r": 32, "s": 0.1})
    records = tables.load_records(tmp_path)
    assert records["data_id"].nunique() == 2  # val200 and test runs read different split lists
    vtab = tables.build_table("4", records, "vtab", PAPER)["mean"].loc["vit-b lora", "dtd"]
    paper = tables.build_table("4", records, "paper", PAPER)["mean"].loc["vit-b lora", "dtd"]
    assert vtab == pytest.approx(69.5)  # final accuracy of the s=0.1 retrain
    assert paper == pytest.approx(80.0)  # best test accuracy over configs


def test_vtab_protocol_chooses_per_seed_by_final_val200_accuracy(tmp_path):
    """Seeds whose choices differ, and best_acc ranking the other way: seed 1 chooses s=0.1 (final 80 > 70),
    seed 2 s=1 (75 > 60). By best_acc it would be s=1, then s=0.1; over both seeds s=1 (mean 72.5 > 70)."""
    a, b = {"r": 32, "s": 1.0}, {"r": 32, "s": 0.1}
    for seed, (fa, ba), (fb, bb) in ((1, (70, 90), (80, 81)), (2, (75, 76), (60, 95))):
        _record(tmp_path, "vit-b", "lora", "dtd", seed, ba, a, eval_split="val200", final=fa)
        _record(tmp_path, "vit-b", "lora", "dtd", seed, bb, b, eval_split="val200", final=fb)
    retrains = {(1, "a"): 50.0, (1, "b"): 55.0, (2, "a"): 65.0, (2, "b"): 45.0}
    for (seed, name), acc in retrains.items():
        _record(tmp_path, "vit-b", "lora", "dtd", seed, 99.0, a if name == "a" else b, final=acc)
    result = tables.build_table("4", tables.load_records(tmp_path), "vtab", PAPER)
    cells = result["cells"]["vit-b lora"].sort_values("seed")
    chosen = [read_record(p)["method_config"]["s"] for p in cells["path"]]
    assert list(cells["seed"]) == [1, 2] and chosen == [0.1, 1.0] and list(cells["acc"]) == [55.0, 65.0]
    assert result["mean"].loc["vit-b lora", "dtd"] == pytest.approx(60.0) and result["n"].loc["vit-b lora", "dtd"] == 2


def test_sweep_retrains_per_row_and_seed_the_best_final_val200_point(monkeypatch):
    """The same records through sweep's best_on_val; two rows of one method (as Table 5's lily-s and
    lily-l) each get their retrain."""
    accs = {(1, 1.0): (70, 90), (1, 0.1): (80, 81), (2, 1.0): (75, 76), (2, 0.1): (60, 95)}
    points = [sweep_cli.Point("p", RunSpec("vit-mini", "digits", "lora", {"r": r, "s": s}, seed, "val200"), row=row)
              for row, r in ((0, 2), (1, 4)) for seed in (1, 2) for s in (1.0, 0.1)]
    fake = {id(p.spec): {"run_id": f"s{p.spec.seed}-{p.row}{p.spec.options['s']}",
                         "final_acc": accs[p.spec.seed, p.spec.options["s"]][0],
                         "best_acc": accs[p.spec.seed, p.spec.options["s"]][1]} for p in points}
    monkeypatch.setattr(sweep_cli, "record_of", lambda spec, args: fake[id(spec)])
    chosen = sorted((s.options["r"], s.seed, s.options["s"], s.eval_split) for s in sweep_cli.best_on_val(points, None))
    assert chosen == [(2, 1, 0.1, "test"), (2, 2, 1.0, "test"), (4, 1, 0.1, "test"), (4, 2, 1.0, "test")]


def test_vtab_retrain_joins_only_its_selection_point(tmp_path):
    """A paper-protocol record of the chosen config with another recipe, and one of the other config, sit
    beside the retrain: neither joins (n=1); the other recipe is listed as in no row."""
    _record(tmp_path, "vit-b", "lora", "dtd", 1, 60.0, {"r": 32, "s": 1.0}, eval_split="val200")
    _record(tmp_path, "vit-b", "lora", "dtd", 1, 65.0, {"r": 32, "s": 0.1}, eval_split="val200")
    _record(tmp_path, "vit-b", "lora", "dtd", 1, 70.0, {"r": 32, "s": 0.1})
    _record(tmp_path, "vit-b", "lora", "dtd", 1, 90.0, {"r": 32, "s": 0.1},
            recipe=recipe_identity("vit-b", {"lr": 1e-2}))
    _record(tmp_path, "vit-b", "lora", "dtd", 1, 95.0, {"r": 32, "s": 1.0})
    result = tables.build_table("4", tables.load_records(tmp_path), "vtab", PAPER)
    assert result["n"].loc["vit-b lora", "dtd"] == 1 and result["mean"].loc["vit-b lora", "dtd"] == 69.5
    assert len(result["used"]) == 4


@pytest.mark.slow
def test_vtab_sweep_folder_tabulates_with_both_protocols(tmp_path, capsys):
    runs = tmp_path / "runs"
    for seed in (1, 2):
        _record(runs, "vit-b", "lora", "dtd", seed, 60.0 + seed, {"r": 32}, eval_split="val200")
        _record(runs, "vit-b", "lora", "dtd", seed, 70.0 + seed, {"r": 32})
    for protocol, want in (("vtab", "71.0 ± 0.7 (n=2)"), ("paper", "71.5 ± 0.7 (n=2)")):
        assert tables.main(["--table", "4", "--protocol", protocol, "--runs", str(runs), "--out",
                            str(tmp_path / "out")]) == 0
        md = (tmp_path / "out" / f"table4_{protocol}.md").read_text()
        assert f"| vit-b lora | 0.001 | 4 |  |  | {want} |" in md
    caption = next(line for line in (tmp_path / "out" / "table4_vtab.md").read_text().splitlines()
                   if line.startswith("Cells: "))
    assert "the configuration with the best final val200 accuracy" in caption  # the field it selects by


@pytest.mark.parametrize("field", ["weights", "precision", "data"])
def test_tables_refuse_to_pool_records_of_different_provenance(tmp_path, field):
    _record(tmp_path, "vit-b", "lora", "dtd", 1, 70.0, {"r": 32})
    _record(tmp_path, "vit-b", "lora", "dtd", 2, 72.0, {"r": 32}, **{"weights": {"weights": "b"},
            "precision": {"precision": "bf16"}, "data": {"data": "c" * 64}}[field])
    with pytest.raises(tables.ProvenanceConflict, match=f"records of vit-b( dtd)?( test)? differ in {field}"):
        tables.build_table("4", tables.load_records(tmp_path), "paper", PAPER)


def test_paper_check_tolerance_is_inclusive_at_a_tenth():
    cells = {t: 50.0 for t in VTAB_TASKS}  # every Mean recomputes to 50.00
    printed = {"inside+": 50.1, "inside-": 49.9, "outside+": 50.11, "outside-": 49.89}
    paper = pd.DataFrame([{"table": "t", "backbone": "b", "label": k, "mean": v, **cells} for k, v in printed.items()])
    check = tables.check_paper(paper.set_index(["table", "backbone", "label"])).droplevel([0, 1])
    assert check["recomputed"].tolist() == [50.0] * 4
    assert check["flag"].to_dict() == {"inside+": False, "inside-": False, "outside+": True, "outside-": True}


@pytest.mark.slow
def test_cli_writes_every_output_with_table_4_layout(tmp_path, capsys):
    _feed_paper(tmp_path / "runs")
    assert tables.main(["--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    for t in ("4", "5", "15"):
        for suffix in ("md", "tex", "csv", "png"):
            assert (tmp_path / "out" / f"table{t}_paper.{suffix}").stat().st_size > 0
    assert "Table 5 vit-b-in1k linear: printed 66.4, recomputed 57.23" in out and "not in any row" not in out
    md = (tmp_path / "out" / "table4_paper.md").read_text().split("\n\n", 1)[1].splitlines()  # below the card
    header = md[3].split(" | ")
    assert header[1:4] == ["params (M)", "storage (KB)", "cifar100"]
    assert header[-7:-4] == ["Natural", "Specialized", "Structured"]
    assert md[5].count("Natural") == 7 and md[5].count("Specialized") == 4 and md[5].count("Structured") == 8
    assert "| vit-b lily | 0.318 | 1242 | 73.9 |" in "\n".join(md)
    tex = (tmp_path / "out" / "table4_paper.tex").read_text()
    assert r"\toprule" in tex and r"\multicolumn{7}{c}{Natural}" in tex


@pytest.mark.slow
def test_extended_table_sets_the_published_baselines_beside_ours(tmp_path):
    """Printed Means of vtab_lily/paper/extended.csv check by their own definition (19-task mean or mean of
    groups); the table shows Table 4's Mean (of groups) for every row."""
    check = tables.check_paper(PAPER).loc["extended"]
    assert not check["flag"].any()
    assert check.loc[("vit-b", "ssf"), "recomputed"] == 73.10 and check.loc[("vit-b", "vpt-deep"), "printed"] == 71.96
    _feed_paper(tmp_path)
    result = tables.build_table("extended", tables.load_records(tmp_path), "paper", PAPER)["mean"]
    assert result.loc["vit-b ssf", "paper_Mean"] == pytest.approx(75.69) and result.loc["vit-b ssf", "Mean"] == (
        pytest.approx(75.69, abs=0.01))
    assert result.loc["vit-b fact-tk", "dtd"] == 70.8 and np.isnan(result.loc["vit-b fact-tt", "Mean"])
    assert (result["diff_Mean"].dropna().abs() < 0.02).all() and len(result["diff_Mean"].dropna()) == 6


def test_mini_table_group_means_plain_mean_and_outputs(tmp_path):
    accs = {t: 50.0 + 3 * i for i, t in enumerate(MINI_TASKS)}
    for task, acc in accs.items():
        _record(tmp_path, "vit-mini", "lily", task, 42, acc, {"r": 8, "ne": 2})
        _record(tmp_path, "vit-mini", "lily", task, 42, acc - 5, {"r": 8, "ne": 4})
    result = tables.build_table("mini", tables.load_records(tmp_path), "paper", PAPER)
    row = result["mean"].loc["vit-mini lily"]
    group_means = [np.mean([accs[t] for t in MINI_TASKS if TASKS[t].group == g]) for g in GROUPS]
    assert row["Mean"] == pytest.approx(np.mean(group_means))
    assert row[f"Mean{len(MINI_TASKS)}"] == pytest.approx(np.mean(list(accs.values())))
    assert np.isnan(result["mean"].loc["vim-mini fft", "Mean"]) and np.isnan(row["paper_Mean"])
    md, tex, csv, meta, png = tables.write_outputs(result, "mini", "paper", tmp_path / "out")
    assert "| vit-mini lily |" in md.read_text() and "mini\\_ori" in tex.read_text()
    assert png.stat().st_size > 5_000


def test_a_smoke_run_of_another_recipe_is_in_no_row(tmp_path, capsys):
    runs = tmp_path / "runs"
    _record(runs, "vit-mini", "lily", "digits", 42, 60.0, {"r": 8, "ne": 2})
    smoke = _record(runs, "vit-mini", "lily", "digits", 42, 90.0, {"r": 8, "ne": 2},
                    recipe=recipe_identity("vit-mini", {"epochs": 1}))
    assert tables.main(["--table", "mini", "--runs", str(runs), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "| vit-mini lily | 0.001 | 4 | 60.0 |" in out
    assert f"  vit-mini lily [recipe: epochs=1]: 1 record(s), e.g. {smoke}" in out.split("not in any row")[1]
    assert "Paper check" not in out and not list((tmp_path / "out").glob("paper_check*"))


def test_one_table_prints_only_its_paper_check(tmp_path, capsys):
    _record(tmp_path / "runs", "vit-b", "lora", "dtd", 1, 70.0, {"r": 32})
    assert tables.main(["--table", "4", "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    n4 = int((PAPER.index.get_level_values("table") == "4").sum())
    assert f"Paper check: {n4} printed Means" in out and "Table 5" not in out
    check = pd.read_csv(tmp_path / "out" / "paper_check_table4.csv")
    assert len(check) == n4 and set(check["table"].astype(str)) == {"4"}
    assert not (tmp_path / "out" / "paper_check.csv").exists()


@pytest.mark.parametrize("folder", ["empty", "misspelled"])
def test_no_records_is_an_error_and_writes_nothing(tmp_path, capsys, folder):
    runs = tmp_path / "runs"
    runs.mkdir()
    _record(tmp_path / "elsewhere", "vit-b", "lora", "dtd", 1, 70.0, {"r": 32})
    where = runs if folder == "empty" else tmp_path / "rnus"
    assert tables.main(["--runs", str(where), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: no finished run records under {where}") and len(err.splitlines()) == 1
    assert ("no such folder" in err) == (folder == "misspelled") and not (tmp_path / "out").exists()
    assert tables.main(["--runs", str(tmp_path / "elsewhere"), "--select", "precision=bf16", "--out",
                        str(tmp_path / "out")]) == 2
    assert "match precision=bf16" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_runs_table_has_a_column_per_recorded_task_grouped_by_benchmark(tmp_path, capsys):
    runs = tmp_path / "runs"
    for task, acc in (("dtd", 70.0), ("digits", 80.0), ("mini_count", 30.0)):
        _record(runs, "vit-mini", "lora", task, 1, acc, {"r": 8})
    assert tables.main(["--table", "runs", "--runs", str(runs), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "Paper check" not in out and not list((tmp_path / "out").glob("paper_check*"))
    md = (tmp_path / "out" / "runs_paper.md").read_text().split("\n\n", 1)[1].splitlines()  # below the card
    header = md[3].strip("| ").split(" | ")
    assert header[3:] == ["dtd", "digits", "mini_count", "VTAB-1K Natural", "VTAB-1K Mean", "VTAB-1K Mean1",
                          "mini Natural", "mini Structured", "mini Mean", "mini Mean2"]  # no paper: no paper columns
    assert md[5].strip("| ").split(" | ")[:3] == ["VTAB-1K Natural", "mini Natural", "mini Structured"]
    assert md[6].strip("| ").split(" | ")[3:12] == ["70.0", "80.0", "30.0", "70.0", "", "70.0", "80.0", "30.0", ""]
    assert "mini Mean2" in md[0] and r"\multicolumn{1}{c}{mini Structured}" in (
        tmp_path / "out" / "runs_paper.tex").read_text()
    only_mini = tables.build_table("runs", tables.load_records(runs).query("task != 'dtd'"), "paper", PAPER)
    assert list(only_mini["mean"].columns[:5]) == ["digits", "mini_count", "Natural", "Structured", "Mean"]
    assert only_mini["mean"].iloc[0]["Mean2"] == 55.0 and np.isnan(only_mini["mean"].iloc[0]["Mean"])


def test_runs_table_gives_each_recipe_its_row(tmp_path):
    _record(tmp_path, "vit-mini", "lora", "digits", 1, 70.0, {"r": 8})
    _record(tmp_path, "vit-mini", "lora", "digits", 1, 90.0, {"r": 8},
            recipe=recipe_identity("vit-mini", {"epochs": 1}))
    result = tables.build_table("runs", tables.load_records(tmp_path), "paper", PAPER)["mean"]
    assert result["digits"].to_dict() == {"vit-mini lora [its recipe]": 70.0, "vit-mini lora [epochs=1]": 90.0}


def test_records_missing_a_required_field_are_damaged(tmp_path):
    good = _record(tmp_path, "vit-b", "lora", "dtd", 1, 70.0, {"r": 32})
    bad = _record(tmp_path, "vit-b", "lora", "dtd", 2, 72.0, {"r": 32})
    record = json.loads(bad.read_text())
    del record["best_acc"]
    bad.write_text(json.dumps(record))
    with pytest.warns(UserWarning, match=f"skipped damaged run record {bad} \\(missing or invalid: best_acc\\)"):
        df = load_records(tmp_path)
    assert list(df["path"]) == [str(good)]
    with pytest.warns(UserWarning, match="missing or invalid: best_acc"):
        assert finished(bad) is None
    record["best_acc"], record["final_acc"] = None, "70"
    bad.write_text(json.dumps(record))
    with pytest.warns(UserWarning, match="missing or invalid: best_acc, final_acc"):
        assert finished(bad) is None


def test_run_reruns_a_record_missing_a_field(data_root, tmp_path, capsys):
    args = ["--backbone", "vit-tiny", "--task", "digits", "--method", "linear", "--data-root", str(data_root),
            "--runs", str(tmp_path), "--no-progress", "--set", "image_size=32", "--set", "batch_size=50",
            "--set", "epochs=1", "--set", "warmup_epochs=0"]
    assert run_cli.main(args) == 0
    (path,) = tmp_path.rglob("*.json")
    record = read_record(path)
    del record["best_acc"]
    path.write_text(json.dumps(record))
    capsys.readouterr()
    with pytest.warns(UserWarning, match=f"damaged run record {path}"):
        assert run_cli.main(args) == 0
    out = capsys.readouterr().out
    assert "skipped" not in out and f"{read_record(path)['best_acc']:.2f}" in out


def test_dangling_links_and_folders_named_json_are_skipped(tmp_path, capsys):
    good = _record(tmp_path, "vit-b", "lora", "dtd", 1, 70.0, {"r": 32})
    (good.parent / "gone.json").symlink_to(tmp_path / "nowhere.json")
    (good.parent / "folder.json").mkdir()
    with pytest.warns(UserWarning) as caught:
        df = load_records(tmp_path)
    assert list(df["path"]) == [str(good)]
    assert sorted(str(w.message).split(" (")[0] for w in caught) == [
        f"skipped unreadable run record {good.parent / 'folder.json'}",
        f"skipped unreadable run record {good.parent / 'gone.json'}"]
    with pytest.warns(UserWarning, match="unreadable run record"):
        assert tables.main(["--table", "4", "--runs", str(tmp_path), "--out", str(tmp_path / "out")]) == 0


def test_paper_only_prints_the_published_table(capsys):
    assert tables.main(["--paper-only", "--table", "4"]) == 0
    out = capsys.readouterr().out
    lily = next(line for line in out.splitlines() if line.startswith("| vit-b lily |"))
    assert lily.split(" | ")[1:5] == ["0.318", "", "73.9", "93.0"] and lily.endswith("| 77.3 | 75.2 | 77.3 | +0.0 |")
    assert "Paper check: 8 printed Means" in out
    assert tables.main(["--paper-only", "--table", "mini"]) == 2


# the run id: every provenance field ----------------------------------------------------------------------

def _fake_task(root, version="2.0.0"):
    folder = root / "digits"
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train800", "val200", "train800val200", "test"):
        (folder / f"{split}.txt").write_text(f"images/{split}/0.png 0\n")
    write_json(folder / "manifest.json", {"source": "sklearn", "version_used": version, "format": 2})
    return folder


def test_run_id_changes_with_every_provenance_field(tmp_path, monkeypatch):
    folder = _fake_task(tmp_path / "data")
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"A" * 64)
    spec = RunSpec("vit-tiny", "digits", "lora", {"r": 2}, 0, "test", {"precision": "bf16"})

    def run_id(s=spec, device="cpu"):
        return resolve(s, tmp_path / "data", str(weights), device=device)[0].run_id

    base, val_base = run_id(), run_id(dataclasses.replace(spec, eval_split="val200"))
    changed = {}
    st = os.stat(weights)
    weights.write_bytes(b"B" * 64)  # rewritten in place: same size, same inode
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    changed["weights"] = run_id()
    weights.write_bytes(b"A" * 64)
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    for split in ("train800val200", "test"):  # the two lists a test run reads
        before = (folder / f"{split}.txt").read_text()
        (folder / f"{split}.txt").write_text(before + "images/x.png 1\n")
        changed[split] = run_id()
        (folder / f"{split}.txt").write_text(before)
    (folder / "val200.txt").write_text("images/y.png 1\n")  # a list a test run does not read
    assert run_id() == base and run_id(dataclasses.replace(spec, eval_split="val200")) != val_base
    _fake_task(tmp_path / "data", version="2.0.1")
    changed["manifest version"] = run_id()
    _fake_task(tmp_path / "data")
    (folder / "val200.txt").write_text("images/val200/0.png 0\n")
    changed["precision"] = run_id(device="cuda")  # bf16 on CUDA, fp32 on the CPU
    monkeypatch.setattr("vtab_lily.adapters.plugins.origin", lambda module: {"module": module, "sha256": "0" * 64})
    changed["origin"] = run_id()
    monkeypatch.undo()
    assert run_id() == base
    assert {k: v != base for k, v in changed.items()} == dict.fromkeys(changed, True)
    assert len(set(changed.values())) == len(changed)


def test_file_hash_follows_a_file_rewritten_or_replaced_within_one_process(tmp_path):
    path, other = tmp_path / "w.bin", tmp_path / "other.bin"
    path.write_bytes(b"A" * 32)
    first = file_sha256(path)
    st = os.stat(path)
    with open(path, "r+b") as f:  # in place: same size and inode, mtime set back to the same second
        f.write(b"B" * 32)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    assert file_sha256(path) == hashlib.sha256(b"B" * 32).hexdigest() != first
    other.write_bytes(b"C" * 32)
    os.utime(other, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    os.replace(other, path)  # another file: same path, size and mtime, another inode
    assert os.stat(path).st_mtime_ns == st.st_mtime_ns + 1
    assert file_sha256(path) == hashlib.sha256(b"C" * 32).hexdigest()


@pytest.mark.slow
def test_origin_hashes_the_file_imported_not_the_installed_one(tmp_path, monkeypatch):
    """An installed plugin reports its version; an edited copy earlier on sys.path shadows it, and the
    origin is the copy's SHA-256."""
    site, shadow = tmp_path / "site", tmp_path / "shadow"
    for name in ("plug_installed_x1", "plug_shadowed_x1"):
        site.mkdir(exist_ok=True)
        (site / f"{name}.py").write_text("VALUE = 1\n")
        info = site / f"{name}-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
        (info / "RECORD").write_text(f"{name}.py,,\n{info.name}/METADATA,,\n{info.name}/RECORD,,\n")
    shadow.mkdir()
    (shadow / "plug_shadowed_x1.py").write_text("VALUE = 2  # edited\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.syspath_prepend(str(shadow))
    for name in ("plug_installed_x1", "plug_shadowed_x1"):
        monkeypatch.delitem(sys.modules, name, raising=False)
        registry.import_plugin(name)
    assert plugins.origin("plug_installed_x1") == {"module": "plug_installed_x1", "version": "1.0"}
    digest_ = hashlib.sha256((shadow / "plug_shadowed_x1.py").read_bytes()).hexdigest()
    assert sys.modules["plug_shadowed_x1"].VALUE == 2
    assert plugins.origin("plug_shadowed_x1") == {"module": "plug_shadowed_x1", "sha256": digest_}
