"""Numbers you can trust: provenance in run ids, official defaults, faults and bad input end cleanly,
and tests that fail when the runner reports the wrong thing."""
import dataclasses
import json
import multiprocessing
import os
import shutil
import socket
import time

import pytest
import torch
from helpers import TINY_RECIPE, set_args
from safetensors.torch import save_file

from backbones import create_backbone
from vtab_lily import build_model
from vtab_lily import run as run_cli
from vtab_lily import sweep as sweep_cli
from vtab_lily import tables as tables_cli
from vtab_lily.adapters import make_config
from vtab_lily.locks import RunLock
from vtab_lily.prepare import prepare_task
from vtab_lily.provenance import file_sha256
from vtab_lily.recipes import RECIPES, Recipe, recipe_for
from vtab_lily.records import RunSpec, load_records, read_record, recipe_identity
from vtab_lily.run import execute, resolve
from vtab_lily.train import History, evaluate

TINY = TINY_RECIPE
TINY_ARGS = set_args(TINY)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("vtab")
    prepare_task("digits", root)
    return root


def _vit_tiny_file(path, seed):
    torch.manual_seed(seed)
    model = create_backbone("vit-tiny", 10, pretrained=False, img_size=32)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _main(args, tmp_path, data_root, capsys):
    code = run_cli.main(["--data-root", str(data_root), "--runs", str(tmp_path / "runs"), "--no-progress", *args])
    return code, capsys.readouterr()


# 1. provenance ---------------------------------------------------------------------------------------

@pytest.mark.slow
def test_run_id_covers_weights_data_and_precision(data_root, tmp_path):
    spec = RunSpec("vit-tiny", "digits", "lora", {"r": 2}, 0, "test", TINY)
    a, b = _vit_tiny_file(tmp_path / "a.safetensors", 1), _vit_tiny_file(tmp_path / "b.safetensors", 2)
    ids = {name: resolve(spec, data_root, str(path))[0].run_id for name, path in (("a", a), ("b", b))}
    assert ids["a"] != ids["b"]
    shutil.copy(a, tmp_path / "a-moved.safetensors")  # the content counts, not the path
    assert resolve(spec, data_root, str(tmp_path / "a-moved.safetensors"))[0].run_id == ids["a"]
    random = resolve(spec, data_root)[0]
    assert random.provenance["weights"] == {"source": "random", "seed": 0} and random.run_id not in ids.values()
    # data: the same task with one label changed in the training list
    other = tmp_path / "data2"
    shutil.copytree(data_root / "digits", other / "digits")
    lines = (other / "digits" / "train800val200.txt").read_text().splitlines()
    path, label = lines[0].rsplit(maxsplit=1)
    lines[0] = f"{path} {(int(label) + 1) % 10}"
    (other / "digits" / "train800val200.txt").write_text("\n".join(lines) + "\n")
    assert resolve(spec, other)[0].run_id != random.run_id
    # precision: bf16 and fp32 differ on CUDA; on the CPU both compute (and are recorded) in fp32
    bf16 = dataclasses.replace(spec, recipe={**TINY, "precision": "bf16"})
    assert resolve(bf16, data_root, device="cuda")[0].run_id != resolve(spec, data_root, device="cuda")[0].run_id
    assert resolve(bf16, data_root, device="cpu")[0].run_id == random.run_id
    assert resolve(bf16, data_root, device="cuda")[0].provenance["precision"] == "bf16"
    # a result-neutral field (checkpoint_every) does not change the id
    neutral = dataclasses.replace(spec, recipe={**TINY, "checkpoint_every": 7})
    assert resolve(neutral, data_root)[0].run_id == random.run_id


