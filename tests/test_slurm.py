"""The Slurm launcher on its real path: submitit's SlurmExecutor with fake sbatch / srun / sacct / scancel /
scontrol (tests/fake_slurm.py) first on PATH; the jobs' command runs here, so tiny runs write records."""
import json
import re
import subprocess

import fake_slurm
import pytest

from vtab_lily import sweep as sweep_cli
from vtab_lily.records import load_records, read_record

pytest.importorskip("submitit")


@pytest.fixture
def slurm(tmp_path, monkeypatch):
    """The fake Slurm's state folder; its commands first on PATH; submitit's shared sacct cache emptied."""
    from submitit.slurm.slurm import SlurmJob
    state = tmp_path / "slurm"
    fake_slurm.install(tmp_path / "bin", state)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{__import__('os').environ['PATH']}")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    SlurmJob.watcher.clear()
    yield state
    SlurmJob.watcher.clear()


def sweep(data_root, tmp_path, *argv, epochs=4):
    return sweep_cli.main(["--backbones", "vit-tiny", "--tasks", "digits", "--launcher", "slurm",
                           "--set", "image_size=32", "batch_size=100", f"epochs={epochs}", "checkpoint_every=1",
                           "warmup_epochs=0", "--data-root", str(data_root), "--runs", str(tmp_path / "runs"),
                           "--logs", str(tmp_path / "logs"), *argv])


def test_submission_returns_at_once_with_every_sbatch_line_and_status_counts(data_root, tmp_path, slurm, capsys):
    argv = ["--methods", "lora", "--seeds", "1", "2", "3", "--partition", "gpu", "--array-parallelism", "2",
            "--slurm", "account=proj7", "--slurm", "qos=high", "--slurm", "mem_gb=16", "--slurm", "cpus_per_task=4",
            "--slurm", "gpus_per_node=2", "--slurm", "constraint=a100", "--slurm", "exclude=node3",
            "--slurm", "setup=module load cuda", "--slurm", "setup=export HF_HUB_OFFLINE=1",
            "--slurm", "additional_parameters.reservation=paper"]
    assert sweep(data_root, tmp_path, *argv) == 0
    out = capsys.readouterr().out
    assert "submitted 3 runs in 3 jobs to slurm: job ids 1000_0 .. 1000_2" in out
    assert "--status" in out and out.count("submitted (job 1000_") == 3
    (call,) = fake_slurm.calls(slurm, "sbatch")
    script = (slurm / "1000.sh").read_text()
    for line in ("--account=proj7", "--qos=high", "--mem=16GB", "--cpus-per-task=4", "--gpus-per-node=2",
                 "--constraint=a100", "--exclude=node3", "--reservation=paper", "--array=0-2%2", "--partition=gpu",
                 "--time=240", "--signal=USR2@120", "--job-name=vtab-lily"):
        assert f"#SBATCH {line}\n" in script, line
    assert "# setup\nmodule load cuda\nexport HF_HUB_OFFLINE=1\n" in script
    assert re.search(r"^srun .* -u -m submitit\.core\._submit ", script, re.M)
    manifest = json.loads((tmp_path / "logs" / "submissions" / "1000.json").read_text())
    assert [j["job_id"] for j in manifest["jobs"]] == ["1000_0", "1000_1", "1000_2"]
    assert [j["runs"][0]["spec"]["seed"] for j in manifest["jobs"]] == [1, 2, 3]
    assert not (tmp_path / "runs").exists()  # nothing ran

    # the same command again: every run is queued already, nothing is submitted twice
    assert sweep(data_root, tmp_path, *argv) == 0
    assert len(fake_slurm.calls(slurm, "sbatch")) == 1
    capsys.readouterr()

    fake_slurm.set_state(slurm, "1000_1", "RUNNING")
    fake_slurm.set_state(slurm, "1000_2", "FAILED")
    subprocess.run(["scancel", "1000_0"], check=True)  # the user stops one job
    from submitit.slurm.slurm import SlurmJob
    SlurmJob.watcher.clear()
    assert sweep(data_root, tmp_path, *argv, "--status") == 1
    out = capsys.readouterr().out
    assert out.splitlines()[-1] == "3 runs: 0 done, 1 running, 0 pending, 2 failed, 0 not submitted"
    assert "job 1000_0 ended CANCELLED without finishing the run" in out.splitlines()[0]
    assert "running (RUNNING, job 1000_1, log " in out.splitlines()[1]
    failed = next(line for line in out.splitlines() if "seed 3" in line)
    assert f"job 1000_2 ended FAILED without finishing the run (job 1000_2, log {tmp_path / 'logs'}/1000_2_0_log.err)" \
        in failed
    assert ["-o", "JobID,State,NodeList", "--parsable2", "-j", "1000"] in fake_slurm.calls(slurm, "sacct")


