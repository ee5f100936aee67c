"""ViT methods of issue 23 (part a): RepAdapter, LN-tune, ConvPass, Adapter+.

Per method: the parameter count on ViT-B/16 (the official code's, derived in a comment), identity at
initialisation where the official init gives it, gradients only where they belong, equality with the official
forward restated here on the naive ViT of test_classic (float64, outputs and gradients, the zero-init tensors
perturbed), the official defaults pinned with the file and line they come from; RepAdapter's merged form.
"""
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, randomize_trainable, tiny
from test_classic import check_naive, plain_vit, trained_and_reloaded

from vtab_lily import build_model, count_params, disable_adapters
from vtab_lily.adapters import repadapter
from vtab_lily.errors import UserError
from vtab_lily.recipes import ADAPTER_PLUS, CONVPASS, LNTUNE_RECIPE, REPADAPTER_SCALE, recipe_for
from vtab_lily.rows import PRESETS
from vtab_lily.tables import TABLES
from vtab_lily.tasks import VTAB_TASKS

# ---------------------------------------------------------------- the official forwards, restated

def repadapter_edit(model):
    """luogen1996/RepAdapter repadapter.py L168-172: x + scale * conv_B(dropout(conv_A(x))) over channels, conv_B
    a 1x1 Conv1d with groups=2 (L159), on the outputs of norm1 and norm2 (L21-24)."""
    def out(name, layer, y):
        if name not in ("norm1", "norm2"):
            return y
        a = getattr(model.blocks[layer], name).branches[0]
        x = y.transpose(1, 2)
        h = F.conv1d(x, a.down.weight.unsqueeze(-1), a.down.bias)
        h = F.conv1d(h, a.up.weight.unsqueeze(-1), a.up.bias, groups=a.up.groups)
        return (h * a.s + x).transpose(1, 2)
    return dict(out=out)


def lntune_edit(model):
    return dict(params={n: p for n, p in model.named_parameters() if ".norm" in n or n.startswith("norm.")})


def quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


def convpass_official(a, x, side):
    """PETL-ViT convpass/vtab/convpass.py L129-149 on a side x side grid (the official fixes 14 x 14), times s."""
    b = len(x)
    down = quick_gelu(F.linear(x, a.down.weight, a.down.bias))
    patch = down[:, 1:].reshape(b, side, side, -1).permute(0, 3, 1, 2)
    patch = F.conv2d(patch, a.conv.weight, a.conv.bias, stride=1, padding=1)
    patch = patch.permute(0, 2, 3, 1).reshape(b, side * side, -1)
    cls = down[:, :1].reshape(b, 1, 1, -1).permute(0, 3, 1, 2)
    cls = F.conv2d(cls, a.conv.weight, a.conv.bias, stride=1, padding=1).permute(0, 2, 3, 1).reshape(b, 1, -1)
    return F.linear(quick_gelu(torch.cat([cls, patch], dim=1)), a.up.weight, a.up.bias) * a.s


def convpass_edit(model, side=4):
    """L7-10: x + attn(norm1(x)) + convpass(norm1(x)) * s, the same with the MLP (eval: no drop_path)."""
    normed = {}

    def out(name, layer, y):
        if name in ("norm1", "norm2"):
            normed[name] = y
        elif name in ("attn_out", "mlp_out"):
            block = model.blocks[layer]
            bypass = block.attn if name == "attn_out" else block.mlp
            if hasattr(bypass, "branches"):  # placement "attn": a plain MLP
                return y + convpass_official(bypass.branches[0], normed["norm1" if name == "attn_out" else "norm2"],
                                             side)
        return y
    return dict(out=out)


def adapterplus_edit(model):
    """adapter_plus/vit_adapter.py L269-273 forward_post: x = adapter(x, skip=x) after each block, the adapter
    L91-102: scaling * bottleneck(x) + skip (no norm_a, eval: no drop_path)."""
    def tokens(layer, h):
        if layer == 0:
            return h
        a = model.blocks[layer - 1].branches[0]
        z = F.gelu(F.linear(h, a.down.weight, a.down.bias))
        return F.linear(z, a.up.weight, a.up.bias) * a.scaling + h
    return dict(tokens=tokens)


