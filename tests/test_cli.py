"""What a newcomer meets on the command line: --help names the choices, a skipped run says so, and
`run --prepare` finishes a half-prepared task."""
import re
from pathlib import Path

import pytest

from backbones import BACKBONES
from vtab_lily import run
from vtab_lily.adapters import METHODS
from vtab_lily.prepare import prepare_task
from vtab_lily.tasks import ALIASES, TASKS

TINY = ["--backbone", "vit-tiny", "--task", "digits", "--epochs", "1", "--set", "image_size=32", "--set",
        "batch_size=100", "--set", "warmup_epochs=1", "--no-progress"]


@pytest.mark.parametrize("module", ["vtab_lily.run", "vtab_lily.sweep", "analysis.attention", "analysis.routers",
                                    "analysis.granularity"])
def test_help_lists_every_backbone_method_and_task(module, capsys, monkeypatch):
    import importlib
    monkeypatch.setenv("COLUMNS", "10000")  # no line wrapping (argparse also breaks names at hyphens)
    with pytest.raises(SystemExit):
        importlib.import_module(module).main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    names = {"vtab_lily.run": [*BACKBONES, *METHODS, *TASKS, *ALIASES],
             "vtab_lily.sweep": [*BACKBONES, *METHODS, *TASKS], "analysis.granularity": [*BACKBONES]}
    for name in names.get(module, [*TASKS, *ALIASES]):
        assert f" {name}," in text or f" {name} " in text or f" {name})" in text, name


@pytest.mark.slow
def test_skipped_finished_run_says_so(tmp_path, capsys):
    prepare_task("digits", tmp_path / "data")
    argv = [*TINY, "--data-root", str(tmp_path / "data"), "--runs", str(tmp_path / "runs")]
    assert run.main(argv) == 0
    assert "skipped:" not in capsys.readouterr().out
    assert run.main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("skipped: this run is already finished (") and "--force runs it again" in out
    assert "| vit-tiny | lily |" in out


@pytest.mark.slow
def test_run_prepare_finishes_a_half_prepared_task(tmp_path, capsys):
    prepare_task("digits", tmp_path / "data", limit=10)  # then killed before it wrote the lists
    folder = tmp_path / "data" / "digits"
    for p in [folder / "manifest.json", *folder.glob("*.txt")]:
        p.unlink()
    argv = [*TINY, "--data-root", str(tmp_path / "data"), "--runs", str(tmp_path / "runs")]
    assert run.main(argv) == 2
    assert "missing list file" in capsys.readouterr().err
    assert run.main([*argv, "--prepare"]) == 0
    assert len((folder / "test.txt").read_text().splitlines()) == 797 and (folder / "manifest.json").exists()


# sweeps: a failing point never stops the sweep; --preset with --methods; scoped --set; accuracies per run --------

SWEEP_TINY = ["--set", "image_size=32", "batch_size=100", "epochs=1", "warmup_epochs=0"]


def _sweep(argv, data_root, tmp_path):
    from vtab_lily import sweep
    return sweep.main(["--backbones", "vit-tiny", "--tasks", "digits", "--data-root", str(data_root),
                       "--runs", str(tmp_path / "runs"), "--logs", str(tmp_path / "logs"), *argv])