@pytest.mark.slow
def test_weights_change_reruns_and_tables_refuse_to_pool(data_root, tmp_path, capsys):
    a, b = _vit_tiny_file(tmp_path / "a.safetensors", 1), _vit_tiny_file(tmp_path / "b.safetensors", 2)
    args = ["--backbone", "vit-tiny", "--task", "digits", "--method", "linear", *TINY_ARGS, "--set", "epochs=1"]
    code, out = _main([*args, "--weights", str(a)], tmp_path, data_root, capsys)
    assert code == 0 and "skipped" not in out.out
    code, out = _main([*args, "--weights", str(b)], tmp_path, data_root, capsys)
    assert code == 0 and "skipped" not in out.out  # B trains: it is not A's record
    code, out = _main([*args, "--weights", str(a)], tmp_path, data_root, capsys)
    assert code == 0 and "skipped: this run is already finished" in out.out
    records = sorted((tmp_path / "runs").rglob("*.json"))
    assert len(records) == 2
    shas = {read_record(p)["provenance"]["weights"]["sha256"] for p in records}
    assert shas == {file_sha256(a), file_sha256(b)}
    df = load_records(tmp_path / "runs")
    assert set(df.weights_id) == {file_sha256(a)[:12], file_sha256(b)[:12]} and set(df.precision) == {"fp32"}
    # tables: a Table 4 row would pool the two; make them look like vit-b linear records
    fake = tmp_path / "fake"
    for p in records:
        r = read_record(p)
        r["backbone"], r["recipe"] = "vit-b", recipe_identity("vit-b", {})  # Table 4's recipe
        dest = fake / "vit-b" / "linear" / "digits" / p.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(json.dumps(r))
    base = ["--table", "4", "--runs", str(fake), "--out", str(tmp_path / "tables")]
    assert tables_cli.main(base) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: records of vit-b differ in weights") and file_sha256(a)[:12] in err
    assert "--select weights_id=" in err and not (tmp_path / "tables").exists()
    assert tables_cli.main([*base, "--select", f"weights_id={file_sha256(b)[:8]}"]) == 0
    csv = (tmp_path / "tables" / "table4_paper.csv").read_text()
    assert "weights_id" in csv.splitlines()[0] and file_sha256(b)[:12] in csv and file_sha256(a)[:12] not in csv


# 2. official defaults --------------------------------------------------------------------------------

def test_head_init_follows_the_official_code_per_family():
    torch.manual_seed(0)
    vit = create_backbone("vit-tiny", 397, pretrained=False, img_size=32).head  # 64 -> 397
    bound = 1 / 64 ** 0.5  # PyTorch's default Linear init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), bias too
    for t in (vit.weight, vit.bias):
        assert t.abs().max() <= bound and t.abs().max() > 0.95 * bound
    assert vit.weight.std().item() == pytest.approx(bound / 3 ** 0.5, rel=0.03)  # uniform, not N(0, 0.02)
    vim = create_backbone("vim-tiny-test", 397, pretrained=False, img_size=32).head  # 32 -> 397
    assert vim.weight.std().item() == pytest.approx(0.02, rel=0.05) and vim.weight.mean().abs() < 0.002
    assert torch.count_nonzero(vim.bias) == 0


def test_paper_recipes_are_the_official_values():
    assert dataclasses.asdict(Recipe()) == dict(  # the official Lily ViT script (train.py + vtab configs)
        lr=1e-3, weight_decay=1e-4, no_decay_1d=False, batch_size=64, epochs=100, warmup_epochs=10,
        warmup_lr_init=1e-6, lr_min=1e-5, drop_path=0.1, normalize=False, eval_every=10, eval_batch_size=256,
        image_size=224, interpolation="bicubic", precision="fp32", checkpoint_every=10, recipe=None,
        lr_schedule="timm", clip_grad=None, no_decay=(), drop_last=True, label_smoothing=0.0)
    assert RECIPES["vit"] == Recipe()
    assert dataclasses.asdict(RECIPES["vim"]) == {**dataclasses.asdict(Recipe()), "lr": 1e-2 * 64 / 512,
                                                  "weight_decay": 1e-3, "no_decay_1d": True, "warmup_epochs": 5,
                                                  "drop_path": 0.05}
    assert recipe_for("vim-s") == RECIPES["vim"] and recipe_for("vit-b-in1k") == RECIPES["vit"]
    assert {recipe_for(b).precision for b in ("vit-b", "vit-b-in1k", "vim-s")} == {"fp32"}


def test_method_defaults_are_the_official_values():
    vit = dataclasses.asdict(make_config("lily", {}, "vit-b"))
    assert vit == dict(r=16, s=1.0, ne_1=4, ne_2=4, ne=None, targets=("k", "v", "mlp"), mlp_r=None, mlp_relu=True,
                       router="layer", routing="batch", lp_dropout=0.0, dt_r=0, preset=None)
    vim = dataclasses.asdict(make_config("lily", {}, "vim-s"))
    assert vim == dict(r=8, s=1.0, ne_1=None, ne_2=5, ne=None, targets=("in_proj",), mlp_r=None, mlp_relu=True,
                       router="model", routing="token", lp_dropout=0.1, dt_r=4, preset=None)
    assert dataclasses.asdict(make_config("lora", {}, "vit-b")) == dict(targets=("q", "v"), r=8, s=1.0, dropout=0.1)
    assert dataclasses.asdict(make_config("adaptformer", {}, "vit-b")) == dict(
        width=32, s=0.1, dropout=0.1, bias=False, site="mlp_residual")


