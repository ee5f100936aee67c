"""Figure functions on tiny models: shapes, ranges and known cases."""
import json

import pandas as pd
import pytest
import torch
from helpers import assert_close, randomize_trainable, tiny

from analysis.attention import cls_attention, plot_attention
from analysis.common import save_figure
from analysis.features import block_features, feature_difference, plot_differences
from analysis.granularity import accuracy_vs_ne, plot_granularity
from analysis.rank import effective_rank, numerical_rank, updates
from analysis.routers import plot_router_weights, router_weights
from vtab_lily import build_model, save_adapter


def test_attention_maps_are_distributions_over_patches(images, tmp_path):
    model = tiny("lily").eval()
    maps = cls_attention(model, images)
    assert maps.shape == (4, 3, 4, 4)  # 4 layers, 3 images, 4 x 4 patches at 32 px / patch 8
    # the class token also attends to itself, so the patch weights sum to a little under 1
    sums = maps.sum((-1, -2))
    assert ((sums > 0) & (sums < 1)).all() and (maps >= 0).all()
    fig = plot_attention({"lily": maps, "lora": cls_attention(tiny("lora").eval(), images)}, images, [0, 3])
    assert save_figure(fig, tmp_path / "attn.png").stat().st_size > 0


def test_feature_difference_is_zero_for_identical_layers(images, tmp_path):
    feats = block_features(tiny("lily").eval(), images)
    assert len(feats) == 4 and feats[0].shape == (3, 17, 64)
    diff = feature_difference(feats)
    assert diff.shape == (4, 4) and torch.allclose(diff.diagonal(), torch.zeros(4), atol=1e-6)
    assert torch.allclose(diff, diff.T) and (diff > 1e-3).sum() == 12
    same = feature_difference([feats[1]] * 3)
    assert torch.allclose(same, torch.zeros(3, 3), atol=1e-6)  # exact zeros: no scale to be relative to
    assert save_figure(plot_differences({"lily": diff}), tmp_path / "f.png").exists()


def test_router_weights_sum_to_tokens_and_one_expert_gets_everything(images, tmp_path):
    model = tiny("lily", ne_1=2, ne_2=3).eval()
    randomize_trainable(model, std=0.5)
    w = router_weights(model, images, "k", batch_size=2)
    assert w.shape == (4, 3)
    assert torch.allclose(w.sum(-1), torch.full((4,), 3 * 17.0))  # every token's probabilities sum to 1
    single = router_weights(tiny("lily", ne_1=2, ne_2=1).eval(), images, "v")
    assert torch.allclose(single / single.sum(-1, keepdim=True), torch.ones(4, 1))
    assert save_figure(plot_router_weights(w, [0, 3], "k"), tmp_path / "r.png").exists()


def test_router_weights_on_vim(tmp_path):
    torch.manual_seed(0)
    model = build_model("vim-tiny-test", "lily", 5, pretrained=False, backbone_options={"img_size": 32},
                        ne_2=4).eval()
    randomize_trainable(model, std=0.5)
    w = router_weights(model, torch.rand(2, 3, 32, 32), "in_proj")
    assert w.shape == (2, 4) and torch.allclose(w.sum(-1), torch.full((2,), 2 * 5.0))


def test_lora_update_rank_is_at_most_r():
    model = tiny("lora", r=3)
    randomize_trainable(model, std=0.5)
    ups = updates(model)
    assert len(ups) == 8  # q and v in 4 layers
    assert all(numerical_rank(u) == 3 and u.shape == (64, 64) for u in ups.values())
    assert all(effective_rank(u) <= 3 + 1e-6 for u in ups.values())


def test_lily_update_rank_exceeds_lora_at_equal_parameters(images):
    """q, v on 4 layers of width 64. LoRA r=2: 4 * 2 * (64*2 + 2*64) = 2,048 parameters. Lily with 1 LP
    and 1 HP expert per target shared by all layers, r=7, no router: 2 * (64*7 + 7*64) = 1,792 <= 2,048,
    and every layer's update has rank 7."""
    from vtab_lily import count_params
    lora = tiny("lora", r=2, targets=("q", "v"))
    lily = tiny("lily", r=7, ne=1, router="none", targets=("q", "v"))
    assert (count_params(lily), count_params(lora)) == (1_792, 2_048)
    randomize_trainable(lora, std=0.5)
    randomize_trainable(lily, std=0.5)
    lora_ranks = [numerical_rank(u) for u in updates(lora).values()]
    lily_ranks = [numerical_rank(u) for u in updates(lily.eval(), images).values()]
    assert max(lora_ranks) == 2 and min(lily_ranks) == 7
    assert min(effective_rank(u) for u in updates(lily, images).values()) > max(
        effective_rank(u) for u in updates(lora).values())


