"""MambaPEFT's tuning methods on Vim (issue 19): partial tuning, LoRA on x_proj / dt_proj / out_proj / the patch
embedding, LoRAp (+ DoRA) on slices of in_proj and x_proj, AdaptFormer as their ParallelAdapter.

Counts on Vim-S equal what the official `vim_peft_all.py` creates at their configs' sizes; each method is the
identity at init (DoRA up to rounding), trains only its tensors and the head, and equals a restatement of the
official forward written from their formulas (merged weights W + s up @ down, DoRA's m V / ||V||, A_log + dA,
the patch conv plus a conv LoRA, out_proj plus the ParallelAdapter) in outputs and gradients."""
import re

import pytest
import torch
import torch.nn.functional as F
from helpers import VIM_TINY, assert_close, randomize_trainable
from test_scan import assert_grads_close

from backbones import create_backbone
from vtab_lily import build_model, count_params, disable_adapters
from vtab_lily.adapters import make_config
from vtab_lily.errors import UnknownName
from vtab_lily.model import load_model, param_groups, save_adapter
from vtab_lily.options import OptionError
from vtab_lily.recipes import Recipe
from vtab_lily.train import make_optimizer

D, DI, R, N, L = 384, 768, 24, 16, 24  # Vim-S: width, d_inner, dt_rank, d_state, layers

# (method, options, trainable parameters on Vim-S without the head); the official sizes: partial tensors are
# whole A_log / D / conv kernels / dt biases of both directions (set_peft L910-1017); LoRA(x_proj) dim 64,
# LoRA(dt_proj) dim 64, LoRA(out_proj) dim 96, LoRA(in_proj) dim 32 (2_small_lora_*.py L20), LoRA(embed) at
# set_peft's dim_patch_embed 32 (L735; no config); LoRAp dim 64 (2_small_lorap_*.py L20); ParallelAdapter 32.
# Published (K, with a ~9K head): A 598, D 45, conv1d 156, CLS 9, pos 84, x_proj 2,540, dt_proj 2,442,
# out_proj 2,663, in_proj 1,483, embed 45, LoRAp X / Z 1,778, d 2,442, B / C 2,417.
VIM_S_COUNTS = [
    ("partial", {"parts": "A"}, L * 2 * DI * N),                                   # 589,824
    ("partial", {"parts": "D"}, L * 2 * DI),                                       # 36,864
    ("partial", {"parts": "conv1d"}, L * 2 * DI * 4),                              # 147,456
    ("partial", {"parts": "dt_bias"}, L * 2 * DI),                                 # 36,864 (their 37K: headless)
    ("partial", {"parts": "cls_token"}, D),
    ("partial", {"parts": "pos_embed"}, 197 * D),                                  # 75,648
    ("partial", {"parts": "A+D", "delta": False}, L * 2 * DI * (N + 1)),
    ("lora", {"targets": "x_proj+x_proj_b", "r": 64}, L * 2 * 64 * (DI + R + 2 * N)),  # 2,531,328
    ("lora", {"targets": "dt_proj+dt_proj_b", "r": 64}, L * 2 * 64 * (R + DI)),    # 2,433,024
    ("lora", {"targets": "out_proj", "r": 96}, L * 96 * (DI + D)),                 # 2,654,208
    ("lora", {"targets": "in_proj", "r": 32}, L * 32 * (D + 2 * DI)),              # 1,474,560
    ("lora", {"targets": "patch_embed", "r": 32}, 32 * (3 * 16 * 16 + D)),         # 36,864
    ("lorap", {"targets": "x"}, L * 64 * (D + DI)),                                # 1,769,472 (the check)
    ("lorap", {"targets": "z"}, L * 64 * (D + DI)),
    ("lorap", {"targets": "dt"}, L * 2 * 64 * (DI + R)),                           # 2,433,024
    ("lorap", {"targets": "B"}, L * 2 * 64 * (DI + N)),                            # 2,408,448
    ("lorap", {"targets": "C"}, L * 2 * 64 * (DI + N)),
    ("lorap", {"targets": "x", "dora": True}, L * (64 * (D + DI) + D)),            # + m, one per input feature
    ("adaptformer", {}, L * 32 * (DI + D)),                                        # 884,736 (their table: 663K)
]


@pytest.mark.parametrize("method,options,expected", VIM_S_COUNTS)
def test_vim_s_counts_equal_the_official_code(method, options, expected):
    assert count_params(build_model("vim-s", method, 10, pretrained=False, **options)) == expected


