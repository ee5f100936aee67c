import sys

import pytest
import torch

from vtab_lily import build_model
from vtab_lily.prepare import prepare_task

TINY = dict(img_size=32, patch_size=8)  # vit-tiny at 32 px: 4 layers, width 64, 16 patches + cls


def tiny(method: str, seed: int = 0, num_classes: int = 5, **options):
    """A tiny ViT with `method` attached; the backbone's weights depend only on `seed`."""
    torch.manual_seed(seed)
    return build_model("vit-tiny", method, num_classes, pretrained=False, backbone_options=TINY, **options)


def randomize_trainable(model, seed: int = 1, std: float = 0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * std)


@pytest.fixture
def images():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    """The offline digits task in VTAB-1K layout, prepared once per session."""
    root = tmp_path_factory.mktemp("vtab")
    prepare_task("digits", root)
    return root


@pytest.fixture
def scan_backend(monkeypatch):
    """use(name) forces a selective-scan backend for one test; `triton` runs under Triton's interpreter."""
    from backbones import ssm
    before = ssm._requested["name"]

    def use(name: str) -> None:
        if name == "triton":
            pytest.importorskip("triton")
            monkeypatch.setenv("TRITON_INTERPRET", "1")  # read when the kernels are defined: import them afresh
            monkeypatch.delitem(sys.modules, "backbones.ssm_triton", raising=False)
            ssm.triton_scan.cache_clear()
        ssm.set_backend(name)
    yield use
    sys.modules.pop("backbones.ssm_triton", None)
    ssm.triton_scan.cache_clear()
    ssm.set_backend(before)


def assert_close(got, want, rel: float = 1e-5) -> None:
    """max |got - want| <= rel * max |want|: the tolerance scales with the values compared, so an fp32
    comparison holds on any CPU's kernels; parity tests with a different order of operations compute both
    sides in float64 (`rel` 1e-9 there)."""
    got, want = torch.as_tensor(got), torch.as_tensor(want)
    assert got.shape == want.shape, (got.shape, want.shape)
    scale = want.abs().max().item()
    err = (got - want).abs().max().item()
    assert err <= rel * scale, f"max abs error {err:.3g} > {rel:g} x max |want| {scale:.3g}"