def test_lily_routed_update_uses_the_seen_router_weights(images):
    model = tiny("lily", r=4, ne_1=2, ne_2=3, targets=("k", "v")).eval()
    randomize_trainable(model, std=0.5)
    ups = updates(model, images)
    assert sorted(ups) == [f"{t}.{i}" for t in ("k", "v") for i in range(4)]
    w = router_weights(model, images, "k")
    mix = w[2] / w[2].sum()
    want = torch.einsum("e,erd->rd", mix, model.lily.hps["k"]).T @ model.lily.lps["k"][1].weight
    assert_close(ups["k.2"], want, 1e-6)
    with pytest.raises(ValueError, match="needs images"):
        updates(model)


def test_accuracy_vs_ne_from_records(tmp_path):
    records = pd.DataFrame({
        "method": ["lily"] * 5 + ["lora"], "eval_split": ["test"] * 6, "backbone": ["vit-b"] * 6,
        "task": ["dtd", "dtd", "dtd", "svhn", "svhn", "dtd"], "opt.ne_2": [2, 2, 4, 2, 4, None],
        "best_acc": [60.0, 62.0, 65.0, 80.0, 79.0, 99.0], "weights_id": ["a1"] * 6, "recipe": ['{"epochs": 100}'] * 6})
    table = accuracy_vs_ne(records)
    assert table.loc[("vit-b", "dtd"), 2] == 62.0 and table.loc[("vit-b", "dtd"), 4] == 65.0
    assert table.loc[("vit-b", "svhn"), 4] == 79.0
    assert save_figure(plot_granularity(table), tmp_path / "g.pdf").stat().st_size > 0
    with pytest.raises(ValueError, match="no finished Lily test records"):
        accuracy_vs_ne(records[records.method == "lora"])


