"""Vision Mamba: checkpoint keys, the mixer and model against naive per-token code, Lily/LoRA on Vim."""
import pytest
import torch
from helpers import VIM_TINY, assert_close, randomize_trainable
from test_scan import assert_grads_close, naive_scan

from backbones import create_backbone
from backbones.vim import Mixer, resize_pos_embed
from vtab_lily import build_model, count_params, disable_adapters


def hustvl_vim_s_state_dict(num_classes=1000):
    """Vim-S keys and shapes as in vim_s_midclstok_80p5acc.pth (D 384, d_inner 768, dt_rank 24, 24 layers)."""
    D, di, r, n = 384, 768, 24, 16
    sd = {"cls_token": (1, 1, D), "pos_embed": (1, 197, D), "patch_embed.proj.weight": (D, 3, 16, 16),
          "patch_embed.proj.bias": (D,), "head.weight": (num_classes, D), "head.bias": (num_classes,),
          "norm_f.weight": (D,)}
    for i in range(24):
        p = f"layers.{i}."
        sd[p + "norm.weight"] = (D,)
        for s in ("", "_b"):
            sd.update({f"{p}mixer.A{s}_log": (di, n), f"{p}mixer.D{s}": (di,), f"{p}mixer.conv1d{s}.weight": (di, 1, 4),
                       f"{p}mixer.conv1d{s}.bias": (di,), f"{p}mixer.x_proj{s}.weight": (r + 2 * n, di),
                       f"{p}mixer.dt_proj{s}.weight": (di, r), f"{p}mixer.dt_proj{s}.bias": (di,)})
        sd[p + "mixer.in_proj.weight"] = (2 * di, D)
        sd[p + "mixer.out_proj.weight"] = (D, di)
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(shape, generator=g) * 0.02 for k, shape in sd.items()}


@pytest.mark.slow
def test_official_vim_s_checkpoint_loads_strictly(tmp_path):
    state = hustvl_vim_s_state_dict()
    assert len(state) == 415
    path = tmp_path / "vim_s_midclstok_80p5acc.pth"
    torch.save({"model": state, "epoch": 299, "args": None}, path)
    model = create_backbone("vim-s", 1000, weights=str(path))
    assert sum(p.numel() for p in model.parameters()) == 25_796_584
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    task = create_backbone("vim-s", 10, weights=str(path))  # head dropped for a 10-class task
    assert task.head.weight.shape == (10, 384)
    assert torch.equal(task.layers[3].mixer.in_proj.weight, state["layers.3.mixer.in_proj.weight"])


def test_offline_without_weights_names_the_file(monkeypatch):
    import huggingface_hub

    from backbones import WeightsError
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # as HF_HUB_OFFLINE=1 at start-up
    with pytest.raises(WeightsError, match="vim_s_midclstok_80p5acc.pth.*--weights PATH"):
        create_backbone("vim-s", 10, pretrained=True)


def test_pos_embed_resize_keeps_the_middle_class_token():
    pos = torch.randn(1, 17, 8)  # 4 x 4 patches, class token at index 8
    out = resize_pos_embed(pos, 64)
    assert out.shape == (1, 65, 8) and torch.equal(out[:, 32], pos[:, 8])
    assert torch.allclose(resize_pos_embed(pos, 16), pos)


def naive_direction(m: Mixer, xz, s, weights=None):
    """One scan direction of mixer `m` on xz (b, 2 d_inner, l): explicit per-token conv, the naive scan.
    `weights(s)`: direction s's (x_proj weight, A_log), the state size n = A_log's columns (default: the
    mixer's own)."""
    x, z = xz.chunk(2, dim=1)
    w, bias = getattr(m, f"conv1d{s}").weight[:, 0], getattr(m, f"conv1d{s}").bias
    k = w.shape[1]
    conv = torch.stack([sum(w[:, j] * (x[:, :, t - (k - 1) + j] if t - (k - 1) + j >= 0 else 0) for j in range(k))
                        + bias for t in range(x.shape[-1])], dim=-1)
    x = conv * torch.sigmoid(conv)
    w_x, A_log = weights(s) if weights else (getattr(m, f"x_proj{s}").weight, getattr(m, f"A{s}_log"))
    dt, B, C = (x.transpose(1, 2) @ w_x.T).split([m.dt_rank, A_log.shape[1], A_log.shape[1]], -1)
    dt_proj = getattr(m, f"dt_proj{s}")
    delta = (dt @ dt_proj.weight.T).transpose(1, 2)
    A = -torch.exp(A_log)
    return naive_scan(x, delta, A, B.transpose(1, 2), C.transpose(1, 2), getattr(m, f"D{s}"), z, dt_proj.bias)


