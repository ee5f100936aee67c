"""The classic VTAB-1K baselines: VPT, BitFit, SSF, Adapter, FacT.

Parity: each method against a naive ViT forward written here from the plain backbone's weights (outputs
and gradients); exact parameter counts on ViT-B/16 against the papers' VTAB-1K figures; SSF's merge;
FacT's shared tensors stored once; gradients only where they belong; save/load.
"""
import pytest
import torch
import torch.nn.functional as F
from helpers import TINY, assert_close, randomize_trainable, tiny
from safetensors.torch import load_file

from backbones import create_backbone
from vtab_lily import build_model, count_params, disable_adapters, load_adapter, save_adapter, storage_bytes
from vtab_lily.adapters.ssf import merge_ssf

VTAB_CLASSES = [100, 102, 47, 102, 37, 10, 397, 2, 10, 45, 5, 8, 6, 6, 4, 16, 16, 18, 9]  # the 19 tasks' heads


def naive_vit(plain, images, params=None, out=None, weight_delta=None, tokens=None):
    """A ViT forward from the plain backbone's tensors, written out op by op (eval mode).
    params: tensors replacing the plain ones by name; out(name, layer, y): a serial edit after an op;
    weight_delta(name, layer): an increment of a Linear weight; tokens(layer, h): edits the token sequence
    before block `layer` (and once more with layer = depth, after the last block)."""
    P = {**dict(plain.named_parameters()), **(params or {})}
    out = out or (lambda name, layer, y: y)
    weight_delta = weight_delta or (lambda name, layer: 0)
    tokens = tokens or (lambda layer, h: h)
    d, heads, depth = plain.embed_dim, plain.blocks[0].attn.num_heads, len(plain.blocks)
    eps = plain.norm.eps

    def linear(name, layer, x):
        w = P[f"blocks.{layer}.{name}.weight"] + weight_delta(name.split(".")[-1], layer)
        return out(name.split(".")[-1], layer, x @ w.T + P[f"blocks.{layer}.{name}.bias"])

    def norm(prefix, x):
        return F.layer_norm(x, (d,), P[f"{prefix}.weight"], P[f"{prefix}.bias"], eps)

    patch = plain.patch_embed.patch_size
    h = F.conv2d(images, P["patch_embed.proj.weight"], P["patch_embed.proj.bias"], stride=patch).flatten(2).mT
    h = out("patch_embed", None, h)
    h = torch.cat([P["cls_token"].expand(len(h), -1, -1), h], 1) + P["pos_embed"]
    for i in range(depth):
        h = tokens(i, h)
        b, n, _ = h.shape
        qkv = linear("attn.qkv", i, out("norm1", i, norm(f"blocks.{i}.norm1", h)))
        q, k, v = qkv.view(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.mT * (d // heads) ** -0.5, -1) @ v
        h = h + out("attn_out", i, linear("attn.proj", i, att.transpose(1, 2).reshape(b, n, d)))
        g = F.gelu(linear("mlp.fc1", i, out("norm2", i, norm(f"blocks.{i}.norm2", h))))
        h = h + out("mlp_out", i, linear("mlp.fc2", i, g))
    h = out("norm", None, norm("norm", tokens(depth, h)))
    return h[:, 0] @ P["head.weight"].T + P["head.bias"]


def plain_vit(seed=0):
    torch.manual_seed(seed)
    return create_backbone("vit-tiny", 5, pretrained=False, **TINY).eval()


def branch_at(module):
    return module.branches[0]


def ssf_edit(model):
    layer_sites = {"norm1": "norm1", "norm2": "norm2", "qkv": "attn.qkv", "proj": "attn.proj",
                   "fc1": "mlp.fc1", "fc2": "mlp.fc2"}

    def out(name, layer, y):
        if name in ("patch_embed", "norm"):
            ssf = branch_at(getattr(model, name))
        elif name in layer_sites:
            ssf = branch_at(model.blocks[layer].get_submodule(layer_sites[name]))
        else:
            return y
        return y * ssf.scale + ssf.shift
    return dict(out=out)


def adapter_edit(model):
    def out(name, layer, y):
        if name != "mlp_out":
            return y
        a = branch_at(model.blocks[layer].drop_path2)
        z = y @ a.down.weight.T + a.down.bias
        return y + (z * torch.sigmoid(1.702 * z)) @ a.up.weight.T + a.up.bias
    return dict(out=out)


def fact_edit(model):
    """FacT as increments of the weights (the paper's view): per d x d block dW = s V G U, where G is the
    r x r middle factor (FacT-TT: the trained factor; FacT-TK: from core and P, reshaped as the official
    code); fc1's 4 output blocks take G's row blocks, fc2's 4 input blocks its column blocks."""
    fact, s = model.fact, model.peft_config["options"]["s"]
    U, V, r = fact.u.weight, fact.v.weight, fact.r

    def middle(layer, name):
        if fact.kind == "tk":
            col = 12 * layer + {"q": 0, "k": 1, "v": 2, "proj": 3, "fc1": 4, "fc2": 8}[name]
            n = 4 if name in ("fc1", "fc2") else 1
            m = torch.einsum("ijk,kn->ijn", fact.core, fact.p[:, col:col + n]).reshape(r, r * n)
            return m if name == "fc2" else m.T
        site = {"q": "attn.qkv", "k": "attn.qkv", "v": "attn.qkv", "proj": "attn.proj"}.get(name, f"mlp.{name}")
        return model.blocks[layer].get_submodule(site).branches[{"q": 0, "k": 1, "v": 2}.get(name, 0)].factor.weight

    def delta(g):
        return s * V @ g @ U

    def weight_delta(name, layer):
        if name == "qkv":
            return torch.cat([delta(middle(layer, t)) for t in "qkv"])
        g = middle(layer, name)
        if name == "fc1":
            return torch.cat([delta(g[j * r:(j + 1) * r]) for j in range(4)])
        if name == "fc2":
            return torch.cat([delta(g[:, j * r:(j + 1) * r]) for j in range(4)], dim=1)
        return delta(g)
    return dict(weight_delta=weight_delta)


def vpt_edit(model):
    prompts, deep = model.vpt.tokens, model.peft_config["options"]["deep"]
    n = prompts.shape[1]

    def tokens(layer, h):
        if layer == 0:
            return torch.cat([h[:, :1], prompts[0].expand(len(h), -1, -1), h[:, 1:]], 1)
        if layer == len(model.blocks):
            return torch.cat([h[:, :1], h[:, 1 + n:]], 1)
        if deep:
            return torch.cat([h[:, :1], prompts[layer].expand(len(h), -1, -1), h[:, 1 + n:]], 1)
        return h
    return dict(tokens=tokens)


def bitfit_edit(model):
    return dict(params={n: p for n, p in model.named_parameters() if n.endswith(".bias")})


NAIVE = [("vpt", dict(length=3), vpt_edit), ("vpt", dict(length=2, deep=False), vpt_edit),
         ("bitfit", {}, bitfit_edit), ("ssf", {}, ssf_edit), ("adapter", dict(width=4), adapter_edit),
         ("fact", dict(r=4, s=2.0), fact_edit), ("fact", dict(type="tk", r=4, s=0.5), fact_edit)]


def check_naive(method, options, edit, images) -> None:
    """Both sides in float64, every trainable tensor (the zero-init ones included) perturbed: the model's
    outputs and gradients equal naive_vit's with `edit(model)`'s changes, to 1e-9 on any CPU."""
    model = tiny(method, **options).eval().double()
    randomize_trainable(model, std=0.2)
    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.randn(3, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    images = images.double()
    got = model(images)
    kw = edit(model)
    kw["params"] = {**kw.get("params", {}), "head.weight": model.head.weight, "head.bias": model.head.bias}
    want = naive_vit(plain_vit().double(), images, **kw)
    assert_close(got, want, 1e-9)
    grads = torch.autograd.grad((got * g).sum(), params)
    ref = torch.autograd.grad((want * g).sum(), params)
    for a, b in zip(grads, ref):
        assert_close(a, b, 1e-9)


@pytest.mark.parametrize("method,options,edit", NAIVE, ids=lambda v: v if isinstance(v, str) else None)
def test_equals_a_naive_computation_outputs_and_gradients(method, options, edit, images):
    check_naive(method, options, edit, images)


@pytest.mark.parametrize("method,options", [("fact", {}), ("fact", dict(type="tk")), ("adapter", dict(init="zero")),
                                            ("ssf", dict(init="identity")), ("bitfit", {})])
def test_identity_at_initialisation_where_the_official_code_has_it(method, options, images):
    """FacT (V zero) starts as the backbone, BitFit trivially; Adapter with zero up, SSF at scale 1."""
    with torch.no_grad():
        assert_close(tiny(method, **options).eval()(images), plain_vit()(images), 1e-6)


@pytest.mark.parametrize("method,options", [("vpt", {}), ("vpt", dict(deep=False)), ("ssf", {}), ("adapter", {})])
def test_official_initialisations_that_are_not_identities(method, options, images):
    """VPT's prompts take part in attention; SSF starts at N(1, .02) / N(0, .02); NOAH's adapter has a
    trunc_normal(.02) up projection. Each changes the logits at initialisation, and disabling it restores them."""
    model = tiny(method, **options).eval()
    with torch.no_grad():
        base = plain_vit()(images)
        assert (model(images) - base).abs().max() > 1e-3
        with disable_adapters(model):
            assert_close(model(images), base, 1e-6)


def test_vpt_initialisation_and_dropout_follow_the_official_code():
    deep = tiny("vpt", length=5)
    bound = (6 / (3 * 8 * 8 + 64)) ** 0.5  # patch 8 at 32 px, width 64
    assert deep.vpt.tokens.shape == (4, 5, 64) and deep.vpt.tokens.abs().max() <= bound
    assert deep.vpt.tokens.abs().max() > 0.9 * bound
    assert deep.vpt.dropout.p == 0.1 and tiny("vpt", deep=False).vpt.dropout.p == 0.0
    assert tiny("vpt", deep=False).vpt.tokens.shape == (1, 10, 64)


@pytest.mark.slow
@pytest.mark.parametrize("method,options,expected", [
    ("vpt", dict(length=1, deep=False), 768),          # VPT-shallow: p * 768
    ("vpt", dict(length=1), 9_216),                    # VPT-deep: 12 * p * 768
    ("vpt", dict(length=50), 460_800),
    ("bitfit", {}, 102_912),                           # 0.10M (VPT / NOAH / FacT tables)
    ("ssf", {}, 205_824),                              # + head averaged over VTAB = SSF's 0.24M
    ("adapter", {}, 156_768),                          # NOAH's Adapter-8: 0.16M
    ("adapter", dict(placement="houlsby"), 313_536),
    ("fact", dict(r=4), 8_448), ("fact", dict(r=8), 21_504), ("fact", dict(r=16), 61_440),
    ("fact", dict(type="tk", r=16), 30_976), ("fact", dict(type="tk", r=32), 86_528),
])
def test_parameter_counts_on_vit_b(method, options, expected):
    model = build_model("vit-b", method, 100, pretrained=False, **options)
    assert count_params(model) == expected
    assert storage_bytes(model) == 4 * expected


def test_paper_parameter_figures_are_recovered():
    """SSF's 0.24M counts the head averaged over the 19 tasks; FacT's 0.040M / 0.069M are the means over
    its official per-task ranks (FacT/configs)."""
    head = sum(769 * c for c in VTAB_CLASSES) / 19
    assert round((205_824 + head) / 1e6, 2) == 0.24 and round((102_912 + head) / 1e6, 2) == 0.14
    from vtab_lily.recipes import FACT_RANK
    tt = sum(1536 * r + 144 * r * r for r in FACT_RANK["tt"].values()) / 19
    tk = sum(1536 * r + r ** 3 + 144 * r for r in FACT_RANK["tk"].values()) / 19
    assert (round(tt), round(tk)) == (39_734, 68_985)
    assert (round(tt / 1e6, 3), round(tk / 1e6, 3)) == (0.040, 0.069)


def test_vim_bitfit_and_ssf_counts_and_parity():
    """Vim-S: BitFit trains the patch-conv, causal-conv and dt_proj biases (74,112); SSF-style 190,464."""
    assert count_params(build_model("vim-s", "bitfit", 10, pretrained=False)) == 384 + 24 * 4 * 768
    assert count_params(build_model("vim-s", "ssf", 10, pretrained=False)) == 2 * (24 * 3952 + 384)
    torch.manual_seed(0)
    model = build_model("vim-tiny-test", "ssf", 5, pretrained=False).eval()
    randomize_trainable(model, std=0.2)
    torch.manual_seed(0)
    plain = create_backbone("vim-tiny-test", 5, pretrained=False).eval()
    plain.head.load_state_dict(model.head.state_dict())

    def hook(ssf):  # forward hooks: an independent way to scale and shift a module's output
        return lambda module, inputs, y: y * ssf.scale + ssf.shift
    for i, layer in enumerate(plain.layers):
        for name in ("norm", "in_proj", "x_proj", "x_proj_b", "dt_proj", "dt_proj_b", "out_proj"):
            path = name if name == "norm" else f"mixer.{name}"
            layer.get_submodule(path).register_forward_hook(hook(model.layers[i].get_submodule(path).branches[0]))
    plain.norm_f.register_forward_hook(hook(model.norm_f.branches[0]))
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert_close(model(x), plain(x), 1e-5)


def test_vim_bitfit_trains_the_biases_only():
    torch.manual_seed(0)
    model = build_model("vim-tiny-test", "bitfit", 5, pretrained=False)
    model(torch.randn(1, 3, 224, 224)).logsumexp(-1).sum().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {n for n, p in model.named_parameters() if p.requires_grad}
    assert with_grad == {n for n, _ in model.named_parameters() if n.endswith("bias")} | {"head.weight"}
    assert {n.split(".")[-2] for n in with_grad if n.startswith("layers.")} == {
        "conv1d", "conv1d_b", "dt_proj", "dt_proj_b"}


def test_ssf_merged_form_gives_the_same_logits(images):
    model = tiny("ssf").eval()
    randomize_trainable(model, std=0.3)
    with torch.no_grad():
        before = model(images)
        assert merge_ssf(model) == 2 + 4 * 6  # patch embed, final norm, 6 per block
        assert count_params(model) == 0 and not any("branches" in n for n, _ in model.named_parameters())
        assert_close(model(images), before, 1e-5)
    vim = build_model("vim-tiny-test", "ssf", 5, pretrained=False).eval()
    randomize_trainable(vim, std=0.3)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        before = vim(x)
        assert merge_ssf(vim) == 2 * 6  # the Linear sites; RMSNorms (no bias for the shift) keep SSF
        assert_close(vim(x), before, 1e-5)


@pytest.mark.parametrize("kind", ["tt", "tk"])
def test_fact_shared_tensors_are_stored_once(kind, tmp_path, images):
    model = tiny("fact", type=kind, r=4).eval()
    randomize_trainable(model)
    branches = [b for blk in model.blocks for m in (blk.attn.qkv, blk.attn.proj, blk.mlp.fc1, blk.mlp.fc2)
                for b in m.branches]
    assert len(branches) == 4 * 6 and all(b.shared is model.fact for b in branches)
    path = tmp_path / "fact.safetensors"
    save_adapter(model, path)
    keys = sorted(load_file(str(path)))
    shared = ["fact.u.weight", "fact.v.weight"] + (["fact.core", "fact.p"] if kind == "tk" else [])
    assert [k for k in keys if k.startswith("fact.")] == sorted(shared)
    assert not [k for k in model.state_dict() if ".u.weight" in k and not k.startswith("fact.")]
    assert len([k for k in keys if ".factor." in k]) == (4 * 6 if kind == "tt" else 0)
    fresh = tiny("fact", type=kind, r=4).eval()
    load_adapter(fresh, path)
    with torch.no_grad():
        assert torch.equal(fresh(images), model(images))


def trained_and_reloaded(method, options, images, tmp_path) -> set[str]:
    """The parameters a backward pass reaches (checked equal to those that require gradients), after checking
    that the saved adapter, loaded into a fresh model, gives the same outputs."""
    model = tiny(method, **options)
    randomize_trainable(model)
    model(images).logsumexp(-1).sum().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {n for n, p in model.named_parameters() if p.requires_grad}
    model.eval()
    save_adapter(model, tmp_path / "a.safetensors")
    fresh = tiny(method, **options).eval()
    load_adapter(fresh, tmp_path / "a.safetensors")
    with torch.no_grad():
        assert torch.equal(fresh(images), model(images))
    return with_grad


@pytest.mark.parametrize("method,options,owner", [
    ("vpt", {}, ("vpt.",)), ("bitfit", {}, ("bias",)), ("ssf", {}, (".branches.",)),
    ("adapter", {}, (".branches.",)), ("fact", {}, ("fact.", ".branches.")),
    ("fact", dict(type="tk"), ("fact.",))])
def test_gradients_only_where_they_belong_and_save_load(method, options, owner, images, tmp_path):
    with_grad = trained_and_reloaded(method, options, images, tmp_path)
    assert all(n.startswith("head.") or any(o in n for o in owner) for n in with_grad)
    assert any(n.startswith("head.") for n in with_grad) and len(with_grad) > 2
    if method == "bitfit":
        biases = {n for n, _ in tiny(method, **options).named_parameters() if n.endswith(".bias")}
        assert with_grad == biases | {"head.weight"}


def test_vpt_and_fact_refuse_vim_with_one_clear_error():
    with pytest.raises(KeyError, match="vpt needs a token-sequence site"):
        build_model("vim-tiny-test", "vpt", 5, pretrained=False)
    with pytest.raises(KeyError, match="unknown adapter site 'q'"):
        build_model("vim-tiny-test", "fact", 5, pretrained=False)


def test_serial_and_parallel_branches_cannot_share_a_module():
    from backbones import LinearSite
    from vtab_lily.adapters.base import add_branch
    from vtab_lily.adapters.lora import LoRABranch
    site = LinearSite(tiny("ssf").blocks[0].attn, "qkv", 64, slice(0, 64))
    with pytest.raises(ValueError, match="serial and parallel branches cannot share a module"):
        add_branch(site, LoRABranch(64, 64, 2, 1.0, 0.0))


def test_extended_preset_uses_each_papers_settings_per_task():
    from vtab_lily.recipes import VPT_LENGTHS
    from vtab_lily.rows import PRESETS
    from vtab_lily.sweep import expand
    specs = [p.spec for p in expand(PRESETS["extended"], ["dtd", "svhn"], [42], {}, {})]
    assert len(specs) == 2 * (6 + 6 + 1 + 1 + 1 + 2)  # VPT grids, BitFit, Adapter, SSF, FacT-TT and -TK
    fact = {(s.task, s.options["type"]): (s.options["r"], s.options["s"]) for s in specs if s.method == "fact"}
    assert fact == {("dtd", "tt"): (8, 0.01), ("dtd", "tk"): (16, 0.01), ("svhn", "tt"): (16, 100.0),
                    ("svhn", "tk"): (32, 100.0)}  # FacT/configs/{tt,tk}/{dtd,svhn}.yaml
    ssf = {s.task: s.recipe for s in specs if s.method == "ssf"}
    assert (ssf["svhn"]["lr"], ssf["dtd"]["lr"], ssf["svhn"]["batch_size"], ssf["dtd"]["no_decay_1d"]) == (
        1e-2, 5e-3, 64, True)  # SSF train_scripts/vit/vtab/{svhn,dtd}/train_ssf.sh
    vpt = [s for s in specs if s.method == "vpt" and s.task == "dtd"]
    assert sorted(s.options["length"] for s in vpt if s.options["deep"]) == VPT_LENGTHS
    assert all(s.recipe == {"drop_path": 0.0, "normalize": True} for s in vpt)
    (point,) = expand(PRESETS["extended"][-1:], ["digits"], [42], {}, {})  # reported as failed, never fatal
    assert point.spec is None and "no per-task setting of ['r', 's'] for task 'digits'" in point.error


# --- Initialisation distributions and train-mode dropout against the official code ----------------------

def _pooled(tensors) -> torch.Tensor:
    return torch.cat([t.detach().flatten().double() for t in tensors])


def assert_uniform(tensors, bound):
    """U(-bound, bound): nothing beyond the bound, the extremes near it, std bound / sqrt(3), flat tails."""
    t = _pooled(tensors)
    assert t.numel() >= 256
    assert t.abs().max() <= bound * (1 + 1e-6) and t.abs().max() > 0.95 * bound
    assert t.std().item() == pytest.approx(bound / 3 ** 0.5, rel=0.08)
    kurtosis = (((t - t.mean()) / t.std()) ** 4).mean().item()
    assert kurtosis < 2.2  # uniform: 1.8; normal: 3


def assert_normal(tensors, mean, std, bound=None):
    """N(mean, std) (truncated at mean +- bound when given): its mean and std, normal tails (kurtosis ~3),
    which neither a Xavier nor a Kaiming uniform init has."""
    t = _pooled(tensors)
    assert t.numel() >= 1000
    assert abs(t.mean().item() - mean) < 5 * std / t.numel() ** 0.5
    assert t.std().item() == pytest.approx(std, rel=0.08)
    kurtosis = (((t - t.mean()) / t.std()) ** 4).mean().item()
    assert 2.5 < kurtosis < 3.6
    if bound is not None:
        assert (t - mean).abs().max() <= bound


def _modules(model, cls):
    return [m for m in model.modules() if isinstance(m, cls)]


def _linear_default(d_in):  # nn.Linear's default: kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in))
    return 1 / d_in ** 0.5


def test_vpt_init_is_official_xavier_uniform_of_a_patch():
    # KMnP/vpt src/models/vit_prompt/vit.py L57 val = sqrt(6 / (3 * patch^2 + d)), L62 / L70 uniform_(-val, val)
    assert_uniform([tiny("vpt", seed=s).vpt.tokens for s in range(2)], (6 / (3 * 8 * 8 + 64)) ** 0.5)


def test_bitfit_starts_at_the_pretrained_biases():
    model, plain = tiny("bitfit"), plain_vit()
    own = dict(plain.named_parameters())
    biases = {n: p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("head")}
    assert len(biases) == 2 + 4 * 6 and all(torch.equal(p, own[n]) for n, p in biases.items())


def test_ssf_init_is_official_normal():
    # dongzelian/SSF models/vision_transformer.py init_ssf_scale_shift: normal_(scale, mean=1, std=.02),
    # normal_(shift, std=.02)
    from vtab_lily.adapters.ssf import ScaleShift
    branches = _modules(tiny("ssf"), ScaleShift)
    assert_normal([b.scale for b in branches], 1.0, 0.02)
    assert_normal([b.shift for b in branches], 0.0, 0.02)


def test_adapter_init_is_noahs_trunc_normal_and_xavier_stays_an_option():
    # NOAH model/supernet_vision_transformer_timm.py L462 -> L531 self.apply(_init_vit_weights), L684-688:
    # trunc_normal_(std=.02) (timm's bounds +-2), zero biases: it overwrites adapter_super.py L38-44's Xavier
    from vtab_lily.adapters.adapter import AdapterBranch
    branches = _modules(tiny("adapter"), AdapterBranch)
    assert_normal([b.down.weight for b in branches] + [b.up.weight for b in branches], 0.0, 0.02, bound=2.0)
    assert all(not b.down.bias.any() and not b.up.bias.any() for b in branches)
    xavier = _modules(tiny("adapter", init="xavier"), AdapterBranch)
    assert_uniform([b.down.weight for b in xavier], (6 / (64 + 8)) ** 0.5)


def test_fact_init_is_official():
    # PETL-ViT FacT/fact_tt.py L105-107: FacTu, FacTv nn.Linear default, FacTv zero; L110ff FacTs nn.Linear
    # default; FacT/fact_tk.py L115-116 xavier_uniform_ of FacTc (r, r, r) and FacTp (r, 12 L)
    from vtab_lily.adapters.fact import FacTBranch
    tt = [tiny("fact", seed=s) for s in range(4)]
    assert_uniform([m.fact.u.weight for m in tt], _linear_default(64))
    assert all(not m.fact.v.weight.any() for m in tt)
    branches = [b for m in tt for b in _modules(m, FacTBranch)]
    assert_uniform([b.factor.weight for b in branches if b.target in ("q", "k", "v", "proj")], _linear_default(8))
    assert_uniform([b.factor.weight for b in branches if b.target == "fc2"], _linear_default(32))
    tk = [tiny("fact", seed=s, type="tk") for s in range(2)]
    assert_uniform([m.fact.core for m in tk], (6 / (2 * 8 * 8)) ** 0.5)  # fan_in = fan_out = r * r
    assert_uniform([m.fact.p for m in tk], (6 / (8 + 48)) ** 0.5)  # 4 layers x 12 columns


def test_adaptformer_lora_lily_init_is_the_lily_codes():
    # PETL-ViT binary_adapter/adaptformer.py L18-20 and binary_adapter/lora.py L29-31 (bit 32): down nn.Linear
    # default, up zero; Lily: LPs and routers nn.Linear default, HP experts zero (vtab_lily/adapters/lily.py)
    from vtab_lily.adapters.adaptformer import AdaptFormerBranch
    from vtab_lily.adapters.lora import LoRABranch
    af = _modules(tiny("adaptformer"), AdaptFormerBranch)
    assert_uniform([b.down.weight for b in af], _linear_default(64))
    assert all(not b.up.weight.any() for b in af)
    lora = [b for s in range(4) for b in _modules(tiny("lora", seed=s), LoRABranch)]
    assert_uniform([b.down.weight for b in lora], _linear_default(64))
    assert all(not b.up.weight.any() for b in lora)
    lily = [tiny("lily", seed=s, r=8) for s in range(4)]
    lps = [lp for m in lily for group in m.lily.lps.values() for lp in group]
    routers = [q for m in lily for group in m.lily.routers.values() for q in group]
    for modules in (lps, routers):  # in_features differ (the mlp target's own r): scaled to U(-1, 1)
        assert_uniform([q.weight * q.in_features ** 0.5 for q in modules], 1.0)
    assert all(not hp.any() for m in lily for hp in m.lily.hps.values())


def _same_masks(module, official, x, seed=11):
    """module(x) in train mode and official(x) with the generator seeded alike: equal outputs (the same
    dropout masks), and dropout really active (the eval-mode output differs)."""
    module.train()
    torch.manual_seed(seed)
    got = module(x)
    torch.manual_seed(seed)
    want = official(x)
    assert (got - want).abs().max() <= 1e-6 * want.abs().max()
    with torch.no_grad():
        assert (module.eval()(x) - got).abs().max() > 1e-3 * got.abs().max()


def test_adapter_train_mode_dropout_is_noahs():
    # NOAH model/module/adapter_super.py L62-71: ln1 -> QuickGELU -> dropout(drop_rate_adapter = 0.1) -> ln2
    from vtab_lily.adapters.adapter import AdapterBranch
    model = tiny("adapter")
    randomize_trainable(model, std=0.3)
    b = _modules(model, AdapterBranch)[0]

    def official(x):
        h = F.linear(x, b.down.weight, b.down.bias)
        h = F.dropout(h * torch.sigmoid(1.702 * h), p=0.1, training=True)
        return F.linear(h, b.up.weight, b.up.bias)
    _same_masks(b, official, torch.randn(2, 5, 64))


@pytest.mark.parametrize("kind", ["tt", "tk"])
def test_fact_train_mode_dropout_is_official(kind):
    # PETL-ViT FacT/fact_tt.py L64 q = FacTv(dp(q_FacTs(FacTu(x)))), fact_tk.py L66 FacTv(dp(FacTu(x) @ q_FacTc)),
    # dp = nn.Dropout(0.1) (fact_tt.py L114, fact_tk.py L124); the block scales by s
    from vtab_lily.adapters.fact import FacTBranch
    model = tiny("fact", type=kind, s=2.0)
    randomize_trainable(model, std=0.3)
    b = next(m for m in _modules(model, FacTBranch) if m.target == "q")
    f = model.fact

    def official(x):
        code = f.u(x) @ (b.factor.weight.T if kind == "tt" else (f.core @ f.p[:, :1]).reshape(8, 8))
        return f.v(F.dropout(code, p=0.1, training=True)) * 2.0
    _same_masks(b, official, torch.randn(2, 5, 64))


def test_vpt_train_mode_dropout_is_official():
    # KMnP/vpt src/models/vit_prompt/vit.py L82 / L114: prompt_dropout(prompt embeddings .expand(B, -1, -1)),
    # MODEL.PROMPT.DROPOUT 0.1 in its VTAB commands for VPT-deep
    model = tiny("vpt", length=4)
    prompts = model.vpt

    def official(batch):
        return F.dropout(prompts.tokens[2].expand(batch, -1, -1), p=0.1, training=True)
    prompts.train()
    torch.manual_seed(5)
    got = prompts(2, 3)
    torch.manual_seed(5)
    assert torch.equal(got, official(3)) and not torch.equal(got, prompts.tokens[2].expand(3, -1, -1))


@pytest.mark.parametrize("method", ["adaptformer", "lora"])
def test_adaptformer_and_lora_train_mode_dropout_is_the_lily_codes(method):
    # PETL-ViT binary_adapter/adaptformer.py L29-35: down -> ReLU -> Dropout(0.1) -> up (times s, L9);
    # binary_adapter/lora.py L40-45: down -> Dropout(0.1) -> up (times s, L10-11)
    from vtab_lily.adapters.adaptformer import AdaptFormerBranch
    from vtab_lily.adapters.lora import LoRABranch
    model = tiny(method)
    randomize_trainable(model, std=0.3)
    b = _modules(model, AdaptFormerBranch if method == "adaptformer" else LoRABranch)[0]
    act = F.relu if method == "adaptformer" else (lambda h: h)

    def official(x):
        return b.up(F.dropout(act(b.down(x)), p=0.1, training=True)) * b.s
    _same_masks(b, official, torch.randn(2, 5, 64))


def test_lily_vim_train_mode_dropout_is_on_the_lp_output():
    # Lily's official Vim code: dropout 0.1 on the LP output, before the router and the HP experts
    # (vtab_lily/adapters/lily.py module docstring); ViT: none
    from vtab_lily.adapters.lily import LilyBranch, lily_combine
    model = build_model("vim-tiny-test", "lily", 5, pretrained=False, backbone_options={"img_size": 32})
    randomize_trainable(model, std=0.3)
    b = _modules(model, LilyBranch)[0]
    lily, t = model.lily, b.target

    def official(x):
        h = F.dropout(lily.lps[t][lily.lp_index(t, b.layer)](x), p=0.1, training=True)
        return lily_combine(h, lily.hps[t], lily.router_for(t, b.layer), lily.routing) * lily.s
    _same_masks(b, official, torch.randn(2, 5, lily.specs[t].d_in))
    assert all(m.dropout.p == 0.0 for m in _modules(tiny("lily"), LilyBranch))


def test_ssf_and_bitfit_have_no_train_mode_dropout_of_their_own(images):
    # SSF's ssf_ada (dongzelian/SSF models/vision_transformer.py) and BitFit add no dropout: with the
    # backbone's drop_path 0 a train-mode forward equals the eval-mode one
    for method in ("ssf", "bitfit"):
        torch.manual_seed(0)
        model = build_model("vit-tiny", method, 5, pretrained=False, backbone_options=TINY, drop_path_rate=0.0)
        randomize_trainable(model, std=0.1)
        with torch.no_grad():
            assert torch.equal(model.train()(images), model.eval()(images))


def test_extended_rows_follow_each_official_code():
    """Inputs ImageNet-normalised for FacT, VPT, Adapter, BitFit; NOAH's Adapter with dropout 0.1, trunc_normal
    init and no weight decay on 1-d tensors; BitFit with drop_path 0 (encoder in eval mode)."""
    from vtab_lily.adapters.adapter import AdapterConfig
    from vtab_lily.rows import PRESETS
    from vtab_lily.sweep import expand
    specs = [p.spec for p in expand(PRESETS["extended"], ["dtd"], [42], {}, {})]
    by = {}
    for s in specs:
        by.setdefault(s.method, []).append(s)
    # PETL-ViT FacT/vtab.py L81, NOAH lib/datasets.py L241, KMnP/vpt src/data/datasets/tf_dataset.py L75-76
    for method in ("fact", "vpt", "adapter", "bitfit"):
        assert all(s.full_recipe().normalize for s in by[method]), method
    assert not any(s.full_recipe().normalize for s in by["ssf"])  # SSF's own constants (0.5) differ: stated
    (adapter,) = by["adapter"]
    cfg = AdapterConfig(**adapter.options)
    # NOAH supernet_train_prompt.py L209 (--drop_rate_adapter 0.1), L365 timm create_optimizer (1-d: no decay)
    assert (cfg.width, cfg.dropout, cfg.init, adapter.full_recipe().no_decay_1d) == (8, 0.1, "trunc_normal", True)
    (bitfit,) = by["bitfit"]
    assert bitfit.full_recipe().drop_path == 0.0  # KMnP/vpt src/models/vit_models.py L33-35, L173-174
    assert all(s.full_recipe().drop_path == 0.1 for s in by["fact"])  # FacT/fact_tt.py L175 drop_path_rate=0.1
