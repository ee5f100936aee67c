"""Table 4's other baselines: Bi-LoRA, FourierFT, MoRA."""
import numpy as np
import pytest
import torch
from helpers import TINY, assert_close, randomize_trainable, tiny
from scipy.stats import norm

from backbones import create_backbone
from vtab_lily import build_model, count_params, disable_adapters, storage_bytes
from vtab_lily.adapters.bilora import BiLoRABranch, export_bits, load_bits
from vtab_lily.adapters.mora import MoRABranch, MoRAConfig, mora_rank


def _codebook_from_the_binary_adapter_iteration(bits=1):
    """The Binary Adapter code's iteration: quantile midpoints of N(0, 1), refined 500 times."""
    values, ranges = np.zeros(2 ** bits), np.zeros(2 ** bits - 1)
    for _ in range(500):
        ranges = (values[1:] + values[:-1]) / 2
        pv = np.concatenate([[0], norm.cdf(ranges), [1]])
        values = norm.ppf((pv[1:] + pv[:-1]) / 2)
    return values


def test_bilora_forward_is_quantise_then_matmul_with_straight_through_gradient():
    torch.manual_seed(0)
    branch = BiLoRABranch(16, 12, r=4, s=0.5, dropout=0.0)
    with torch.no_grad():
        branch.up.weight.normal_()
    x = torch.randn(3, 5, 16)
    code = _codebook_from_the_binary_adapter_iteration()
    assert code == pytest.approx([-0.6745, 0.6745], abs=1e-4)

    def quantised(w):
        z = ((w - w.mean()) / (w.std() + 1e-5)).numpy()
        return torch.from_numpy(np.where(z > 0, code[1], code[0]).astype(np.float32)) * w.std() + w.mean()

    down, up = quantised(branch.down.weight.detach()), quantised(branch.up.weight.detach())
    want = (x @ down.T) @ up.T * 0.5
    out = branch(x)
    assert_close(out, want, 1e-5)
    # straight-through: the gradient is that of W(w) = (c + z(w) - z(w0)) * std(w) + mean(w), c and w0 fixed
    g = torch.randn_like(out)
    (out * g).sum().backward()
    w = branch.up.weight.detach().clone().requires_grad_(True)
    z0 = ((w - w.mean()) / (w.std() + 1e-5)).detach()
    c = torch.sign(z0) * code[1]
    eff = (c + (w - w.mean()) / (w.std() + 1e-5) - z0) * w.std() + w.mean()
    (((x @ down.T) @ eff.T * 0.5) * g).sum().backward()
    assert_close(branch.up.weight.grad, w.grad, 1e-5)


@pytest.mark.slow
def test_bilora_counts_storage_and_exported_bits_round_trip(tmp_path, images):
    vitb = build_model("vit-b", "bilora", 100, pretrained=False)
    assert count_params(vitb) == 1_179_648
    assert storage_bytes(vitb) == 1_179_648 // 8 + 48 * 8  # 147,840 bytes: one bit per weight + mean, std
    model = tiny("bilora", r=4).eval()
    randomize_trainable(model)
    path = tmp_path / "bits.safetensors"
    assert export_bits(model, path) == storage_bytes(model)
    fresh = tiny("bilora", r=4).eval()
    load_bits(fresh, path)
    with torch.no_grad():
        assert_close(fresh(images), model(images), 1e-5)


def test_bilora_starts_near_but_not_at_the_backbone(images):
    model = tiny("bilora", r=4).eval()
    with torch.no_grad():
        delta = model(images)
        with disable_adapters(model):
            delta = delta - model(images)
    assert 0 < delta.abs().max() < 1e-2


peft = pytest.importorskip("peft")


def test_fourierft_equals_peft_fourierft(images):
    ours = tiny("fourierft", n=50, scale=3.0, loc_seed=5, targets=("qkv",), num_classes=5).eval()
    randomize_trainable(ours, std=0.5)
    torch.manual_seed(0)
    plain = create_backbone("vit-tiny", 5, pretrained=False, **TINY).eval()
    ref = peft.get_peft_model(plain, peft.FourierFTConfig(n_frequency=50, scaling=3.0, random_loc_seed=5,
                                                         target_modules=["qkv"])).eval()
    timm_ref = ref.base_model.model
    with torch.no_grad():
        timm_ref.head.load_state_dict(ours.head.state_dict())
        for ob, rb in zip(ours.blocks, timm_ref.blocks):
            branch = ob.attn.qkv.branches[0]
            assert torch.equal(torch.stack([branch.rows, branch.cols]), rb.attn.qkv.indices["default"])
            rb.attn.qkv.fourierft_spectrum["default"].copy_(branch.spectrum)
        assert_close(ours(images), ref(images), 1e-5)