NAIVE = [("repadapter", dict(s=0.7), repadapter_edit), ("repadapter", dict(width=8, groups=4), repadapter_edit),
         ("lntune", {}, lntune_edit), ("convpass", dict(s=0.5), convpass_edit),
         ("convpass", dict(xavier_init=True, placement="attn", width=4), convpass_edit),
         ("adapterplus", {}, adapterplus_edit), ("adapterplus", dict(width=3), adapterplus_edit)]


@pytest.mark.parametrize("method,options,edit", NAIVE, ids=lambda v: v if isinstance(v, str) else None)
def test_equals_the_official_forward_outputs_and_gradients(method, options, edit, images):
    check_naive(method, options, edit, images)


# ---------------------------------------------------------------- parameter counts on ViT-B/16

@pytest.mark.slow
@pytest.mark.parametrize("method,options,expected", [
    # per adapter: down 768 * 8 + 8, grouped up 768 * (8 / 2) + 768 = 9,992; 2 per layer, 12 layers: 239,808
    ("repadapter", {}, 239_808),
    ("repadapter", dict(placement="attn"), 119_904),  # repattn: 1 per layer, 12 x 9,992
    ("lntune", {}, 38_400),  # norm1 and norm2 of 12 blocks and the final norm: 25 x (768 + 768)
    # per bypass: down 768 * 8 + 8, conv 8 * 8 * 3 * 3 + 8, up 8 * 768 + 768 = 13,648; 2 per layer, 12 layers
    ("convpass", {}, 327_552),
    ("convpass", dict(placement="attn"), 163_776),
    # down 768 * 8 + 8, up 8 * 768 + 768, channel scaling 768 = 13,832 per layer, 12 layers
    ("adapterplus", {}, 165_984),
    ("adapterplus", dict(width=32), 12 * (768 * 32 + 32 + 32 * 768 + 768 + 768)),  # their dim-32 rows: 609,024
])
def test_parameter_counts_on_vit_b(method, options, expected):
    assert count_params(build_model("vit-b", method, 100, pretrained=False, **options)) == expected


def test_v_petl_benchs_repadapter_figure_counts_the_weights_alone():
    """V-PETL Bench's README prints RepAdapter at 0.22M: its weights without the biases."""
    model = build_model("vit-b", "repadapter", 100, pretrained=False)
    weights = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and n.endswith("weight")
                  and not n.startswith("head."))
    assert weights == 2 * 12 * (768 * 8 + 768 * 4) == 221_184 and round(weights / 1e6, 2) == 0.22


# ---------------------------------------------------------------- identity at init, gradients, save / load

@pytest.mark.parametrize("method,options", [("repadapter", {}), ("repadapter", dict(placement="attn")),
                                            ("lntune", {}), ("convpass", {}), ("convpass", dict(xavier_init=True))])
def test_identity_at_initialisation(method, options, images):
    """RepAdapter's up projection is zero (repadapter.py L166-167), ConvPass's too (convpass.py L122-123); LN-tune
    starts at the pretrained norms."""
    with torch.no_grad():
        assert_close(tiny(method, **options).eval()(images), plain_vit()(images), 1e-6)


@pytest.mark.parametrize("method,options,trained", [
    ("repadapter", {}, {f"blocks.{i}.{n}.branches.0.{p}" for i in range(4) for n in ("norm1", "norm2")
                        for p in ("down.weight", "down.bias", "up.weight", "up.bias")}),
    ("repadapter", dict(placement="attn"), {f"blocks.{i}.norm1.branches.0.{p}" for i in range(4)
                                            for p in ("down.weight", "down.bias", "up.weight", "up.bias")}),
    ("lntune", {}, {f"blocks.{i}.{n}.{p}" for i in range(4) for n in ("norm1", "norm2") for p in ("weight", "bias")}
     | {"norm.weight", "norm.bias"}),
    ("convpass", {}, {f"blocks.{i}.{n}.branches.0.{m}.{p}" for i in range(4) for n in ("attn", "mlp")
                      for m in ("down", "conv", "up") for p in ("weight", "bias")}),
    ("adapterplus", {}, {f"blocks.{i}.branches.0.{p}" for i in range(4)
                         for p in ("down.weight", "down.bias", "up.weight", "up.bias", "scaling")}),
])
def test_gradients_only_where_they_belong_and_save_load(method, options, trained, images, tmp_path):
    assert trained_and_reloaded(method, options, images, tmp_path) == trained | {"head.weight", "head.bias"}


# ---------------------------------------------------------------- RepAdapter's merged form

