"""addscan (MambaPEFT's additional scan) on Vim: counts, the official init, gradients, and equality with the
official forward written out (the new rows concatenated into x_proj's weight and A, through the naive scan)."""
import copy

import pytest
import torch
from helpers import assert_close, randomize_trainable
from test_scan import assert_grads_close
from test_vim import VIM_TINY, naive_mixer

from backbones.vim import Mixer
from vtab_lily import build_model, count_params, disable_adapters, load_model, save_adapter
from vtab_lily.adapters import make_config
from vtab_lily.adapters.addscan import AdditionalScan
from vtab_lily.errors import UnknownName
from vtab_lily.options import OptionError


def tiny(seed=0, **options):
    torch.manual_seed(seed)
    return build_model("vim-tiny-test", "addscan", 5, pretrained=False, backbone_options=VIM_TINY, **options)


@pytest.mark.parametrize("options,expected", [
    ({}, 24 * 2 * 768 * (6 + 2 * 6)),                     # 663,552: their table's 672K less a ~8.4K mean head
    ({"n": 1, "pos": "suffix", "copy_A": False}, 24 * 2 * 768 * 3),
])
def test_vim_s_addscan_parameter_count(options, expected):
    """Per layer and direction: A_log_scan_addi (768, n) + x_proj_scan_addi (2n, 768), as set_peft creates."""
    model = build_model("vim-s", "addscan", 10, pretrained=False, **options)
    assert count_params(model) == expected
    state = model.layers[23].mixer.state_b
    n = options.get("n", 6)
    assert state.A_log.shape == (768, n) and state.x_proj.weight.shape == (2 * n, 768)


def test_published_rows_share_one_head_size():
    """MambaPEFT's table (thousands, rounded) counts a head: 672K = 663,552 + the head, and one head size fits
    every row whose count is derived (linear probing 9K = the head alone; A 589,824; D 36,864; conv1d 147,456;
    LoRAp(X) 1,769,472): 8,500 to 8,636 parameters."""
    rows = ((672, 663_552), (9, 0), (598, 589_824), (45, 36_864), (156, 147_456), (1_778, 1_769_472))
    low = max((published - 0.5) * 1e3 - ours for published, ours in rows)
    high = min((published + 0.5) * 1e3 - ours for published, ours in rows)
    assert (low, high) == (8_500, 8_636)


@pytest.mark.parametrize("pos,copy_A", [("prefix", True), ("suffix", True), ("prefix", False)])
def test_new_A_log_is_the_official_init(pos, copy_A):
    """scan_A_copy_from_last: the pretrained A_log's first column (prefix) or last column (suffix), n times;
    otherwise log(d_state + 1 .. d_state + n). vim-mini's shipped weights: trained A_log, columns all differ."""
    model = build_model("vim-mini", "addscan", 5, n=3, pos=pos, copy_A=copy_A)
    for mixer in (model.layers[0].mixer, model.layers[3].mixer):
        for s in ("", "_b"):
            own, new = getattr(mixer, f"A{s}_log"), getattr(mixer, f"state{s}").A_log
            want = own[:, [0 if pos == "prefix" else -1]].expand(-1, 3) if copy_A else \
                torch.log(torch.tensor([17.0, 18.0, 19.0])).expand(own.shape[0], 3)
            assert (own[:, 0] - own[:, -1]).abs().min() > 0
            assert torch.equal(new, want) and new.data_ptr() != own.data_ptr()


def test_not_an_identity_at_init_but_one_with_zero_x_proj_rows(images):
    """The official x_proj rows are nn.Linear's random init (zero_init_x_proj False): the output changes. With
    them zeroed, B = 0 keeps the 6 new states at zero from the first step: exactly the backbone's output."""
    model = tiny().eval()
    with torch.no_grad():
        out = model(images)
        with disable_adapters(model):
            plain = model(images)
        assert (out - plain).abs().max() > 1e-3 * plain.abs().max()
        for m in model.modules():
            if isinstance(m, AdditionalScan):
                m.x_proj.weight.zero_()
        assert_close(model(images), plain, 1e-6)


def test_gradients_only_on_the_new_states_and_the_head(images):
    model = tiny()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"layers.{i}.mixer.state{s}.{t}" for i in range(2) for s in ("", "_b")
                         for t in ("A_log", "x_proj.weight")} | {"head.weight", "head.bias"}
    model(images).square().sum().backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None and p.grad.abs().max() > 0) == (name in trainable), name