@pytest.mark.slow
def test_fourierft_locations_are_shared_by_layers_and_count():
    model = build_model("vit-b", "fourierft", 10, pretrained=False)
    assert count_params(model) == 72_000  # q and v, n = 3000, 12 layers (Table 4 prints 0.936M)
    a, b = model.blocks[0].attn.qkv.branches[0], model.blocks[7].attn.qkv.branches[1]
    assert torch.equal(a.rows, b.rows) and torch.equal(a.cols, b.cols)


@pytest.mark.parametrize("kind,r_hat,params", [(1, 111, 12_321), (6, 110, 12_100)])
def test_mora_rank_and_parameters(kind, r_hat, params):
    assert mora_rank(768, 768, 8, kind) == r_hat
    branch = MoRABranch(768, 768, MoRAConfig(r=8, type=kind))
    assert sum(p.numel() for p in branch.parameters()) == params
    x = torch.randn(2, 3, 768)
    c = branch.compress(x)
    assert c.shape == ((2, 3, 111) if kind == 1 else (2, 3, 7, 110))  # 768 = 7 blocks of 110 after padding
    y = branch.decompress(branch.matrix(c))
    assert y.shape == (2, 3, 768)


def test_mora_type1_compression_and_decompression_by_hand():
    branch = MoRABranch(10, 7, MoRAConfig(r=1, type=1, dropout=0.0))  # r_hat = int(sqrt(17) + .5) = 4
    assert branch.r_hat == 4
    x = torch.arange(10.0).view(1, 10)
    padded = torch.cat([x, x[:, :2]], 1)  # padded with its own first entries to 12 = 3 blocks of 4
    assert torch.equal(branch.compress(x), padded.view(1, 3, 4).sum(1))
    y = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    assert branch.decompress(y).tolist() == [[1.0, 2.0, 3.0, 4.0, 1.0, 2.0, 3.0]]


def test_mora_type6_rotates_blocks_by_their_position():
    branch = MoRABranch(8, 8, MoRAConfig(r=1, type=6, dropout=0.0))  # r_hat = sqrt(16) = 4, 2 blocks
    x = torch.randn(1, 8)
    blocks = branch.compress(x)
    first, second = x.view(2, 4)
    assert torch.allclose(blocks[0, 0], first)  # position 0: no rotation
    angle = torch.tensor([1.0, 1.0 / 100])  # 1 / 10000^(2i / 4)
    rot = torch.cat([-second[2:], second[:2]])
    assert torch.allclose(blocks[0, 1], second * torch.cat([angle.cos()] * 2) + rot * torch.cat([angle.sin()] * 2))


@pytest.mark.slow
def test_table4_mora_count_is_type6_at_r29():
    model = build_model("vit-b", "mora", 10, pretrained=False, r=29, type=6)
    assert count_params(model) == 24 * 210 ** 2 == 1_058_400


@pytest.mark.parametrize("method,options", [("mora", {}), ("mora", {"type": 6}), ("fourierft", {"init": "zeros"})])
def test_zero_init_identity(method, options, images):
    model = tiny(method, **options).eval()
    with torch.no_grad():
        out = model(images)
        with disable_adapters(model):
            assert_close(out, model(images), 1e-6)


@pytest.mark.parametrize("backbone,method", [("vim-tiny-test", "fft"), ("vit-tiny", "fft"), ("vit-tiny", "adapter")])
def test_weight_decay_groups_follow_the_official_optimizers(backbone, method):
    """no_decay_1d (timm create_optimizer, filter_bias_and_bn): no decay on 1-d tensors, biases and the
    backbone's no_weight_decay() names: Vim's pos_embed and cls_token (hustvl/Vim vim/models_mamba.py
    L378-379, vim/main.py L391). Without it (the Lily / FacT code: plain AdamW, PETL-ViT FacT/fact_tt.py L195)
    everything decays."""
    from vtab_lily.model import param_groups
    model = build_model(backbone, method, 5, pretrained=False, backbone_options={"img_size": 32, **(
        {"patch_size": 8} if backbone == "vit-tiny" else {})})
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    exempt, decay = param_groups(model, 1e-3, no_decay_1d=True)
    assert (exempt["weight_decay"], decay["weight_decay"]) == (0.0, 1e-3)
    names = {id(p): n for n, p in trainable.items()}
    undecayed = {names[id(p)] for p in exempt["params"]}
    assert undecayed == {n for n, p in trainable.items() if p.ndim <= 1 or n.endswith(".bias")
                         or n in ("pos_embed", "cls_token", "reg_token", "dist_token")}
    if method == "fft":
        assert {"pos_embed", "cls_token"} <= undecayed
    if method == "adapter":  # NOAH's row: the adapters' biases and the head bias are not decayed
        assert any(n.endswith("down.bias") for n in undecayed) and "head.bias" in undecayed
    (everything,) = param_groups(model, 1e-4, no_decay_1d=False)
    assert everything["weight_decay"] == 1e-4 and len(everything["params"]) == len(trainable)