@pytest.mark.parametrize("options", [{}, dict(placement="attn"), dict(groups=4, s=3.0)])
def test_repadapter_merged_form_equals_the_unmerged_model(options, images):
    model = tiny("repadapter", **options).eval()
    randomize_trainable(model, std=0.3)
    with torch.no_grad():
        before = model(images)
        assert repadapter.merge(model) == 4 * (1 if options.get("placement") == "attn" else 2)
        assert count_params(model) == 0 and not any("branches" in n for n, _ in model.named_modules())
        assert all(type(b.norm1).__name__ == "LayerNorm" and type(b.norm2).__name__ == "LayerNorm"
                   for b in model.blocks)
        assert_close(model(images), before, 1e-5)


def test_repadapter_merge_leaves_an_adapter_whose_reader_another_method_adapts(images):
    """repadapter+lora: LoRA's branches on qkv read the adapted norm1 output, so norm1's adapter stays; norm2's
    (read by the plain fc1) is merged."""
    torch.manual_seed(0)
    model = build_model("vit-tiny", "repadapter+lora", 5, pretrained=False,
                        backbone_options=dict(img_size=32, patch_size=8)).eval()
    randomize_trainable(model, std=0.3)
    with torch.no_grad():
        before = model(images)
        assert repadapter.merge(model) == 4
        assert all(type(b.norm1).__name__ == "Adapted" and type(b.norm2).__name__ == "LayerNorm"
                   for b in model.blocks)
        assert_close(model(images), before, 1e-5)


def test_user_mistakes_are_one_clear_error():
    with pytest.raises(UserError, match="groups .3. must divide its width .8."):
        tiny("repadapter", groups=3)
    with pytest.raises(UserError, match="placement must be one of"):
        tiny("convpass", placement="mlp")
    for method in ("repadapter", "convpass", "adapterplus"):  # ViT sites only
        with pytest.raises(UserError, match="unknown adapter site|token-sequence site"):
            build_model("vim-tiny-test", method, 5, pretrained=False)
    assert repadapter.merge(tiny("lora")) == 0  # nothing of RepAdapter's to merge


# ---------------------------------------------------------------- official defaults

def test_repadapter_defaults_are_the_official_ones():
    model = tiny("repadapter")
    a = model.blocks[0].norm1.branches[0]
    assert a.down.out_features == 8  # train.py L79 --dim 8
    assert a.up.groups == 2 and a.up.weight.shape == (64, 4)  # repadapter.py L154 groups=2, L159 conv_B
    assert a.s == 1.0  # repadapter.py L155 scale=1
    assert a.dropout.p == 0.1  # repadapter.py L160
    assert a.up.weight.abs().max() == 0 and a.up.bias.abs().max() == 0  # L166-167 zeros_
    assert a.down.bias.abs().max() == 0  # L165
    bound = (6 / (64 + 8)) ** 0.5  # L164 xavier_uniform_ of conv_A (fan_in 64, fan_out 8)
    assert 0.9 * bound < a.down.weight.abs().max() <= bound
    assert model.peft_config["options"]["placement"] == "block"  # train.py L77 --method repblock
    # configs/repblock/<task>.yaml `scale`, in VTAB_TASKS order
    assert [REPADAPTER_SCALE[t] for t in VTAB_TASKS] == [0.1, 5, 1, 0.5, 0.1, 10, 0.1, 1, 1, 5, 0.1, 0.5, 0.1, 5, 5,
                                                         5, 0.1, 10, 1]


def test_repadapter_train_mode_dropout_is_between_down_and_up():
    a = tiny("repadapter").blocks[0].norm1.branches[0].train()
    randomize_trainable(a, std=0.3)
    y = torch.randn(2, 5, 64)
    torch.manual_seed(4)
    got = a(y)
    torch.manual_seed(4)
    want = a.up(F.dropout(a.down(y), 0.1, training=True)) * a.s
    assert_close(got, want, 1e-6)


def test_lntune_recipe_is_v_petl_benchs():
    """V-PETL Bench ImageClassification/scripts/run_vit_lntune.sh L16-52 (--lr, --wd per task)."""
    assert LNTUNE_RECIPE["lr"]["cifar100"] == 0.008 and LNTUNE_RECIPE["weight_decay"]["cifar100"] == 0.01  # L16
    assert LNTUNE_RECIPE["lr"]["pets"] == 0.0007 and LNTUNE_RECIPE["weight_decay"]["pets"] == 0.8
    assert LNTUNE_RECIPE["lr"]["smallnorb_ele"] == 0.0011 and LNTUNE_RECIPE["weight_decay"]["smallnorb_ele"] == 5e-4
    assert LNTUNE_RECIPE["normalize"] is True  # dataloader/vtab.py L74 Normalize(ImageNet mean / std)


