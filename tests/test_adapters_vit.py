"""The core methods on ViT: identity at zero init, exact parameter counts, gradients, save/load."""
import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import TINY, assert_close, randomize_trainable, tiny

from backbones import create_backbone
from vtab_lily import adapter_config, build_model, count_params, disable_adapters, load_adapter, save_adapter
from vtab_lily.errors import UserError

METHODS = [
    ("lily", {}),
    ("lily", dict(routing="token", router="lp", ne_1=2, ne_2=3)),
    ("lily", dict(routing="sample", targets=("q", "v", "mlp"))),
    ("lily", dict(router="none")),
    ("lora", {}),
    ("adaptformer", {}),
    ("adaptformer", dict(bias=True, width=8)),
    ("fft", {}),
    ("linear", {}),
]


@pytest.mark.parametrize("method,options", METHODS)
def test_zero_init_is_identity_and_keeps_fused_attention(method, options, images, monkeypatch):
    torch.manual_seed(0)
    plain = create_backbone("vit-tiny", 5, pretrained=False, **TINY).eval()
    model = tiny(method, **options).eval()
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    with torch.no_grad():
        want = plain(images)
        calls.clear()
        got = model(images)
        assert len(calls) == 4  # timm's fused attention ran in all 4 blocks
        with disable_adapters(model):
            off = model(images)
    if method in ("fft", "linear"):
        assert torch.equal(got, want)
    else:
        assert_close(got, want, 1e-6)
    assert torch.equal(off, want)




@pytest.mark.slow
@pytest.mark.parametrize("method,options,expected", [
    ("lily", dict(r=16, ne=4), 396_288),
    ("lily", dict(r=32, ne=4), 792_576),
    ("lora", dict(r=8), 294_912),
    ("lora", dict(r=32), 1_179_648),
    ("adaptformer", dict(width=32), 589_824),
    ("adaptformer", dict(width=8, bias=True), 156_768),
    ("linear", {}, 0),
])
def test_parameter_counts_on_vit_b(method, options, expected):
    model = build_model("vit-b", method, 100, pretrained=False, **options)
    assert count_params(model) == expected


@pytest.mark.slow
def test_lily_parameter_breakdown_on_vit_b():
    model = build_model("vit-b", "lily", 100, pretrained=False, r=16, ne=4)
    parts = {k: sum(p.numel() for n, p in model.lily.named_parameters() if n.startswith(k))
             for k in ("lps", "hps", "routers")}
    assert parts == {"lps": 196_608, "hps": 196_608, "routers": 3_072}


@pytest.mark.parametrize("method", ["lily", "lora", "adaptformer", "linear", "fft"])
def test_gradients_only_where_they_belong(method, images):
    model = tiny(method)
    randomize_trainable(model) if method != "fft" else None
    model(images).logsumexp(-1).sum().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert with_grad == trainable
    prefixes = {"lily": ("lily.", "head."), "linear": ("head.",), "fft": ("",),
                "lora": ("head.",), "adaptformer": ("head.",)}[method]
    branch = ".branches." if method in ("lora", "adaptformer") else "\0"
    assert all(n.startswith(prefixes) or branch in n for n in with_grad)
    assert any(n.startswith("head.") for n in with_grad)


def test_unknown_option_lists_valid_ones():
    with pytest.raises(UserError, match=r"unknown option\(s\) \['rank'\].*valid options: \['r', 's'"):
        tiny("lily", rank=4)
    with pytest.raises(KeyError, match="unknown method 'lorax'"):
        tiny("lorax")


def test_lily_ne_1_above_the_depth_is_refused():
    with pytest.raises(ValueError, match=r"ne_1=5 \(LPs for .k.\) must be between 1 and the number of layers \(4\)"):
        tiny("lily", ne_1=5)


def test_save_load_round_trip_stores_shared_tensors_once(tmp_path, images):
    model = tiny("lily", ne_1=2, ne_2=3).eval()
    randomize_trainable(model)
    path = tmp_path / "adapter.safetensors"
    save_adapter(model, path)
    fresh = tiny("lily", ne_1=2, ne_2=3).eval()
    load_adapter(fresh, path)
    with torch.no_grad():
        assert torch.equal(fresh(images), model(images))
    from safetensors.torch import load_file
    keys = sorted(load_file(str(path)))
    assert [k for k in keys if k.startswith("lily.hps")] == ["lily.hps.k", "lily.hps.mlp", "lily.hps.v"]
    assert len([k for k in keys if k.startswith("lily.lps")]) == 2 * 3  # ne_1 LPs per target, once each
    assert len([k for k in keys if k.startswith("lily.routers")]) == 4 * 3  # one per layer and target
    assert adapter_config(path)["options"]["ne_2"] == 3
    assert not list(tmp_path.glob(".*tmp"))


def test_load_adapter_rejects_a_different_config(tmp_path):
    model = tiny("lily", r=4)
    save_adapter(model, tmp_path / "a.safetensors")
    with pytest.raises(UserError, match="does not fit this model"):
        load_adapter(tiny("lily", r=8), tmp_path / "a.safetensors")


def test_deepcopy_keeps_one_shared_copy():
    model = copy.deepcopy(tiny("lily"))
    branch = model.blocks[1].attn.qkv.branches[0]
    assert branch.shared is model.lily


def test_disable_adapters_removes_a_trained_adapter(images):
    model = tiny("lily").eval()
    with torch.no_grad():
        base = model(images)
        randomize_trainable(model)
        with disable_adapters(model):
            plain_new_head = model(images)
        adapted = model(images)
        model.head.load_state_dict(tiny("lily").head.state_dict())
        with disable_adapters(model):
            off = model(images)
    assert (adapted - plain_new_head).abs().max() > 1e-3
    assert torch.equal(off, base)


def test_branches_keep_slice_order_and_overlaps_are_refused(images):
    model = tiny("lora", targets=("v", "q"))
    qkv = model.blocks[0].attn.qkv
    assert qkv.slices == [slice(0, 64), slice(128, 192)]
    with pytest.raises(ValueError, match="adapter output slices overlap"):
        tiny("lora", targets=("qkv", "k"))


def test_load_model_rebuilds_the_saved_model(tmp_path, images):
    from vtab_lily import load_model
    model = tiny("lora", r=3).eval()
    randomize_trainable(model)
    save_adapter(model, tmp_path / "a.safetensors")
    rebuilt = load_model(tmp_path / "a.safetensors", pretrained=False, backbone_options=TINY)
    assert rebuilt.peft_config == model.peft_config and not rebuilt.training
    # the backbone is rebuilt from the same seed-free random init, so compare only the adapter tensors
    for (n, p), (m, q) in zip(sorted(rebuilt.named_parameters()), sorted(model.named_parameters())):
        if q.requires_grad:
            assert n == m and torch.equal(p, q)


def test_adaptformer_reads_the_stream_before_norm2_and_adds_after_the_mlp():
    """Official AdaptFormer / Lily copy: x + drop_path(mlp(norm2(x))) + s * up(relu(down(x)))."""
    model = tiny("adaptformer", width=4, s=0.3).eval()
    randomize_trainable(model, std=0.3)
    block = model.blocks[1]
    branch = block.drop_path2.branches[0]
    x = torch.randn(2, 17, 64)
    with torch.no_grad():
        h = x + block.attn(block.norm1(x))
        want = h + block.mlp(block.norm2(h)) + 0.3 * branch.up(torch.relu(branch.down(h)))
        assert_close(block(x), want, 1e-5)