def test_granularity_never_pools_backbones_weights_or_recipes():
    """The notebook's ne=5 digits point was a vim-mini run pooled with vit-mini ones: each (backbone,
    weights, recipe) is its own curve, and --backbone keeps one backbone's curves."""
    records = pd.DataFrame({
        "method": ["lily"] * 5, "eval_split": ["test"] * 5, "task": ["digits"] * 5,
        "backbone": ["vit-mini", "vit-mini", "vim-mini", "vit-mini", "vit-mini"], "opt.ne_2": [2, 4, 5, 2, 2],
        "best_acc": [80.0, 85.0, 70.0, 99.0, 30.0], "weights_id": ["w", "w", "v", "w", "random"],
        "recipe": [json.dumps({"epochs": e, "lr": lr}) for e, lr in
                   ((10, 0.001), (10, 0.001), (10, 0.00125), (1, 0.001), (10, 0.001))]})
    table = accuracy_vs_ne(records)
    # labels name what differs within one backbone's records (vim-mini has one recipe: none)
    assert table.loc[("vit-mini [w] epochs=10", "digits"), 2] == 80.0  # not 99 (epochs=1), not 30 (random)
    assert table.loc[("vit-mini [w] epochs=1", "digits"), 2] == 99.0
    assert table.loc[("vit-mini [random] epochs=10", "digits"), 2] == 30.0
    assert pd.isna(table.loc[("vit-mini [w] epochs=10", "digits"), 5])  # the vim-mini point stays out
    assert table.loc[("vim-mini", "digits"), 5] == 70.0
    only = accuracy_vs_ne(records, backbone="vim-mini")
    assert list(only.index) == [("vim-mini", "digits")] and list(only.columns) == [5]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two tiny one-epoch runs on digits at 32 px (Lily, LoRA): (data root, runs folder, adapter files,
    (spec, record path) per run)."""
    from vtab_lily.prepare import prepare_task
    from vtab_lily.records import RunSpec
    from vtab_lily.run import execute
    root = tmp_path_factory.mktemp("trained")
    prepare_task("digits", root / "data")
    recipe = {"image_size": 32, "batch_size": 100, "epochs": 1, "warmup_epochs": 1}
    specs, adapters = [], []
    for method, options in (("lily", {"r": 4, "ne": 2}), ("lora", {"r": 2})):
        spec = RunSpec("vit-tiny", "digits", method, options, 0, "test", recipe)
        record = execute(spec, root / "runs", root / "data", progress=False)
        specs.append((spec, record))
        adapters.append(str(record.with_suffix(".safetensors")))
    return root / "data", root / "runs", adapters, specs


@pytest.mark.slow
def test_command_lines_write_their_figures(trained, tmp_path, capsys):
    from analysis import attention, features, granularity, rank, routers
    data, runs_dir, adapters, _ = trained
    common = ["--task", "digits", "--data-root", str(data), "--image-size", "32", "--n", "3"]
    both = ["--adapter", adapters[0], "--adapter", adapters[1]]
    runs = [(attention, both + common), (features, both + common), (rank, both + common),
            (routers, ["--adapter", adapters[0], "--target", "k"] + common)]
    for module, argv in runs:
        out = tmp_path / f"{module.__name__.split('.')[-1]}.png"
        assert module.main(argv + ["--out", str(out)]) == 0 and out.stat().st_size > 0
    out = tmp_path / "granularity.pdf"
    assert granularity.main(["--runs", str(runs_dir), "--out", str(out)]) == 0 and out.exists()
    printed = capsys.readouterr().out
    assert "effective rank mean" in printed and printed.count("wrote ") == 5


def test_figure_size_is_capped_whatever_the_number_of_images(images):
    from analysis.common import MAX_ROWS
    many = torch.rand(64, 3, 32, 32)
    maps = {name: cls_attention(tiny(name).eval(), many) for name in ("lily", "lora")}
    fig = plot_attention(maps, many, [0, 1, 2, 3], "digits")
    rows = fig.axes[0].get_gridspec().nrows
    assert rows == MAX_ROWS and fig.get_size_inches()[1] < 16  # 64 images: 4 shown per method
    assert "first 4 of 64 images" in fig.get_suptitle() and fig.axes[-1].get_ylabel().startswith("class-token")
    assert [ax.get_title() for ax in fig.axes[1:5]] == ["layer 0", "layer 1", "layer 2", "layer 3"]


def test_random_init_adapter_loads_the_backbone_it_was_trained_with(trained):
    """load_model rebuilds the run's random backbone from the seed saved with the adapter: the loaded
    model scores the run's recorded final accuracy, and every load gives the same weights."""
    from vtab_lily import adapter_config, load_model
    from vtab_lily.data import Batches, load_split
    from vtab_lily.records import read_record
    from vtab_lily.train import evaluate
    data, _, adapters, specs = trained
    assert adapter_config(adapters[0])["seed"] == 0
    torch.manual_seed(123)
    a = load_model(adapters[0], backbone_options={"img_size": 32})
    state = torch.random.get_rng_state()
    b = load_model(adapters[0], backbone_options={"img_size": 32})
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's random state is left alone
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    split = load_split(data, "digits", "test", size=32, progress=False)
    spec, record = specs[0]
    acc = evaluate(a, Batches(split, 256), spec.full_recipe()).acc
    assert acc == pytest.approx(read_record(record)["final_acc"], abs=1e-6)


