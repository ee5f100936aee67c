"""One error type (issue 18, section 2): what a user can cause is one `error:` line and exit 2, checked
before any work; a bug (the suite's or a plugin's) keeps its traceback; I/O failures of every writer are
user errors; every option's bounds are enforced."""
import dataclasses
import errno
import math
import os
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import torch
from helpers import TINY_RECIPE, set_args
from safetensors import SafetensorError

import backbones
from backbones import UnmappableBackbone, WeightsError
from backbones.ssm import ScanBackendError
from vtab_lily import prepare as prepare_cli
from vtab_lily import run as run_cli
from vtab_lily import tables as tables_cli
from vtab_lily.adapters import METHODS, get_method, make_config, register
from vtab_lily.adapters.registry import PluginNotFound
from vtab_lily.data import Batches, DataError, load_split
from vtab_lily.errors import UnknownName, UserError, write_errors
from vtab_lily.options import MAX_SEED, OptionError, _kinds
from vtab_lily.prepare import PrepareError, prepare_task
from vtab_lily.recipes import PerTask, Recipe, for_task
from vtab_lily.records import RecordError, RunSpec
from vtab_lily.run import RunBusy, split_settings
from vtab_lily.tables import ProvenanceConflict
from vtab_lily.tasks import get_task

ROOT = Path(__file__).resolve().parents[1]
TINY = {**TINY_RECIPE, "batch_size": 100, "epochs": 1, "warmup_epochs": 0}  # one epoch: errors come before work
TINY_ARGS = set_args(TINY)
# what the real writers raise on a full disk (measured on a 64 KiB tmpfs: torch 2.14, safetensors 0.8)
TORCH_ENOSPC = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
SAFETENSORS_ENOSPC = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("vtab")
    prepare_task("digits", root)
    return root


def _run(argv, data_root, tmp_path, capsys):
    code = run_cli.main(["--backbone", "vit-tiny", "--task", "digits", "--data-root", str(data_root),
                         "--runs", str(tmp_path / "runs"), "--no-progress", *argv])
    return code, capsys.readouterr()


def _one_line(out, message):
    assert out.err.startswith("error: ") and out.err.count("\n") == 1 and re.search(message, out.err), out.err
    assert "Traceback" not in out.err


def _nothing_written(tmp_path):
    runs = tmp_path / "runs"
    assert not runs.exists() or not any(runs.rglob("*")), list(runs.rglob("*"))


# 1. one base class ---------------------------------------------------------------------------------------

def test_every_user_error_type_derives_from_user_error():
    from analysis.common import UsageError
    for kind in (WeightsError, ScanBackendError, UnmappableBackbone, OptionError, DataError, PrepareError, RunBusy,
                 RecordError, UsageError, ProvenanceConflict, UnknownName, PluginNotFound):
        assert issubclass(kind, UserError), kind


@pytest.mark.parametrize("cause,message", [
    (lambda: get_task("cifar10"), "unknown task 'cifar10'"),
    (lambda: backbones.check_backbone("vit-nosuch"), "unknown backbone 'vit-nosuch'"),
    (lambda: get_method("lorax"), "unknown method 'lorax'"),
    (lambda: get_method("no_such_plugin_module:m"), "could not import method module 'no_such_plugin_module'"),
    (lambda: get_method("peft:nosuch"), "unknown peft tuner 'nosuch'"),
    (lambda: split_settings("lily", {"rank": 4}), "unknown setting 'rank'"),
    (lambda: make_config("lily", {"rank": 4}), r"unknown option\(s\) \['rank'\]"),
    (lambda: make_config("lily", {"routing": "nosuch"}), "lily routing must be one of"),
    (lambda: make_config("peft:lora", {"lora_dropout": "x"}), "peft:lora"),
    (lambda: register("lora", object)(lambda model, cfg: None), "'lora' is already taken"),
    (lambda: for_task({"r": PerTask(dtd=1)}, "digits"), "no per-task setting"),
    (lambda: RunSpec("vit-tiny", "digits", "lora", eval_split="train"), "eval split must be one of"),
])
def test_names_and_settings_a_user_gives_raise_user_errors(cause, message):
    with pytest.raises(UserError, match=message):
        cause()


# 2. bugs keep their traceback; run's own failures ---------------------------------------------------------

