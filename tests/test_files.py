"""Files from outside are data, never code; state, caches, locks and prepared folders survive damage."""
import argparse
import errno
import json
import os
import shutil
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import TINY_RECIPE, set_args
from timm.scheduler.cosine_lr import CosineLRScheduler

from backbones import create_backbone
from backbones.vim import load_vim_weights
from backbones.weights import UnsafeCheckpoint, load_torch_file
from vtab_lily import data as data_mod
from vtab_lily import fileio
from vtab_lily import locks as locks_mod
from vtab_lily import run as run_cli
from vtab_lily.data import load_split, read_list
from vtab_lily.locks import TTL_S, LockLost, RunLock
from vtab_lily.prepare import prepare_task
from vtab_lily.records import RunSpec, read_record
from vtab_lily.run import execute, resolve
from vtab_lily.train import Interrupted

TINY = {**TINY_RECIPE, "checkpoint_every": 1}  # a resumable state after every epoch
TINY_ARGS = set_args(TINY)
SPEC = RunSpec("vit-tiny", "digits", "lora", {"r": 2}, 3, "test", TINY)
RESULT = ("evaluations", "best_acc", "final_acc", "lrs", "train_losses", "params")


class Payload:
    """Unpickling this creates `marker`: what a malicious .pth does (os.system could run anything)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _main(args, runs, data_root, capsys):
    code = run_cli.main(["--data-root", str(data_root), "--runs", str(runs), "--no-progress", *args])
    return code, capsys.readouterr()


# 1. untrusted files never execute ------------------------------------------------------------------

@pytest.mark.parametrize("backbone,name", [("vim-tiny-test", "payload.pth"), ("vit-tiny", "payload.pth"),
                                           ("vit-tiny", "payload.pt")])
def test_a_pickle_payload_given_as_weights_never_runs(backbone, name, data_root, tmp_path, capsys):
    marker, weights = tmp_path / "pwned", tmp_path / name
    torch.save({"model": {"pos_embed": Payload(marker)}}, weights)
    code, out = _main(["--backbone", backbone, "--task", "digits", "--method", "linear", "--weights", str(weights),
                       *TINY_ARGS], tmp_path / "runs", data_root, capsys)
    assert not marker.exists()
    assert code == 2 and out.err.count("\n") == 1 and out.err.startswith("error: ")
    assert f"refused to load {weights}" in out.err and "posix.system" in out.err
    assert not list((tmp_path / "runs").rglob("*.json"))


def test_an_official_vim_checkpoint_loads_through_the_allow_list(tmp_path):
    # hustvl/Vim vim/main.py (lines 496-503) saves these keys; `args` is its argparse.Namespace
    model = create_backbone("vim-tiny-test", 10, pretrained=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = CosineLRScheduler(optimizer, t_initial=300, warmup_t=5, warmup_lr_init=1e-6)
    args = argparse.Namespace(model="vim_tiny", lr=5e-4, opt_betas=None, input_size=224, if_amp=False,
                              output_dir="./output", lr_noise=[0.1, 0.2], distributed=False)
    ckpt = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "lr_scheduler": scheduler.state_dict(),
            "epoch": 299, "model_ema": model.state_dict(), "scaler": "none", "args": args}
    torch.save(ckpt, tmp_path / "vim_t_midclstok.pth")
    loaded = load_torch_file(tmp_path / "vim_t_midclstok.pth")
    assert loaded["args"] == args and loaded["epoch"] == 299
    torch.manual_seed(1)
    other = create_backbone("vim-tiny-test", 10, pretrained=False)
    load_vim_weights(other, tmp_path / "vim_t_midclstok.pth")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
    # anything beyond the allow-list is refused, naming the file and the global
    ckpt["args"] = argparse.Namespace(output_dir=Path("./output"))  # a harmless class, but not on the list
    torch.save(ckpt, tmp_path / "more.pth")
    with pytest.raises(UnsafeCheckpoint, match=r"more\.pth: unpickling it would call pathlib\.PosixPath"):
        load_torch_file(tmp_path / "more.pth")


# 2. damaged state -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fresh_record(data_root, tmp_path_factory):
    return read_record(execute(SPEC, tmp_path_factory.mktemp("fresh"), data_root, progress=False))


def _payload_state(path, tmp_path):
    torch.save({"epoch": 1, "history": Payload(tmp_path / "pwned")}, path)


def _truncated_state(path, tmp_path, data_root):
    with pytest.raises(Interrupted):
        execute(SPEC, path.parents[3], data_root, interrupt_after=1, progress=False)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage", "payload", "foreign"])
def test_a_damaged_state_is_moved_aside_and_the_run_starts_afresh(damage, fresh_record, data_root, tmp_path,
                                                                   capsys):
    runs = tmp_path / "runs"
    state = resolve(SPEC, data_root)[0].path(runs, ".state.pt")
    state.parent.mkdir(parents=True)
    if damage == "empty":
        state.write_bytes(b"")
    elif damage == "truncated":
        _truncated_state(state, tmp_path, data_root)
    elif damage == "garbage":
        state.write_bytes(b"not a torch file\n" * 10)
    elif damage == "payload":
        _payload_state(state, tmp_path)
    else:  # loads, but is not a state of this run
        torch.save({"epoch": 1, "trainable": {"x": torch.zeros(2)}}, state)
    capsys.readouterr()
    record = read_record(execute(SPEC, runs, data_root, progress=False))
    assert not (tmp_path / "pwned").exists()
    err = capsys.readouterr().err
    aside = state.with_name(state.name + ".damaged")
    assert err.count("warning: ") == 1 and f"the resumable state {state} is damaged" in err
    assert f"moved it to {aside}" in err and "epoch 0" in err
    assert aside.exists() and not state.exists()
    for key in RESULT:
        assert record[key] == fresh_record[key], key


def test_our_own_state_loads_as_data(data_root, tmp_path):
    with pytest.raises(Interrupted):
        execute(SPEC, tmp_path, data_root, interrupt_after=1, progress=False)
    state = torch.load(resolve(SPEC, data_root)[0].path(tmp_path, ".state.pt"), weights_only=True)
    assert state["epoch"] == 1 and state["rng_cpu"].dtype == torch.uint8 and len(state["history"]["lrs"]) == 1


# 3. atomic writes reach the disk --------------------------------------------------------------------

def test_atomic_writes_fsync_the_file_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    target = tmp_path / "record.json"
    fileio.write_json(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}
    assert [kind for kind, _ in events] == ["fsync", "replace", "fsync"]
    assert events[0][1].startswith(str(tmp_path / ".record.json.")) and events[0][1].endswith(".tmp")
    assert events[1][1] == str(target) and events[2][1] == str(tmp_path)


# 4. a full disk while the image cache is built --------------------------------------------------------

def test_a_full_disk_for_the_image_cache_is_one_line_and_leaves_no_cache(data_root, tmp_path, capsys, monkeypatch):
    root = tmp_path / "data"
    shutil.copytree(data_root / "digits", root / "digits", ignore=shutil.ignore_patterns(".cache"))

    def full(fd, offset, length):
        assert length > 32 * 32 * 3 * 100  # the whole array is reserved at once
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    code, out = _main(["--backbone", "vit-tiny", "--task", "digits", "--method", "linear", *TINY_ARGS],
                      tmp_path / "runs", root, capsys)
    assert code == 2 and out.err.count("\n") == 1 and out.err.startswith("error: ")
    assert "No space left on device" in out.err and "decoded-image cache needs" in out.err
    assert str(root / "digits" / ".cache" / "train800val200-32-bicubic-") in out.err
    assert not list((root / "digits" / ".cache").glob("*.npy")) and not list((root / "digits").rglob("*.tmp"))
    assert not list((tmp_path / "runs").rglob("*.json"))


def test_the_image_cache_is_preallocated(data_root, tmp_path, monkeypatch):
    root = tmp_path / "data"
    shutil.copytree(data_root / "digits", root / "digits", ignore=shutil.ignore_patterns(".cache"))
    calls = []
    real = os.posix_fallocate
    monkeypatch.setattr(os, "posix_fallocate", lambda fd, off, n: (calls.append((off, n)), real(fd, off, n))[1])
    split = load_split(root, "digits", "val200", size=16, progress=False)
    assert calls == [(0, split.cache.stat().st_size)] and split.images.shape == (200, 16, 16, 3)


# 5. locks --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("content,problem", [
    ({"host": socket.gethostname(), "pid": "abc", "token": "t", "created": 0}, "field 'pid' is 'abc'"),
    ({"host": socket.gethostname(), "token": "t", "created": 0}, "field 'pid' is missing"),
    ({"host": 7, "pid": 1, "token": "t", "created": 0}, "field 'host' is 7"),
    ({"host": "h", "pid": -3, "token": "t", "created": 0}, "pid -3 is not a process id"),
    (["host", "pid"], "a JSON list, not an object"),
    ("", "it is empty"),
])
def test_a_lock_with_bad_fields_is_unreadable_named_and_taken_over(content, problem, tmp_path, capsys):
    path = tmp_path / "run.lock"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    lock = RunLock(path)
    assert not lock.acquire()  # maybe being written right now
    assert str(path) in lock.describe() and problem in lock.describe()
    os.utime(path, (time.time() - 60, time.time() - 60))
    assert lock.acquire()
    err = capsys.readouterr().err
    assert f"taking over the unreadable run lock {path}" in err and problem in err
    assert json.loads(path.read_text())["token"] == lock.token
    lock.release()
    assert not path.exists()


def test_a_holder_taken_over_notices_at_its_next_heartbeat(tmp_path):
    path = tmp_path / "run.lock"
    first = RunLock(path, heartbeat_s=3600)  # suspended: its thread does not beat
    assert first.acquire()
    os.utime(path, (time.time() - TTL_S - 1, time.time() - TTL_S - 1))
    second = RunLock(path)
    assert second.acquire()  # no heartbeat for longer than the TTL: taken over
    first.check()  # nothing noticed before its next heartbeat
    assert not first.heartbeat()
    with pytest.raises(LockLost, match=f"run lock {path} was taken over.*pid {os.getpid()}.*without writing"):
        first.check()
    old = path.stat().st_mtime
    os.utime(path, (old - 100, old - 100))
    assert not first.heartbeat() and path.stat().st_mtime == old - 100  # never refreshes another's lock
    first.release()
    assert json.loads(path.read_text())["token"] == second.token  # nor removes it
    second.release()
    # the heartbeat thread notices by itself
    live = RunLock(path, heartbeat_s=0.02)
    assert live.acquire()
    path.unlink()
    taker = RunLock(path)
    assert taker.acquire()
    deadline = time.time() + 5
    while live.lost is None and time.time() < deadline:
        time.sleep(0.01)
    with pytest.raises(LockLost):
        live.check()
    live.release()
    taker.release()


def test_a_run_whose_lock_is_taken_over_writes_neither_record_nor_state(data_root, tmp_path, capsys, monkeypatch):
    runs = tmp_path / "runs"
    others = []

    class Suspended(RunLock):
        def check(self):  # after epoch 1: another process took the lock over while this one was suspended
            if not others:
                self.path.unlink()
                others.append(RunLock(self.path))
                assert others[0].acquire()
                self.heartbeat()
            super().check()

    monkeypatch.setattr(run_cli, "RunLock", Suspended)
    code, out = _main(["--backbone", "vit-tiny", "--task", "digits", "--method", "linear", "--seed", "3",
                       *TINY_ARGS], runs, data_root, capsys)
    assert code == 2 and out.err.count("\n") == 1 and "was taken over" in out.err
    assert not list(runs.rglob("*.json")) and not list(runs.rglob("*.state.pt"))
    assert not list(runs.rglob("*.safetensors"))
    (lock,) = runs.rglob("*.lock")
    assert json.loads(lock.read_text())["token"] == others[0].token
    others[0].release()


@pytest.mark.slow
def test_a_lock_dated_in_the_future_is_clock_skew_and_aged_by_its_change_time(tmp_path):
    path = tmp_path / "run.lock"
    path.write_text(json.dumps({"host": "node-17", "pid": 4242, "token": "t", "created": time.time() + 3600}))
    os.utime(path, (time.time() + 3600, time.time() + 3600))  # written by a node whose clock is 1 h ahead
    lock = RunLock(path, ttl_s=1.0)
    assert not lock.acquire()  # its change time is now: a live holder
    assert "dated 3600 s in the future: clock skew" in lock.describe()
    time.sleep(1.2)  # one TTL without a change, not the whole hour of skew
    assert lock.acquire()
    lock.release()


def test_a_slow_heartbeat_on_another_node_is_taken_over_only_after_the_timeout(tmp_path):
    # section 10: a lock on another node must not be declared stale after one heartbeat interval
    path = tmp_path / "run.lock"
    path.write_text(json.dumps({"host": "node-17", "pid": os.getpid(), "token": "t", "created": time.time() - 900}))
    for late in (31, 120, TTL_S - 5):  # alive, beating late
        os.utime(path, (time.time() - late, time.time() - late))
        lock = RunLock(path)
        assert not lock.acquire(), late
        assert f"last heartbeat {late:.0f} s ago" in lock.describe()
    os.utime(path, (time.time() - TTL_S - 5, time.time() - TTL_S - 5))
    assert RunLock(path).acquire()


def test_ages_are_measured_in_the_file_systems_clock(tmp_path, monkeypatch):
    path = tmp_path / "run.lock"
    path.write_text(json.dumps({"host": "node-17", "pid": 1, "token": "t", "created": time.time() - 900}))
    os.utime(path, (time.time() - 31, time.time() - 31))  # a live holder, beating
    real = time.time
    monkeypatch.setattr(locks_mod, "time", SimpleNamespace(time=lambda: real() + 600))  # our clock 10 min ahead
    lock = RunLock(path)
    assert not lock.acquire()
    assert "last heartbeat 31 s ago" in lock.describe()


# 6. prepared folders ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_deleted_list_makes_the_task_unprepared(data_root, tmp_path, capsys):
    root = tmp_path / "data"
    shutil.copytree(data_root / "digits", root / "digits", ignore=shutil.ignore_patterns(".cache"))
    (root / "digits" / "val200.txt").unlink()
    manifest = prepare_task("digits", root)
    assert "val200.txt, named in its manifest, is missing); preparing it again" in capsys.readouterr().err
    assert manifest["counts"]["val200"] == 200 and (root / "digits" / "val200.txt").is_file()
    (root / "digits" / "test.txt").write_text("images/test/000000.png 0\n")  # differs from its checksum
    assert prepare_task("digits", root)["counts"]["test"] == 797
    (root / "digits" / "manifest.json").write_text("{")
    assert prepare_task("digits", root)["counts"]["test"] == 797
    # run --prepare re-prepares a task whose list was deleted, instead of saying "prepare again" forever
    (root / "digits" / "train800val200.txt").unlink()
    code, out = _main(["--backbone", "vit-tiny", "--task", "digits", "--method", "linear", "--prepare", *TINY_ARGS,
                       "--epochs", "1"], tmp_path / "runs", root, capsys)
    assert code == 0, out.err
    assert read_record(next((tmp_path / "runs").rglob("*.json")))["split_sizes"]["train800val200"] == 1000


def test_a_read_only_data_root_with_its_caches_is_usable(data_root, tmp_path, capsys, monkeypatch):
    root = tmp_path / "data"
    shutil.copytree(data_root / "digits", root / "digits", ignore=shutil.ignore_patterns(".cache"))
    first = load_split(root, "digits", "val200", size=16, progress=False)
    moved = tmp_path / "elsewhere"  # a copy keeping mtimes (cp -a, rsync -a): the memo still matches
    shutil.copytree(root, moved)
    memo = moved / "digits" / ".cache" / "val200.checksum"
    assert not any(str(tmp_path) in line for line in memo.read_text().splitlines())  # relative paths only

    def read_only(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", str(memo))

    if os.geteuid() == 0:  # root ignores permissions: simulate the read-only mount
        monkeypatch.setattr(data_mod, "write_json", read_only)
        monkeypatch.setattr(data_mod, "atomic_path", read_only)
    else:
        for folder, _, _ in os.walk(moved):
            os.chmod(folder, 0o555)
    try:
        mtime = memo.stat().st_mtime_ns
        again = load_split(moved, "digits", "val200", size=16, progress=False)
        assert again.cache.name == first.cache.name and np.array_equal(np.array(again.images), np.array(first.images))
        assert memo.stat().st_mtime_ns == mtime and capsys.readouterr().err == ""  # not rewritten, no warning
        # a changed image: the memo cannot be rewritten; a warning, a rehash, and a clear error for the cache
        image = moved / "digits" / "images" / "val200" / "000000.png"
        os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))
        key = data_mod._checksum(moved / "digits" / "val200.txt", read_list(moved / "digits", "val200", 10)[0])
        assert key in first.cache.name  # the same bytes: the same key
        err = capsys.readouterr().err
        assert err.startswith("warning: could not write the checksum memo") and str(memo) in err
    finally:
        if os.geteuid() != 0:
            for folder, _, _ in os.walk(moved):
                os.chmod(folder, 0o755)