def naive_mixer(m: Mixer, h, weights=None):
    """The bimamba-v2 mixer with explicit per-token conv and the naive scan, both directions."""
    xz = (h @ m.in_proj.weight.T).transpose(1, 2)
    y = naive_direction(m, xz, "", weights) + naive_direction(m, xz.flip(-1), "_b", weights).flip(-1)
    return (y / 2).transpose(1, 2) @ m.out_proj.weight.T


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_mixer_equals_naive_mixer_outputs_and_gradients(backend, scan_backend):
    """Both scan directions, the conv and the projections; Triton under its interpreter."""
    scan_backend(backend)
    torch.manual_seed(0)
    mixer = Mixer(8)  # d_inner 16, dt_rank 1, d_state 16
    h = torch.randn(2, 5, 8, requires_grad=True)
    out = mixer(h)
    want = naive_mixer(mixer, h)
    assert_close(out, want, 1e-5)
    params = [h, mixer.in_proj.weight, mixer.conv1d_b.weight, mixer.x_proj.weight, mixer.dt_proj_b.bias,
              mixer.A_log, mixer.D_b]
    grads = torch.autograd.grad(out.square().sum(), params)
    want_grads = torch.autograd.grad(want.square().sum(), params)
    for a, b in zip(grads, want_grads):
        assert_grads_close(a, b)


def test_whole_model_equals_naive_blocks():
    torch.manual_seed(0)
    model = create_backbone("vim-tiny-test", 5, pretrained=False, drop_path_rate=0.0, **VIM_TINY).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = model.patch_embed.proj(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([tokens[:, :2], model.cls_token.expand(2, -1, -1), tokens[:, 2:]], 1) + model.pos_embed

        def rms(v, w):
            return v * torch.rsqrt(v.square().mean(-1, keepdim=True) + 1e-5) * w
        residual = tokens
        h = naive_mixer(model.layers[0].mixer, rms(residual, model.layers[0].norm.weight))
        residual = residual + h
        h = naive_mixer(model.layers[1].mixer, rms(residual, model.layers[1].norm.weight))
        want = model.head(rms(residual + h, model.norm_f.weight)[:, 2])
        assert_close(model(x), want, 1e-5)


@pytest.mark.parametrize("method,options", [("lily", {}), ("lily", {"preset": "lily-s"}), ("lora", {"r": 2})])
def test_zero_init_adapters_leave_vim_unchanged(method, options):
    torch.manual_seed(0)
    model = build_model("vim-tiny-test", method, 5, pretrained=False, backbone_options=VIM_TINY, **options).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
        with disable_adapters(model):
            assert_close(out, model(x), 1e-6)


@pytest.mark.parametrize("options,expected", [
    ({"preset": "lily-s"}, 4 * (24 * 384 + 1537 * 3) + 2688 * 7),     # 74,124 (Table 5: 0.074M)
    ({"preset": "lily-l"}, 8 * (24 * 384 + 1537 * 6) + 2688 * 18),    # 195,888 (Table 5: 0.196M)
    ({}, 8 * (24 * 384 + 1537 * 5) + 2688 * 4),                       # the official script: ne 5, 8, 4
])
def test_vim_s_lily_parameter_counts(options, expected):
    model = build_model("vim-s", "lily", 10, pretrained=False, **options)
    assert count_params(model) == expected


def test_vim_lora_on_in_proj_counts():
    model = build_model("vim-s", "lora", 10, pretrained=False, r=1)
    assert count_params(model) == 24 * (384 + 1536) * 1


def test_vim_lily_is_the_official_per_token_computation():
    """in_proj: LP per layer, one model-wide router, per-token weights; the official code builds a
    per-token combined HP [B, L, r, d_out]; dt: (W + up @ down) applied to dt_low."""
    torch.manual_seed(0)
    model = build_model("vim-tiny-test", "lily", 5, pretrained=False, backbone_options=VIM_TINY,
                        r=3, ne_2=4, dt_r=2).eval()
    randomize_trainable(model, std=0.3)
    lily = model.lily
    assert len(lily.lps["in_proj"]) == 2 and len(lily.routers["in_proj"]) == 1
    adapted = model.layers[1].mixer.in_proj
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        h = x @ lily.lps["in_proj"][1].weight.T
        probs = torch.softmax(h @ lily.routers["in_proj"][0].weight.T, -1)
        combined = torch.einsum("ble,eio->blio", probs, lily.hps["in_proj"])  # official, memory heavy
        want = x @ adapted.base.weight.T + torch.einsum("bld,blde->ble", h, combined)
        assert_close(adapted(x), want, 1e-5)
        dt_proj = model.layers[0].mixer.dt_proj_b
        low = torch.randn(2, 5, dt_proj.base.in_features)
        w = dt_proj.base.weight + lily.hps["dt_proj_b"][0].T @ lily.lps["dt_proj_b"][0].weight
        assert_close(dt_proj(low), (low @ w.T + dt_proj.base.bias), 1e-5)