@pytest.mark.slow
def test_a_bug_inside_fit_is_not_a_user_error(data_root, tmp_path, capsys, monkeypatch):
    def fit(*args, **kwargs):
        return {}["a bug"]
    monkeypatch.setattr(run_cli, "fit", fit)
    with pytest.raises(KeyError, match="a bug"):  # main does not swallow it: the interpreter prints the traceback
        _run(["--method", "linear", *TINY_ARGS], data_root, tmp_path, capsys)


def _plugin(tmp_path, name, body):
    (tmp_path / f"{name}.py").write_text(
        "import sys\nfrom dataclasses import dataclass\nfrom vtab_lily.adapters import register\n\n\n"
        "@dataclass\nclass Config:\n    r: int = 2\n\n\n"
        f"@register({name!r}, Config)\ndef attach(model, cfg):\n{body}\n")


@pytest.mark.slow
@pytest.mark.parametrize("body,kind,message", [
    ("    raise TypeError('bug in my attach')", TypeError, "bug in my attach"),
    ("    sys.exit(3)", RuntimeError, r"method 'attach_exit' \(attach_exit\) called sys.exit\(3\) while attaching"),
])
def test_a_plugin_failing_in_attach_keeps_its_traceback(data_root, tmp_path, capsys, monkeypatch, body, kind,
                                                        message):
    name = "attach_bug" if kind is TypeError else "attach_exit"
    _plugin(tmp_path, name, body)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(kind, match=message):
        _run(["--method", f"{name}:{name}", *TINY_ARGS], data_root, tmp_path, capsys)
    _nothing_written(tmp_path)


