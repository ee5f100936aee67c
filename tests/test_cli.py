"""What a newcomer meets on the command line: --help names the choices, a skipped run says so, and
`run --prepare` finishes a half-prepared task."""
import pytest

from backbones import BACKBONES
from vtab_lily import run
from vtab_lily.adapters import METHODS
from vtab_lily.prepare import prepare_task
from vtab_lily.tasks import ALIASES, TASKS

TINY = ["--backbone", "vit-tiny", "--task", "digits", "--epochs", "1", "--set", "image_size=32", "--set",
        "batch_size=100", "--set", "warmup_epochs=1", "--no-progress"]


@pytest.mark.parametrize("module", ["vtab_lily.run", "vtab_lily.sweep", "analysis.attention", "analysis.routers",
                                    "analysis.granularity"])
def test_help_lists_every_backbone_method_and_task(module, capsys, monkeypatch):
    import importlib
    monkeypatch.setenv("COLUMNS", "10000")  # no line wrapping (argparse also breaks names at hyphens)
    with pytest.raises(SystemExit):
        importlib.import_module(module).main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    names = {"vtab_lily.run": [*BACKBONES, *METHODS, *TASKS, *ALIASES],
             "vtab_lily.sweep": [*BACKBONES, *METHODS, *TASKS], "analysis.granularity": [*BACKBONES]}
    for name in names.get(module, [*TASKS, *ALIASES]):
        assert f" {name}," in text or f" {name} " in text or f" {name})" in text, name


def test_skipped_finished_run_says_so(tmp_path, capsys):
    prepare_task("digits", tmp_path / "data")
    argv = [*TINY, "--data-root", str(tmp_path / "data"), "--runs", str(tmp_path / "runs")]
    assert run.main(argv) == 0
    assert "skipped:" not in capsys.readouterr().out
    assert run.main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("skipped: this run is already finished (") and "--force runs it again" in out
    assert "| vit-tiny | lily |" in out


def test_run_prepare_finishes_a_half_prepared_task(tmp_path, capsys):
    prepare_task("digits", tmp_path / "data", limit=10)  # then killed before it wrote the lists
    folder = tmp_path / "data" / "digits"
    for p in [folder / "manifest.json", *folder.glob("*.txt")]:
        p.unlink()
    argv = [*TINY, "--data-root", str(tmp_path / "data"), "--runs", str(tmp_path / "runs")]
    assert run.main(argv) == 2
    assert "missing list file" in capsys.readouterr().err
    assert run.main([*argv, "--prepare"]) == 0
    assert len((folder / "test.txt").read_text().splitlines()) == 797 and (folder / "manifest.json").exists()