def test_lntune_cannot_be_disabled_and_trains_vims_rmsnorms():
    """LN-tune trains the backbone's own norms, so the model is its own merged form; on Vim the RMSNorms train."""
    vim = build_model("vim-tiny-test", "lntune", 5, pretrained=False)
    names = {n for n, p in vim.named_parameters() if p.requires_grad} - {"head.weight", "head.bias"}
    assert names and all(n.split(".")[-2] in ("norm", "norm_f") and n.endswith("weight") for n in names)
    model = tiny("lntune")
    with disable_adapters(model):
        assert sum(p.requires_grad for p in model.parameters()) == 2 * (4 * 2 + 1) + 2


def test_convpass_defaults_are_the_official_ones():
    a = tiny("convpass").blocks[0].attn.branches[0]
    assert a.down.out_features == 8 and a.conv.kernel_size == (3, 3)  # train.py L69 dim=8; convpass.py L110
    assert a.conv.stride == (1, 1) and a.conv.padding == (1, 1)  # L110 Conv2d(dim, dim, 3, 1, 1)
    assert a.s == 1.0 and a.dropout.p == 0.1  # L188 s=1; L126 Dropout(0.1)
    centre = torch.zeros(8, 8, 3, 3)
    centre[:, :, 1, 1] = torch.eye(8)
    assert torch.equal(a.conv.weight, centre) and a.conv.bias.abs().max() == 0  # L113-116 (xavier_init=False, L107)
    assert a.up.weight.abs().max() == 0 and a.up.bias.abs().max() == 0 and a.down.bias.abs().max() == 0  # L120-123
    bound = (6 / (64 + 8)) ** 0.5  # L120 xavier_uniform_ of adapter_down
    assert 0.9 * bound < a.down.weight.abs().max() <= bound
    conv = tiny("convpass", xavier_init=True).blocks[0].attn.branches[0].conv.weight  # L112
    bound = (6 / (72 + 72)) ** 0.5  # fan_in = fan_out = 8 * 3 * 3
    assert 0.9 * bound < conv.abs().max() <= bound and conv[:, :, 0, 0].abs().max() > 0
    # configs/convpass/<task>.yaml (scale, xavier_init) in VTAB_TASKS order
    assert [CONVPASS["s"][t] for t in VTAB_TASKS] == [0.1, 1, 0.01, 0.1, 1, 100, 0.1, 10, 10, 10, 1, 1, 0.1, 10, 10,
                                                      100, 0.1, 100, 1]
    assert [t for t in VTAB_TASKS if CONVPASS["xavier_init"][t]] == [
        "dtd", "flowers102", "pets", "svhn", "clevr_dist", "kitti", "dsprites_loc", "dsprites_ori", "smallnorb_azi",
        "smallnorb_ele"]
    assert CONVPASS["normalize"] is True  # vtab.py L55


def test_convpass_reads_the_grid_and_the_prefix_tokens_from_the_backbone():
    """A 6 x 6 grid (48 px, patch 8) with the class token and 4 registers: the patches run through the 3x3 conv on
    their grid, each prefix token alone as a 1x1 image (only the kernel's centre and the bias read it)."""
    torch.manual_seed(0)
    model = build_model("vit-tiny", "convpass", 5, pretrained=False,
                        backbone_options=dict(img_size=48, patch_size=8, reg_tokens=4))
    a = model.blocks[1].mlp.branches[0].eval()
    assert a.prefix == 5
    randomize_trainable(a, std=0.3)
    x = torch.randn(2, 5 + 36, 64)
    h = quick_gelu(a.down(x))
    grid = F.conv2d(h[:, 5:].reshape(2, 6, 6, 8).permute(0, 3, 1, 2), a.conv.weight, a.conv.bias, padding=1)
    prefix = h[:, :5] @ a.conv.weight[:, :, 1, 1].T + a.conv.bias
    want = a.up(quick_gelu(torch.cat([prefix, grid.permute(0, 2, 3, 1).reshape(2, 36, 8)], 1))) * a.s
    with torch.no_grad():
        assert_close(a(x), want, 1e-6)
        model.eval()(torch.randn(1, 3, 48, 48))  # the whole model runs on its grid