def test_official_defaults():
    """lorap: r 64, s 0.1 (2_small_lorap_X_64.py L20); ParallelAdapter: width 32, s 0.1 (4_small_adaptf_32.py
    L20), Adapter without biases, ReLU, dropout 0.1 (vim_peft_all.py L592-618); partial v2, wd x1."""
    assert vars(make_config("lorap", {}, "vim-s")) == dict(targets=("x",), r=64, s=0.1, dora=False)
    assert vars(make_config("adaptformer", {}, "vim-s")) == dict(width=32, s=0.1, dropout=0.1, bias=False,
                                                                  site="out_proj")
    assert vars(make_config("adaptformer", {}, "vit-b"))["site"] == "mlp_residual"
    assert vars(make_config("partial", {}, "vim-s")) == dict(parts=("conv1d",), delta=True, wd_mult=1.0)
    model = tiny("lorap", targets="x+dt")
    branches = model.layers[0].mixer.in_proj.branches, model.layers[0].mixer.x_proj_b.branches
    assert [b.dropout.p for b in branches[0]] == [0.1] and [b.dropout.p for b in branches[1]] == [0.0]


def tiny(method, seed=0, **options):
    return build_model("vim-tiny-test", method, 5, pretrained=False, backbone_options=VIM_TINY, seed=seed,
                       **options).eval()


def plain(model=None, seed=0):
    """The backbone of `tiny(..., seed)` without any method (build_model seeds torch, then creates it), with
    `model`'s head."""
    torch.manual_seed(seed)
    base = create_backbone("vim-tiny-test", 5, pretrained=False, **VIM_TINY).eval()
    if model is not None:
        base.head.load_state_dict(model.head.state_dict())
    return base


CASES = [
    ("partial", {"parts": "A+D+conv1d+dt_bias+cls_token+pos_embed"}),
    ("partial", {"parts": "A+conv1d", "delta": False}),
    ("lora", {"targets": "x_proj+x_proj_b", "r": 3}),
    ("lora", {"targets": "dt_proj+dt_proj_b+out_proj", "r": 3}),
    ("lora", {"targets": "patch_embed", "r": 3}),
    ("lorap", {"targets": "x+z+dt+B+C", "r": 3}),
    ("lorap", {"targets": "x+dt+B+C", "r": 3, "dora": True}),
    ("adaptformer", {"width": 4}),
]

# the tensors each case trains (besides the head), by name on the 2-layer model
TRAINS = {
    0: [f"layers.{i}.mixer.{t}" for i in range(2) for t in
        ("parametrizations.A_log.0.delta", "parametrizations.A_b_log.0.delta", "parametrizations.D.0.delta",
         "parametrizations.D_b.0.delta", "conv1d.parametrizations.weight.0.delta",
         "conv1d_b.parametrizations.weight.0.delta", "dt_proj.parametrizations.bias.0.delta",
         "dt_proj_b.parametrizations.bias.0.delta")] + ["parametrizations.cls_token.0.delta",
                                                         "parametrizations.pos_embed.0.delta"],
    1: [f"layers.{i}.mixer.{t}" for i in range(2) for t in ("A_log", "A_b_log", "conv1d.weight", "conv1d_b.weight")],
    2: [f"layers.{i}.mixer.{m}.branches.0.{w}.weight" for i in range(2) for m in ("x_proj", "x_proj_b")
        for w in ("down", "up")],
    3: [f"layers.{i}.mixer.{m}.branches.0.{w}.weight" for i in range(2) for m in ("dt_proj", "dt_proj_b", "out_proj")
        for w in ("down", "up")],
    4: ["patch_embed.proj.branches.0.down.weight", "patch_embed.proj.branches.0.up.weight"],
    5: [f"layers.{i}.mixer.{m}.branches.{j}.{w}.weight" for i in range(2)
        for m, n in (("in_proj", 2), ("x_proj", 3), ("x_proj_b", 3)) for j in range(n) for w in ("down", "up")],
    6: [f"layers.{i}.mixer.{m}.branches.{j}.{w}" for i in range(2)
        for m, n in (("in_proj", 1), ("x_proj", 3), ("x_proj_b", 3)) for j in range(n)
        for w in ("down.weight", "up.weight", "m")],
    7: [f"layers.{i}.mixer.out_proj.branches.0.{w}.weight" for i in range(2) for w in ("down", "up")],
}


@pytest.mark.parametrize("case", range(len(CASES)))
def test_identity_at_init_and_gradients_only_on_the_method(case):
    method, options = CASES[case]
    model, x = tiny(method, **options), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
        assert_close(out, plain()(x), 1e-6)  # zero-init deltas / up matrices; DoRA's m V / ||V|| = W up to rounding
        if options.get("delta", True):  # delta=False trains the backbone's own tensors: nothing to disable
            with disable_adapters(model):
                assert_close(model(x), out, 1e-6)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == sorted(TRAINS[case] + ["head.weight", "head.bias"])
    randomize_trainable(model, std=0.1)
    if options.get("delta", True):
        with torch.no_grad(), disable_adapters(model):  # trained: disabled, the plain backbone (with its head)
            assert_close(model(x), plain(model)(x), 1e-6)
    model(x).square().sum().backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None and p.grad.abs().max() > 0) == p.requires_grad, name


