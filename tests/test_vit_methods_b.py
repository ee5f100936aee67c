"""ViT methods of V-PETL Bench (issue 23, part b): Hydra, SCT, DTL, GPS.

Per method: the parameter count on ViT-B/16 (derived in a comment from the official code), identity at init where
the official init makes it, gradients only on the method's tensors, equality with a restatement of the official
forward on a tiny ViT (float64, outputs and gradients, after perturbing the zero-init tensors), the official
defaults pinned (file and line named), and for the pre-pass methods (SCT, GPS) the selection computed from the
data as the official code does, recorded and reloaded. The run / sweep / load_model flow is in test_flows.py.
"""
import pytest
import torch
import torch.nn.functional as F
from helpers import TINY, assert_close, randomize_trainable

from backbones import create_backbone
from vtab_lily import build_model, count_params, disable_adapters, load_model, save_adapter
from vtab_lily.adapters.base import FROM_FILE, NeedsTrainingData, TrainingData

G = torch.Generator


def plain(seed=0):
    torch.manual_seed(seed)
    return create_backbone("vit-tiny", 5, pretrained=False, **TINY).eval()


def tiny(method, seed=0, data=None, **options):
    return build_model("vit-tiny", method, 5, pretrained=False, backbone_options=TINY, seed=seed, data=data,
                       **options)


def toy_data(n=24, seed=5, classes=5):
    """A training split of n random 32 px images and labels, in batches as run's TrainingData gives them."""
    x = torch.randn(n, 3, 32, 32, generator=G().manual_seed(seed))
    y = torch.arange(n) % classes

    def batches(batch_size, shuffle):
        order = torch.randperm(n, generator=G().manual_seed(seed)) if shuffle else torch.arange(n)
        for i in range(0, n, batch_size):
            yield x[order[i:i + batch_size]], y[order[i:i + batch_size]]
    return TrainingData(batches, seed), x, y


