"""Composition of methods (`--method a+b`, adapters/compose.py): counts, outputs equal to attaching the
methods by hand in order, gradients, conflicts as one error, save/load, records, CLI, sweep and tables."""
from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import pandas as pd
import pytest
import torch
from helpers import TINY, assert_close, randomize_trainable
from torch import nn

from backbones import create_backbone, head_of
from vtab_lily import build_model, count_params, disable_adapters, load_model, save_adapter
from vtab_lily import run as run_cli
from vtab_lily import sweep as sweep_cli
from vtab_lily import tables as tables_cli
from vtab_lily.adapters import METHODS, get_method, make_config, register
from vtab_lily.adapters.base import Method, SiteConflict
from vtab_lily.adapters.bitfit import BitFitConfig
from vtab_lily.errors import UnknownName, UserError
from vtab_lily.model import storage_bytes
from vtab_lily.prepare import prepare_task
from vtab_lily.records import RunSpec, origin_label, read_record

VIM = "vim-tiny-test"
TIED = "examples.tied_lora:tied_lora"  # a plugin whose low-rank matrices are shared by all layers


def built(backbone: str, method: str, seed: int = 0, **options) -> nn.Module:
    kw = {"backbone_options": TINY if backbone == "vit-tiny" else {"img_size": 32}}
    return build_model(backbone, method, 5, pretrained=False, seed=seed, **kw, **options)


def by_hand(backbone: str, parts: list[tuple[str, dict]], seed: int = 0) -> nn.Module:
    """The parts attached one after the other to a frozen backbone, as a user would without composition."""
    torch.manual_seed(seed)
    model = create_backbone(backbone, 5, pretrained=False, **(TINY if backbone == "vit-tiny" else {"img_size": 32}))
    model.requires_grad_(False)
    for name, options in parts:
        get_method(name).attach(model, make_config(name, options, backbone))
    head_of(model).requires_grad_(True)
    return model


