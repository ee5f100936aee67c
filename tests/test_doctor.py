"""`python -m vtab_lily.doctor`: the CPU run (GPU checks skipped, exit 0), a backend made to disagree (exit 1,
named), missing weights and data with their fetch commands, projections and the calibration file from given
rates; the CUDA checks themselves run only where CUDA is."""
import json
import subprocess
import sys

import pytest
import torch

from backbones import ssm
from vtab_lily import doctor
from vtab_lily.prepare import prepare_task
from vtab_lily.tasks import MINI_TASKS

RATES = {"vit-b": {"batch": 64, "train_ips": 960.0, "eval_ips": 1000.0},
         "vim-s": {"batch": 64, "train_ips": 480.0, "eval_ips": 500.0}}


def lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines()]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU machine's screen")
def test_cpu_machine_runs_its_checks_and_skips_the_gpu_ones(tmp_path, capsys):
    code = doctor.main(["--quick", "--data-root", str(tmp_path)])
    out = lines(capsys.readouterr().out)
    assert code == 0
    assert out[0] == "versions" and f"PASS  torch: {torch.__version__.split('+')[0]}" in out[1]
    scan = [line for line in out if line.startswith("PASS  torch float32: max error")]
    assert len(scan) == 1 and float(scan[0].split("max error ")[1].split()[0]) < 1e-5  # fp32 vs float64
    assert any(line.startswith("PASS  torch bfloat16: max error") for line in out)
    assert "SKIP  triton, mamba against the torch scan: no CUDA device" in out
    assert "SKIP  mini run against the CPU, tf32, bf16, sweep --runs-per-gpu 2: no CUDA device" in out
    assert "SKIP  ViT-B/16 and Vim-S Lily: --quick" in out
    assert not any(line.startswith("FAIL") for line in out) and ", 0 FAIL," in out[-1]


def test_a_backend_that_disagrees_fails_the_doctor_with_its_check_named(tmp_path, capsys, monkeypatch):
    real = ssm.selective_scan
    monkeypatch.setattr(ssm, "selective_scan", lambda *a: real(*a) * 1.01)  # 1% off: 10x the fp32 tolerance
    code = doctor.main(["--quick", "--data-root", str(tmp_path)])
    out = lines(capsys.readouterr().out)
    assert code == 1
    failed = [line for line in out if line.startswith("FAIL")]
    assert [line.split(":")[0] for line in failed] == ["FAIL  torch float32"]  # bf16's 3e-2 band holds 1%
    assert float(failed[0].split("max error ")[1].split()[0]) == pytest.approx(0.01, rel=0.05)
    assert out[-1].endswith("; failed: scan backends on cpu: torch float32")


def test_scan_error_is_relative_to_the_reference_magnitude():
    leaves = doctor.mixer_inputs("cpu", torch.float32, b=1, d=8, l=20, n=4)
    assert doctor.scan_error("torch", leaves) < 1e-5
    bf16 = doctor.mixer_inputs("cpu", torch.bfloat16, b=1, d=8, l=20, n=4)
    assert 1e-4 < doctor.scan_error("torch", bf16) < doctor.SCAN_TOLERANCE[torch.bfloat16]  # the inputs' rounding


