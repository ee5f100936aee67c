"""One source per fact: the backbone family is a field of its spec, one hub-download helper, one file
hash, Lily's router analysis runs the adapter's own LP -> ReLU -> router step."""
import dataclasses
import hashlib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import randomize_trainable, tiny

from analysis.routers import router_weights
from backbones import BACKBONES, WeightsError, create_backbone, family, pretrained_file
from backbones.weights import sha256
from vtab_lily.adapters.lily import LilyBranch
from vtab_lily.recipes import recipe_for
from vtab_lily.records import RunSpec, read_record

ROOT = Path(__file__).resolve().parent.parent


def test_the_family_is_the_backbone_specs_field_for_methods_and_recipes(monkeypatch):
    assert {name: family(name) for name in ("vit-b", "vit-mini", "vim-s", "vim-mini", "timm:vit_small_patch16_224")} \
        == {"vit-b": "vit", "vit-mini": "vit", "vim-s": "vim", "vim-mini": "vim", "timm:vit_small_patch16_224": "vit"}
    monkeypatch.setitem(BACKBONES, "my-mamba", BACKBONES["vim-s"])  # a Vim whose name does not start with vim
    assert family("my-mamba") == "vim"
    assert recipe_for("my-mamba") == recipe_for("vim-s") != recipe_for("vit-b")
    monkeypatch.setitem(BACKBONES, "vimlike-vit", dataclasses.replace(BACKBONES["vit-b"]))
    assert family("vimlike-vit") == "vit" and recipe_for("vimlike-vit") == recipe_for("vit-b")


@pytest.mark.slow
def test_every_hub_download_fails_with_one_message(monkeypatch):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    messages = []
    for fetch in (lambda: create_backbone("vit-b", 10), lambda: create_backbone("vim-s", 10),
                  lambda: pretrained_file("vim-t")):
        with pytest.raises(WeightsError) as e:
            fetch()
        messages.append(e.value.args[0])
    for text, file in zip(messages, ("ViT-B_16.npz", "vim_s_midclstok_80p5acc.pth", "vim_t_midclstok_76p1acc.pth")):
        assert text.startswith("could not fetch ") and file in text
        assert "from the Hugging Face hub (HF_HUB_OFFLINE is set, and it is not in the local hub cache). Offline, " \
               "download it on a connected machine and pass it with --weights PATH (Python: weights=PATH)" in text


def test_one_file_hash_for_weights_lists_and_method_modules(tmp_path):
    data = bytes(range(256)) * (5 << 12)  # 5 MiB: more than one 4 MiB block
    (tmp_path / "f").write_bytes(data)
    assert sha256(tmp_path / "f") == hashlib.sha256(data).hexdigest()
    users = sorted(str(p.relative_to(ROOT)) for folder in ("backbones", "vtab_lily", "analysis")
                   for p in (ROOT / folder).rglob("*.py") if "hashlib.sha256(" in p.read_text())
    # the file hash; a digest over a pre-pass's selection; a digest over split lists
    assert users == ["backbones/weights.py", "vtab_lily/adapters/prepass.py", "vtab_lily/provenance.py"]


def test_router_weights_are_the_branches_own_router_step(images):
    model = tiny("lily", ne_1=2, ne_2=3, targets="k+mlp").eval()
    randomize_trainable(model, std=0.3)
    shared = model.lily
    for target in ("k", "mlp"):
        seen = {}
        branches = [b for b in model.modules() if isinstance(b, LilyBranch) and b.target == target]
        def keep(branch, inputs, output, seen=seen):  # returns None: the branch's output stays as it is
            seen[branch.layer] = inputs[0]
        hooks = [b.register_forward_hook(keep) for b in branches]
        with torch.no_grad():
            model(images)
            for h in hooks:
                h.remove()
            want = []
            for layer in sorted(seen):  # the step as the analysis computed it before it called the adapter's
                h = shared.lps[target][shared.lp_index(target, layer)](seen[layer])
                h = F.relu(h) if target == "mlp" else h
                want.append(F.softmax(shared.router_for(target, layer)(h), -1).reshape(-1, 3).sum(0))
        got = router_weights(model, images, target)
        assert got.shape == (4, 3) and torch.equal(got, torch.stack(want))
        assert torch.allclose(got.sum(-1), torch.full((4,), 3.0 * 17))  # 3 images x 17 tokens


TINY_RECIPE = {"image_size": 32, "batch_size": 50, "epochs": 2, "eval_every": 2, "warmup_epochs": 1, "lr": 3e-3}


def test_the_run_id_is_computed_once_per_resolved_spec(data_root, monkeypatch):
    from vtab_lily import records
    from vtab_lily.run import resolve
    spec, _ = resolve(RunSpec("vit-tiny", "digits", "lora", {"r": 2}, recipe=TINY_RECIPE), data_root, pretrained=False)
    calls = []
    real = records.digest
    monkeypatch.setattr(records, "digest", lambda obj: calls.append(obj) or real(obj))
    ids = {spec.run_id, spec.run_id, spec.path("runs").stem, spec.path("runs", ".lock").stem}
    assert len(ids) == 1 and spec.identity() == calls[0] and len(calls) == 1
    again = dataclasses.replace(spec, seed=1)  # a new spec: its own id
    assert again.run_id != spec.run_id and len(calls) == 2


