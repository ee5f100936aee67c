"""Figure functions on tiny models: shapes, ranges and known cases."""
import pandas as pd
import pytest
import torch
from conftest import randomize_trainable, tiny

from analysis.attention import cls_attention, plot_attention
from analysis.common import save_figure
from analysis.features import block_features, feature_difference, plot_differences
from analysis.granularity import accuracy_vs_ne, plot_granularity
from analysis.rank import effective_rank, numerical_rank, updates
from analysis.routers import plot_router_weights, router_weights
from vtab_lily import build_model


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
    assert torch.allclose(same, torch.zeros(3, 3), atol=1e-6)
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
    assert torch.allclose(ups["k.2"], want, atol=1e-6)
    with pytest.raises(ValueError, match="needs images"):
        updates(model)


def test_accuracy_vs_ne_from_records(tmp_path):
    records = pd.DataFrame({
        "method": ["lily"] * 5 + ["lora"], "eval_split": ["test"] * 6, "backbone": ["vit-b"] * 6,
        "task": ["dtd", "dtd", "dtd", "svhn", "svhn", "dtd"], "opt.ne_2": [2, 2, 4, 2, 4, None],
        "best_acc": [60.0, 62.0, 65.0, 80.0, 79.0, 99.0]})
    table = accuracy_vs_ne(records)
    assert table.loc["dtd", 2] == 62.0 and table.loc["dtd", 4] == 65.0 and table.loc["svhn", 4] == 79.0
    assert save_figure(plot_granularity(table), tmp_path / "g.pdf").stat().st_size > 0
    with pytest.raises(ValueError, match="no finished Lily test records"):
        accuracy_vs_ne(records[records.method == "lora"])


def test_command_lines_write_their_figures(tmp_path, capsys):
    from analysis import attention, features, granularity, rank, routers
    from vtab_lily.prepare import prepare_task
    from vtab_lily.records import RunSpec
    from vtab_lily.run import execute
    prepare_task("digits", tmp_path / "data")
    recipe = {"image_size": 32, "batch_size": 100, "epochs": 1, "warmup_epochs": 1}
    adapters = []
    for method, options in (("lily", {"r": 4, "ne": 2}), ("lora", {"r": 2})):
        spec = RunSpec("vit-tiny", "digits", method, options, 0, "test", recipe)
        record = execute(spec, tmp_path / "runs", tmp_path / "data", progress=False)
        adapters.append(str(record.with_suffix(".safetensors")))
    common = ["--task", "digits", "--data-root", str(tmp_path / "data"), "--image-size", "32", "--n", "3"]
    both = ["--adapter", adapters[0], "--adapter", adapters[1]]
    runs = [(attention, both + common), (features, both + common), (rank, both + common),
            (routers, ["--adapter", adapters[0], "--target", "k"] + common)]
    for module, argv in runs:
        out = tmp_path / f"{module.__name__.split('.')[-1]}.png"
        assert module.main(argv + ["--out", str(out)]) == 0 and out.stat().st_size > 0
    out = tmp_path / "granularity.pdf"
    assert granularity.main(["--runs", str(tmp_path / "runs"), "--out", str(out)]) == 0 and out.exists()
    printed = capsys.readouterr().out
    assert "effective rank mean" in printed and printed.count("wrote ") == 5