@pytest.mark.slow
def test_array_runs_requeue_on_timeout_resumes_and_status_reports_reasons(data_root, tmp_path, slurm, capsys,
                                                                         monkeypatch):
    monkeypatch.setenv("FAKE_SLURM_RUN", "1")
    # array task 0 gets Slurm's USR2 once its run saved a state (after epoch 1): submitit requeues it
    monkeypatch.setenv("FAKE_SLURM_TIMEOUT", f"0:{tmp_path / 'runs'}/**/*.state.pt")
    argv = ["--methods", "lora", "--seeds", "1", "--grid", "lr=0.001,1e30", "--timeout-min", "1", "--wait"]
    assert sweep(data_root, tmp_path, *argv) == 1  # the lr=1e30 run fails (NaN loss)
    out = capsys.readouterr().out
    assert "submitted 2 runs in 2 jobs to slurm: job ids 1000_0 .. 1000_1" in out
    assert fake_slurm.history(slurm, "1000_0") == ["PENDING", "RUNNING", "REQUEUED", "RUNNING", "COMPLETED"]
    (signal,) = [c for c in fake_slurm.calls(slurm) if c[0] == "USR2"]
    assert signal[1] == "1000_0" and signal[2].endswith(".state.pt")
    assert ["requeue", "1000_0"] in fake_slurm.calls(slurm, "scontrol")
    log = (tmp_path / "logs" / "1000_0_0_log.out").read_text()
    assert "resumed from " in log and ".state.pt after epoch " in log
    assert "this job is timed-out" in (tmp_path / "logs" / "1000_0_0_log.err").read_text()
    df = load_records(tmp_path / "runs")
    assert len(df) == 1 and df.iloc[0]["best_epoch"] == 4
    record = read_record(df.iloc[0]["path"])
    assert [e["epoch"] for e in record["evaluations"]] == [4] and len(record["train_losses"]) == 4
    assert out.splitlines()[-1] == "2 jobs: 1 ran, 0 already done, 0 run elsewhere, 1 failed"
    assert not list((tmp_path / "runs").rglob("*.lock")) and not list((tmp_path / "runs").rglob("*.state.pt"))

    from submitit.slurm.slurm import SlurmJob
    SlurmJob.watcher.clear()
    assert sweep(data_root, tmp_path, *argv[:-1], "--status") == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == "2 runs: 1 done, 0 running, 0 pending, 1 failed, 0 not submitted"
    assert "the training loss became" in lines[1] and "(job 1000_1, log " in lines[1], lines


@pytest.mark.slow
def test_runs_per_gpu_puts_k_runs_in_one_job_and_its_requeue_resumes_them(data_root, tmp_path, slurm, capsys,
                                                                          monkeypatch):
    monkeypatch.setenv("FAKE_SLURM_RUN", "1")
    monkeypatch.setenv("FAKE_SLURM_TIMEOUT", f":{tmp_path / 'runs'}/**/*.state.pt")  # the one job (no array)
    argv = ["--methods", "linear", "--seeds", "1", "2", "--runs-per-gpu", "2"]
    assert sweep(data_root, tmp_path, *argv) == 0  # returns at once
    capsys.readouterr()
    fake_slurm.wait_all(slurm)
    assert fake_slurm.history(slurm, "1000") == ["PENDING", "RUNNING", "REQUEUED", "RUNNING", "COMPLETED"]
    assert "#SBATCH --gpus-per-node=1\n" in (slurm / "1000.sh").read_text() and "--array" not in \
        (slurm / "1000.sh").read_text()
    log = (tmp_path / "logs" / "1000_0_log.out").read_text()
    assert "resumed from " in log  # a run process of the requeued job resumed from the state it saved
    df = load_records(tmp_path / "runs")
    assert sorted(df["seed"]) == [1, 2] and list(df["best_epoch"]) == [4, 4]
    assert not list((tmp_path / "runs").rglob("*.lock")) and not list((tmp_path / "runs").rglob("*.state.pt"))
    from submitit.slurm.slurm import SlurmJob
    SlurmJob.watcher.clear()
    assert sweep(data_root, tmp_path, *argv, "--status") == 0
    assert capsys.readouterr().out.splitlines()[-1] == "2 runs: 2 done, 0 running, 0 pending, 0 failed, 0 not submitted"


@pytest.mark.parametrize("argv,message", [
    (["--slurm", "acount=x"], "--slurm acount: not a Slurm parameter of submitit; valid keys: account, "
                              "additional_parameters, array_parallelism,"),
    (["--slurm", "mem_gb=lots"], "--slurm mem_gb=lots: expects float"),
    (["--slurm", "qos"], "--slurm expects KEY=VALUE, got 'qos'"),
    (["--array-parallelism", "0"], "--slurm array_parallelism must be an integer >= 1, got 0"),
])
def test_bad_slurm_options_are_one_line_before_any_work(data_root, tmp_path, slurm, capsys, argv, message):
    assert sweep(data_root, tmp_path, "--methods", "lora", *argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert fake_slurm.calls(slurm) == [] and not (tmp_path / "logs").exists()


def test_a_refused_submission_is_one_line(data_root, tmp_path, slurm, capsys, monkeypatch):
    monkeypatch.setenv("FAKE_SLURM_ACCOUNTS", "proj7")
    assert sweep(data_root, tmp_path, "--methods", "lora", "--slurm", "account=proj8") == 2
    err = capsys.readouterr().err
    assert err == ("error: sbatch refused the jobs: sbatch: error: Batch job submission failed: Invalid account or "
                   "account/partition combination specified (check --partition and --slurm account / qos / the "
                   "resources asked)\n")
    assert not (tmp_path / "logs" / "submissions").exists()
