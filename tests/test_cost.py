"""The cost table (python -m vtab_lily.cost): its CSV's columns and values on two tiny backbones, the merged
forms equal to the unmerged models, the CPU memory figure against a hand computation, the CLI's errors; the
`cost` and `vpetl` tables and PPT."""
import copy
import dataclasses
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import randomize_trainable, tiny
from torch import nn

from vtab_lily import build_model, count_params, storage_bytes, tables
from vtab_lily import cost as cost_cli
from vtab_lily.adapters import METHODS, Adapted, get_method
from vtab_lily.tasks import VTAB_TASKS

SMALL = ["--batch", "2", "--rounds", "1", "--image-size", "32"]


def test_cost_csv_columns_and_values_on_two_tiny_backbones(tmp_path, capsys):
    out = tmp_path / "cost.csv"
    assert cost_cli.main(["--backbones", "vit-tiny", "vim-tiny-test", "--methods", "lora", "bitfit", "ssf",
                          "--set", "lora.r=4", *SMALL, "--out", str(out)]) == 0
    table = pd.read_csv(out)
    assert list(table.columns) == cost_cli.COLUMNS and len(table) == 8
    assert list(table["method"]) == ["linear", "lora", "bitfit", "ssf"] * 2
    for col in ("step_ms", "step_ratio", "memory_mb", "latency_ms", "latency_ratio"):
        assert np.isfinite(table[col]).all() and (table[col] > 0).all(), col
    ref = table[table["method"] == "linear"]
    assert (ref["step_ratio"] == 1).all() and (ref["latency_ratio"] == 1).all() and not ref["merges"].any()
    merged = table[table["method"] != "linear"]
    assert merged["merges"].all() and np.isfinite(merged["merged_latency_ms"]).all()
    assert (merged["merge_max_rel_diff"] <= cost_cli.MERGE_TOLERANCE).all()
    for _, r in table.iterrows():
        options = json.loads(r["options"])
        model = build_model(r["backbone"], r["method"], cost_cli.NUM_CLASSES, pretrained=False,
                            backbone_options={"img_size": 32}, **options)
        assert r["params"] == count_params(model) and r["storage_bytes"] == storage_bytes(model)
    assert json.loads(table.loc[1, "options"]) == {"r": 4} and table.loc[1, "params"] == 4 * 2 * 4 * 2 * 64
    meta = json.loads((tmp_path / "cost.csv.json").read_text())
    assert meta["memory"] == cost_cli.MEMORY_RULE and meta["batch"] == 2 and meta["reference"] == "linear"


@pytest.mark.parametrize("method,options", [("lora", dict(targets="q+v+proj+fc1")), ("fact", dict(type="tt")),
                                            ("fact", dict(type="tk")), ("ssf", {}), ("bitfit", {})])
def test_merged_form_gives_the_same_logits_without_the_wrappers(method, options, images):
    model = tiny(method, **options)
    randomize_trainable(model)  # LoRA's and FacT's increments are zero at init: make them count
    model.eval()
    merged = copy.deepcopy(model)
    get_method(method).merge(merged)
    want = model(images)
    assert (merged(images) - want).abs().max() <= 1e-5 * want.abs().max()
    if method != "bitfit":
        assert not any(isinstance(m, Adapted) for m in merged.modules())
    assert get_method("lily").merge is None and get_method("adapter").merge is None


def test_lora_merges_into_vims_patch_conv_and_in_proj():
    torch.manual_seed(0)
    model = build_model("vim-tiny-test", "lora", 5, pretrained=False, backbone_options={"img_size": 32},
                        targets="in_proj+patch_embed", dropout=0.0)
    randomize_trainable(model)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    merged = copy.deepcopy(model)
    get_method("lora").merge(merged)
    assert not any(isinstance(m, Adapted) for m in merged.modules())
    want = model(x)
    assert (merged(x) - want).abs().max() <= 1e-5 * want.abs().max()


def test_a_merge_that_changes_the_outputs_is_refused(monkeypatch):
    run = cost_cli.Measured("vit-tiny", "lora", {}, 2, 32, "cpu")
    for _ in range(2):
        run.step()  # AdamW moves LoRA's up projection off zero

    def unwrap(model):  # a wrong merge: drops the branches instead of folding them
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, Adapted):
                    setattr(parent, name, child.base)
    monkeypatch.setitem(METHODS, "lora", dataclasses.replace(METHODS["lora"], merge=unwrap))
    with pytest.raises(RuntimeError, match="merged form differs"):
        run.make_merged()