@pytest.mark.parametrize("source,message", [
    ("import sys\nsys.exit(3)\n", r"method module 'import_exit' called sys.exit\(3\) while importing"),
    ("x = 1 / 0\n", r"method module 'import_exit' raised ZeroDivisionError: division by zero while importing"),
])
def test_a_plugin_failing_on_import_is_a_runtime_error_naming_it(tmp_path, monkeypatch, source, message):
    (tmp_path / "import_exit.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "import_exit", raising=False)
    with pytest.raises(RuntimeError, match=message):
        get_method("import_exit:m")


@pytest.mark.slow
def test_a_plugin_that_exits_on_import_gives_a_traceback_and_exit_1_not_its_code(data_root, tmp_path):
    (tmp_path / "exit_plugin.py").write_text("import sys\nsys.exit(3)\n")
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{tmp_path}", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "vtab_lily.run", "--backbone", "vit-tiny", "--task", "digits",
                          "--method", "exit_plugin:m", "--data-root", str(data_root), "--runs", str(tmp_path / "runs"),
                          "--no-progress"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, (out.returncode, out.stderr)
    assert "Traceback" in out.stderr and "method module 'exit_plugin' called sys.exit(3)" in out.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_a_user_error_from_the_command_line_is_one_line_exit_2_in_a_subprocess(tmp_path):
    out = subprocess.run([sys.executable, "-m", "vtab_lily.run", "--backbone", "vit-tiny", "--task", "digits",
                          "--device", "nosuch", "--runs", str(tmp_path / "runs")], cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr == "error: --device 'nosuch': choose cpu or cuda[:N]\n", out.stderr


@pytest.mark.slow
@pytest.mark.parametrize("module,argv,message", [
    ("vtab_lily.sweep", ["--backbones", "vit-tiny", "--methods", "lora", "--seeds", "-1"], "seed must be an integer"),
    ("vtab_lily.prepare", ["--task", "digits", "--root", "{tmp}/data", "--limit", "0"], "--limit must be an integer"),
    ("vtab_lily.tables", ["--paper", "{tmp}/missing.csv"], "--paper .*missing.csv: no such file"),
    ("analysis.granularity", ["--runs", "{tmp}/runs", "--out", "{tmp}/g.png"], "is not a folder of run records"),
    ("backbones.pretrain", ["--backbone", "vit-mini", "--steps", "0"], "--steps must be a positive integer"),
])
def test_each_cli_gives_one_line_and_exit_2_in_a_subprocess(tmp_path, module, argv, message):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    out = subprocess.run([sys.executable, "-m", module, *argv], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert out.returncode == 2 and out.stderr.startswith("error: ") and out.stderr.count("\n") == 1, out.stderr
    assert re.search(message, out.stderr), out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "nothing is written"


# 3. I/O failures of the writers --------------------------------------------------------------------------

def test_write_errors_turns_the_writers_disk_full_into_os_error():
    with pytest.raises(OSError) as e, write_errors("x.pt"):
        raise TORCH_ENOSPC
    assert e.value.filename == "x.pt" and "is the disk full?" in e.value.strerror
    with pytest.raises(OSError) as e, write_errors("x.safetensors"):
        raise SAFETENSORS_ENOSPC
    assert (e.value.errno, e.value.strerror, e.value.filename) == (errno.ENOSPC, "No space left on device",
                                                                   "x.safetensors")
    with pytest.raises(RuntimeError, match="a bug"), write_errors("x.pt"):  # not a write failure: unchanged
        raise RuntimeError("a bug")


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_torch_save_on_a_really_full_device_is_an_os_error():
    with pytest.raises(OSError, match="is the disk full"), write_errors("/dev/full"):
        torch.save({"w": torch.zeros(10_000)}, "/dev/full")  # /dev/full: every write fails with ENOSPC


@pytest.mark.parametrize("writer", ["adapter", "state"])
def test_a_full_disk_in_either_writer_is_one_line_and_no_record(data_root, tmp_path, capsys, monkeypatch, writer):
    def full(*args, **kwargs):
        raise SAFETENSORS_ENOSPC if writer == "adapter" else TORCH_ENOSPC
    import vtab_lily.model
    if writer == "adapter":
        monkeypatch.setattr(vtab_lily.model, "save_file", full)
    else:
        monkeypatch.setattr(torch, "save", full)
    code, out = _run(["--method", "linear", *TINY_ARGS, "--set", "epochs=2", "--set", "checkpoint_every=1"],
                     data_root, tmp_path, capsys)
    suffix = ".safetensors" if writer == "adapter" else ".state.pt"
    _one_line(out, rf"^error: could not write \S+{re.escape(suffix)}: .*(No space left on device|is the disk full)")
    assert code == 2 and "an interrupted run resumes" in out.err
    assert not list((tmp_path / "runs").rglob("*.json")) and not list((tmp_path / "runs").rglob("*.lock"))


def test_the_other_safetensors_writers_report_a_full_disk_as_os_error(tmp_path, monkeypatch):
    from backbones import pretrain
    from vtab_lily.adapters import bilora
    from vtab_lily.model import build_model

    def full(*args, **kwargs):
        raise SAFETENSORS_ENOSPC
    monkeypatch.setattr(pretrain, "save_file", full)
    monkeypatch.setattr(bilora, "save_file", full)
    with pytest.raises(OSError, match="No space left on device"):
        pretrain.save_weights(torch.nn.Linear(2, 2), tmp_path / "w.safetensors")
    model = build_model("vit-tiny", "bilora", 5, pretrained=False, backbone_options={"img_size": 32}, r=2)
    with pytest.raises(OSError, match="No space left on device"):
        bilora.export_bits(model, tmp_path / "b.safetensors")
    assert list(tmp_path.iterdir()) == []


# 4. options checked before any work -----------------------------------------------------------------------

@pytest.mark.parametrize("args,message", [
    (["--set", "image_size=8"], r"image_size 8 does not fit vit-tiny's 16 px patches: use a multiple of 16"),
    (["--set", "image_size=40"], r"image_size 40 does not fit vit-tiny's 16 px patches: .* \(e.g. 32\)"),
    (["--device", "nosuch"], r"--device 'nosuch': choose cpu or cuda\[:N\]"),
    (["--device", "cuda:99"], r"--device cuda:99: (this process sees \d+ GPU|no CUDA GPU is visible)"),
    (["--seed", str(2**64)], r"seed must be an integer in \[0, \d+\], got 18446744073709551616"),
    (["--seed", str(MAX_SEED + 1)], rf"seed must be an integer in \[0, {MAX_SEED}\]"),
    (["--seed", "-1"], r"seed must be an integer in \[0, \d+\], got -1"),
    (["--set", "lily.r"], r"--set expects KEY=VALUE, got 'lily.r'"),
    (["--tensorboard", "{tmp}/tb"], r"--tensorboard needs the tensorboard package"),
])
def test_run_refuses_bad_options_before_any_work(data_root, tmp_path, capsys, monkeypatch, args, message):
    if "--tensorboard" in args:
        monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as when it is not installed
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    code, out = _run([*TINY_ARGS, *args], data_root, tmp_path, capsys)
    assert code == 2
    _one_line(out, message)
    _nothing_written(tmp_path)
    assert not (tmp_path / "tb").exists()


def test_cuda_on_a_machine_without_cuda_is_refused(data_root, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, out = _run([*TINY_ARGS, "--device", "cuda"], data_root, tmp_path, capsys)
    assert code == 2
    _one_line(out, r"^error: --device cuda: no CUDA GPU is visible here .*; use cpu$")
    _nothing_written(tmp_path)


def test_a_cuda_index_beyond_the_visible_gpus_is_refused(data_root, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    code, out = _run([*TINY_ARGS, "--device", "cuda:2"], data_root, tmp_path, capsys)
    assert code == 2
    _one_line(out, r"^error: --device cuda:2: this process sees 2 GPU\(s\), numbered 0..1$")


def test_the_seed_bound_is_the_one_the_shuffle_needs(data_root):
    """MAX_SEED is the largest seed whose every epoch (< 100,003) gets a generator seed torch accepts."""
    split = load_split(data_root, "digits", "val200", 32, progress=False)
    batches = Batches(split, 100, shuffle=True, seed=MAX_SEED)
    batches.epoch = 100_002
    assert len(list(batches)) == 2
    batches = Batches(split, 100, shuffle=True, seed=MAX_SEED + 1)
    batches.epoch = 100_002
    with pytest.raises((RuntimeError, ValueError), match="Overflow"):
        list(batches)


def test_the_seed_bound_is_accepted_at_the_bound(data_root, tmp_path, capsys):
    code, out = _run([*TINY_ARGS, "--method", "linear", "--seed", str(MAX_SEED)], data_root, tmp_path, capsys)
    assert code == 0, out.err
    assert f"s{MAX_SEED}-" in out.out


@pytest.mark.parametrize("limit", ["0", "-5"])
def test_prepare_limit_must_be_at_least_one(tmp_path, capsys, limit):
    assert prepare_cli.main(["--task", "digits", "--root", str(tmp_path / "data"), "--limit", limit]) == 2
    err = capsys.readouterr().err
    assert err == f"error: --limit must be an integer >= 1 (the examples kept per split), got {limit}\n"
    assert not (tmp_path / "data").exists()
    with pytest.raises(OptionError, match="--limit"):
        prepare_task("digits", tmp_path / "data", limit=int(limit))


def test_prepare_limit_one_is_accepted(tmp_path, capsys):
    assert prepare_cli.main(["--task", "digits", "--root", str(tmp_path / "data"), "--limit", "1"]) == 0
    assert [len((tmp_path / "data" / "digits" / f"{s}.txt").read_text().splitlines())
            for s in ("train800", "val200", "test")] == [1, 1, 1]


def test_prepare_reports_any_os_error_in_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert prepare_cli.main(["--task", "digits", "--root", str(tmp_path / "file" / "data")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: could not access ") and "Not a directory" in err and err.count("\n") == 1, err


def test_slurm_without_sbatch_is_refused(tmp_path, capsys, monkeypatch):
    from vtab_lily import sweep as sweep_cli
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    code = sweep_cli.main(["--backbones", "vit-tiny", "--methods", "lora", "--tasks", "digits", "--launcher", "slurm",
                           "--partition", "gpu", "--runs", str(tmp_path / "runs"), "--logs", str(tmp_path / "logs")])
    assert code == 2
    assert capsys.readouterr().err.startswith("error: --launcher slurm: Slurm's sbatch and srun are not on PATH")
    assert sorted(tmp_path.iterdir()) == []
    (tmp_path / "sbatch").write_text("#!/bin/sh\n")  # sbatch alone: submitit's executor needs srun too
    (tmp_path / "sbatch").chmod(0o755)
    code = sweep_cli.main(["--backbones", "vit-tiny", "--methods", "lora", "--tasks", "digits", "--launcher", "slurm",
                           "--runs", str(tmp_path / "runs"), "--logs", str(tmp_path / "logs")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: --launcher slurm: Slurm's srun is not on PATH") and err.count("\n") == 1
    assert sorted(tmp_path.iterdir()) == [tmp_path / "sbatch"]


@pytest.mark.parametrize("argv,message", [
    (["--timeout-min", "0"], "--timeout-min must be >= 1, got 0"),
    (["--seeds", "1", str(2**64)], "seed must be an integer in"),
    (["--launcher", "submitit-local", "--slurm", "qos=x", "--slurm", "gpus=2"], "--slurm gpus: not a Slurm parameter"),
    (["--slurm", "qos=high"], "--slurm, --array-parallelism and --wait are for --launcher slurm"),
    (["--grid", "r"], "--grid expects KEY=V1,V2,..., got 'r'"),
    (["--set", "=3"], "--set expects KEY=VALUE, got '=3'"),
    (["--tasks", "cifar10"], "unknown task 'cifar10'"),
])
def test_sweep_refuses_bad_options_before_any_work(tmp_path, capsys, argv, message):
    from vtab_lily import sweep as sweep_cli
    code = sweep_cli.main(["--backbones", "vit-tiny", "--methods", "lora", "--tasks", "digits",
                           "--runs", str(tmp_path / "runs"), "--logs", str(tmp_path / "logs"), *argv])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert sorted(tmp_path.iterdir()) == []


def test_tables_refuses_a_missing_paper_file_and_an_unwritable_out_before_work(tmp_path, capsys, monkeypatch):
    base = ["--runs", str(tmp_path / "runs"), "--table", "mini"]
    assert tables_cli.main([*base, "--paper", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "t")]) == 2
    assert re.match(r"error: --paper \S+missing.csv: no such file", capsys.readouterr().err)
    (tmp_path / "a-file").write_text("x")
    assert tables_cli.main([*base, "--out", str(tmp_path / "a-file")]) == 2
    assert re.match(r"error: cannot write tables under \S+a-file \(Not a directory\)", capsys.readouterr().err)
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    assert tables_cli.main([*base, "--paper", str(tmp_path / "bad.csv"), "--out", str(tmp_path / "t")]) == 2
    assert re.match(r"error: --paper \S+bad.csv: not a table of published numbers", capsys.readouterr().err)

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")
    monkeypatch.setattr("tempfile.mkstemp", read_only)
    assert tables_cli.main([*base, "--out", str(tmp_path / "t")]) == 2
    assert re.match(r"error: cannot write tables under \S+ \(Read-only file system\); pass a writable folder with "
                    r"--out\n$", capsys.readouterr().err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "bad.csv"]


# 5. every option's bounds (section 10: "an option's range check removed") ----------------------------------
# (owner, field): (lowest, highest) accepted, None = open; "finite": any finite number. Restated here, not read
# from the code, so that deleting any one check fails its case; a new numeric option must be added.

BOUNDS = {
    ("adapter", "width"): (1, None), ("adapter", "dropout"): (0.0, 1.0),
    ("adaptformer", "width"): (1, None), ("adaptformer", "s"): "finite", ("adaptformer", "dropout"): (0.0, 1.0),
    ("addscan", "n"): (1, None),
    ("bilora", "r"): (1, None), ("bilora", "s"): "finite", ("bilora", "dropout"): (0.0, 1.0),
    ("fact", "r"): (1, None), ("fact", "s"): "finite", ("fact", "dropout"): (0.0, 1.0),
    ("fourierft", "n"): (1, None), ("fourierft", "scale"): "finite", ("fourierft", "loc_seed"): (0, None),
    ("lily", "r"): (1, None), ("lily", "s"): "finite", ("lily", "ne_1"): (1, None), ("lily", "ne_2"): (1, None),
    ("lily", "ne"): (1, None), ("lily", "mlp_r"): (1, None), ("lily", "lp_dropout"): (0.0, 1.0),
    ("lily", "dt_r"): (0, None),
    ("lora", "r"): (1, None), ("lora", "s"): "finite", ("lora", "dropout"): (0.0, 1.0),
    ("lorap", "r"): (1, None), ("lorap", "s"): "finite",
    ("partial", "wd_mult"): (0.0, None),
    ("mora", "r"): (1, None), ("mora", "type"): (1, None), ("mora", "s"): "finite", ("mora", "dropout"): (0.0, 1.0),
    ("vpt", "length"): (1, None), ("vpt", "dropout"): (0.0, 1.0),
    ("prompt", "n"): (1, None), ("affix", "n"): (1, None),
    ("repadapter", "width"): (1, None), ("repadapter", "groups"): (1, None), ("repadapter", "s"): "finite",
    ("repadapter", "dropout"): (0.0, 1.0),
    ("convpass", "width"): (1, None), ("convpass", "s"): "finite", ("convpass", "dropout"): (0.0, 1.0),
    ("adapterplus", "width"): (1, None), ("adapterplus", "drop_path"): (0.0, 1.0),
    ("hydra", "r"): (1, None), ("hydra", "s"): "finite", ("hydra", "dropout"): (0.0, 1.0), ("sct", "k"): (1, None),
    ("dtl", "r"): (1, None), ("dtl", "beta"): "finite", ("dtl", "add_from"): (0, None),
    ("gps", "k"): (1, None), ("gps", "prepass_batch"): (2, None), ("gps", "temperature"): (1e-6, None),
    ("recipe", "lr"): (1e-12, None), ("recipe", "weight_decay"): (0.0, None), ("recipe", "batch_size"): (1, None),
    ("recipe", "epochs"): (1, None), ("recipe", "warmup_epochs"): (0, None), ("recipe", "warmup_lr_init"): (0.0, None),
    ("recipe", "lr_min"): (0.0, None), ("recipe", "drop_path"): (0.0, 1.0), ("recipe", "eval_every"): (1, None),
    ("recipe", "eval_batch_size"): (1, None), ("recipe", "image_size"): (8, None),
    ("recipe", "checkpoint_every"): (1, None), ("recipe", "clip_grad"): (1e-12, None),
    ("recipe", "label_smoothing"): (0.0, 1.0),
}
# options that take one of a few values: (owner, field): (an accepted value, a refused one)
CHOICES = {
    ("adapter", "placement"): ("houlsby", "nosuch"), ("adapter", "init"): ("zero", "nosuch"),
    ("addscan", "pos"): ("suffix", "nosuch"),
    ("fact", "type"): ("tk", "nosuch"), ("fourierft", "init"): ("zeros", "nosuch"),
    ("lily", "router"): ("lp", "nosuch"), ("lily", "routing"): ("sample", "nosuch"),
    ("lily", "preset"): ("lily-s", "nosuch"), ("ssf", "init"): ("identity", "nosuch"), ("mora", "type"): (6, 2),
    ("prompt", "type"): ("suffix", "nosuch"),
    ("repadapter", "placement"): ("attn", "nosuch"), ("convpass", "placement"): ("attn", "nosuch"),
    ("gps", "loss"): ("ce", "nosuch"),
    ("recipe", "interpolation"): ("nearest", "nosuch"), ("recipe", "precision"): ("bf16", "fp16"),
    ("recipe", "lr_schedule"): ("mmengine", "nosuch"), ("recipe", "recipe"): ("mambapeft", "nosuch"),
}


def _numeric_options():
    owners = {name: m.config for name, m in METHODS.items() if m.module.startswith("vtab_lily.")}
    owners["recipe"] = Recipe
    found = set()
    for owner, cls in owners.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            kinds, _, _ = _kinds(hints[f.name])
            if (int in kinds or float in kinds) and bool not in kinds:
                found.add((owner, f.name))
    return found


def _make(owner: str, field: str, value):
    return Recipe(**{field: value}) if owner == "recipe" else make_config(owner, {field: value}, "vit-tiny")


def test_every_numeric_option_of_every_method_and_the_recipe_has_its_bounds_here():
    assert _numeric_options() == set(BOUNDS)


def _cases():
    for (owner, field), bounds in BOUNDS.items():
        if bounds == "finite":
            yield owner, field, [math.inf, -math.inf, math.nan], [-1e30, 0.0, 1e30]
            continue
        low, high = bounds
        step = (lambda v, d: v + d) if isinstance(low, int) else (lambda v, d: math.nextafter(v, d * math.inf))
        outside = [step(b, d) for b, d in ((low, -1), (high, 1)) if b is not None]
        inside = [b for b in (low, high) if b is not None]
        yield owner, field, outside, inside


@pytest.mark.parametrize("owner,field,outside,inside", list(_cases()), ids=lambda v: str(v))
def test_an_option_just_outside_its_bounds_is_refused_and_at_them_accepted(owner, field, outside, inside):
    for value in outside:
        with pytest.raises(OptionError, match=rf"\b{field}\b"):
            _make(owner, field, value)
    for value in inside:
        assert getattr(_make(owner, field, value), field) == value


@pytest.mark.parametrize("owner,field", list(CHOICES), ids=str)
def test_an_option_with_choices_refuses_others(owner, field):
    good, bad = CHOICES[(owner, field)]
    assert getattr(_make(owner, field, good), field) == good
    with pytest.raises(OptionError, match=rf"\b{field}\b"):
        _make(owner, field, bad)
