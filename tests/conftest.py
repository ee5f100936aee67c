"""Fixtures shared by the tests; plain helpers (tiny models, the tiny recipe, assert_close) are in helpers.py."""
import sys

import pytest
import torch

from vtab_lily.prepare import prepare_task


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