def images(n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("backbone, method, options, parts", [
    ("vit-tiny", "lora+bitfit", {"lora.r": 4}, [("lora", {"r": 4}), ("bitfit", {})]),
    ("vit-tiny", "vpt+lora", {"vpt.length": 3}, [("vpt", {"length": 3}), ("lora", {})]),
    ("vit-tiny", "lora+ssf", {"ssf.targets": "norm1+norm2"}, [("lora", {}), ("ssf", {"targets": "norm1+norm2"})]),
    (VIM, "lily+bitfit", {}, [("lily", {}), ("bitfit", {})]),
    (VIM, "lora+lily", {"lora.r": 2}, [("lora", {"r": 2}), ("lily", {})]),  # both on in_proj's whole output
    (VIM, "peft:lora+bitfit", {"peft:lora.r": 2}, [("peft:lora", {"r": 2}), ("bitfit", {})]),
    ("vit-tiny", f"{TIED}+lora", {"lora.targets": "proj"}, [(TIED, {}), ("lora", {"targets": "proj"})]),
])
def test_composition_counts_and_computes_as_its_parts_attached_by_hand(backbone, method, options, parts):
    model = built(backbone, method, **options).eval()
    alone = [built(backbone, name, **opts) for name, opts in parts]
    assert count_params(model) == sum(count_params(m) for m in alone)
    assert storage_bytes(model) == sum(storage_bytes(m) for m in alone)
    hand = by_hand(backbone, parts).eval()
    assert [n for n, p in model.named_parameters() if p.requires_grad] == \
           [n for n, p in hand.named_parameters() if p.requires_grad]
    randomize_trainable(model)
    randomize_trainable(hand)
    x = images()
    with torch.no_grad():
        assert torch.equal(model(x), hand(x))
    assert model.peft_config["method"] == method
    assert model.peft_config["options"] == {f"{n}.{k}": v for n, opts in parts
                                            for k, v in make_config(n, opts, backbone).__dict__.items()}


def test_parallel_branches_on_one_slice_are_summed_in_order():
    model = built("vit-tiny", "lora+lily", **{"lora.targets": "v", "lily.targets": "v"}).eval()
    randomize_trainable(model)
    qkv = model.blocks[0].attn.qkv
    assert qkv.slices == [slice(128, 192), slice(128, 192)] and qkv.owners == ["lora", "lily"]
    x = torch.randn(2, 17, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    model.double()  # lily's projectors live in model.lily, shared across layers
    with torch.no_grad():
        want = qkv.base(x).clone()
        want[..., 128:] += qkv.branches[0](x) + qkv.branches[1](x)
        assert_close(qkv(x), want, rel=1e-12)


def test_gradients_reach_only_both_methods_tensors_and_the_head():
    model = built(VIM, "lora+bitfit")
    randomize_trainable(model)
    model(images(2)).square().sum().backward()
    lora = {n for n, _ in model.named_parameters() if ".branches." in n}
    biases = {n for n, _ in model.named_parameters() if n.endswith(".bias") and not n.startswith("head.")}
    head = {"head.weight", "head.bias"}
    assert lora and biases and not lora & biases
    got = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert got == lora | biases | head
    assert all(p.grad is None for n, p in model.named_parameters() if n not in lora | biases | head)


def test_disable_adapters_switches_off_every_part():
    model = built("vit-tiny", "lora+vpt", **{"vpt.length": 3}).eval()
    plain = built("vit-tiny", "linear").eval()
    randomize_trainable(model)
    plain.head.load_state_dict(model.head.state_dict())
    x = images()
    with torch.no_grad():
        on = model(x)
        with disable_adapters(model):
            assert torch.equal(model(x), plain(x))
        assert torch.equal(model(x), on) and (on - plain(x)).abs().max() > 1e-3


def test_save_and_load_model_round_trip(tmp_path):
    model = built("vit-tiny", "lora+bitfit", **{"lora.targets": "q+v", "lora.r": 3}).eval()
    randomize_trainable(model)
    save_adapter(model, tmp_path / "a.safetensors")
    rebuilt = load_model(tmp_path / "a.safetensors")
    assert json.loads(json.dumps(rebuilt.peft_config)) == json.loads(json.dumps(model.peft_config))
    assert rebuilt.peft_config["options"]["lora.targets"] == ("q", "v")
    with torch.no_grad():
        assert torch.equal(rebuilt(images()), model(images()))


@pytest.mark.parametrize("backbone, method, options, first, second, site", [
    ("vit-tiny", "lora+ssf", {}, "lora", "ssf", "blocks.0.attn.qkv"),  # parallel, then serial (ssf's qkv)
    ("vit-tiny", "adaptformer+adapter", {}, "adaptformer", "adapter", "blocks.0.drop_path2"),
    ("vit-tiny", "lora+lily", {"lora.targets": "qkv"}, "lora", "lily", "blocks.0.attn.qkv"),  # 0:192 vs k's 64:128
    ("vit-tiny", "lora+peft:lora", {}, "lora", "peft:lora", "blocks.0.attn.qkv"),
    (VIM, "ssf+lora", {"lora.targets": "dt_proj"}, "ssf", "lora", "layers.0.mixer.dt_proj"),
])
def test_incompatible_methods_on_one_site_are_one_error_naming_both(backbone, method, options, first, second, site):
    with pytest.raises(SiteConflict) as e:
        built(backbone, method, **options)
    message = str(e.value)
    assert "\n" not in message and f"methods {first} and {second} both adapt {site}:" in message


@pytest.fixture
def rebias(monkeypatch):
    """A method (registered for this test only) that replaces every backbone bias by a trainable copy, frozen
    or not, and one that unfreezes the patch embedding's bias in place."""
    def replace(model, cfg):
        for module in model.modules():
            if module is not model.head and isinstance(getattr(module, "bias", None), nn.Parameter):
                module.bias = nn.Parameter(module.bias.detach().clone())

    def unfreeze(model, cfg):
        model.patch_embed.proj.bias.requires_grad = True
    monkeypatch.setitem(METHODS, "rebias", Method(BitFitConfig, replace))
    monkeypatch.setitem(METHODS, "unfreeze", Method(BitFitConfig, unfreeze))


def test_two_methods_owning_one_parameter_are_one_error(rebias):
    for method in ("bitfit+rebias", "unfreeze+rebias"):  # replaced, or unfrozen in place, by the first
        first, second = method.split("+")
        with pytest.raises(SiteConflict, match=rf"^methods {first} and {second} both adapt patch_embed\.proj\.bias: "
                                               "both take the parameter as their own; give one of them other targets$"):
            built("vit-tiny", method)
    for method in ("rebias+bitfit", "unfreeze+bitfit"):  # bitfit leaves the biases an earlier part owns to it
        assert count_params(built("vit-tiny", method)) == count_params(built("vit-tiny", "bitfit"))


def test_a_method_replacing_another_ones_wrapper_is_one_error(monkeypatch):
    monkeypatch.setitem(METHODS, "vpt2", METHODS["vpt"])  # a second prompt method on the same stack of blocks
    with pytest.raises(SiteConflict, match=r"^methods vpt and vpt2 both adapt blocks: the later one replaced the "
                                           "earlier one's wrapper, which no longer runs"):
        built("vit-tiny", "vpt+vpt2")


def test_a_later_part_never_freezes_an_earlier_ones_tensors():
    model = built("vit-tiny", "lora+peft:lora", **{"lora.targets": "proj"})  # peft freezes all but its own
    assert count_params(model) == count_params(built("vit-tiny", "lora", targets="proj")) + \
        count_params(built("vit-tiny", "peft:lora"))
    model = built("vit-tiny", "peft:lora+peft:loha", **{"peft:loha.targets": "proj"})  # two peft tuners
    assert count_params(model) == count_params(built("vit-tiny", "peft:lora")) + \
        count_params(built("vit-tiny", "peft:loha", targets="proj"))


def test_composition_names_and_options_are_checked():
    with pytest.raises(UnknownName, match=r"option 'r' of the composition 'lora\+bitfit' needs its method's prefix; "
                                          r"valid options are \['lora.targets', 'lora.r', 'lora.s', 'lora.dropout'\]"):
        built(VIM, "lora+bitfit", r=4)
    with pytest.raises(UnknownName, match="names lora twice"):
        built(VIM, "lora+lora")
    with pytest.raises(UnknownName, match=r"unknown option\(s\) \['rank'\] for method 'lora'"):
        built(VIM, "lora+bitfit", **{"lora.rank": 4})
    with pytest.raises(UserError, match="must be >= 1"):
        built(VIM, "lora+bitfit", **{"lora.r": 0})
    with pytest.raises(UserError, match=r"contains '\+'"):
        register("a+b", BitFitConfig)(lambda model, cfg: None)
    assert get_method("fft+lora").trains_backbone and not get_method("lora+bitfit").trains_backbone


def test_run_id_is_stable_and_names_the_composition():
    def spec(method="lora+bitfit", **options):
        s = RunSpec("vit-mini", "digits", method, options)
        s.provenance = {"weights": {"source": "random"}}
        return s
    a, b = spec(**{"lora.r": 4}), spec(**{"lora.r": 4})
    assert a.run_id == b.run_id != spec(**{"lora.r": 2}).run_id != spec("bitfit+lora", **{"lora.r": 4}).run_id
    assert a.identity()["method_config"] == {"lora.targets": ("q", "v"), "lora.r": 4, "lora.s": 1.0,
                                             "lora.dropout": 0.1}
    assert a.path("runs").parts[:3] == ("runs", "vit-mini", "lora+bitfit")
    assert "origin" not in a.identity()
    plugin = spec(f"lora+{TIED}", **{"lora.targets": "proj"}).identity()["origin"]
    assert list(plugin) == [TIED] and plugin[TIED]["module"] == "examples.tied_lora"
    assert origin_label(plugin) == origin_label(plugin[TIED]) != ""


def call(main, argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    root = tmp_path_factory.mktemp("compose") / "vtab-1k"
    prepare_task("digits", root, limit=64)
    return root


def test_cli_errors_are_one_line_before_any_work(digits, tmp_path):
    base = ["--backbone", "vit-mini", "--task", "digits", "--data-root", digits, "--runs", tmp_path, "--device", "cpu",
            "--no-progress", "--epochs", 1]
    code, out, err = call(run_cli.main, [*base, "--method", "lora+bitfit", "--set", "r=4"])
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: unknown setting 'r': lora+bitfit composes "
                                                                 "methods, so its options take their method's prefix")
    code, out, err = call(run_cli.main, [*base, "--method", "lora+ssf"])
    assert code == 2 and err == ("error: methods lora and ssf both adapt blocks.0.attn.qkv: a parallel branch (reads "
                                 "its input) and a serial branch (reads its output): serial and parallel branches "
                                 "cannot share a module; give one of them other targets\n")
    assert not list(tmp_path.rglob("*.json")) and not list(tmp_path.rglob("*.state.pt"))
    with pytest.raises(SystemExit), contextlib.redirect_stdout(io.StringIO()) as help_text:
        run_cli.main(["--help"])
    assert "compose methods with '+' (e.g. lora+bitfit" in " ".join(help_text.getvalue().split())


@pytest.mark.slow
def test_run_sweep_and_runs_table_of_a_composition(digits, tmp_path):
    runs = tmp_path / "runs"
    common = ["--data-root", digits, "--runs", runs]
    code, out, err = call(run_cli.main, ["--backbone", "vit-mini", "--task", "digits", "--method", "lora+bitfit",
                                         "--set", "lora.r=4", "--set", "lora.targets=q+v", "--epochs", 1, "--seed", 1,
                                         "--device", "cpu", "--no-progress", *common])
    assert code == 0, err
    record = read_record(Path(re.search(r"^record: (.*)$", out, re.M).group(1)))
    assert record["method"] == "lora+bitfit" and record["method_config"]["lora.r"] == 4
    assert record["method_config"]["lora.targets"] == ["q", "v"]
    parts = built("vit-mini", "lora", r=4), built("vit-mini", "bitfit")
    assert record["params"] == sum(count_params(m) for m in parts)
    code, out, err = call(sweep_cli.main, ["--backbones", "vit-mini", "--methods", "lora+bitfit", "lora", "--tasks",
                                           "digits", "--seeds", 1, "--grid", "lora.r=2,4", "--set", "epochs=1",
                                           *common])
    assert code == 0, out + err
    assert "4 jobs: 3 ran, 1 already done" in out  # lora+bitfit at r=4 ran above: the same run id
    assert re.search(r"vit-mini lora\+bitfit digits seed 1 \{'lora.r': 2\} eval test: ran", out)
    assert re.search(r"vit-mini lora digits seed 1 \{'lora.r': 2\} eval test: ran", out)
    code, out, err = call(tables_cli.main, ["--table", "runs", "--runs", runs, "--out", tmp_path / "t"])
    assert code == 0, err
    table = pd.read_csv(tmp_path / "t" / "runs_paper.csv", index_col="row")
    assert sorted(table.index) == ["vit-mini lora", "vit-mini lora+bitfit"]
    records = [read_record(p) for p in (runs / "vit-mini" / "lora+bitfit" / "digits").glob("*.json")]
    assert len(records) == 2
    best = max(r["best_acc"] for r in records)
    assert table.loc["vit-mini lora+bitfit", "digits"] == pytest.approx(best, rel=1e-9)
    assert table.loc["vit-mini lora+bitfit", "params_m"] * 1e6 == pytest.approx(
        next(r["params"] for r in records if r["best_acc"] == best), rel=1e-9) or best == min(
        r["best_acc"] for r in records)  # a tie: tables takes the first record read