def test_a_point_that_fails_in_any_way_is_logged_and_the_sweep_goes_on(data_root, tmp_path, capsys, monkeypatch):
    import errno
    import re

    from vtab_lily import sweep
    from vtab_lily.errors import UserError
    from vtab_lily.records import read_record
    from vtab_lily.train import NonFiniteLoss
    real = sweep.execute
    raised = {1: RuntimeError("a bug in the suite"), 2: UserError("a user error in one point"),
              3: OSError(errno.ENOSPC, "No space left on device", "x.state.pt"), 4: NonFiniteLoss("loss is nan")}

    def execute(spec, *args, **kwargs):
        if spec.seed in raised:
            raise raised[spec.seed]
        return real(spec, *args, **kwargs)
    monkeypatch.setattr(sweep, "execute", execute)
    code = _sweep(["--methods", "linear", "--seeds", "1", "2", "3", "4", "5", *SWEEP_TINY], data_root, tmp_path)
    out = capsys.readouterr().out.splitlines()
    assert code == 1 and out[-1] == "5 jobs: 1 ran, 0 already done, 0 run elsewhere, 4 failed"
    reasons = ["RuntimeError: a bug in the suite", "a user error in one point",
               "could not write x.state.pt: No space left on device", "NonFiniteLoss: loss is nan"]
    for line, reason, seed in zip(out, reasons, raised):
        found = re.fullmatch(rf"\[{seed}/5\] vit-tiny linear digits seed {seed} eval test: failed: {re.escape(reason)} "
                             r"\(traceback: (\S+)\)", line)
        assert found, line
        log = Path(found.group(1)).read_text()
        assert log.startswith(f"vit-tiny linear digits seed {seed}") and "Traceback (most recent call last)" in log
        assert "raise raised[spec.seed]" in log and f"{type(raised[seed]).__name__}: " in log
        assert Path(found.group(1)).parent == tmp_path / "logs" / "failed"
    found = re.fullmatch(r"\[5/5\] .* seed 5 eval test: ran \(best (\S+) at epoch (\d+), final (\S+)\)", out[4])
    (path,) = (tmp_path / "runs").rglob("*.json")
    record = read_record(path)
    assert found and found.groups() == (f"{record['best_acc']:.2f}", str(record["best_epoch"]),
                                        f"{record['final_acc']:.2f}")


def test_points_that_cannot_be_made_fail_alone_at_expand_and_dry_run_time(data_root, tmp_path, capsys, monkeypatch):
    from vtab_lily import sweep
    code = _sweep(["--methods", "lora", "--grid", "image_size=8,32", *SWEEP_TINY[:1], "batch_size=100", "--dry-run"],
                  data_root, tmp_path)
    out = capsys.readouterr().out
    assert code == 1 and "failed: image_size 8 does not fit vit-tiny's 16 px patches" in out
    assert out.splitlines()[-1] == "2 runs: 0 done, 1 to run, 1 failed"
    real = sweep.split_settings

    def split_settings(method, settings):
        if settings.get("lora.r") == 2:
            raise ZeroDivisionError("a bug while expanding")
        return real(method, settings)
    monkeypatch.setattr(sweep, "split_settings", split_settings)

    def resolve(spec, *args, **kwargs):
        raise AttributeError("a bug while resolving")
    monkeypatch.setattr(sweep, "resolve", resolve)
    code = _sweep(["--methods", "lora", "--grid", "lora.r=2,4", *SWEEP_TINY, "--dry-run"], data_root, tmp_path)
    out = capsys.readouterr().out.splitlines()
    assert code == 1 and out[-1] == "2 runs: 0 done, 0 to run, 2 failed"
    assert "failed: ZeroDivisionError: a bug while expanding (traceback: " in out[0]
    assert "failed: AttributeError: a bug while resolving (traceback: " in out[1]
    assert len(list((tmp_path / "logs" / "failed").glob("*.log"))) == 3  # image_size=8 above, and these two
    assert not (tmp_path / "runs").exists()


def test_preset_with_methods_keeps_only_those_rows(tmp_path, capsys):
    from vtab_lily import sweep
    base = ["--preset", "mini", "--tasks", "digits", "--runs", str(tmp_path / "runs"), "--data-root",
            str(tmp_path / "nodata"), "--dry-run"]
    sweep.main([*base, "--methods", "lora", "lily"])
    lines = capsys.readouterr().out.splitlines()
    assert [" ".join(line.split()[:2]) for line in lines[:-1]] == [
        "vit-mini lora", "vit-mini lily", "vit-mini lily", "vim-mini lora", "vim-mini lily", "vim-mini lily",
        "vim-mini lora"]  # the vim section's LoRA row: out_proj
    assert lines[-1].startswith("7 runs:")
    sweep.main([*base, "--methods", "lily", "--backbones", "vim-mini"])
    assert capsys.readouterr().out.splitlines()[-1].startswith("2 runs:")  # Lily-S and Lily-L
    assert sweep.main([*base, "--methods", "vpt"]) == 2
    assert capsys.readouterr().err == ("error: --methods vpt: preset mini has no such rows; its methods are "
                                       "['adapterplus', 'adaptformer', 'addscan', 'affix', 'bilora', 'convpass', "
                                       "'dtl', 'fft', 'fourierft', 'gps', 'hydra', 'lily', 'linear', 'lntune', 'lora', "
                                       "'lorap', 'lorap+partial', 'mora', 'partial', 'prompt', 'repadapter', 'sct']\n")


