"""peft's tuners as methods (`peft:<tuner>`) on vit-tiny and a Vim: counts against peft's own report,
gradients only in adapters and head, disable_adapters, save/load, and a 2-epoch run's record."""
import peft
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, randomize_trainable

from backbones import create_backbone
from vtab_lily import build_model, count_params, disable_adapters, load_adapter, save_adapter
from vtab_lily.errors import UserError
from vtab_lily.records import RunSpec, read_record
from vtab_lily.run import execute

RECIPE = {"image_size": 32, "batch_size": 50, "epochs": 2, "eval_every": 2, "warmup_epochs": 1, "lr": 3e-3}
VIT = dict(img_size=32, patch_size=8)  # vit-tiny: 4 layers of width 64, 16 patches + class token
VIM = dict(img_size=32)
TUNERS = {  # tuner -> peft's own config for the same target modules (whole qkv of every block)
    "lora": lambda t: peft.LoraConfig(target_modules=t),
    "dora": lambda t: peft.LoraConfig(target_modules=t, use_dora=True),
    "loha": lambda t: peft.LoHaConfig(target_modules=t),
    "lokr": lambda t: peft.LoKrConfig(target_modules=t),
    "ia3": lambda t: peft.IA3Config(target_modules=t, feedforward_modules=[]),
    "vera": lambda t: peft.VeraConfig(target_modules=t),
    "oft": lambda t: peft.OFTConfig(target_modules=t),
    "fourierft": lambda t: peft.FourierFTConfig(target_modules=t),
    "vblora": lambda t: peft.VBLoRAConfig(target_modules=t, vector_length=16),  # one vector bank for all layers
}
OPTIONS = {"vblora": {"vector_length": 16}}  # the default 256 does not divide vit-tiny's width
CASES = [("vit-tiny", VIT, t, "qkv") for t in TUNERS] + [("vim-tiny-test", VIM, "lora", "in_proj")]


def _model(backbone, options, method):
    torch.manual_seed(0)
    return build_model(backbone, method, 5, pretrained=False, backbone_options=options,
                       **OPTIONS.get(method.removeprefix("peft:"), {}))


@pytest.mark.parametrize("backbone,options,tuner,target", CASES)
def test_peft_tuner_counts_trains_switches_and_round_trips(backbone, options, tuner, target, tmp_path):
    model = _model(backbone, options, f"peft:{tuner}")
    torch.manual_seed(0)
    reference = peft.get_peft_model(create_backbone(backbone, 5, pretrained=False, **options), TUNERS[tuner]([target]))
    assert count_params(model) == reference.get_nb_trainable_parameters()[0] > 0  # peft freezes the head
    banks = {id(m.vblora_vector_bank) for m in model.modules() if hasattr(m, "vblora_vector_bank")}
    assert len(banks) == (1 if tuner == "vblora" else 0)  # shared by every layer, counted once above

    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    F.cross_entropy(model(x), torch.arange(4)).backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if ".default" in n or n.startswith("head.")}
    assert all((p.grad is not None) == p.requires_grad for p in model.parameters())

    model.eval()
    randomize_trainable(model, std=0.2)  # LoHa's update is a product of four factors: not too small
    plain = _model(backbone, options, "linear").eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if k.startswith("head.")}, strict=False)
    with disable_adapters(model):
        assert_close(model(x), plain(x), 1e-5)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    adapted = model(x)
    assert (adapted - plain(x)).abs().max() > 1e-3

    save_adapter(model, tmp_path / "adapter.safetensors")
    again = _model(backbone, options, f"peft:{tuner}").eval()
    load_adapter(again, tmp_path / "adapter.safetensors")
    assert_close(again(x), adapted, 1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("backbone,tuner", [("vit-tiny", t) for t in ("lora", "ia3", "vera", "oft", "loha", "lokr")]
                         + [("vim-tiny-test", "lora")])
def test_two_epoch_run_writes_a_record(data_root, tmp_path, backbone, tuner):
    spec = RunSpec(backbone, "digits", f"peft:{tuner}", {}, 0, "test", RECIPE)
    record = read_record(execute(spec, tmp_path, data_root, progress=False))
    assert record["status"] == "done" and [e["epoch"] for e in record["evaluations"]] == [2]
    assert record["origin"] == {"module": "peft", "version": peft.__version__}
    assert record["params"] == count_params(_model(backbone, VIT if backbone == "vit-tiny" else VIM, f"peft:{tuner}"))
    assert record["method_config"]["targets"] == (["qkv"] if backbone == "vit-tiny" else ["in_proj"])


def test_options_go_to_peft_and_sites_map_to_whole_modules():
    model = _model("vit-tiny", VIT, "peft:lora")
    assert model.peft_config["options"]["r"] == 8  # peft's default
    ranked = build_model("vit-tiny", "peft:lora", 5, pretrained=False, backbone_options=VIT, r=2,
                         targets="qkv+fc2")
    assert count_params(ranked) == 4 * (2 * (64 + 192) + 2 * (256 + 64))  # r (d_in + d_out) per module
    with pytest.raises(ValueError, match="site 'k' is a slice of qkv; peft adapts whole modules"):
        build_model("vit-tiny", "peft:lora", 5, pretrained=False, backbone_options=VIT, targets="k")
    with pytest.raises(ValueError, match="site 'mlp' is a parallel site"):
        build_model("vit-tiny", "peft:lora", 5, pretrained=False, backbone_options=VIT, targets="mlp")
    with pytest.raises(UserError, match="unknown option"):
        build_model("vit-tiny", "peft:lora", 5, pretrained=False, backbone_options=VIT, rank=2)