def test_execute_builds_under_the_lock_and_reads_the_record_once(data_root, tmp_path, monkeypatch):
    from vtab_lily import run
    from vtab_lily.locks import RunLock
    spec = RunSpec("vit-tiny", "digits", "linear", recipe=TINY_RECIPE)
    lock = run.resolve(spec, data_root)[0].path(tmp_path, ".lock")
    seen = {"finished": 0, "built": []}
    real_finished, real_build = run.finished, run.build_model

    def finished(path):
        seen["finished"] += 1
        return real_finished(path)

    def build_model(*args, **kwargs):
        seen["built"].append(lock.exists())  # the run's lock is held while its model is built
        return real_build(*args, **kwargs)
    monkeypatch.setattr(run, "finished", finished)
    monkeypatch.setattr(run, "build_model", build_model)
    path = run.execute(spec, tmp_path, data_root, run.RunOptions(progress=False))
    assert read_record(path)["status"] == "done" and seen == {"finished": 1, "built": [True]} and not lock.exists()
    skipped = []
    assert run.execute(spec, tmp_path, data_root, progress=False, on_skip=skipped.append) == path
    assert skipped == [path] and seen == {"finished": 2, "built": [True]}
    other = dataclasses.replace(spec, seed=1)
    with RunLock(run.resolve(other, data_root)[0].path(tmp_path, ".lock")) as held:
        assert held.acquire()
        with pytest.raises(run.RunBusy):
            run.execute(other, tmp_path, data_root, progress=False)
    assert seen == {"finished": 3, "built": [True]}  # a busy run builds nothing


def test_a_run_refused_while_building_leaves_no_folder(data_root, tmp_path):
    from vtab_lily import run
    from vtab_lily.adapters import SiteConflict
    spec = RunSpec("vit-tiny", "digits", "lora+ssf", recipe=TINY_RECIPE)  # a parallel and a serial branch on qkv
    with pytest.raises(SiteConflict):
        run.execute(spec, tmp_path / "runs", data_root, progress=False)
    assert not (tmp_path / "runs").exists()


def test_training_restores_the_tf32_flags_it_sets():
    from vtab_lily.train import tf32

    def flags():
        return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    before = flags()
    for enabled in (True, False):
        with tf32(torch.device("cuda"), enabled):
            assert flags() == (enabled, enabled)
        assert flags() == before
    with pytest.raises(KeyboardInterrupt), tf32(torch.device("cuda"), not before[0]):
        raise KeyboardInterrupt
    with tf32(torch.device("cpu"), True):
        assert flags() == before
    assert flags() == before


def test_a_sweep_leaves_the_environment_as_it_was_and_hands_its_scan_backend_to_jobs(data_root, tmp_path,
                                                                                     scan_backend, monkeypatch):
    import os

    from backbones import ssm
    from vtab_lily import sweep
    scan_backend("auto")  # the fixture restores the process's choice after the test
    monkeypatch.delenv("VTAB_LILY_SCAN", raising=False)
    before = dict(os.environ)
    assert sweep.main(["--backbones", "vim-mini", "--methods", "linear", "--tasks", "digits", "--data-root",
                       str(data_root), "--runs", str(tmp_path), "--scan-backend", "torch", "--dry-run"]) == 0
    assert dict(os.environ) == before and ssm._requested["name"] == "torch"  # set for this process's runs
    ssm.set_backend("auto")
    assert sweep.Job("torch").run_all([], tmp_path, data_root, None, False, None) == []
    assert ssm._requested["name"] == "torch"


@pytest.mark.parametrize("module", ["vtab_lily.tasks", "vtab_lily.records", "vtab_lily.tables"])
def test_tasks_records_and_tables_import_without_torch(module):
    import os
    import subprocess
    import sys
    code = f"import sys, {module}; print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'timm')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0 and out.stdout == "[]\n", out.stderr


def test_sweep_hands_its_stages_one_frozen_options_object(data_root, tmp_path, monkeypatch):
    from vtab_lily import sweep
    seen = []
    monkeypatch.setattr(sweep, "launch", lambda points, opts, stage, statuses: seen.append((len(points), opts, stage)))
    argv = ["--backbones", "vit-tiny", "--methods", "linear", "--tasks", "digits", "--seeds", "1", "2",
            "--runs", str(tmp_path / "runs"), "--data-root", str(data_root)]
    assert sweep.main(argv) == 0
    ((count, opts, stage),) = seen
    assert count == 2 and stage == "all" and isinstance(opts, sweep.SweepOptions)
    want = (str(tmp_path / "runs"), str(tmp_path / "slurm-logs"), tuple(argv), {})
    assert (opts.runs, opts.logs, opts.argv, opts.slurm_params) == want
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.runs = "elsewhere"
