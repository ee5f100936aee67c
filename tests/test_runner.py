"""The runner: records, the recipe's learning rates, resume, sweeps, errors, determinism."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from helpers import TINY_RECIPE, set_args
from timm.scheduler.cosine_lr import CosineLRScheduler

from vtab_lily import run as run_cli
from vtab_lily import sweep as sweep_cli
from vtab_lily.records import RunSpec, load_records, read_record
from vtab_lily.run import execute
from vtab_lily.train import Interrupted

TINY = {**TINY_RECIPE, "epochs": 4, "eval_every": 2, "warmup_epochs": 2, "checkpoint_every": 100}  # two evaluations
TINY_ARGS = set_args(TINY)


def _cli(data_root, runs, *extra):
    return run_cli.main(["--backbone", "vit-tiny", "--task", "digits", "--data-root", str(data_root), "--runs",
                         str(runs), "--no-progress", *TINY_ARGS, *extra])


@pytest.mark.slow
def test_run_writes_a_complete_record_and_adapter(data_root, tmp_path, capsys):
    assert _cli(data_root, tmp_path, "--set", "r=4") == 0
    out = capsys.readouterr().out
    (path,) = tmp_path.glob("vit-tiny/lily/digits/*.json")
    assert f"record: {path}" in out and "| vit-tiny | lily | digits |" in out
    r = read_record(path)
    assert r["status"] == "done" and r["seed"] == 42 and r["method_config"]["r"] == 4
    assert r["train_split"] == "train800val200" and r["eval_split"] == "test"
    assert [e["epoch"] for e in r["evaluations"]] == [2, 4]
    assert r["best_acc"] == max(e["acc"] for e in r["evaluations"]) and r["final_acc"] == r["evaluations"][-1]["acc"]
    # Lily kvmlp r=4 ne=4 on 4 layers of width 64: LPs 4*(64*4*2 + 64*8), HPs 4*(4*64*2 + 8*64), routers 4*(4+4+8)*4
    assert r["params"] == 4 * (64 * 4 * 2 + 64 * 8) * 2 + 4 * (4 + 4 + 8) * 4
    assert set(r["environment"]) >= {"python", "torch", "timm", "device"} and "git_sha" in r["code"]
    assert r["recipe"]["epochs"] == 4 and r["images_per_s"] > 0
    assert path.with_suffix(".safetensors").exists() and not list(tmp_path.rglob("*.state.pt"))
    assert not list(tmp_path.rglob("*.lock"))
    # same config and seed: skipped, record untouched
    mtime = path.stat().st_mtime_ns
    assert _cli(data_root, tmp_path, "--set", "r=4") == 0
    assert path.stat().st_mtime_ns == mtime


@pytest.mark.slow
def test_learning_rate_of_every_epoch_follows_timms_cosine_scheduler(data_root, tmp_path):
    spec = RunSpec("vit-tiny", "digits", "linear", {}, 0, "test", {**TINY, "epochs": 6, "warmup_epochs": 3})
    lrs = read_record(execute(spec, tmp_path, data_root, progress=False))["lrs"]
    opt = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=3e-3)
    sched = CosineLRScheduler(opt, t_initial=6, warmup_t=3, warmup_lr_init=1e-6, lr_min=1e-5)
    want = []
    for epoch in range(6):  # the official loop: train an epoch, then scheduler.step(epoch)
        want.append(opt.param_groups[0]["lr"])
        sched.step(epoch)
    assert lrs == pytest.approx(want, rel=1e-12)
    assert lrs[:2] == pytest.approx([1e-6, 1e-6])  # epoch 1 trains at the init lr, epoch 2 at t=0
    # epoch 5 trains at t=3, the end of warm-up: timm's cosine counts t from 0, not from the warm-up's end
    assert lrs[4] == pytest.approx(1e-5 + 0.5 * (3e-3 - 1e-5) * (1 + math.cos(math.pi * 3 / 6)))


@pytest.mark.slow
def test_interrupted_run_resumes_to_the_same_record(data_root, tmp_path):
    spec = RunSpec("vit-tiny", "digits", "lily", {"r": 4}, 1, "test", TINY)
    whole = read_record(execute(spec, tmp_path / "a", data_root, progress=False))
    with pytest.raises(Interrupted):
        execute(spec, tmp_path / "b", data_root, interrupt_after=3, progress=False)
    (state,) = tmp_path.glob("b/*/*/*/*.state.pt")
    assert not list(tmp_path.glob("b/*/*/*/*.json"))
    resumed = read_record(execute(spec, tmp_path / "b", data_root, progress=False))
    for key in ("evaluations", "best_acc", "final_acc", "params", "lrs", "train_losses"):
        assert resumed[key] == whole[key], key
    assert not state.exists()
    assert resumed["wall_time_s"] >= resumed["train_time_s"] > 0  # both sessions: 3 epochs before, 1 after


@pytest.mark.slow
def test_same_seed_same_accuracies(data_root, tmp_path):
    spec = RunSpec("vit-tiny", "digits", "lora", {"r": 2}, 5, "test", {**TINY, "epochs": 2})
    a = read_record(execute(spec, tmp_path / "a", data_root, progress=False))
    b = read_record(execute(spec, tmp_path / "b", data_root, progress=False))
    assert a["evaluations"] == b["evaluations"] and a["train_losses"] == b["train_losses"]


@pytest.mark.parametrize("args,message", [
    (["--task", "digits", "--data-root", "{missing}"], "no folder for task 'digits'.*python -m vtab_lily.prepare"),
    (["--task", "cifar10"], "unknown task 'cifar10'"),
    (["--task", "digits", "--set", "rank=4"], "unknown setting 'rank'.*lily options are"),
    (["--task", "digits", "--method", "lorax"], "unknown method 'lorax'"),
])
def test_bad_input_is_one_clear_error_and_writes_nothing(data_root, tmp_path, capsys, args, message):
    args = [a.replace("{missing}", str(tmp_path / "nowhere")) for a in args]
    argv = ["--backbone", "vit-tiny", "--data-root", str(data_root), "--runs", str(tmp_path / "runs"),
            "--no-progress", *args]
    assert run_cli.main(argv) == 2
    import re
    err = capsys.readouterr().err
    assert err.startswith("error: ") and re.search(message, err), err
    assert not (tmp_path / "runs").exists()


def test_nan_loss_stops_with_a_failed_record_that_never_counts(data_root, tmp_path, capsys):
    assert _cli(data_root, tmp_path, "--method", "linear", "--set", "lr=1e30", "--set", "warmup_lr_init=1e30") == 1
    err = capsys.readouterr().err
    assert "the training loss became" in err and "lower the learning rate" in err
    (path,) = tmp_path.glob("vit-tiny/linear/digits/*.json")
    assert read_record(path)["status"] == "failed"
    assert load_records(tmp_path).empty
    assert len(load_records(tmp_path, include_failed=True)) == 1
    assert not list(tmp_path.rglob("*.state.pt")) and not list(tmp_path.rglob("*.lock"))


@pytest.mark.slow
def test_sweep_through_submitit_local_executor_writes_all_records(data_root, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the local executor starts the 4 jobs at once on 2 cores
    code = sweep_cli.main(["--backbones", "vit-tiny", "--methods", "lily", "--tasks", "digits", "--seeds", "1", "2",
                           "--grid", "lily.r=2,4", "--set", *[f"{k}={v}" for k, v in TINY.items()], "epochs=2",
                           "--launcher", "submitit-local", "--logs", str(tmp_path / "logs"),
                           "--data-root", str(data_root), "--runs", str(tmp_path / "runs")])
    assert code == 0
    df = load_records(tmp_path / "runs")
    assert len(df) == 4
    assert sorted(zip(df["seed"], df["opt.r"])) == [(1, 2), (1, 4), (2, 2), (2, 4)]


@pytest.mark.slow
def test_two_concurrent_sweeps_share_the_grid(data_root, tmp_path):
    argv = [sys.executable, "-m", "vtab_lily.sweep", "--backbones", "vit-tiny", "--methods", "lora", "--tasks",
            "digits", "--seeds", "1", "2", "--grid", "lora.r=1,2", "--set",
            *[f"{k}={v}" for k, v in TINY.items()], "epochs=2",
            "--data-root", str(data_root), "--runs", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # two processes on two cores
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    ran = sum(o.count(": ran") for o in outs)
    assert ran == 4, outs  # every run trained exactly once across the two sweeps
    records = sorted(tmp_path.glob("vit-tiny/lora/digits/*.json"))
    assert len(records) == 4
    assert all(json.loads(p.read_text())["status"] == "done" for p in records)
    assert not list(tmp_path.rglob("*.lock")) and not list(tmp_path.rglob("*.tmp"))


@pytest.mark.slow
def test_vtab_protocol_selects_on_val200_then_tests(data_root, tmp_path):
    code = sweep_cli.main(["--backbones", "vit-tiny", "--methods", "lora", "--tasks", "digits", "--seeds", "3",
                           "--grid", "lora.r=1,2", "--set", *[f"{k}={v}" for k, v in TINY.items()], "epochs=2",
                           "--protocol", "vtab", "--data-root", str(data_root), "--runs", str(tmp_path)])
    assert code == 0
    df = load_records(tmp_path)
    val = df[df.eval_split == "val200"]
    test = df[df.eval_split == "test"]
    assert len(val) == 2 and set(val.train_split) == {"train800"}
    assert len(test) == 1 and test.iloc[0]["train_split"] == "train800val200"
    chosen = val[val["opt.r"] == test.iloc[0]["opt.r"]]
    assert chosen.final_acc.max() == val.final_acc.max()


def test_tensorboard_logs_every_epoch(data_root, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    spec = RunSpec("vit-tiny", "digits", "linear", {}, 0, "test", TINY)
    record = read_record(execute(spec, tmp_path / "runs", data_root, progress=False, tensorboard=tmp_path / "tb"))
    events = EventAccumulator(str(tmp_path / "tb" / record["run_id"]))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]
    assert [e.step for e in events.Scalars("eval/acc")] == [2, 4]
    assert [e.value for e in events.Scalars("eval/acc")] == pytest.approx([e["acc"] for e in record["evaluations"]])


@pytest.mark.slow
def test_two_runs_per_gpu_train_every_run_of_both_vtab_stages_once(data_root, tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # two worker processes on two cores
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)  # two worker slots on the CPU
    code = sweep_cli.main(["--backbones", "vit-tiny", "--methods", "lora", "--tasks", "digits", "--seeds", "4",
                           "--grid", "lora.r=1,2", "--set", *[f"{k}={v}" for k, v in TINY.items()], "epochs=2",
                           "--protocol", "vtab", "--runs-per-gpu", "2", "--data-root", str(data_root), "--runs",
                           str(tmp_path)])
    assert code == 0
    out = capfd.readouterr().out
    assert out.count(": ran (best ") == 3  # the workers' lines: each of the 3 runs trained by one worker only
    assert out.count(": busy\n") + out.count(": done\n") == 3  # the other worker's view of them
    assert out.strip().splitlines()[-1] == "3 jobs: 3 ran, 0 already done, 0 run elsewhere, 0 failed"
    df = load_records(tmp_path)
    assert sorted(df.eval_split) == ["test", "val200", "val200"]


# The official recipes' optimizers, from their code (not from make_optimizer's rule). Lily's ViT script (the
# PETL-ViT line's, e.g. PETL-ViT `FacT/fact_tt.py` L195): `AdamW(trainable, lr=1e-3, weight_decay=1e-4)`, one
# group, every trainable tensor decayed. hustvl/Vim `vim/main.py` L391: timm's `create_optimizer(args, model)`,
# lr 1e-2 x 64 / 512, wd 1e-3, through timm's `param_groups_weight_decay`: no decay where
# `param.ndim <= 1 or name.endswith(".bias") or name in model.no_weight_decay()`, the set of
# `vim/models_mamba.py` L378-379 below.
HUSTVL_NO_WEIGHT_DECAY = {"pos_embed", "cls_token", "dist_token", "cls_token_head", "cls_token_tail"}
OFFICIAL_OPTIMIZER = {"vit": (1e-3, 1e-4, lambda name, p: True),
                      "vim": (1e-2 * 64 / 512, 1e-3, lambda name, p: not (
                          p.ndim <= 1 or name.endswith(".bias") or name in HUSTVL_NO_WEIGHT_DECAY))}


def assert_official_optimizer(model, recipe, family):
    from vtab_lily.train import make_optimizer
    lr, wd, decays = OFFICIAL_OPTIMIZER[family]
    optimizer = make_optimizer(model, recipe)
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert len(group_of) == len(trainable) and all(id(p) in group_of for _, p in trainable)
    for name, p in trainable:
        assert group_of[id(p)]["lr"] == pytest.approx(lr), name
        assert group_of[id(p)]["weight_decay"] == (wd if decays(name, p) else 0.0), name


@pytest.mark.parametrize("backbone,method,family", [("vit-tiny", "lily", "vit"), ("vit-tiny", "fft", "vit"),
                                                    ("vim-tiny-test", "lily", "vim"), ("vim-tiny-test", "fft", "vim")])
def test_optimizer_groups_are_the_official_recipes(backbone, method, family):
    from vtab_lily import build_model
    from vtab_lily.recipes import recipe_for
    torch.manual_seed(0)
    model = build_model(backbone, method, 5, pretrained=False, backbone_options={"img_size": 32})
    assert_official_optimizer(model, recipe_for(backbone), family)


def test_vim_runs_with_the_official_vim_recipe(data_root, tmp_path):
    from vtab_lily import build_model
    from vtab_lily.recipes import recipe_for
    recipe = recipe_for("vim-s")
    assert (recipe.lr, recipe.weight_decay, recipe.warmup_epochs, recipe.drop_path, recipe.precision) == (
        1e-2 * 64 / 512, 1e-3, 5, 0.05, "fp32")  # pinned in full by tests/test_trust.py
    model = build_model("vim-tiny-test", "fft", 5, pretrained=False, backbone_options={"img_size": 32})
    assert_official_optimizer(model, recipe, "vim")
    spec = RunSpec("vim-tiny-test", "digits", "lily", {}, 0, "test", {**TINY, "epochs": 1})
    record = read_record(execute(spec, tmp_path, data_root, progress=False))
    assert record["status"] == "done" and record["recipe"]["lr"] == pytest.approx(3e-3)  # TINY overrides lr
    assert record["method_config"]["router"] == "model" and record["method_config"]["routing"] == "token"
    assert record["scan"] == {"backend": "torch", "reason": "cpu tensors"}


def test_a_forced_scan_backend_that_cannot_run_is_one_clear_error(data_root, tmp_path, capsys, scan_backend):
    scan_backend("auto")  # restores the choice after the test
    argv = ["--backbone", "vim-tiny-test", "--task", "digits", "--data-root", str(data_root), "--runs",
            str(tmp_path / "runs"), "--device", "cpu", "--no-progress", "--scan-backend", "mamba", *TINY_ARGS]
    assert run_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: scan backend mamba cannot run: tensors on cpu, not CUDA") and err.count("\n") == 1
    assert not (tmp_path / "runs").exists()


def test_only_done_records_count_as_finished(tmp_path):
    from vtab_lily.fileio import write_json
    from vtab_lily.records import finished
    write_json(tmp_path / "a.json", {"run_id": "a", "status": "failed"})
    from vtab_lily.records import REQUIRED, REQUIRED_DONE
    write_json(tmp_path / "b.json", {**dict.fromkeys(REQUIRED, {}), **dict.fromkeys(REQUIRED_DONE, 1),
                                     "run_id": "b", "status": "done", "final_acc": 1.0})
    assert finished(tmp_path / "a.json") is None and finished(tmp_path / "none.json") is None
    assert finished(tmp_path / "b.json")["final_acc"] == 1.0
