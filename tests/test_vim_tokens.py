"""MambaPEFT's prompt-tuning (`prompt`) and affix-tuning (`affix`) on Vim: Vim-S parameter counts from the
official construction, the official forward restated independently (token placement; the inner dual prefix
through a per-token conv and the float64 per-step scan), every scan backend, gradients, round trips."""
import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from helpers import VIM_TINY, assert_close
from test_scan import assert_grads_close
from test_vim import naive_direction

from backbones import ssm
from backbones.vim import Mixer
from vtab_lily import build_model, count_params, disable_adapters, load_model, save_adapter
from vtab_lily.adapters import get_method, make_config
from vtab_lily.adapters.affix import AffixTokens
from vtab_lily.adapters.prompt import PrefixEncoder
from vtab_lily.errors import UnknownName, UserError
from vtab_lily.options import OptionError

D, T, L = 384, 1536, 24  # Vim-S: width, scan-input width 2 d_inner, layers


def tiny(method, seed=0, **options):
    return build_model("vim-tiny-test", method, 5, pretrained=False, backbone_options=VIM_TINY, seed=seed,
                       **options).eval()


@pytest.mark.parametrize("method,options,expected", [
    # Embedding (8, 384) + Linear(384, 384) + Linear(384, 384), biases: their 307K with the ~9K head
    ("prompt", {}, 8 * D + 2 * (D * D + D)),                       # 298,752
    ("prompt", {"project": False}, 8 * D),                         # 3,072: their 12K
    # Embedding (3, 1536) + Linear(1536, 1536) + Linear(1536, 24 x 2 x 1536): their table prints 117,000K
    ("affix", {}, 3 * T + T * T + T + T * L * 2 * T + L * 2 * T),  # 115,685,376
    ("affix", {"project": False}, 3 * L * 2 * T),                  # 221,184: their 230K
])
def test_vim_s_parameter_counts_are_the_official_construction(method, options, expected):
    model = build_model("vim-s", method, 10, pretrained=False, **options)
    assert count_params(model) == expected


def official_prompts(encoder: PrefixEncoder, batch: int):
    """MambaPEFT's PrefixEncoder.forward (vim_peft_all.py L698-710) on its own tensors, assembled from our pieces
    (the Embedding (n, pieces x width) without projection; the last Linear (pieces x width, d) with it): token
    ids arange(n) per sample through the Embedding, then Linear, Tanh, Linear: (batch, n, pieces x width)."""
    if not encoder.project:
        table = torch.cat(list(encoder.tokens), dim=1)
        return F.embedding(torch.arange(table.shape[0]).unsqueeze(0).expand(batch, -1), table)
    ids = torch.arange(encoder.embedding.num_embeddings).unsqueeze(0).expand(batch, -1)
    first = encoder.transform[0]
    weight, bias = torch.cat([o.weight for o in encoder.out]), torch.cat([o.bias for o in encoder.out])
    return F.linear(torch.tanh(F.linear(F.embedding(ids, encoder.embedding.weight), first.weight, first.bias)),
                    weight, bias)


@pytest.mark.parametrize("kind", ["prefix", "suffix", "prefix_suffix"])
@pytest.mark.parametrize("project", [True, False])
def test_prompt_tokens_sit_where_the_official_forward_puts_them(kind, project):
    """forward_features_visionmamba_peft L468-497: prompts after pos_embed, tensor_split in two for
    prefix_suffix (n = 5: 3 before, 2 after), the class token read at M//2 + the prompts before it."""
    model = tiny("prompt", n=5, type=kind, project=project)
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    seq = model.patch_embed.proj(x).flatten(2).transpose(1, 2)
    m = seq.shape[1] // 2
    seq = torch.cat([seq[:, :m], model.cls_token.expand(2, -1, -1), seq[:, m:]], 1) + model.pos_embed
    p = official_prompts(model.prompt, 2)
    if kind == "prefix":
        seq, m = torch.cat([p, seq], 1), m + 5
    elif kind == "suffix":
        seq = torch.cat([seq, p], 1)
    else:
        before, after = torch.tensor_split(p, 2, dim=1)
        assert before.shape[1] == 3
        seq, m = torch.cat([before, seq, after], 1), m + before.shape[1]
    h, residual = seq, None
    for layer in model.layers:
        h, residual = layer(h, residual)
    want = model.head(model.norm_f(residual + h)[:, m])
    assert_close(out, want, 1e-6)
    params = [p for p in model.parameters() if p.requires_grad]
    for a, b in zip(torch.autograd.grad(out.square().sum(), params), torch.autograd.grad(want.square().sum(), params)):
        assert_grads_close(a, b)