def official_weights(m, n: int, pos: str):
    """`forward_mamba_peft` (vim_peft_all.py L97-103, L146-156) for direction s: A = [A_addi, A] (prefix) or
    [A, A_addi] (suffix); x_proj weight = dt rows, then the B block with the first n new rows inserted at the
    same side, then the C block with the last n new rows."""
    r, N = m.dt_rank, m.d_state

    def weights(s):
        W, A_log = getattr(m, f"x_proj{s}").weight, getattr(m, f"A{s}_log")
        state = getattr(m, f"state{s}")
        Wa, Aa = state.x_proj.weight, state.A_log
        if pos == "prefix":
            return torch.cat([W[:r], Wa[:n], W[r:r + N], Wa[n:], W[r + N:]]), torch.cat([Aa, A_log], 1)
        return torch.cat([W[:r + N], Wa[:n], W[r + N:], Wa[n:]]), torch.cat([A_log, Aa], 1)
    return weights


@pytest.mark.slow
@pytest.mark.parametrize("backend,pos", [("torch", "prefix"), ("torch", "suffix"), ("triton", "prefix")])
def test_mixer_equals_the_official_concatenation_through_a_float64_naive_scan(backend, pos, scan_backend):
    """A mixer with the new states on both directions (16 + 6 = 22; new tensors as if trained) against the
    official forward restated: outputs and gradients (input, new A_log and x_proj rows, both directions), fp32
    ours vs float64 reference, every weight random (std 0.3); Triton under its interpreter (width 8: d_inner 16)."""
    scan_backend(backend)
    torch.manual_seed(0)
    mixer = Mixer(8)
    for s in ("", "_b"):
        setattr(mixer, f"state{s}", AdditionalScan(getattr(mixer, f"A{s}_log"), 6, pos, copy_A=True))
    randomize_trainable(mixer, std=0.3)
    ref = copy.deepcopy(mixer).double()
    h = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(3))
    hs = [h.clone().requires_grad_(), h.double().requires_grad_()]
    out, want = mixer(hs[0]), naive_mixer(ref, hs[1], official_weights(ref, 6, pos))
    assert_close(out.double(), want, 1e-5)

    def leaves(m, x):
        return [x] + [p for s in ("", "_b") for p in (getattr(m, f"state{s}").A_log,
                                                    getattr(m, f"state{s}").x_proj.weight)]
    g = torch.randn(want.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    grads = torch.autograd.grad((out * g.float()).sum(), leaves(mixer, hs[0]))
    want_grads = torch.autograd.grad((want * g).sum(), leaves(ref, hs[1]))
    for a, b in zip(grads, want_grads):
        assert_grads_close(a.double(), b)


def test_options_and_backbone_are_checked():
    with pytest.raises(OptionError, match="addscan pos must be one of"):
        make_config("addscan", {"pos": "middle"})
    with pytest.raises(OptionError, match="n must be >= 1"):
        make_config("addscan", {"n": 0})
    with pytest.raises(UnknownName, match="addscan needs state sites .* 'vit-tiny' has none"):
        build_model("vit-tiny", "addscan", 5, pretrained=False)


def test_saved_adapter_loads_into_the_same_logits(tmp_path, images):
    """build_model -> save_adapter -> load_model (random backbone redrawn from its seed): the same logits."""
    path = tmp_path / "addscan.safetensors"
    model = build_model("vim-tiny-test", "addscan", 5, pretrained=False, backbone_options=VIM_TINY, seed=5,
                        n=2, pos="suffix")
    randomize_trainable(model, std=0.3)
    save_adapter(model, path)
    loaded = load_model(path, pretrained=False)
    assert loaded.layers[1].mixer.state_b.A_log.shape == (64, 2)
    with torch.no_grad():
        assert torch.equal(loaded(images), model.eval()(images))


def test_widening_a_widened_state_again_is_a_site_conflict():
    from vtab_lily.adapters import SiteConflict, get_method
    from vtab_lily.adapters.base import attaching
    model = tiny()
    with attaching("addscan", model), pytest.raises(SiteConflict, match=r"layers\.0\.mixer\.state: its state is "
                                                                     "widened already"):
        get_method("addscan").attach(model, make_config("addscan", {}, "vim-tiny-test"))
