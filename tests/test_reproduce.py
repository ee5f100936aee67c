"""`python -m vtab_lily.reproduce`: end to end on a subset of the mini table (its task prepared from the bundled
data, its runs, the table equal to `tables --table mini` on the same runs), `--tables-only`, `--dry-run` (the
plan, the preset's run count, the GPU-hours of a calibration; nothing written) and the user's mistakes. Its
Slurm path (submission returns, `--tables-only` later) is in test_slurm.py, with the fake Slurm."""
import json

import pytest

from vtab_lily import doctor, reproduce
from vtab_lily import tables as tables_cli
from vtab_lily.records import load_records
from vtab_lily.tasks import TASK_SETS

TABLE_FILES = ("tablemini_paper.md", "tablemini_paper.csv", "tablemini_paper.tex")


def folders(tmp_path) -> list[str]:
    return ["--data-root", str(tmp_path / "data"), "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out"),
            "--calibration", str(tmp_path / "calibration.json")]


@pytest.mark.slow
def test_mini_table_end_to_end_prepares_runs_and_writes_what_tables_writes(tmp_path, capsys):
    argv = ["--table", "mini", "--tasks", "digits", "--backbones", "vit-mini", "--methods", "linear", "--seeds", "1",
            *folders(tmp_path)]  # the mini table's cheapest cell
    assert reproduce.main(argv) == 0
    out = capsys.readouterr().out
    assert "table mini: preset mini, 1 rows (1 configurations) x 1 tasks x 1 seed(s) = 1 runs\n" in out
    assert f"data under {tmp_path / 'data'}: 0 of 1 tasks prepared; to prepare: digits\n" in out
    assert "prepared digits: {'train800': 800, 'val200': 200, 'train800val200': 1000, 'test': 797}\n" in out
    assert "weights of vit-mini: shipped with the code\n" in out
    assert f"projected GPU-hours: none, no calibration at {tmp_path / 'calibration.json'}" in out
    records = load_records(tmp_path / "runs")
    assert list(records["method"]) == ["linear"] and set(records["task"]) == {"digits"}
    assert set(records["best_epoch"]) <= set(range(1, 11)) and set(records["final_epoch"]) == {10}  # the mini recipe
    assert tables_cli.main(["--table", "mini", "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "t")]) == 0
    for name in TABLE_FILES:
        assert (tmp_path / "out" / name).read_text() == (tmp_path / "t" / name).read_text(), name
    assert (tmp_path / "out" / "tablemini_paper.png").stat().st_size > 10_000
    table = (tmp_path / "out" / "tablemini_paper.md").read_text()
    for record in records.itertuples():
        assert f"{record.best_acc:.1f}" in table

    capsys.readouterr()
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").rglob("*")}
    assert reproduce.main([*argv[:-2], "--out", str(tmp_path / "again"), "--tables-only"]) == 0
    assert "= 1 runs" not in capsys.readouterr().out  # no plan, no sweep: the table only
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").rglob("*")} == stamps
    for name in TABLE_FILES:
        assert (tmp_path / "again" / name).read_text() == (tmp_path / "t" / name).read_text(), name


@pytest.mark.slow
def test_dry_run_prints_the_plan_the_presets_run_count_and_the_calibrated_gpu_hours_and_writes_nothing(tmp_path,
                                                                                                   capsys):
    rate = {"batch": 64, "train_ips": 100.0, "eval_ips": 400.0, "precision": "bf16", "device": "cuda:0"}
    (tmp_path / "calibration.json").write_text(json.dumps({"device_name": "NVIDIA H200", "rates": {"vit-b": rate}}))
    before = sorted(tmp_path.rglob("*"))
    assert reproduce.main(["--table", "4", "--dry-run", *folders(tmp_path), "--data-dir", str(tmp_path / "tfds")]) == 0
    out = capsys.readouterr().out
    runs = doctor.preset_runs("table4")
    assert len(runs) == 418
    assert "table 4: preset table4, 8 rows (22 configurations) x 19 tasks x 1 seed(s) = 418 runs\n" in out
    sizes = doctor.test_split_sizes()  # epochs x the full batches of 1000 images at 100 img/s, and the test passes
    hours = sum(epochs * (1000 // batch * batch if drop else 1000) / 100 + epochs // every * sizes[task] / 400
                for _, task, epochs, every, batch, drop in runs) / 3600
    assert f"projected GPU-hours: {hours:.1f}, from {tmp_path / 'calibration.json'}: NVIDIA H200, vit-b 100.0 img/s\n" \
        in out
    assert f"0 of 19 tasks prepared; to prepare: {' '.join(TASK_SETS['all'])}\n" in out
    for task in ("resisc45", "retinopathy"):
        assert (f"then: python -m vtab_lily.prepare --task {task} --root {tmp_path / 'data'} --data-dir "
                f"{tmp_path / 'tfds'}\n") in out
        assert f"  manual download: {task}: tfds cannot download " in out
    assert "weights of vit-b: " in out
    assert (f"sweep: python -m vtab_lily.sweep --preset table4 --protocol paper --data-root {tmp_path / 'data'} "
            f"--runs {tmp_path / 'runs'}\n") in out
    assert f"table: python -m vtab_lily.tables --table 4 --protocol paper --runs {tmp_path / 'runs'}" in out
    assert sorted(tmp_path.rglob("*")) == before


@pytest.mark.parametrize("argv,message", [
    (["--table", "7"], "--table 7: reproduce makes tables 4, 5, 15, extended, mini"),
    ([], "give --table, one of 4, 5, 15, extended, mini"),
    (["--table", "mini", "--slurm", "account=a"], "--slurm, --array-parallelism and --wait are for --launcher slurm"),
    (["--table", "mini", "--launcher", "slurm"], "--launcher slurm: Slurm's sbatch and srun are not on PATH"),
    (["--table", "mini", "--launcher", "slurm", "--slurm", "acount=a"], "--slurm acount: not a Slurm parameter"),
    (["--table", "mini", "--preset", "table4"], "--preset: not an option of reproduce"),
    (["--table", "mini", "--tasks", "nope"], "nope"),
    (["--table", "4", "--tasks", "dtd", "resisc45"], "1 task(s) need a manual download first: resisc45: tfds cannot "
                                                     "download resisc45 by itself"),
])
def test_a_mistake_is_one_error_line_before_any_work(tmp_path, capsys, monkeypatch, argv, message):
    if "acount=a" in argv:
        import fake_slurm
        fake_slurm.install(tmp_path / "bin", tmp_path / "slurm")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))  # no Slurm, unless the fake one
    before = sorted(tmp_path.rglob("*"))
    assert reproduce.main([*argv, *folders(tmp_path), "--data-dir", str(tmp_path / "tfds")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert sorted(tmp_path.rglob("*")) == before