def official_affix_mixer(m: Mixer, h, prefixes, layer: int):
    """forward_mamba_peft's inner_dual_prefix path (L192-195, L278-280, L312-313) in float64: layer `layer`'s
    slice of the encoder output (L530-531), its first half prepended to xz and its second half to the flipped xz
    BEFORE the conv; per-token conv and per-step scan over l + n tokens; the n virtual outputs dropped."""
    xz = (h @ m.in_proj.weight.T).transpose(1, 2)
    width = xz.shape[1]
    dual = prefixes[..., layer * 2 * width:(layer + 1) * 2 * width].permute(0, 2, 1)  # (b, 2 width, n)
    n = dual.shape[2]
    out = naive_direction(m, torch.cat([dual[:, :width], xz], dim=2), "")[..., n:]
    out_b = naive_direction(m, torch.cat([dual[:, width:], xz.flip(-1)], dim=2), "_b")[..., n:]
    return ((out + out_b.flip(-1)) / 2).transpose(1, 2) @ m.out_proj.weight.T


@pytest.mark.slow
@pytest.mark.parametrize("backend,project,batch", [("torch", True, 2), ("torch", False, 2), ("triton", True, 1)])
def test_affix_mixer_equals_the_official_inner_dual_prefix(backend, project, batch, scan_backend):
    """Layer 1 of 2 (its slice of the shared encoder), both directions; 14 tokens + 3 virtual = 17 steps: the
    torch scan's chunks of 16, the last ragged; Triton under its interpreter. Ours fp32, the reference float64."""
    scan_backend(backend)
    torch.manual_seed(0)
    mixer = Mixer(8)  # d_inner 16: scan input width 32
    encoder = PrefixEncoder(3, 32, 32, 2 * 2, project)  # 2 layers x 2 directions
    mixer.scan_input = AffixTokens(encoder, 1)
    h = torch.randn(batch, 14, 8, requires_grad=True)
    out = mixer(h)
    ref = Mixer(8).double()
    ref.load_state_dict({k: v.double() for k, v in mixer.state_dict().items()})
    ref_encoder = PrefixEncoder(3, 32, 32, 2 * 2, project).double()
    ref_encoder.load_state_dict({k: v.double() for k, v in encoder.state_dict().items()})
    h64 = h.detach().double().requires_grad_()
    want = official_affix_mixer(ref, h64, official_prompts(ref_encoder, batch), 1)
    assert out.shape == (batch, 14, 8)
    assert_close(out.double(), want, 1e-5)
    g = torch.randn(want.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    def read_by_layer_1(enc):  # its pieces 2 and 3 (and the shared Embedding and transform)
        if not project:
            return list(enc.tokens[2:])
        return [enc.embedding.weight, *enc.transform.parameters(), *enc.out[2].parameters(), *enc.out[3].parameters()]
    ours = torch.autograd.grad((out * g.float()).sum(), [h, *read_by_layer_1(encoder)])
    theirs = torch.autograd.grad((want * g).sum(), [h64, *read_by_layer_1(ref_encoder)])
    for a, b in zip(ours, theirs):
        assert_grads_close(a.double(), b)
    if not project:  # the z half of each direction's tokens only gates dropped outputs: no gradient
        assert all(grad[:, 16:].abs().max() == 0 and grad[:, :16].abs().max() > 0 for grad in ours[1:])


def test_affix_gives_each_layer_its_slice_of_one_shared_encoder():
    model = tiny("affix")
    hooks = [layer.mixer.scan_input for layer in model.layers]
    assert [h.layer for h in hooks] == [0, 1] and all(h.encoder is model.affix for h in hooks)
    assert [o.out_features for o in model.affix.out] == [128] * 4  # layers x directions pieces of 2 d_inner
    assert all(o.weight.abs().max() <= 128 ** -0.5 for o in model.affix.out)  # Linear(128, 4 x 128)'s init bound
    assert sorted(k for k in model.state_dict() if "affix" in k or "scan_input" in k) == [
        "affix.embedding.weight", *[f"affix.out.{j}.{w}" for j in range(4) for w in ("bias", "weight")],
        "affix.transform.0.bias", "affix.transform.0.weight"]
    twin = copy.deepcopy(model)
    assert all(layer.mixer.scan_input.encoder is twin.affix for layer in twin.layers) and twin.affix is not model.affix


@pytest.mark.parametrize("method", ["prompt", "affix"])
def test_gradients_only_on_the_method_and_the_head_and_not_an_identity_at_init(method):
    """The official init (Embedding N(0, 1), default Linear init) is not zero: the output changes at init;
    disable_adapters gives the plain backbone's output back."""
    model = tiny(method)
    plain = tiny("linear")
    x = torch.randn(2, 3, 32, 32)
    plain.head.load_state_dict(model.head.state_dict())
    out = model(x)
    with torch.no_grad(), disable_adapters(model):
        assert_close(model(x), plain(x), 1e-6)
    assert (out - plain(x)).abs().max() > 1e-3 * out.abs().max()
    out.square().sum().backward()
    graded = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().max() > 0}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert graded == trainable and {n.split(".")[0] for n in trainable} == {method, "head"}


@pytest.mark.slow
@pytest.mark.parametrize("method,options", [("prompt", {"type": "prefix", "n": 3}), ("affix", {"project": False})])
def test_triton_backend_runs_the_longer_sequences_as_torch(method, options, scan_backend):
    model = tiny(method, **options)
    x = torch.randn(1, 3, 32, 32)
    scan_backend("torch")
    want = model(x)
    scan_backend("triton")
    assert_close(model(x), want, 1e-5)