def test_missing_weights_and_data_are_listed_with_the_commands_that_fetch_them(tmp_path, monkeypatch):
    from huggingface_hub import constants
    cache = tmp_path / "hub"
    snapshot = cache / "models--timm--vit_base_patch16_224.orig_in21k" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").write_bytes(b"x")
    (cache / "models--timm--vit_base_patch16_224.orig_in21k" / "refs").mkdir()
    (cache / "models--timm--vit_base_patch16_224.orig_in21k" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    weights = {c.name: c for c in doctor.weights_checks()}
    assert weights["vit-b"].status == "PASS" and weights["vit-b"].detail == str(snapshot / "model.safetensors")
    assert weights["vim-s"].status == "WARN" and weights["vim-s"].detail == (
        "hustvl/Vim-small-midclstok/vim_s_midclstok_80p5acc.pth is not cached; fetch it on a connected machine: "
        "hf download hustvl/Vim-small-midclstok vim_s_midclstok_80p5acc.pth")

    root = tmp_path / "vtab"
    prepare_task("digits", root)
    data = {c.name: c for c in doctor.data_checks(root)}
    assert data["mini VTAB"].status == "WARN" and data["mini VTAB"].detail == (
        f"1 of 7 prepared; missing {', '.join(MINI_TASKS[1:])}; prepare: python -m vtab_lily.prepare --task mini "
        f"--root {root}")
    assert data["VTAB-1K"].detail.startswith("0 of 19 prepared; missing cifar100, caltech101,")
    assert data["VTAB-1K"].detail.endswith(f"prepare: python -m vtab_lily.prepare --task all --root {root} (on a "
                                           "machine with internet)")
    assert "resisc45 (manual download)" in data and "retinopathy (manual download)" in data
    (root / "digits" / "test.txt").write_text("changed")  # a list that no longer matches its manifest's checksum
    assert next(c for c in doctor.data_checks(root) if c.name == "mini VTAB").detail.startswith("0 of 7 prepared")


@pytest.mark.slow
def test_projections_from_a_given_throughput():
    sizes = doctor.test_split_sizes()
    total_test = sum(sizes.values())  # 19 x 20,416
    assert total_test == 19 * 20_416
    vit_b = doctor.projected_run_s(RATES["vit-b"], 20_416)
    assert vit_b == pytest.approx(100 * 960 / 960 + 10 * 20_416 / 1000)  # 100 epochs of 960 images, 10 tests
    runs, hours, why = doctor.preset_hours("table4", RATES, gpus=1)
    assert runs == 418 and why == ""  # 7 rows + Lily's 15 grid points, x 19 tasks
    assert hours == pytest.approx(22 * (19 * 100 + 10 * total_test / 1000) / 3600)
    runs, hours, _ = doctor.preset_hours("table5", RATES, gpus=4)  # 5 Vim-S rows at half the rate, 4 ViT-B rows
    vim, vit = 19 * 200 + 10 * total_test / 500, 19 * 100 + 10 * total_test / 1000
    assert runs == 9 * 19 and hours == pytest.approx((5 * vim + 4 * vit) / 4 / 3600)
    runs, hours, why = doctor.preset_hours("mini", RATES, gpus=1)
    assert hours is None and why == "no rate for vim-mini, vit-mini"
    screen = {c.name: c.detail for c in doctor.projection_checks(RATES, 2)}
    assert screen["preset table4"] == f"418 runs, {22 * (1900 + 10 * total_test / 1000) / 2 / 3600:.1f} h"
    assert screen["one vit-b VTAB-1K run"] == (f"{(100 + 204.16) / 60:.1f} min (mean test split), "
                                               f"{(100 + 737.28) / 60:.1f} min (largest)")


@pytest.mark.slow
def test_calibration_file_holds_the_rates_and_the_preset_projections(tmp_path):
    path = tmp_path / "calibration.json"
    doctor.write_calibration(path, RATES, gpus=8)
    saved = json.loads(path.read_text())
    assert saved["rates"] == RATES and saved["gpus"] == 8 and saved["torch"] == torch.__version__
    assert saved["device_name"] == (torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
    assert saved["presets"]["table4"] == {"runs": 418, "hours": doctor.preset_hours("table4", RATES, 8)[1]}
    assert saved["presets"]["mini"]["hours"] is None
    assert [p.name for p in tmp_path.iterdir()] == ["calibration.json"]  # no temporary left beside it


def test_throughput_of_a_tiny_backbone_on_the_cpu():
    rate = doctor.throughput("vit-tiny", "lily", 2, "cpu", "bf16")
    assert rate["precision"] == "fp32" and rate["batch"] == 2 and rate["train_ips"] > 0 and rate["eval_ips"] > 0


def test_run_band():
    ok, detail = doctor.within_band({"acc": 80.0, "loss": 1.02}, {"acc": 82.0, "loss": 1.0})
    assert ok and detail == "acc 80.0 vs 82.0 (band 3 points), last loss 1.0200 vs 1.0000 (band 5%)"
    assert not doctor.within_band({"acc": 78.0, "loss": 1.0}, {"acc": 82.0, "loss": 1.0})[0]
    assert not doctor.within_band({"acc": 82.0, "loss": 1.1}, {"acc": 82.0, "loss": 1.0})[0]
    assert not doctor.within_band({"acc": 82.0, "loss": float("nan")}, {"acc": 82.0, "loss": 1.0})[0]


@pytest.mark.parametrize("argv,message", [
    (["--gpus", "0"], "error: --gpus must be at least 1, got 0\n"),
    (["--quick", "--calibration", "c.json"], "error: --calibration needs the throughput part: drop --quick\n"),
])
def test_user_mistakes_are_one_line_and_exit_2(argv, message, capsys):
    assert doctor.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err == message and captured.out == ""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_scan_backends_and_runs_pass(tmp_path):
    checks = doctor.scan_checks("cuda:0") + doctor.gpu_run_checks("cuda:0", tmp_path)
    assert not [c.line() for c in checks if c.status == "FAIL"]
    assert any(c.name == "torch float32" and c.status == "PASS" for c in checks)


def test_the_gpu_runs_output_goes_to_their_log_worker_processes_included(tmp_path, capfd):
    with doctor.output_to(tmp_path / "log.txt"):
        print("from the doctor")
        worker = "import sys; print('from a worker'); print('its error', file=sys.stderr)"
        subprocess.run([sys.executable, "-c", worker], check=True)
    print("on the screen")
    assert (tmp_path / "log.txt").read_text().splitlines() == ["from the doctor", "from a worker", "its error"]
    assert capfd.readouterr().out == "on the screen\n"
