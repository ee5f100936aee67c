"""A non-editable install: the wheel built from this tree, installed into a fresh folder, makes the tables
from another working directory (the published numbers are package data, read with importlib.resources)."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("pyproject.toml", "README.md", "vtab_lily", "backbones", "analysis")


@pytest.mark.slow
@pytest.mark.install
def test_wheel_installed_into_a_fresh_target_prints_the_paper_tables(tmp_path):
    src = tmp_path / "src"  # a copy, so that the build leaves nothing in the tree
    src.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(ROOT / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    built = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w",
                            str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=120)
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "dist").glob("vtab_lily-*.whl")
    target = tmp_path / "target"
    installed = subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(target), str(wheel)],
                               capture_output=True, text=True, timeout=120)
    assert installed.returncode == 0, installed.stderr
    assert (target / "vtab_lily" / "paper" / "paper_tables.csv").is_file()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    where = subprocess.run([sys.executable, "-c", "import vtab_lily; print(vtab_lily.__file__)"], cwd=elsewhere,
                           env=env, capture_output=True, text=True, timeout=120)
    assert where.stdout.strip() == str(target / "vtab_lily" / "__init__.py"), where.stderr
    out = subprocess.run([sys.executable, "-m", "vtab_lily.tables", "--paper-only"], cwd=elsewhere, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    lily = next(line for line in lines if line.startswith("| vit-b lily |"))  # Table 4's Lily row, as published
    assert lily.split(" | ")[3:6] == ["73.9", "93.0", "72.9"] and lily.endswith("| 77.3 | 75.2 | 77.3 | +0.0 |")
    assert ("Paper check: 76 printed Means recomputed from their per-task numbers (or group means); 2 differ by more "
            "than 0.1:") in lines  # 27 + 21 (vpetl.csv) with per-task numbers, 28 of MambaPEFT with group means only
    assert "  Table 5 vit-b-in1k linear: printed 66.4, recomputed 57.23" in lines
    assert not list(elsewhere.iterdir())  # --paper-only writes nothing