@pytest.mark.parametrize("method,options", [("prompt", {"type": "suffix", "project": False}), ("affix", {"n": 2})])
def test_load_model_rebuilds_prompt_and_affix(method, options, tmp_path):
    model = tiny(method, seed=3, **options)
    with torch.no_grad():
        for p in getattr(model, method).parameters():
            p.add_(0.1)
    path = tmp_path / "adapter.safetensors"
    save_adapter(model, path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(load_model(path)(x), model(x))


def test_user_errors_are_one_line():
    with pytest.raises(OptionError, match=r"prompt type must be one of \('prefix', 'suffix', 'prefix_suffix'\), "
                                          r"got 'infix'"):
        make_config("prompt", {"type": "infix"}, "vim-s")
    with pytest.raises(UnknownName, match="prompt needs the token-sequence hook 'tokens'.*'vit-tiny' has none"):
        build_model("vit-tiny", "prompt", 5, pretrained=False, backbone_options=dict(img_size=32, patch_size=8))
    with pytest.raises(UnknownName, match="affix needs the scan-input hook 'scan'.*'vit-tiny' has none"):
        build_model("vit-tiny", "affix", 5, pretrained=False, backbone_options=dict(img_size=32, patch_size=8))
    model = tiny("prompt")
    with pytest.raises(UserError, match="insert_tokens hook already holds PromptTokens: two methods cannot both"):
        get_method("prompt").attach(model, make_config("prompt", {}, "vim-tiny-test"))


@pytest.mark.parametrize("method,options", [("prompt", {}), ("affix", {})])
def test_the_longer_sequences_meet_the_mamba_kernels_calling_convention(method, options, monkeypatch):
    """On the CPU, mamba-ssm's selective_scan_fn and causal-conv1d's causal_conv1d_fn replaced by stand-ins
    that check what the kernels require (shapes with B, C as (b, 1, n, l), fp32 A and D, the conv's
    x contiguous along time or along channels, a (d, width) weight) and compute as the torch backend."""
    def scan_fn(u, delta, A, B, C, D, z, delta_bias=None, delta_softplus=False):
        (b, d, l), n = u.shape, A.shape[1]
        assert delta.shape == z.shape == (b, d, l) and B.shape == C.shape == (b, 1, n, l) and delta_softplus
        assert A.dtype == D.dtype == torch.float32 and delta_bias is None  # the mixer's dt_proj adds its bias
        assert B.is_contiguous() and C.is_contiguous()
        calls.append(l)
        return ssm.ChunkedScan.apply(u, delta, A, B[:, 0], C[:, 0], D, z, delta_bias)

    def conv_fn(x, weight, bias, activation=None):
        assert weight.ndim == 2 and weight.shape[0] == x.shape[1] and activation == "silu"
        assert x.stride(2) == 1 or x.stride(1) == 1
        y = F.conv1d(x, weight[:, None], bias, padding=weight.shape[1] - 1, groups=x.shape[1])
        return F.silu(y[..., :x.shape[-1]])

    model = tiny(method, **options)
    x = torch.randn(2, 3, 32, 32)
    monkeypatch.setattr(ssm, "backend", lambda device_type: ("torch", "test"))
    want = model(x)
    calls = []
    monkeypatch.setattr(ssm, "cuda_kernels", lambda: ((scan_fn, conv_fn), ""))
    monkeypatch.setattr(ssm, "backend", lambda device_type: ("mamba", "test"))
    assert_close(model(x), want, 1e-5)
    assert calls == [5 + (8 if method == "prompt" else 3)] * 4  # 2 layers x 2 directions, l + n steps


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["mamba", "triton", "torch"])
def test_affix_on_cuda_backends_matches_the_cpu(name, monkeypatch):
    """The mamba kernels' calling convention on the l + n sequence (xz from torch.cat: channel-first, not
    in_proj's channel-last view), outputs and gradients against the CPU torch scan."""
    try:
        ssm.choose("cuda", name)
    except ssm.ScanBackendError as e:
        pytest.skip(str(e))
    monkeypatch.setitem(ssm._requested, "name", "torch")
    monkeypatch.setattr(ssm, "backend", functools.cache(ssm.backend.__wrapped__))
    model = tiny("affix")
    x = torch.randn(2, 3, 32, 32)
    want = model(x)
    want_grads = torch.autograd.grad(want.square().sum(), list(model.affix.parameters()))
    monkeypatch.setitem(ssm._requested, "name", name)
    monkeypatch.setattr(ssm, "backend", functools.cache(ssm.backend.__wrapped__))
    model.cuda()
    out = model(x.cuda())
    grads = torch.autograd.grad(out.square().sum(), list(model.affix.parameters()))
    assert torch.allclose(out.cpu(), want, rtol=1e-3, atol=1e-4)
    for a, b in zip(grads, want_grads):
        assert torch.allclose(a.cpu(), b, rtol=1e-3, atol=1e-4 * b.abs().max().item())