def _error_cases(data, runs_dir, adapters, empty):
    common = ["--task", "digits", "--data-root", str(data), "--image-size", "32", "--n", "2"]
    lily, lora = adapters
    return [
        ("attention", ["--adapter", str(empty / "missing.safetensors"), *common], "adapter file .* does not exist"),
        ("features", ["--adapter", str(runs_dir), *common], "adapter file .* does not exist"),
        ("rank", ["--adapter", str(empty / "notes.txt"), *common], "is not an adapter saved by vtab_lily"),
        ("attention", ["--adapter", lily, "--task", "digits", "--data-root", str(empty), "--image-size", "32"],
         "no folder for task 'digits' .*or pass --prepare"),
        ("attention", ["--adapter", lily, "--task", "digitz", "--data-root", str(data)], "unknown task 'digitz'"),
        ("routers", ["--adapter", lily, "--target", "q", *common], "--target q: this Lily adapter has the targets k v"),
        ("routers", ["--adapter", lora, *common], "is a lora adapter; this figure needs a lily adapter"),
        ("routers", ["--adapter", lily, "--layers", "4", *common], "--layers 4 out of range: .* numbered 0..3"),
        ("attention", ["--adapter", lily, "--layers", "0", "-1", *common], "--layers -1 out of range"),
        ("attention", ["--adapter", lily, *common[:-1], "0"], "--n .0. and --image-size .32. must be positive"),
        ("granularity", ["--runs", str(empty)], "no finished Lily test records"),
        ("granularity", ["--runs", str(runs_dir), "--backbone", "vim-s"], "no finished Lily test records of vim-s"),
        ("granularity", ["--runs", str(empty / "nowhere")], "--runs .* is not a folder of run records"),
    ]


def test_every_command_line_mistake_is_one_line_exit_2_nothing_written(trained, tmp_path, capsys):
    import importlib
    import re
    data, runs_dir, adapters, _ = trained
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an adapter\n")
    cases = _error_cases(data, runs_dir, adapters, empty)
    cases.append(("attention", ["--adapter", adapters[0], "--task", "digits", "--data-root", str(data)],
                  "--out .*fig.jpg: give a file name ending in .png or .pdf"))
    vim = empty / "vim.safetensors"
    save_adapter(build_model("vim-tiny-test", "lily", 10, pretrained=False, backbone_options={"img_size": 32}), vim)
    cases.append(("attention", ["--adapter", str(vim), "--task", "digits", "--data-root", str(data)],
                  "adapts a Vision Mamba, which has no attention"))
    for name, argv, message in cases:
        out = tmp_path / ("fig.jpg" if name == "attention" and "--out" in message else "fig.png")
        assert importlib.import_module(f"analysis.{name}").main([*argv, "--out", str(out)]) == 2, (name, argv)
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err.count("\n") == 1, captured.err
        assert re.match(f"error: .*{message}", captured.err), (captured.err, message)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]  # nothing written
    assert sorted(p.name for p in empty.iterdir()) == ["notes.txt", "vim.safetensors"]


@pytest.mark.slow
def test_prepare_option_prepares_a_missing_or_half_prepared_task(trained, tmp_path):
    from analysis import attention
    from vtab_lily.prepare import prepare_task
    _, _, adapters, _ = trained
    prepare_task("digits", tmp_path / "data", limit=4)  # then as if killed before the lists were written
    for split in ("train800", "val200", "train800val200", "test"):
        (tmp_path / "data" / "digits" / f"{split}.txt").unlink()
    (tmp_path / "data" / "digits" / "manifest.json").unlink()
    argv = ["--adapter", adapters[0], "--task", "digits", "--data-root", str(tmp_path / "data"), "--image-size",
            "32", "--n", "2", "--out", str(tmp_path / "a.png")]
    assert attention.main(argv) == 2 and not (tmp_path / "a.png").exists()  # lists missing: an error
    assert attention.main([*argv, "--prepare"]) == 0 and (tmp_path / "a.png").exists()
    assert len((tmp_path / "data" / "digits" / "test.txt").read_text().splitlines()) == 797


def test_figures_default_to_the_trained_image_size_and_refuse_another(trained, tmp_path, capsys):
    """The analysis CLIs defaulted to 224 px for adapters trained at 32 px: they now load at the adapter's
    own size, and a different --image-size is one error line."""
    from analysis import attention
    from analysis.common import load_trained
    data, _, adapters, _ = trained
    assert load_trained(adapters[0]).patch_embed.img_size == (32, 32)
    common = ["--adapter", adapters[0], "--task", "digits", "--data-root", str(data), "--n", "2"]
    assert attention.main(common + ["--out", str(tmp_path / "a.png")]) == 0 and (tmp_path / "a.png").exists()
    capsys.readouterr()
    assert attention.main(common + ["--image-size", "64", "--out", str(tmp_path / "b.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "trained with backbone options" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "b.png").exists()