@pytest.mark.parametrize("ne,lps", [(5, 6), (4, 4), (3, 3), (7, 12), (8, 12), (12, 12)])
def test_lily_lp_grouping_follows_the_official_stride(ne, lps):
    model = build_model("vit-tiny", "lily", 5, pretrained=False, ne=ne, r=2,
                        backbone_options={"img_size": 32, "patch_size": 8, "depth": 12})
    stride = 12 // ne
    assert len(model.lily.lps["k"]) == lps and model.lily.hps["k"].shape[0] == ne
    assert [model.lily.lp_index("k", i) for i in range(12)] == [i // stride for i in range(12)]


# 4. records, locks, sweeps survive faults ---------------------------------------------------------------

def test_a_truncated_record_is_named_rerun_and_skipped_by_sweep_and_tables(data_root, tmp_path, capsys):
    args = ["--backbone", "vit-tiny", "--task", "digits", "--method", "linear", *TINY_ARGS, "--set", "epochs=1"]
    assert _main(args, tmp_path, data_root, capsys)[0] == 0
    (path,) = (tmp_path / "runs").rglob("*.json")
    good = path.read_text()
    for force in ([], ["--force"]):
        path.write_text(good[: len(good) // 2])  # a record cut short (full disk, killed copy)
        with pytest.warns(UserWarning, match=f"damaged run record {path}"):
            code, out = _main([*args, *force], tmp_path, data_root, capsys)
        assert code == 0 and "skipped" not in out.out and read_record(path)["status"] == "done"
    path.write_text("{")
    (path.parent / "notes.json").write_text('{"a": 1}')  # not a record: ignored quietly
    with pytest.warns(UserWarning, match=f"skipped damaged run record {path}"):
        assert load_records(tmp_path / "runs").empty
    sweep = ["--backbones", "vit-tiny", "--methods", "linear", "--tasks", "digits", "--set",
             *[f"{k}={v}" for k, v in TINY.items()], "epochs=1", "--data-root", str(data_root),
             "--runs", str(tmp_path / "runs")]
    with pytest.warns(UserWarning, match="damaged run record"):
        assert sweep_cli.main([*sweep, "--dry-run"]) == 0
    assert "1 runs: 0 done, 1 to run, 0 failed" in capsys.readouterr().out
    with pytest.warns(UserWarning, match="damaged run record"):  # skipped: no records left, nothing written
        assert tables_cli.main(["--table", "4", "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "t")]) == 2
    assert "error: no finished run records" in capsys.readouterr().err and not (tmp_path / "t").exists()


def test_a_bad_grid_point_fails_alone_and_is_counted(data_root, tmp_path, capsys):
    sweep = ["--backbones", "vit-tiny", "--methods", "lora", "--tasks", "digits", "--grid", "lora.r=2,0,abc",
             "--set", *[f"{k}={v}" for k, v in TINY.items()], "epochs=1", "--data-root", str(data_root),
             "--runs", str(tmp_path / "runs"), "--logs", str(tmp_path / "logs")]
    assert sweep_cli.main([*sweep, "--dry-run"]) == 1
    out = capsys.readouterr().out
    assert "lora r must be >= 1, got 0" in out and "lora r must be an integer, got 'abc'" in out
    assert "3 runs: 0 done, 1 to run, 2 failed" in out
    assert sweep_cli.main(sweep) == 1
    out = capsys.readouterr().out
    assert out.count(": ran") == 1 and "3 jobs: 1 ran, 0 already done, 0 run elsewhere, 2 failed" in out


def _contend(path, barrier, results, ttl):
    barrier.wait()
    lock = RunLock(path, ttl_s=ttl)
    if lock.acquire():
        results.put(os.getpid())
        time.sleep(0.05)  # hold it while the others try
        lock.release()


def _dead_pid() -> int:
    p = multiprocessing.get_context("fork").Process(target=lambda: None)
    p.start()
    p.join()
    return p.pid


@pytest.mark.slow
def test_taking_over_a_dead_lock_never_gives_two_holders(tmp_path):
    ctx = multiprocessing.get_context("fork")
    dead = _dead_pid()
    doubles = 0
    for trial in range(100):
        path = tmp_path / f"{trial}.lock"
        path.write_text(json.dumps({"host": socket.gethostname(), "pid": dead, "token": "dead", "created": 0}))
        barrier, results = ctx.Barrier(3), ctx.Queue()
        procs = [ctx.Process(target=_contend, args=(path, barrier, results, 300.0)) for _ in range(3)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        holders = []
        while not results.empty():
            holders.append(results.get())
        doubles += len(holders) > 1
        assert holders, "nobody took over the dead lock"
    assert doubles == 0


def test_stale_locks_are_taken_over_and_live_ones_are_named(tmp_path):
    other = tmp_path / "other.lock"  # a holder on another node: alive until its heartbeat is older than the TTL
    other.write_text(json.dumps({"host": "node-17", "pid": 4242, "token": "t", "created": time.time() - 500}))
    lock = RunLock(other, ttl_s=60)
    assert not lock.acquire()
    assert "host node-17 pid 4242" in lock.describe() and f"delete {other}" in lock.describe()
    os.utime(other, (time.time() - 61, time.time() - 61))  # no heartbeat for 61 s
    assert lock.acquire()
    lock.release()
    assert not other.exists()
    garbage = tmp_path / "garbage.lock"
    garbage.write_text("")
    assert not RunLock(garbage).acquire()  # maybe being written right now
    os.utime(garbage, (time.time() - 60, time.time() - 60))
    assert RunLock(garbage).acquire()
    reused = tmp_path / "reused.lock"  # our own pid, but with another start time: the pid was reused
    reused.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "start": "1", "token": "x",
                                  "created": time.time()}))
    assert RunLock(reused).acquire()


def test_the_holder_refreshes_its_heartbeat(tmp_path):
    lock = RunLock(tmp_path / "beat.lock", heartbeat_s=0.05)
    assert lock.acquire()
    os.utime(lock.path, (0, 0))
    time.sleep(0.3)
    assert time.time() - lock.path.stat().st_mtime < 5
    lock.release()


# 5. bad input: one line, exit 2, nothing written --------------------------------------------------------

def _bad_files(tmp_path):
    text = tmp_path / "weights.pth"
    text.write_text("these are not weights\n")
    wrong = tmp_path / "wrong.safetensors"
    save_file({"foo.weight": torch.zeros(2, 2)}, str(wrong))
    torch.manual_seed(0)
    wide = create_backbone("vit-tiny", 10, pretrained=False, img_size=32, embed_dim=32)
    torch.save(wide.state_dict(), tmp_path / "wide.pth")
    (tmp_path / "runs-file").write_text("")
    return {"{text}": str(text), "{wrong}": str(wrong), "{wide}": str(tmp_path / "wide.pth"),
            "{runs-file}": str(tmp_path / "runs-file")}


@pytest.mark.parametrize("args,message", [
    (["--set", "r=abc"], "lily r must be an integer, got 'abc'"),
    (["--set", "lr=abc"], "lr must be a number, got 'abc'"),
    (["--set", "r=-1"], "lily r must be >= 1, got -1"),
    (["--set", "r=0"], "lily r must be >= 1, got 0"),
    (["--epochs", "0"], "epochs must be >= 1, got 0"),
    (["--set", "checkpoint_every=0"], "checkpoint_every must be >= 1"),
    (["--set", "eval_every=0"], "eval_every must be >= 1"),
    (["--set", "batch_size=0"], "batch_size must be >= 1"),
    (["--set", "batch_size=2000"], "batch_size 2000 is larger than the training split train800val200 .1000 images"),
    (["--set", "s=nan"], "lily s must be a finite number"),
    (["--set", "precision=fp16"], "precision must be one of"),
    (["--weights", "{text}"], "is not a ViT checkpoint this backbone can load"),
    (["--weights", "{wrong}"], "does not fit VisionTransformer"),
    (["--weights", "{wide}"], "is not a ViT checkpoint this backbone can load .*same architecture"),
    (["--backbone", "vim-tiny-test", "--weights", "{text}"], "is not a readable Vim checkpoint"),
    (["--weights", "{missing}"], "does not exist"),
    (["--backbone", "vit-tinny"], "unknown backbone 'vit-tinny'; choose one of"),
    (["--runs", "{runs-file}"], "cannot write run records under"),
])
def test_bad_input_gives_one_line_and_exit_2(data_root, tmp_path, capsys, args, message):
    import re
    files = {**_bad_files(tmp_path), "{missing}": str(tmp_path / "nope.pth")}
    args = [files.get(a, a) for a in args]
    base = ["--backbone", "vit-tiny", "--task", "digits", "--data-root", str(data_root), "--no-progress",
            "--runs", str(tmp_path / "runs"), *TINY_ARGS]
    code = run_cli.main([*base, *args])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and re.search(message, err), err
    assert "Traceback" not in err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_a_full_disk_is_one_line_and_leaves_no_record(data_root, tmp_path, capsys, monkeypatch):
    def full(*a, **k):
        raise OSError(28, "No space left on device", str(tmp_path / "runs" / "x.safetensors"))
    monkeypatch.setattr(run_cli, "save_adapter", full)
    code, out = _main(["--backbone", "vit-tiny", "--task", "digits", "--method", "linear", *TINY_ARGS,
                       "--set", "epochs=1"], tmp_path, data_root, capsys)
    assert code == 2 and out.err.startswith("error: could not write") and "No space left on device" in out.err
    assert not list((tmp_path / "runs").rglob("*.json")) and not list((tmp_path / "runs").rglob("*.lock"))


# 7. tests that catch a runner that reports the wrong thing ------------------------------------------------

@pytest.mark.slow
def test_a_run_trains_on_its_training_split_and_evaluates_the_other(data_root, tmp_path):
    spec = RunSpec("vit-tiny", "digits", "linear", {}, 0, "test", TINY)
    r = read_record(execute(spec, tmp_path, data_root, progress=False))
    assert r["split_sizes"] == {"train800val200": 1000, "test": 797}
    assert r["train_images"] == 2 * (1000 // 50) * 50  # drop_last: 20 full batches per epoch
    val = RunSpec("vit-tiny", "digits", "linear", {}, 0, "val200", TINY)
    r = read_record(execute(val, tmp_path, data_root, progress=False))
    assert r["split_sizes"] == {"train800": 800, "val200": 200} and r["train_images"] == 2 * 800


def test_evaluation_runs_in_eval_mode(data_root):
    from vtab_lily.data import Batches, load_split, to_float
    torch.manual_seed(0)
    model = build_model("vit-tiny", "lora", 10, pretrained=False, backbone_options={"img_size": 32}, dropout=0.9)
    split = load_split(data_root, "digits", "val200", 32)
    recipe = Recipe(image_size=32)
    model.train()
    first = evaluate(model, Batches(split, 64), recipe)
    again = evaluate(model, Batches(split, 64), recipe)  # dropout 0.9 would change every call
    assert again[:2] == first[:2] and torch.equal(again.preds, first.preds)
    model.eval()
    with torch.no_grad():
        logits = model(to_float(torch.from_numpy(split.images.copy()).permute(0, 3, 1, 2)))
    want = 100.0 * (logits.argmax(-1) == torch.from_numpy(split.labels)).float().mean().item()
    assert first[0] == pytest.approx(want)


def test_best_accuracy_is_the_maximum_over_evaluations():
    h = History(evaluations=[{"epoch": 10, "acc": 50.0}, {"epoch": 20, "acc": 70.0}, {"epoch": 30, "acc": 70.0},
                             {"epoch": 40, "acc": 60.0}], train_time_s=1.0, train_images=10)
    s = h.summary()
    assert (s["best_acc"], s["best_epoch"], s["final_acc"]) == (70.0, 20, 60.0)


@pytest.mark.slow
def test_vtab_protocol_retrains_the_best_val200_configuration(data_root, tmp_path, capsys):
    """Two configurations that clearly differ on val200 (a learning rate that trains, one that cannot):
    the retrained one must be the better."""
    code = sweep_cli.main(["--backbones", "vit-tiny", "--methods", "fft", "--tasks", "digits", "--seeds", "3",
                           "--grid", "lr=1e-9,3e-3", "--set", "image_size=32", "batch_size=50", "epochs=6",
                           "eval_every=6", "warmup_epochs=1", "lr_min=1e-9", "warmup_lr_init=1e-9",
                           "--protocol", "vtab", "--data-root", str(data_root), "--runs", str(tmp_path)])
    assert code == 0
    df = load_records(tmp_path)
    val = df[df.eval_split == "val200"].set_index("path")
    lrs = {p: read_record(p)["recipe"]["lr"] for p in val.index}
    good = max(val.index, key=lambda p: val.loc[p, "final_acc"])
    assert lrs[good] == 3e-3 and val.final_acc.max() - val.final_acc.min() > 15  # the grid points differ
    (test_path,) = df[df.eval_split == "test"].path
    assert read_record(test_path)["recipe"]["lr"] == 3e-3
