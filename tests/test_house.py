"""One source per fact: the backbone family is a field of its spec, one hub-download helper, one file
hash, Lily's router analysis runs the adapter's own LP -> ReLU -> router step."""
import dataclasses
import hashlib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_trainable, tiny

from analysis.routers import router_weights
from backbones import BACKBONES, WeightsError, create_backbone, family, pretrained_file
from backbones.weights import sha256
from vtab_lily.adapters.lily import LilyBranch
from vtab_lily.recipes import recipe_for

ROOT = Path(__file__).resolve().parent.parent


def test_the_family_is_the_backbone_specs_field_for_methods_and_recipes(monkeypatch):
    assert {name: family(name) for name in ("vit-b", "vit-mini", "vim-s", "vim-mini", "timm:vit_small_patch16_224")} \
        == {"vit-b": "vit", "vit-mini": "vit", "vim-s": "vim", "vim-mini": "vim", "timm:vit_small_patch16_224": "vit"}
    monkeypatch.setitem(BACKBONES, "my-mamba", BACKBONES["vim-s"])  # a Vim whose name does not start with vim
    assert family("my-mamba") == "vim"
    assert recipe_for("my-mamba") == recipe_for("vim-s") != recipe_for("vit-b")
    monkeypatch.setitem(BACKBONES, "vimlike-vit", dataclasses.replace(BACKBONES["vit-b"]))
    assert family("vimlike-vit") == "vit" and recipe_for("vimlike-vit") == recipe_for("vit-b")


def test_every_hub_download_fails_with_one_message(monkeypatch):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    messages = []
    for fetch in (lambda: create_backbone("vit-b", 10), lambda: create_backbone("vim-s", 10),
                  lambda: pretrained_file("vim-t")):
        with pytest.raises(WeightsError) as e:
            fetch()
        messages.append(e.value.args[0])
    for text, file in zip(messages, ("ViT-B_16.npz", "vim_s_midclstok_80p5acc.pth", "vim_t_midclstok_76p1acc.pth")):
        assert text.startswith("could not fetch ") and file in text
        assert "from the Hugging Face hub (HF_HUB_OFFLINE is set, and it is not in the local hub cache). Offline, " \
               "download it on a connected machine and pass it with --weights PATH (Python: weights=PATH)" in text


def test_one_file_hash_for_weights_lists_and_method_modules(tmp_path):
    data = bytes(range(256)) * (5 << 12)  # 5 MiB: more than one 4 MiB block
    (tmp_path / "f").write_bytes(data)
    assert sha256(tmp_path / "f") == hashlib.sha256(data).hexdigest()
    users = sorted(str(p.relative_to(ROOT)) for folder in ("backbones", "vtab_lily", "analysis")
                   for p in (ROOT / folder).rglob("*.py") if "hashlib.sha256(" in p.read_text())
    assert users == ["backbones/weights.py", "vtab_lily/provenance.py"]  # the file hash; a digest over split lists


def test_router_weights_are_the_branches_own_router_step(images):
    model = tiny("lily", ne_1=2, ne_2=3, targets="k+mlp").eval()
    randomize_trainable(model, std=0.3)
    shared = model.lily
    for target in ("k", "mlp"):
        seen = {}
        branches = [b for b in model.modules() if isinstance(b, LilyBranch) and b.target == target]
        hooks = [b.register_forward_hook(lambda b, i, o: seen.setdefault(b.layer, i[0])) for b in branches]
        with torch.no_grad():
            model(images)
            for h in hooks:
                h.remove()
            want = []
            for layer in sorted(seen):  # the step as the analysis computed it before it called the adapter's
                h = shared.lps[target][shared.lp_index(target, layer)](seen[layer])
                h = F.relu(h) if target == "mlp" else h
                want.append(F.softmax(shared.router_for(target, layer)(h), -1).reshape(-1, 3).sum(0))
        got = router_weights(model, images, target)
        assert got.shape == (4, 3) and torch.equal(got, torch.stack(want))
        assert torch.allclose(got.sum(-1), torch.full((4,), 3.0 * 17))  # 3 images x 17 tokens