def test_cpu_memory_figure_equals_a_hand_computation_on_a_tiny_mlp():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    x, y = torch.randn(3, 4), torch.tensor([0, 1, 1])
    opt = torch.optim.AdamW(mlp.parameters())
    params = 4 * (4 * 8 + 8 + 8 * 2 + 2)  # 232 bytes; gradients as many; AdamW exp_avg, exp_avg_sq as many each
    steps = 4 * 4  # AdamW's step counter: one fp32 scalar per parameter tensor
    # autograd saves: the input x for W1's gradient (3x4 fp32), ReLU's output (3x8; also fc2's input: one storage),
    # W2 (a parameter: counted once), log_softmax's output (3x2; nll_loss reads the same), the int64 target (3)
    # and nll_loss's total weight (an fp32 scalar)
    saved = 4 * 3 * 4 + 4 * 3 * 8 + 4 * 3 * 2 + 8 * 3 + 4
    assert cost_cli.training_memory(mlp, opt, x, y) == 4 * params + steps + saved == 1140


def test_help_and_a_bad_input_give_one_error_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        cost_cli.main(["--help"])
    assert exit_.value.code == 0 and "step_ratio" in capsys.readouterr().out
    assert cost_cli.main(["--backbones", "vit-tiny", "--methods", "nosuch", *SMALL]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "nosuch" in err
    assert cost_cli.main(["--backbones", "vit-tiny", "--methods", "lora", "--set", "r=4", *SMALL]) == 2
    assert "prefix each option" in capsys.readouterr().err


def test_ppt_equals_a_hand_computation_and_the_printed_scores():
    assert tables.ppt(72.25, 0.29e6) == pytest.approx(0.7225 * math.exp(-math.log10(0.029 + 1)))
    assert tables.ppt(52.94, 0) == pytest.approx(0.5294)
    paper = tables.read_paper().loc["vpetl"]
    printed = paper[paper["ppt"].notna()]
    ours = np.round(tables.ppt(printed["mean"], printed["params_m"] * 1e6), 2)
    off = sorted(printed.index[np.abs(ours - printed["ppt"]) > 1e-9].get_level_values("label"))
    assert len(printed) == 19 and off == ["bitfit", "dtl", "repadapter"]  # 0.01 off each as printed (docs/cost.md)


def test_vpetl_csv_reads_and_its_printed_means_recompute():
    paper = tables.read_paper()
    check = tables.check_paper(paper).loc["vpetl"]
    assert len(check) == 21 and not check["flag"].any()  # V-PETL Bench's 20 rows and Convpass
    assert check.loc[("vit-b", "hydra"), "printed"] == 74.21 and check.loc[("vit-b", "convpass"), "recomputed"] == 76.56
    assert paper.loc[("vpetl", "vit-b", "lora"), "params_m"] == 0.29


def _records(runs, rows, accs):
    from test_tables import _record
    for row, base in zip(rows, accs):
        for i, task in enumerate(VTAB_TASKS):
            _record(runs, row.backbone, row.method, task, 42, base + i / 10, dict(row.filters),
                    params=100_000, recipe=json.loads(tables.row_recipe("vpetl", row, task)))


def test_vpetl_table_cells_equal_the_records_with_ppt(tmp_path):
    rows = tables.TABLES["vpetl"][:3]
    _records(tmp_path, rows, [60.0, 70.0, 80.0])
    result = tables.build_table("vpetl", tables.load_records(tmp_path), "paper", tables.read_paper())["mean"]
    adapter = result.loc["vit-b adapter"]
    assert adapter["cifar100"] == 80.0 and adapter["smallnorb_ele"] == pytest.approx(81.8)
    assert adapter["Mean19"] == pytest.approx(80.9) and adapter["paper_Mean19"] == 71.44
    assert adapter["ppt"] == pytest.approx(0.809 * math.exp(-math.log10(0.1e6 / 1e7 + 1)))
    assert adapter["paper_ppt"] == 0.71 and np.isnan(result.loc["vit-b lora", "cifar100"])


def test_sweep_preset_vpetl_dry_run_count(tmp_path, capsys):
    from vtab_lily import sweep
    assert sweep.main(["--preset", "vpetl", "--dry-run", "--runs", str(tmp_path)]) == 0
    # fft, linear, bitfit, adapter, ssf, fact-tk, lora, adaptformer: 19 each; VPT shallow and deep: 6 lengths x 19
    assert "494 runs: 0 done, 494 to run" in capsys.readouterr().out


def test_cost_table_sets_the_records_mean_and_ppt_beside_the_costs(tmp_path, capsys):
    from test_tables import _record
    for i, task in enumerate(VTAB_TASKS):
        _record(tmp_path / "runs", "vit-tiny", "lora", task, 42, 70.0 + i / 10, {})
    cost = pd.DataFrame([{c: 1.0 for c in cost_cli.COLUMNS} | {"backbone": "vit-tiny", "method": m, "options": "{}",
                          "params": p, "merges": True} for m, p in (("lora", 1e5), ("bitfit", 10))])
    cost.to_csv(tmp_path / "cost.csv", index=False)
    assert tables.main(["--table", "cost", "--cost", str(tmp_path / "cost.csv"), "--runs", str(tmp_path / "runs"),
                        "--out", str(tmp_path / "out")]) == 0
    out = pd.read_csv(tmp_path / "out" / "cost.csv")
    assert out.loc[0, "mean_plain"] == pytest.approx(70.9) and out.loc[0, "ppt"] == pytest.approx(
        tables.ppt(70.9, 1e5)) and np.isnan(out.loc[1, "Mean"])
    assert "| vit-tiny | lora |" in (tmp_path / "out" / "cost.md").read_text()
    assert tables.main(["--table", "cost", "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.count("error:") == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_memory_of_a_method_does_not_count_the_other_methods_models():
    alone = cost_cli.Measured("vit-tiny", "lora", {}, 2, 32, "cuda")
    alone.step()
    figure = alone.memory_bytes()
    others = [cost_cli.Measured("vit-tiny", m, {}, 2, 32, "cuda") for m in ("bitfit", "ssf")]
    for run in others:
        run.step()
    weights = sum(p.numel() * 4 for p in alone.model.parameters())
    assert weights < figure and abs(alone.memory_bytes() - figure) <= 0.05 * figure


def test_vpetl_recipe_smooths_the_training_labels_as_timm(monkeypatch):
    """V-PETL Bench's trainers use timm's LabelSmoothingCrossEntropy(0.1) (train/train_model_lora.py L188-190):
    the recipe's label_smoothing reaches the training loss, equal to timm's; the default recipe's run ids keep
    no label_smoothing (Recipe.ID_IF_SET)."""
    from timm.loss import LabelSmoothingCrossEntropy

    from vtab_lily import train as train_mod
    from vtab_lily.data import Batches, Split
    from vtab_lily.recipes import VPETL_LORA, recipe_for
    from vtab_lily.records import recipe_identity
    logits, y = torch.randn(6, 5, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 3, 4, 0])
    assert torch.nn.functional.cross_entropy(logits, y, label_smoothing=0.1) == pytest.approx(
        float(LabelSmoothingCrossEntropy(0.1)(logits, y)), rel=1e-6)
    recipe = recipe_for("vit-tiny", "vpetl", epochs=1, warmup_epochs=0, batch_size=10, eval_every=1, image_size=32)
    assert recipe.label_smoothing == 0.1 and "label_smoothing" not in recipe_identity("vit-b", {})
    assert VPETL_LORA["lr"]["cifar100"] == 0.005 and VPETL_LORA["weight_decay"]["caltech101"] == 0.35
    seen, original = [], torch.nn.functional.cross_entropy
    monkeypatch.setattr(train_mod.F, "cross_entropy", lambda *a, **k: seen.append(k.get("label_smoothing"))
                        or original(*a, **k))
    rng = np.random.default_rng(0)
    split = Split(rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8), rng.integers(0, 5, 10), cache=None)
    train_mod.fit(tiny("lora"), Batches(split, 10, shuffle=True, drop_last=True), Batches(split, 10), recipe,
                  progress=False)
    assert 0.1 in seen