def test_set_with_a_method_prefix_applies_to_that_method_only():
    from vtab_lily.sweep import expand
    rows = [("vit-tiny", "lily", {}, {}), ("vit-tiny", "lora", {}, {}), ("vit-tiny", "adaptformer", {}, {})]
    points = expand(rows, ["digits"], [1], {"lora.s": [0.5, 2.0]},
                    {"lily.r": 4, "r": 2, "width": 4, "lr": 0.01, "lily.ne": 2})
    assert [p.error for p in points] == [None] * 4
    got = [(p.spec.method, p.spec.options, p.spec.recipe) for p in points]
    assert got == [("lily", {"r": 4, "ne": 2}, {"lr": 0.01}), ("lora", {"r": 2, "s": 0.5}, {"lr": 0.01}),
                   ("lora", {"r": 2, "s": 2.0}, {"lr": 0.01}), ("adaptformer", {"width": 4}, {"lr": 0.01})]


@pytest.mark.parametrize("argv,message", [
    (["--set", "nosuch=1"], "error: --set nosuch: no row of this sweep has such a setting"),
    (["--set", "lora.r=4"], "error: --set lora.r: no row of this sweep has such a setting (its methods are ['lily']"),
    (["--grid", "width=4,8"], "error: --grid width: no row of this sweep has such a setting"),
])
def test_a_setting_no_row_has_is_refused(tmp_path, capsys, argv, message):
    from vtab_lily import sweep
    code = sweep.main(["--backbones", "vit-tiny", "--methods", "lily", "--tasks", "digits", "--runs",
                       str(tmp_path / "runs"), "--dry-run", *argv])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(message) and err.count("\n") == 1, err


def test_an_interrupted_sweep_still_prints_its_count(data_root, tmp_path, capsys, monkeypatch):
    from vtab_lily import sweep
    calls = []

    def run_job(spec, *args, **kwargs):
        calls.append(spec.seed)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return "done"
    monkeypatch.setattr(sweep, "run_job", run_job)
    with pytest.raises(KeyboardInterrupt):
        _sweep(["--methods", "linear", "--seeds", "1", "2", "3", *SWEEP_TINY], data_root, tmp_path)
    assert capsys.readouterr().out.splitlines()[-1] == "1 jobs: 0 ran, 1 already done, 0 run elsewhere, 0 failed"
    assert calls == [1, 2]


def test_failed_points_are_logged_beside_the_runs_folder_by_default(data_root, tmp_path, capsys, monkeypatch):
    """Without --logs the tracebacks go to <runs>/../slurm-logs (results/slurm-logs for the default
    results/runs), never into the folder the sweep was started from."""
    from vtab_lily import sweep
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    code = sweep.main(["--backbones", "vit-tiny", "--tasks", "digits", "--methods", "lora", "--grid", "lora.r=0",
                       *SWEEP_TINY, "--data-root", str(data_root), "--runs", str(tmp_path / "out" / "runs"),
                       "--dry-run"])
    line = capsys.readouterr().out.splitlines()[0]
    log = Path(re.search(r"traceback: (.+)\)$", line)[1])
    assert code == 1 and log.parent == tmp_path / "out" / "slurm-logs" / "failed"
    assert "lora r must be >= 1, got 0" in log.read_text()
    assert not any((tmp_path / "elsewhere").iterdir())
