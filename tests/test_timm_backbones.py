"""`timm:<model name>` backbones: sites derived from the blocks of tiny random timm models (nothing
downloads), zero-init identity, timm's fused attention kept, counts from an independent formula."""
import pytest
import torch
import torch.nn.functional as F

from backbones import adapter_sites, check_backbone
from vtab_lily import build_model, count_params, disable_adapters

D, DEPTH, R = 64, 2, 4
ARCHS = {  # name -> (timm kwargs, image size)
    "timm:vit_base_patch16_224": ({}, 32),                                     # plain ViT
    "timm:vit_base_patch14_reg4_dinov2": ({}, 28),                             # 4 registers, layer scale
    "timm:vit_base_patch16_clip_224": ({}, 32),                                # CLIP: pre-norm
    "timm:eva02_tiny_patch14_224": ({"qkv_fused": False}, 28),                 # separate q/k/v projections
}
METHODS = {  # method -> (options, trainable parameters without the head)
    "lora": ({"r": R}, DEPTH * 2 * (D * R + R * D)),  # q, v: down d x r, up r x d
    # Lily k+v+mlp, ne=2 on 2 layers: LPs 2 x (d r for k, v + d 2r for mlp), HPs the transposes, routers
    # per layer and target r -> ne (mlp: 2r -> ne)
    "lily": ({"r": R, "ne": 2}, 2 * (2 * D * R + D * 2 * R) * 2 + DEPTH * (R + R + 2 * R) * 2),
}


def _build(name, method, **options):
    kwargs, size = ARCHS[name]
    torch.manual_seed(0)
    model = build_model(name, method, 5, pretrained=False, backbone_options=dict(
        depth=DEPTH, embed_dim=D, num_heads=4, img_size=size, **kwargs), **options)
    return model.eval(), torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", ARCHS)
@pytest.mark.parametrize("method", METHODS)
def test_methods_attach_start_as_the_backbone_keep_fused_attention_and_count(name, method, monkeypatch):
    options, count = METHODS[method]
    model, x = _build(name, method, **options)
    assert count_params(model) == count
    calls = []
    fused = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or fused(*a, **k))
    with disable_adapters(model):
        plain = model(x)
    adapted = model(x)
    assert torch.equal(adapted, plain) and len(calls) == 2 * DEPTH  # every block, both passes
    assert all(block.attn.fused_attn for block in model.blocks)
    with torch.no_grad():  # the adapters are live: a change of their zero-init parameters moves the logits
        for n, p in model.named_parameters():
            if p.requires_grad and not n.startswith("head"):
                p.add_(0.1)
    assert not torch.allclose(model(x), plain)


def test_sites_follow_the_module_structure():
    fused, _ = _build("timm:vit_base_patch14_reg4_dinov2", "linear")
    separate, _ = _build("timm:eva02_tiny_patch14_224", "linear")
    k = adapter_sites(fused)[1].get("k")
    assert (k.attr, k.out) == ("qkv", slice(D, 2 * D)) and fused.reg_token.shape[1] == 4
    k = adapter_sites(separate)[1].get("k")
    assert (k.attr, k.out) == ("k_proj", slice(0, D)) and "qkv" not in adapter_sites(separate)[0].linear


@pytest.mark.slow
def test_timm_names_with_tags_are_mappable_without_building():
    for name in ("timm:vit_large_patch16_224.orig_in21k", "timm:vit_base_patch14_dinov2.lvd142m",
                 "timm:vit_base_patch16_clip_224.openai", "timm:vit_huge_patch14_224", "timm:deit_base_patch16_224",
                 "timm:vit_base_patch16_224.mae"):
        check_backbone(name)  # known and mappable, checked on the meta device (no weights, no memory)
    with pytest.raises(ValueError, match=r"block 0 \(EvaBlock\) has no mlp.fc1 \(Linear\)$"):  # SwiGLU's fc1_g/_x
        check_backbone("timm:eva02_base_patch14_224.mim_in22k")


@pytest.mark.parametrize("name", ["timm:vit_base_patch14_reg4_dinov2", "timm:eva02_tiny_patch14_224"])
def test_a_timm_checkpoint_file_loads_through_the_models_own_filter(name, tmp_path):
    from safetensors.torch import save_file

    from backbones import create_backbone
    kwargs = dict(depth=DEPTH, embed_dim=D, num_heads=4, img_size=28)
    torch.manual_seed(0)
    source = create_backbone(name, 1000, pretrained=False, **kwargs)
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "w.safetensors"))
    loaded = create_backbone(name, 1000, weights=str(tmp_path / "w.safetensors"), **kwargs)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in source.state_dict().items())
