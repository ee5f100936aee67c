"""The figures notebook runs end to end on a tiny model and the digits task, and writes its PNGs."""
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parent.parent / "analysis" / "notebooks" / "figures.ipynb"


@pytest.mark.slow
def test_figures_notebook_executes(tmp_path, monkeypatch):
    pytest.importorskip("ipykernel")
    for name, sub in (("LILY_FIGURES", "figures"), ("LILY_DATA", "data"), ("LILY_RUNS", "runs")):
        monkeypatch.setenv(name, str(tmp_path / sub))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    written = sorted(p.name for p in (tmp_path / "figures").glob("*.png"))
    assert written == ["attention.png", "features.png", "granularity.png", "rank.png", "routers_vim.png",
                       "routers_vit.png"]
    assert all((tmp_path / "figures" / name).stat().st_size > 5_000 for name in written)
