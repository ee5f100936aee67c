"""ViT backbones: weights from local files, the offline error, adapter sites."""
import pytest
import torch
from helpers import TINY
from safetensors.torch import save_file

from backbones import WeightsError, adapter_sites, create_backbone


@pytest.mark.slow
def test_offline_without_weights_names_the_file_and_the_option(monkeypatch):
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(WeightsError, match=r"ViT-B_16.npz.*--weights PATH"):
        create_backbone("vit-b", 10, pretrained=True)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_local_weights_load_and_a_different_head_is_reset(tmp_path, suffix):
    torch.manual_seed(0)
    source = create_backbone("vit-tiny", 1000, pretrained=False, **TINY)
    path = tmp_path / f"weights{suffix}"
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save({"state_dict": state}, path)
    same = create_backbone("vit-tiny", 1000, weights=str(path), **TINY)
    assert all(torch.equal(same.state_dict()[k], v) for k, v in state.items())
    other = create_backbone("vit-tiny", 7, weights=str(path), **TINY)
    assert other.head.weight.shape == (7, 64)
    assert torch.equal(other.blocks[2].attn.qkv.weight, state["blocks.2.attn.qkv.weight"])


def test_missing_or_unfit_weights_are_clear_errors(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        create_backbone("vit-tiny", 7, weights=str(tmp_path / "none.pth"), **TINY)
    torch.save({"blocks.0.attn.qkv.weight": torch.zeros(3, 3)}, tmp_path / "bad.pth")
    with pytest.raises(Exception, match="size mismatch|does not fit"):
        create_backbone("vit-tiny", 7, weights=str(tmp_path / "bad.pth"), **TINY)


@pytest.mark.slow
def test_vit_sites_slice_the_fused_qkv_and_drop_path_defaults():
    model = create_backbone("vit-b", 10, pretrained=False)
    layers = adapter_sites(model)
    assert len(layers) == 12
    k = layers[5].linear["k"]
    assert (k.d_in, k.d_out, k.out) == (768, 768, slice(768, 1536))
    assert layers[0].parallel["mlp_residual"].read_attr == "norm2"
    assert model.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)  # drop_path 0.1 by default
