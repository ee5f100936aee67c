"""Lily against independent references: HuggingFace peft's Lily / LoRA, and a naive loop (Eq. 17)."""
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import TINY, assert_close, randomize_trainable, tiny

from backbones import create_backbone

peft = pytest.importorskip("peft")


def _plain():
    torch.manual_seed(0)
    return create_backbone("vit-tiny", 5, pretrained=False, **TINY).eval()


def test_whole_linear_lily_equals_peft_lily(images):
    ours = tiny("lily", r=4, s=0.5, ne_1=2, ne_2=3, targets=("qkv", "fc1")).eval()
    randomize_trainable(ours)
    ref = peft.get_peft_model(_plain(), peft.LilyConfig(
        r=4, stride_A=2, num_B=3, scaling=0.5, target_modules=["qkv", "fc1"])).eval()
    timm_ref = ref.base_model.model
    with torch.no_grad():
        timm_ref.head.load_state_dict(ours.head.state_dict())
        for i, block in enumerate(timm_ref.blocks):
            for t, layer in (("qkv", block.attn.qkv), ("fc1", block.mlp.fc1)):
                layer.lily_A["default"].weight.copy_(ours.lily.lps[t][i // 2].weight)
                layer.lily_B["default"].weight.copy_(ours.lily.hps[t].reshape(-1, layer.out_features))
                layer.lily_router["default"].weight.copy_(ours.lily.routers[t][i].weight)
        assert_close(ours(images), ref(images), 1e-5)


def test_whole_qkv_lora_equals_peft_lora(images):
    ours = tiny("lora", r=4, s=2.0, dropout=0.0, targets=("qkv",)).eval()
    randomize_trainable(ours)
    ref = peft.get_peft_model(_plain(), peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["qkv"])).eval()
    timm_ref = ref.base_model.model
    with torch.no_grad():
        timm_ref.head.load_state_dict(ours.head.state_dict())
        for ob, rb in zip(ours.blocks, timm_ref.blocks):
            branch = ob.attn.qkv.branches[0]
            rb.attn.qkv.lora_A["default"].weight.copy_(branch.down.weight)
            rb.attn.qkv.lora_B["default"].weight.copy_(branch.up.weight)
        assert_close(ours(images), ref(images), 1e-5)


def _naive_lily(model, x, r, s, ne_1, ne_2):
    """The official kvmlp Lily forward written out: explicit attention, explicit loops over experts
    (Eq. 17: sum_j w_j * (h @ HP_j)), LP of layer i = LP number floor(i / (L / ne_1)), HPs shared."""
    lily = model.lily
    depth = len(model.blocks)

    def delta(target, i, h, relu):
        lp = lily.lps[target][i // (depth // ne_1)].weight
        low = h @ lp.T
        if relu:
            low = low.clamp(min=0)
        probs = torch.softmax(low @ lily.routers[target][i].weight.T, dim=-1)
        w = probs.mean(dim=(0, 1))  # averaged over batch and tokens
        out = 0
        for j in range(ne_2):
            out = out + w[j] * (low @ lily.hps[target][j])
        return out * s

    x = model.patch_embed(x)
    x = torch.cat([model.cls_token.expand(x.shape[0], -1, -1), x], 1) + model.pos_embed
    for i, block in enumerate(model.blocks):
        h = block.norm1(x)
        qkv = block.attn.qkv.base(h)
        d = h.shape[-1]
        q, k, v = qkv[..., :d], qkv[..., d:2 * d] + delta("k", i, h, False), qkv[..., 2 * d:] + delta("v", i, h, False)
        heads = block.attn.num_heads

        q, k, v = (t.reshape(t.shape[0], t.shape[1], heads, d // heads).transpose(1, 2) for t in (q, k, v))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), dim=-1)
        o = (att @ v).transpose(1, 2).reshape(x.shape)
        x = x + block.attn.proj(o)
        h = block.norm2(x)
        mlp = block.mlp.base
        x = x + mlp.fc2(F.gelu(mlp.fc1(h))) + delta("mlp", i, h, True)
    x = model.norm(x)
    return model.head(x[:, 0])


def test_lily_equals_naive_loop_over_layers_and_experts(images):
    model = tiny("lily", r=4, s=0.7, ne_1=2, ne_2=3).eval()
    randomize_trainable(model, std=0.2)
    with torch.no_grad():
        got = model(images)
        want = _naive_lily(model, images, r=4, s=0.7, ne_1=2, ne_2=3)
        assert_close(got, want, 1e-5)
    lps = [model.blocks[i].attn.qkv.branches[0] for i in range(4)]
    assert [b.shared.lp_index("k", b.layer) for b in lps] == [0, 0, 1, 1]  # layers 0-1 share LP 0, 2-3 LP 1
    assert model.lily.hps["k"].shape == (3, 4, 64)  # one HP bank for all layers
    assert model.lily.lps["mlp"][0].weight.shape == (8, 64)  # the MLP adapter is 2r wide


@pytest.mark.parametrize("routing", ["token", "sample"])
def test_per_token_and_per_sample_routing_equal_explicit_experts(routing):
    from vtab_lily.adapters.lily import lily_combine
    g = torch.Generator().manual_seed(0)
    h, hps = torch.randn(2, 5, 4, generator=g), torch.randn(3, 4, 6, generator=g)
    router = torch.nn.Linear(4, 3, bias=False)
    probs = torch.softmax(router(h), -1)
    if routing == "sample":
        probs = probs.mean(1, keepdim=True).expand_as(probs)
    want = sum(probs[..., j:j + 1] * (h @ hps[j]) for j in range(3))
    assert_close(lily_combine(h, hps, router, routing), want, 1e-5)


def test_batch_routing_makes_predictions_depend_on_the_batch(images):
    model = tiny("lily").eval()
    randomize_trainable(model, std=0.3)
    with torch.no_grad():
        alone = model(images[:1])
        batched = model(images)[:1]
    assert (alone - batched).abs().max() > 1e-6
    per_token = tiny("lily", routing="token").eval()
    randomize_trainable(per_token, std=0.3)
    with torch.no_grad():
        assert_close(per_token(images[:1]), per_token(images)[:1], 1e-5)