def restated_weights(model, base):
    """The official merged weights of every LoRA / DoRA branch (forward_mamba_peft L65-171), written from their
    formulas on the frozen weights of `base`: rows `out` of W get + s up @ down, or with DoRA become
    m * V / ||V||_dim0 (detached), V = W[out] + s up @ down (DoRAAdapter L640-646)."""
    weights = {}
    for name, module in model.named_modules():
        if not hasattr(module, "slices") or not hasattr(module.base, "weight"):
            continue
        w = base.get_submodule(name).weight
        merged = w
        for out, b in zip(module.slices, module.branches):
            lora = b.s * b.up.weight @ b.down.weight
            if hasattr(b, "m"):
                v = w[out] + lora
                lora = b.m * v / v.norm(p=2, dim=0, keepdim=True).detach() - w[out]
            merged = merged + F.pad(lora, (0, 0, out.start, w.shape[0] - out.stop))
        weights[f"{name}.weight"] = merged
    return weights


@pytest.mark.parametrize("case", [2, 3, 5, 6])
def test_lora_and_lorap_equal_their_merged_weights(case):
    method, options = CASES[case]
    model, x = tiny(method, **options), torch.randn(2, 3, 32, 32)
    randomize_trainable(model, std=0.1)
    base = plain(model)
    out = model(x)
    want = torch.func.functional_call(base, restated_weights(model, base), (x,))
    assert_close(out, want, 1e-5)
    params = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("head")]
    for got, ref in zip(torch.autograd.grad(out.square().sum(), params),
                        torch.autograd.grad(want.square().sum(), params)):
        assert_grads_close(got, ref)


def test_lorap_slices_are_the_official_rows():
    """X = in_proj rows [:d_inner], Z = [d_inner:] (L82-89); d, B, C = x_proj rows [:dt_rank],
    [dt_rank:dt_rank + d_state], [dt_rank + d_state:] (L126-144), on both scan directions."""
    model = tiny("lorap", targets="x+z+dt+B+C", r=2)
    m = model.layers[1].mixer
    assert m.in_proj.slices == [slice(0, 64), slice(64, 128)]
    assert m.x_proj.slices == m.x_proj_b.slices == [slice(0, 2), slice(2, 18), slice(18, 34)]


def test_partial_equals_the_frozen_tensors_plus_their_deltas():
    """A = -exp(A_log + dA), D + dD, conv weight + dW, dt bias + db, cls_token + dc, pos_embed + dp (L92-95,
    L173-185, L260, L415-436): the plain backbone with each tensor replaced by tensor + delta; the gradient of a
    delta is the gradient of its tensor there."""
    model, x = tiny(CASES[0][0], **CASES[0][1]), torch.randn(2, 3, 32, 32)
    randomize_trainable(model, std=0.1)
    base = plain(model)
    deltas = {re.sub(r"parametrizations\.(\w+)\.0\.delta$", r"\1", n): p for n, p in model.named_parameters()
              if ".delta" in n}
    assert len(deltas) == 18
    frozen = {n: base.get_parameter(n).detach().requires_grad_() for n in deltas}
    out = model(x)
    want = torch.func.functional_call(base, {n: frozen[n] + d for n, d in deltas.items()}, (x,))
    assert_close(out, want, 1e-5)
    got = torch.autograd.grad(out.square().sum(), list(deltas.values()))
    ref = torch.autograd.grad(want.square().sum(), list(frozen.values()))
    for g, r in zip(got, ref):
        assert_grads_close(g, r)


def test_lora_on_the_patch_embedding_is_their_conv2d_adapter():
    """proj(x) + s * up_1x1(down_16x16(x)) (forward_patch_embed L585, Conv2dAdapter L648-670: down has the patch
    conv's kernel and stride)."""
    model, x = tiny("lora", targets="patch_embed", r=3, s=0.5), torch.randn(2, 3, 32, 32)
    randomize_trainable(model, std=0.1)
    base = plain(model)
    branch = model.patch_embed.proj.branches[0]
    assert branch.down.weight.shape == (3, 3, 16, 16) and branch.up.weight.shape == (32, 3, 1, 1)
    hook = base.patch_embed.proj.register_forward_hook(
        lambda mod, inp, y: y + 0.5 * F.conv2d(F.conv2d(inp[0], branch.down.weight, stride=16), branch.up.weight))
    out, want = model(x), base(x)
    hook.remove()
    assert_close(out, want, 1e-5)
    params = [branch.down.weight, branch.up.weight]
    for g, r in zip(torch.autograd.grad(out.square().sum(), params), torch.autograd.grad(want.square().sum(), params)):
        assert_grads_close(g, r)