def reference_vit(m, images, P=None, linear=None, after_attn=None, before_block=None, weight=None):
    """The ViT forward written out op by op from the plain backbone's tensors (eval mode), with the edits the
    official codes make: linear(name, layer, x, y) -> y' (x the Linear's input, y its output), after_attn(layer, h)
    -> h' (the stream after the attention's residual sum), before_block(layer, h) -> h' (also called with
    layer = depth after the last block), weight(name) -> a tensor replacing a weight or bias by its name."""
    P = {**dict(m.named_parameters()), **(P or {})}
    linear = linear or (lambda name, i, x, y: y)
    after_attn = after_attn or (lambda i, h: h)
    before_block = before_block or (lambda i, h: h)
    weight = weight or (lambda name: P[name])
    d, heads, depth = m.embed_dim, m.blocks[0].attn.num_heads, len(m.blocks)

    def lin(name, i, x):
        w, b = weight(f"blocks.{i}.{name}.weight"), weight(f"blocks.{i}.{name}.bias")
        return linear(name.split(".")[-1], i, x, x @ w.T + b)

    def norm(prefix, x):
        return F.layer_norm(x, (d,), P[f"{prefix}.weight"], P[f"{prefix}.bias"], m.norm.eps)

    patch = m.patch_embed.patch_size
    h = F.conv2d(images, weight("patch_embed.proj.weight"), weight("patch_embed.proj.bias"), stride=patch)
    h = h.flatten(2).mT
    h = torch.cat([P["cls_token"].expand(len(h), -1, -1), h], 1) + P["pos_embed"]
    for i in range(depth):
        h = before_block(i, h)
        b, n, _ = h.shape
        qkv = lin("attn.qkv", i, norm(f"blocks.{i}.norm1", h))
        q, k, v = qkv.view(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        att = (torch.softmax(q @ k.mT * (d // heads) ** -0.5, -1) @ v).transpose(1, 2).reshape(b, n, d)
        h = after_attn(i, h + lin("attn.proj", i, att))
        h = h + lin("mlp.fc2", i, F.gelu(lin("mlp.fc1", i, norm(f"blocks.{i}.norm2", h))))
    h = norm("norm", before_block(depth, h))
    return h[:, 0] @ P["head.weight"].T + P["head.bias"]


def check_parity(model, images, **edits):
    """Outputs and gradients of `model` equal the reference forward with `edits`, float64, to 1e-9."""
    model = model.eval().double()
    images = images.double()
    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.randn(len(images), 5, generator=G().manual_seed(3), dtype=torch.float64)
    got = model(images)
    want = reference_vit(plain().double(), images, P={"head.weight": model.head.weight, "head.bias": model.head.bias},
                         **edits)
    assert_close(got, want, 1e-9)
    for a, b in zip(torch.autograd.grad((got * g).sum(), params), torch.autograd.grad((want * g).sum(), params)):
        assert_close(a, b, 1e-9)


def trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad and not n.startswith("head.")}


# ---------------------------------------------------------------- Hydra

def hydra_layer(branch, x):
    """Hydra_layer.forward (extremebird/Hydra vtab1k/hydra.py L59-61) in eval mode: up(down(x)) * scale."""
    return (x @ branch.down.weight.T + branch.down.bias) @ branch.up.weight.T * branch.s + branch.up.bias * branch.s


def hydra_edits(model):
    """forward_vit_hydra_attn / _ffn (hydra.py L8-41): out = W x + b + par(x) + seq(W x + b)."""
    blocks = model.blocks
    par = {"proj": lambda i: blocks[i].attn.proj_drop.branches[0], "fc2": lambda i: blocks[i].mlp.drop2.branches[0]}
    seq = {"proj": lambda i: blocks[i].attn.proj.branches[0], "fc2": lambda i: blocks[i].mlp.fc2.branches[0]}

    def linear(name, i, x, y):
        return y + hydra_layer(par[name](i), x) + hydra_layer(seq[name](i), y) if name in par else y
    return dict(linear=linear)


@pytest.mark.slow
def test_hydra_parameter_count_on_vit_b():
    # per block (hydra.py L81-84, Hydra_layer with biases): attn par + seq 2 x (768*2 + 2 + 2*768 + 768) = 7,684;
    # mlp par 3072*2 + 2 + 2*768 + 768 = 8,450; mlp seq 768*2 + 2 + 2*768 + 768 = 3,842 -> 19,976 x 12 = 239,712
    assert count_params(build_model("vit-b", "hydra", 100, pretrained=False)) == 239_712
    assert count_params(build_model("vit-b", "hydra", 100, pretrained=False, r=8)) == 12 * (
        2 * (768 * 8 + 8 + 8 * 768 + 768) + (3072 * 8 + 8 + 8 * 768 + 768) + (768 * 8 + 8 + 8 * 768 + 768))


def test_hydra_is_the_backbone_at_init_and_trains_only_its_branches(images):
    model = tiny("hydra").eval()
    with torch.no_grad():
        assert_close(model(images), plain()(images), 1e-6)
    names = trainable(model)
    assert len(names) == 4 * 4 * 4 and all(".branches.0." in n for n in names)  # 4 blocks x 4 branches x 4 tensors
    assert {n.split(".branches")[0] for n in names} == {f"blocks.{i}.{m}" for i in range(4) for m in (
        "attn.proj", "attn.proj_drop", "mlp.fc2", "mlp.drop2")}


def test_hydra_equals_the_official_forward(images):
    model = tiny("hydra", r=3, s=1.7)
    randomize_trainable(model, std=0.2)
    check_parity(model, images, **hydra_edits(model))


def test_hydra_defaults_are_the_official_ones():
    from vtab_lily.recipes import HYDRA
    model = tiny("hydra")
    branch = model.blocks[0].mlp.drop2.branches[0]
    # train_hydra.sh L5 dim=2; scale and dropout: the most common values of configs/hydra_both/<task>.yaml
    assert (branch.down.out_features, branch.s, branch.dropout.p) == (2, 0.1, 0.2)
    assert branch.down.bias.abs().max() == 0 and branch.up.weight.abs().max() == 0 and branch.up.bias.abs().max() == 0
    bound = (6 / (256 + 2)) ** 0.5  # xavier_uniform_ of down (hydra.py L54): fc2's input is 4 x 64 wide
    assert 0.8 * bound < branch.down.weight.abs().max() <= bound
    # configs/hydra_both/<task>.yaml: cifar (lr 5e-4, scale 0.1, dropout 0.2, batch 16), caltech101 (1e-3, 4, 0.1, 32),
    # smallnorb_azi (5e-3, wd 1e-5, 3, 0.2, 64)
    keys = ("lr", "weight_decay", "s", "dropout", "batch_size")
    assert [HYDRA[k]["cifar100"] for k in keys] == [5e-4, 1e-4, 0.1, 0.2, 16]
    assert [HYDRA[k]["caltech101"] for k in ("lr", "s", "dropout", "batch_size")] == [1e-3, 4.0, 0.1, 32]
    assert [HYDRA[k]["smallnorb_azi"] for k in ("lr", "weight_decay", "s", "batch_size")] == [5e-3, 1e-5, 3.0, 64]
    assert HYDRA["r"] == 2 and HYDRA["normalize"] is True  # vtab1k/dataset.py L50: ImageNet mean / std


# ---------------------------------------------------------------- SCT

def official_salient_channels(m, data, k):
    """getSalientChannels (zhaohengyuan1/SCT train_model_sct.py L22-111, sct_attn) restated: norm2's inputs without
    the class token, per class the L2 norm over images and tokens, the mean over classes, the channels above the
    (K+1)-th largest value."""
    feats = {i: [] for i in range(len(m.blocks))}
    hooks = [b.norm2.register_forward_pre_hook(lambda mod, a, i=i: feats[i].append(a[0][:, 1:, :].double()))
             for i, b in enumerate(m.blocks)]
    labels = []
    with torch.no_grad():
        for x, y in data.batches(50, False):
            m(x)
            labels.append(y)
    for h in hooks:
        h.remove()
    labels = torch.cat(labels)
    picks = []
    for i in feats:
        f = torch.cat(feats[i])
        fea = torch.stack([torch.linalg.vector_norm(f[labels == c], dim=(0, 1)) for c in labels.unique()]).mean(0)
        threshold = fea.sort().values[len(fea) - 1 - k]
        picks.append(torch.nonzero(fea > threshold).flatten())
    return picks


def sct_edits(model):
    """ChannelAdapter.forward after the attention's residual (vision_transformer_sct.py L305, L343-345)."""
    def after_attn(i, h):
        tuning = model.blocks[i].drop_path1.branches[0].f
        idx = tuning.selection
        h = h.clone()
        h[..., idx] = h[..., idx] + h[..., idx] @ tuning.linear.weight.T + tuning.linear.bias
        return h
    return dict(after_attn=after_attn)


def test_sct_needs_the_training_split_and_counts_on_vit_b():
    with pytest.raises(NeedsTrainingData, match="sct selects its salient channels from the training split"):
        build_model("vit-tiny", "sct", 5, pretrained=False, backbone_options=TINY, k=8)
    # ChannelAdapter (vision_transformer_sct.py L280): Linear(96, 96) per block: 12 x (96*96 + 96) = 111,744
    assert count_params(build_model("vit-b", "sct", 100, pretrained=False, data=FROM_FILE)) == 111_744


def test_sct_selects_the_official_salient_channels_and_records_them():
    data, _, _ = toy_data()
    model = tiny("sct", data=data, k=10)
    want = official_salient_channels(plain(), data, 10)
    got = [b.drop_path1.branches[0].f.selection for b in model.blocks]
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert len({tuple(g.tolist()) for g in got}) > 1  # the blocks choose different channels
    summary = model.prepass["sct"]
    assert summary["count"] == 4 * 10 and summary["k"] == 10 and len(summary["sha256"]) == 64


def test_sct_equals_the_official_forward_and_trains_only_its_linears(images):
    data, _, _ = toy_data()
    model = tiny("sct", data=data, k=12)
    assert trainable(model) == {f"blocks.{i}.drop_path1.branches.0.f.linear.{t}" for i in range(4)
                                for t in ("weight", "bias")}
    with torch.no_grad():  # trunc_normal(.02) weights: not the backbone at init, which disabling restores
        assert (model.eval()(images) - plain()(images)).abs().max() > 1e-4
        with disable_adapters(model):
            assert_close(model(images), plain()(images), 1e-6)
    randomize_trainable(model, std=0.2)
    check_parity(model, images, **sct_edits(model))


def test_sct_reloads_its_selection_from_the_adapter_file(tmp_path, images):
    data, _, _ = toy_data()
    model = tiny("sct", seed=0, data=data, k=8).eval()
    randomize_trainable(model, std=0.1)
    save_adapter(model, tmp_path / "a.safetensors")
    loaded = load_model(tmp_path / "a.safetensors", backbone_options=TINY)
    assert all(torch.equal(a.drop_path1.branches[0].f.selection, b.drop_path1.branches[0].f.selection)
               for a, b in zip(model.blocks, loaded.blocks))
    with torch.no_grad():
        assert_close(loaded(images), model(images), 1e-6)


def test_sct_defaults_are_the_official_ones():
    from vtab_lily.recipes import SCT
    model = build_model("vit-b", "sct", 10, pretrained=False, data=FROM_FILE)
    linear = model.blocks[0].drop_path1.branches[0].f.linear
    assert linear.in_features == 96  # run_model_sct.sh L6 topN=96
    # ChannelAdapter._init_weights (vision_transformer_sct.py L286-290): trunc_normal(std .02), zero bias
    assert linear.bias.abs().max() == 0 and abs(linear.weight.std().item() - 0.02) < 0.002
    # (timm and torch truncate at +-2 absolute, so at std .02 it is a plain normal)
    # run_model_sct.sh L9 (cifar100: --lr 0.013 --wd 1.0), L39 (kitti: 0.0072, 0.0001); vtab.py L74: ImageNet norm
    assert (SCT["lr"]["cifar100"], SCT["weight_decay"]["cifar100"]) == (0.013, 1.0)
    assert (SCT["lr"]["kitti"], SCT["weight_decay"]["kitti"]) == (0.0072, 0.0001)
    assert SCT["k"] == 96 and SCT["normalize"] is True and SCT["batch_size"] == 64


# ---------------------------------------------------------------- DTL

def dtl_edits(model, add_from):
    """VisionTransformer.forward of heekhero/DTL (models/vision_transformer.py L424-444, fusion_size 0): before
    block i, residuals += x @ A_i^T @ B_i^T; after block i in add_after_blocks, x += swish(residuals, beta)."""
    state = {"res": 0}
    csn = model.dtl

    def before_block(i, h):
        if i > add_from:  # after block i - 1
            res = state["res"]
            h = h + res * torch.sigmoid(res * csn.beta)
        if i < len(csn.lowrank):
            state["res"] = state["res"] + h @ csn.lowrank[i].A.T @ csn.lowrank[i].B.T
        return h
    return dict(before_block=before_block)


def test_dtl_parameter_count_on_vit_b():
    # LoRALinear(768, 768, r=2) before each of the 12 blocks (L362): 12 x (2*768 + 768*2) = 36,864
    assert count_params(build_model("vit-b", "dtl", 100, pretrained=False)) == 36_864


@pytest.mark.parametrize("add_from", [None, 1])
def test_dtl_equals_the_official_forward(images, add_from):
    model = tiny("dtl", r=3, beta=2.0, add_from=add_from).eval()
    with torch.no_grad():  # B = 0: the backbone at init
        assert_close(model(images), plain()(images), 1e-6)
    assert trainable(model) == {f"dtl.lowrank.{i}.{t}" for i in range(4) for t in "AB"}
    randomize_trainable(model, std=0.2)
    check_parity(model, images, **dtl_edits(model, 2 if add_from is None else add_from))
    with torch.no_grad(), disable_adapters(model):  # the plain backbone with the trained head
        head = {"head.weight": model.head.weight, "head.bias": model.head.bias}
        assert_close(model(images.double()), reference_vit(plain().double(), images.double(), P=head), 1e-9)


def test_dtl_defaults_are_the_official_ones():
    from vtab_lily.recipes import DTL
    model = build_model("vit-b", "dtl", 10, pretrained=False)
    csn = model.dtl
    # every train_scripts/vit/vtab/<task>/train_dtl.sh: --r 2 --beta 100.0 --lora_before_blocks 0-11
    # --add_after_blocks 6-11; LoRALinear (L59-63): A kaiming_uniform(a = sqrt 5) (bound 1 / sqrt(768)), B zero
    assert len(csn.lowrank) == 12 and csn.lowrank[0].A.shape == (2, 768) and (csn.beta, csn.add_from) == (100.0, 6)
    assert csn.lowrank[5].B.abs().max() == 0 and 0.9 / 768 ** 0.5 < csn.lowrank[5].A.abs().max() <= 1 / 768 ** 0.5
    # cifar_100/train_dtl.sh: --lr 0.0003 --drop_path 0.1; dsprites_loc: 0.01, 0.0; --weight_decay 0.05, batch 32
    assert (DTL["lr"]["cifar100"], DTL["drop_path"]["cifar100"]) == (3e-4, 0.1)
    assert (DTL["lr"]["dsprites_loc"], DTL["drop_path"]["dsprites_loc"]) == (1e-2, 0.0)
    assert (DTL["weight_decay"], DTL["batch_size"], DTL["lr_min"], DTL["warmup_lr_init"]) == (0.05, 32, 1e-8, 1e-7)


# ---------------------------------------------------------------- GPS

def official_gps_masks(m, data, k):
    """calculate_gradient with the cross-entropy loss (FightingFighting/GPS train_gps.py L572-627) and
    prune_by_percentile_gradient_perCell (utils/pruning.py L5-40) restated on named parameters: 0 = trains."""
    for p in m.parameters():
        p.requires_grad_(True)
        p.grad = None
    for x, y in data.batches(32, True):
        if len(y) == 32:
            F.cross_entropy(m(x), y).backward()
    masks = {}
    for name, p in m.named_parameters():
        if "norm" in name or "pos_embed" in name or "cls_token" in name:
            masks[name] = torch.ones_like(p)
        elif "head" in name or "bias" in name:
            masks[name] = torch.zeros_like(p)
        else:
            g = p.grad.reshape(len(p), -1).abs()
            mask = torch.ones_like(g)
            for j in range(k):
                mask[torch.arange(len(g)), g.argsort(1)[:, -(j + 1)]] = 0
            masks[name] = mask.view_as(p)
    return masks


def gps_weight(model):
    """The weight the official masked training gives: the frozen weight plus the trained values on the mask's 0s."""
    def weight(name):
        module = model.get_submodule(name.rsplit(".", 1)[0])
        if name.endswith(".bias"):
            return module.bias
        delta = module.parametrizations.weight[0]
        flat = module.parametrizations.weight.original.reshape(len(delta.values), -1).clone()
        flat[torch.arange(len(flat))[:, None], delta.selection] += delta.values
        return flat.view_as(module.parametrizations.weight.original)
    return dict(weight=weight)


def test_gps_parameter_count_on_vit_b():
    # per output row 1 weight entry (pruning.py L23-28, times_para 1) and every Linear / patch-conv bias (L12):
    # (768 + 12 x (2304 + 768 + 3072 + 768)) x 2 = 167,424
    assert count_params(build_model("vit-b", "gps", 100, pretrained=False, data=FROM_FILE)) == 167_424
    with pytest.raises(NeedsTrainingData, match="gps selects the weights it tunes from the training split"):
        build_model("vit-tiny", "gps", 5, pretrained=False, backbone_options=TINY)


def test_gps_selects_the_official_entries():
    data, _, _ = toy_data(n=70)
    model = tiny("gps", data=data, loss="ce", k=2, drop_path_rate=0.0)  # the pass runs in train mode
    masks = official_gps_masks(plain(), data, 2)
    selected = {n: mask for n, mask in masks.items() if n.endswith(".weight") and "norm" not in n and "head" not in n}
    for name, mask in selected.items():
        delta = model.get_submodule(name.rsplit(".", 1)[0]).parametrizations.weight[0]
        chosen = torch.nonzero(mask.reshape(len(mask), -1) == 0)[:, 1].view(len(mask), 2)
        assert torch.equal(delta.selection, chosen.sort(1).values), name
    assert model.prepass["gps"]["count"] == sum(len(m) * 2 for m in selected.values())


def test_gps_contrastive_pass_is_seeded_and_its_loss_is_supcon():
    from vtab_lily.adapters.gps import sup_con
    data, _, _ = toy_data(n=70)
    first, again = (tiny("gps", data=data).prepass["gps"]["sha256"] for _ in range(2))
    other = tiny("gps", data=TrainingData(data.batches, seed=6)).prepass["gps"]["sha256"]
    assert first == again != other
    # SupConLoss.forward (utils/loss_utils.py L30-97) restated with its masks, contrast_mode 'all'
    feats = torch.randn(6, 2, 8, generator=G().manual_seed(1), dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 2, 1, 1])
    f = F.normalize(feats, dim=2)
    contrast = torch.cat(torch.unbind(f, dim=1), dim=0)
    logits = contrast @ contrast.T / 0.07
    logits = logits - logits.max(1, keepdim=True).values
    mask = torch.eq(labels.view(-1, 1), labels.view(1, -1)).double().repeat(2, 2)
    logits_mask = torch.scatter(torch.ones_like(mask), 1, torch.arange(12).view(-1, 1), 0)
    mask = mask * logits_mask
    log_prob = logits - torch.log((torch.exp(logits) * logits_mask).sum(1, keepdim=True))
    want = (-(0.07 / 0.07) * (mask * log_prob).sum(1) / mask.sum(1)).view(2, 6).mean()
    assert_close(sup_con(feats, labels, 0.07), want, 1e-12)


def test_gps_equals_the_official_masked_model_and_trains_only_its_entries(images, tmp_path):
    data, _, _ = toy_data(n=40)
    model = tiny("gps", data=data, loss="ce").eval()
    with torch.no_grad():
        assert_close(model(images), plain()(images), 1e-6)
    names = trainable(model)
    linears = [f"blocks.{i}.{m}" for i in range(4) for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
    assert names == {f"{m}.{t}" for m in [*linears, "patch_embed.proj"]
                     for t in ("bias", "parametrizations.weight.0.values")}
    randomize_trainable(model, std=0.05)
    save_adapter(model, tmp_path / "a.safetensors")
    with torch.no_grad():
        assert_close(load_model(tmp_path / "a.safetensors", backbone_options=TINY)(images), model(images), 1e-6)
    check_parity(model, images, **gps_weight(model))


def test_gps_defaults_are_the_official_ones():
    from vtab_lily.recipes import GPS
    model = tiny("gps", data=FROM_FILE)
    cfg = model.peft_config["options"]
    # train_gps.sh: --times_para 1, bz=32, --contrastive; SupConLoss(temperature=0.07) (loss_utils.py L9)
    assert (cfg["k"], cfg["prepass_batch"], cfg["loss"], cfg["temperature"]) == (1, 32, "supcon", 0.07)
    # vtab/cifar_100/train_gps.sh: lr 0.01, --opt adam --weight-decay 0, warmup-lr 1e-7, min-lr 1e-8, drop-path 0
    assert (GPS["lr"]["cifar100"], GPS["weight_decay"], GPS["warmup_lr_init"], GPS["lr_min"]) == (0.01, 0.0, 1e-7, 1e-8)
    assert (GPS["batch_size"]["cifar100"], GPS["prepass_batch"]["cifar100"]) == (32, 32)
    assert GPS["drop_path"]["cifar100"] == 0
    assert (GPS["k"]["camelyon"], GPS["batch_size"]["dtd"], GPS["drop_path"]["smallnorb_ele"]) == (2, 16, 0.2)