def test_adapterplus_defaults_are_the_official_ones_and_not_an_identity(images):
    torch.manual_seed(0)
    model = tiny("adapterplus").eval()
    a = model.blocks[0].branches[0]
    assert a.down.out_features == 8  # conf/adapter/base_adapter.yaml L6 dim: 8
    assert torch.equal(a.scaling, torch.ones(64))  # adapter_plus.yaml L5 scaling: channel; vit_adapter.py L46-47
    assert a.drop_path.drop_prob == 0.1  # base_adapter.yaml L9 drop_path: 0.1
    assert isinstance(a.act, torch.nn.GELU)  # base_adapter.yaml L1 act_layer: true (the ViT's nn.GELU)
    assert not any(isinstance(m, (torch.nn.LayerNorm, torch.nn.Dropout)) for m in a.modules())  # L2, L8
    # init: houlsby (L4): vit_adapter.py L52-63, trunc_normal std 0.01 cut at +-0.02, zero biases
    w = torch.cat([b.branches[0].get_submodule(n).weight.flatten() for b in model.blocks for n in ("down", "up")])
    assert w.abs().max() <= 0.02 and 0.005 < w.std() < 0.01
    assert a.down.bias.abs().max() == 0 and a.up.bias.abs().max() == 0
    with torch.no_grad():  # the up projection is not zero: the logits move at initialisation
        base = plain_vit()(images)
        assert (model(images) - base).abs().max() > 1e-4
        with disable_adapters(model):
            assert_close(model(images), base, 1e-6)
    # the recipe: conf/train/default.yaml L3-4 lr_factor 1000, lr_start_factor 100; adamw.yaml L2-3;
    # adaptermodel.py L159-177 no decay on 1-d tensors, biases and scalings; data/vtab.py L43-44 ImageNet mean / std
    assert ADAPTER_PLUS == {"warmup_lr_init": 1e-5, "lr_min": 1e-6, "no_decay_1d": True, "normalize": True}
    recipe = recipe_for("vit-b", **ADAPTER_PLUS)
    assert (recipe.lr, recipe.weight_decay, recipe.epochs, recipe.warmup_epochs, recipe.batch_size,
            recipe.drop_path) == (1e-3, 1e-4, 100, 10, 64, 0.1)


def test_adapterplus_drop_path_is_on_the_adapter_alone():
    """In training a whole sample's adapter output is dropped (vit_adapter.py L95: drop_path_a on the bottleneck),
    scaled by 1 / (1 - p) where kept."""
    a = tiny("adapterplus", drop_path=0.5).blocks[0].branches[0].train()
    y = torch.randn(64, 3, 64)
    torch.manual_seed(0)
    out = a(y)
    with torch.no_grad():
        full = a.up(a.act(a.down(y))) * a.scaling
    dropped = out.flatten(1).abs().amax(1) == 0
    assert 10 < dropped.sum() < 54
    assert_close(out[~dropped], 2 * full[~dropped], 1e-6)


# ---------------------------------------------------------------- analysis figures

@pytest.mark.parametrize("method", ["repadapter", "convpass", "adapterplus"])
def test_attention_maps_see_through_the_wrappers_of_blocks_and_attention(method, images):
    """analysis.attention reads each block's attention under the methods' wrappers (ConvPass wraps attention,
    Adapter+ the block): with the adapters disabled the maps are the plain backbone's."""
    from analysis.attention import cls_attention
    model = tiny(method).eval()
    randomize_trainable(model, std=0.3)
    maps = cls_attention(model, images)
    assert maps.shape == (4, 3, 4, 4)
    with disable_adapters(model):
        assert_close(cls_attention(model, images), cls_attention(plain_vit(), images), 1e-6)
    assert (maps - cls_attention(plain_vit(), images)).abs().max() > 1e-4  # enabled, they move the maps


# ---------------------------------------------------------------- the mini benchmark's rows

def test_the_mini_preset_and_table_have_the_rows():
    mine = ["repadapter", "lntune", "convpass", "adapterplus"]
    assert [r[1] for r in PRESETS["mini"] if r[0] == "vit-mini" and r[1] in mine] == mine
    assert [r.label for r in TABLES["mini"] if r.backbone == "vit-mini" and r.method in mine] == mine