def test_adaptformer_on_vim_is_their_parallel_adapter():
    """out = out_proj(y) + s * up(relu(down(y))), y the two directions' mean scan output (L325-334)."""
    model, x = tiny("adaptformer", width=4, s=0.3), torch.randn(2, 3, 32, 32)
    randomize_trainable(model, std=0.1)
    base = plain(model)
    branches = [layer.mixer.out_proj.branches[0] for layer in model.layers]
    hooks = [layer.mixer.out_proj.register_forward_hook(
        lambda mod, inp, y, b=b: y + 0.3 * F.relu(inp[0] @ b.down.weight.T) @ b.up.weight.T)
        for layer, b in zip(base.layers, branches)]
    out, want = model(x), base(x)
    for h in hooks:
        h.remove()
    assert_close(out, want, 1e-5)
    params = [p for b in branches for p in (b.down.weight, b.up.weight)]
    for g, r in zip(torch.autograd.grad(out.square().sum(), params), torch.autograd.grad(want.square().sum(), params)):
        assert_grads_close(g, r)


@pytest.mark.parametrize("no_decay_1d", [False, True])
def test_partial_weight_decay_multiplier_reaches_the_optimizer(no_decay_1d):
    """Their x10 (A, D, conv1d) / x100 (dt bias) custom_keys override mmengine's 1-d / bias rules: the 1-d D and
    dt-bias deltas decay at wd * wd_mult under the timm no-decay rules too."""
    model = tiny("partial", parts="A+D+dt_bias", wd_mult=10.0).double()  # .to() keeps the tensors' wd_mult
    deltas = {id(p) for n, p in model.named_parameters() if ".delta" in n}
    groups = param_groups(model, 1e-4, no_decay_1d)
    scaled = [g for g in groups if any(id(p) in deltas for p in g["params"])]
    assert len(scaled) == 1 and {id(p) for p in scaled[0]["params"]} == deltas and len(deltas) == 12
    assert scaled[0]["weight_decay"] == pytest.approx(1e-3)
    head = {id(model.head.weight), id(model.head.bias)}
    head = [g["weight_decay"] for g in groups if head & {id(p) for p in g["params"]}]
    assert head == ([1e-4] if not no_decay_1d else [0.0, 1e-4])
    optimizer = make_optimizer(model, Recipe(weight_decay=1e-4, no_decay_1d=no_decay_1d))
    assert sorted(g["weight_decay"] for g in optimizer.param_groups) == sorted(g["weight_decay"] for g in groups)


@pytest.mark.parametrize("case", range(len(CASES)))
def test_build_and_load_model_round_trip(case, tmp_path):
    method, options = CASES[case]
    model, x = tiny(method, seed=3, **options), torch.randn(2, 3, 32, 32)
    randomize_trainable(model, std=0.1)
    save_adapter(model, tmp_path / "a.safetensors")
    loaded = load_model(tmp_path / "a.safetensors")
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


@pytest.mark.parametrize("backbone,method,options,message", [
    ("vim-s", "partial", {"parts": "A+E"}, r"partial parts must be distinct names among \['A', 'D'"),
    ("vim-s", "partial", {"wd_mult": -1.0}, r"partial wd_mult must be >= 0.0"),
    ("vim-s", "lorap", {"targets": "x+q"}, r"lorap targets must be distinct names among \['x', 'z'"),
    ("vim-s", "lorap", {"targets": "x+x"}, r"lorap targets must be distinct"),
])
def test_bad_options_are_one_error_before_building(backbone, method, options, message):
    with pytest.raises(OptionError, match=message):
        make_config(method, options, backbone)


def test_a_bad_option_on_the_command_line_is_one_error_line(tmp_path, capsys):
    from vtab_lily import run as run_cli
    code = run_cli.main(["--backbone", "vim-mini", "--task", "digits", "--method", "partial", "--set", "parts=A+E",
                         "--data-root", str(tmp_path / "absent"), "--runs", str(tmp_path / "runs"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: partial parts must be distinct") and err.count("\n") == 1
    assert not (tmp_path / "runs").exists()


def test_a_site_the_backbone_lacks_is_one_error():
    with pytest.raises(UnknownName, match="partial part 'A' is not a tensor of vit-tiny"):
        build_model("vit-tiny", "partial", 5, pretrained=False, parts="A")
    with pytest.raises(UnknownName, match=r"lora cannot adapt 'norm_f' \(OutputSite\).*\['patch_embed'\]"):
        tiny("lora", targets="norm_f")
