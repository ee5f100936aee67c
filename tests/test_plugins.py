"""Methods from outside the suite: the example method through run, sweep and tables; entry points; the
origin in records; one clear error for every bad name."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_close, randomize_trainable, tiny

from vtab_lily import count_params, disable_adapters, load_model, save_adapter
from vtab_lily import run as run_cli
from vtab_lily import sweep as sweep_cli
from vtab_lily import tables as tables_cli
from vtab_lily.adapters import get_method, origin
from vtab_lily.errors import UserError
from vtab_lily.records import RunSpec, load_records, read_record

ROOT = Path(__file__).resolve().parent.parent
TIED = "examples.tied_lora:tied_lora"
RECIPE = {"image_size": 32, "batch_size": 50, "epochs": 2, "eval_every": 2, "warmup_epochs": 1, "lr": 3e-3}
RECIPE_ARGS = [f"{k}={v}" for k, v in RECIPE.items()]


def test_example_method_counts_its_shared_tensors_once_and_starts_as_the_backbone(images, tmp_path):
    model = tiny(TIED, r=4, targets="q+v+fc1").eval()
    d, L, r, hidden = 64, 4, 4, 256
    shared = 2 * (d * r + r * d) + (d * r + r * hidden)
    assert count_params(model) == shared + L * (2 * (r + d) + (r + hidden))
    with disable_adapters(model):
        plain = model(images)
    assert torch.equal(model(images), plain)
    randomize_trainable(model)
    assert not torch.allclose(model(images), plain)
    save_adapter(model, tmp_path / "a.safetensors")
    torch.manual_seed(0)  # load_model rebuilds the backbone: same seed as tiny(), random weights
    again = load_model(tmp_path / "a.safetensors", pretrained=False, backbone_options={"img_size": 32, "patch_size": 8})
    assert_close(again(images), model(images), 1e-6)


@pytest.mark.slow
def test_example_method_runs_through_the_cli_sweep_and_tables(data_root, tmp_path):
    runs = tmp_path / "runs"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"}
    out = subprocess.run([sys.executable, "-m", "vtab_lily.run", "--backbone", "vit-tiny", "--task", "digits",
                          "--method", TIED, "--set", "r=2", *sum((["--set", a] for a in RECIPE_ARGS), []),
                          "--data-root", str(data_root), "--runs", str(runs), "--no-progress"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    (path,) = runs.glob(f"vit-tiny/{TIED}/digits/*.json")
    record = read_record(path)
    digest = origin("examples.tied_lora")["sha256"]
    assert record["origin"] == {"module": "examples.tied_lora", "sha256": digest} and len(digest) == 64
    assert record["status"] == "done" and record["method"] == TIED and record["method_config"]["r"] == 2
    assert record["params"] == 2 * (64 * 2 * 2) + 4 * 2 * (2 + 64)  # q, v: shared A, B + per layer u, v

    assert sweep_cli.main(["--backbones", "vit-tiny", "--methods", TIED, "--tasks", "digits", "--grid", "r=2,4",
                           "--set", *RECIPE_ARGS, "--data-root", str(data_root), "--runs", str(runs)]) == 0
    df = load_records(runs)
    assert sorted(df["opt.r"]) == [2, 4] and set(df.origin) == {f"examples.tied_lora sha256:{digest[:12]}"}

    assert tables_cli.main(["--table", "runs", "--runs", str(runs), "--out", str(tmp_path / "tables"), "--ci",
                            "std"]) == 0
    md = (tmp_path / "tables" / "runs_paper.md").read_text()
    (row,) = [line for line in md.splitlines() if f"vit-tiny {TIED}" in line]
    best = df.loc[df.best_acc.idxmax()]  # the paper protocol's choice
    assert row.split(" | ")[1] == f"{best.params / 1e6:.3f}" and row.split(" | ")[3] == f"{best.best_acc:.1f}"


def test_same_name_from_two_origins_gets_two_run_ids_and_two_rows(tmp_path):
    spec = RunSpec("vit-tiny", "digits", TIED, {"r": 2}, provenance={})
    builtin = RunSpec("vit-tiny", "digits", "lora", {"r": 2}, provenance={})
    assert "origin" in spec.identity() and "origin" not in builtin.identity()
    import pandas as pd
    records = pd.DataFrame({"backbone": ["vit-b"] * 3, "method": ["m", "m", "lora"],
                            "origin": ["pkg 1.0", "pkg 2.0", ""], "recipe": ["{}"] * 3})
    labels = [r.label for r in tables_cli.rows_from_records(records)]
    assert labels == ["lora", "m [pkg 1.0]", "m [pkg 2.0]"]


@pytest.mark.slow
def test_entry_point_method_records_its_package_version(tmp_path, monkeypatch):
    (tmp_path / "ep_methods.py").write_text(
        "from examples.tied_lora import TiedLoRAConfig, attach_tied_lora\n"
        "from vtab_lily.adapters import register\n\n\n"
        "@register('ep_tied_lora', TiedLoRAConfig)\n"
        "def attach(model, cfg):\n"
        "    attach_tied_lora(model, cfg)\n")
    info = tmp_path / "ep_methods-1.2.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: ep-methods\nVersion: 1.2.3\n")
    (info / "entry_points.txt").write_text("[vtab_lily.methods]\nep_tied_lora = ep_methods\n")
    (info / "RECORD").write_text("ep_methods.py,,\nep_methods-1.2.3.dist-info/METADATA,,\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert get_method("ep_tied_lora").module == "ep_methods"
    assert RunSpec("vit-tiny", "digits", "ep_tied_lora", provenance={}).identity()["origin"] == {"module": "ep_methods",
                                                                                  "version": "1.2.3"}


def test_a_registered_name_cannot_be_taken_by_another_module():
    from vtab_lily.adapters import register
    with pytest.raises(UserError, match="'lora' is already taken by vtab_lily.adapters.lora"):
        register("lora", object)(lambda model, cfg: None)


@pytest.mark.parametrize("args,message", [
    (["--method", "peft:nosuch"], r"unknown peft tuner 'nosuch'; the installed peft offers \[.*'lora'"),
    (["--method", "peft:adalora"], r"peft tuner 'adalora' is not usable here: .*update_and_allocate"),
    (["--backbone", "timm:vit_nosuch_patch16"], r"unknown timm model 'vit_nosuch_patch16'"),
    (["--backbone", "timm:resnet18"], r"timm:resnet18 \(ResNet\) cannot be adapted: it has no `blocks`"),
    (["--backbone", "timm:vit_small_patch16_18x2_224"], r"block 0 \(ParallelThingsBlock\) has no attn.qkv"),
    (["--method", "missing_plugin:m"], r"could not import method module 'missing_plugin': ModuleNotFoundError"),
    (["--method", "examples.tied_lora:nosuch"], r"module 'examples.tied_lora' does not register .*'tied_lora'"),
])
def test_bad_names_are_one_clear_error_and_write_nothing(data_root, tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.syspath_prepend(str(tmp_path))
    backbone = [] if "--backbone" in args else ["--backbone", "vit-tiny"]
    argv = [*backbone, "--task", "digits", "--data-root", str(data_root), "--runs", str(tmp_path / "runs"),
            "--no-progress", *args]
    assert run_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and re.search(message, err), err
    assert not (tmp_path / "runs").exists()
