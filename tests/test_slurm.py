"""The Slurm launcher on its real path: submitit's SlurmExecutor with fake sbatch / srun / sacct / scancel /
scontrol (tests/fake_slurm.py) first on PATH; the jobs' command runs here, so tiny runs write records."""
import json
import re
import subprocess
from pathlib import Path

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


class RunsCode:
    """A 'result' whose unpickling runs code: it creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_status_never_unpickles_a_result_file_from_the_logs_folder(data_root, tmp_path, slurm, capsys):
    import pickle

    from submitit.slurm.slurm import SlurmJob
    assert sweep(data_root, tmp_path, "--methods", "lora", "--seeds", "1") == 0  # submitted, not run
    (job,) = json.loads((tmp_path / "logs" / "submissions" / "1000.json").read_text())["jobs"]
    result = SlurmJob(folder=tmp_path / "logs", job_id=job["job_id"]).paths.result_pickle
    result.write_bytes(pickle.dumps(("success", RunsCode(tmp_path / "marker"))))
    fake_slurm.set_state(slurm, job["job_id"], "COMPLETED")
    SlurmJob.watcher.clear()
    capsys.readouterr()
    assert sweep(data_root, tmp_path, "--methods", "lora", "--seeds", "1", "--status") == 1
    out = capsys.readouterr().out
    assert not (tmp_path / "marker").exists()
    assert f"failed: job {job['job_id']} ended COMPLETED without finishing the run" in out.splitlines()[0]


@pytest.mark.slow
def test_a_run_killed_inside_a_multi_run_job_fails_alone_and_resumes_when_submitted_again(data_root, tmp_path, slurm,
                                                                                         capsys, monkeypatch):
    import glob
    import os
    import signal
    import time

    from submitit.slurm.slurm import SlurmJob

    from vtab_lily.locks import RunLock
    monkeypatch.setenv("FAKE_SLURM_RUN", "1")
    argv = ["--methods", "linear", "--seeds", "1", "2", "--runs-per-gpu", "2"]
    assert sweep(data_root, tmp_path, *argv, epochs=8) == 0
    end, states = time.time() + 120, []
    while not states and time.time() < end:  # the first run to save a state (after its first epoch) is killed
        states = glob.glob(f"{tmp_path / 'runs'}/**/*.state.pt", recursive=True)
        time.sleep(0.01)
    lock = Path(states[0].removesuffix(".state.pt") + ".lock")
    os.kill(json.loads(lock.read_text())["pid"], signal.SIGKILL)
    fake_slurm.wait_all(slurm)
    assert fake_slurm.history(slurm, "1000")[-1] == "COMPLETED"
    df = load_records(tmp_path / "runs")
    assert len(df) == 1 and df.iloc[0]["best_epoch"] == 8  # the other run finished and recorded
    killed = 3 - int(df.iloc[0]["seed"])
    assert lock.exists() and not RunLock(lock).live()  # left by the killed run, stale: the next holder takes it

    SlurmJob.watcher.clear()
    capsys.readouterr()
    assert sweep(data_root, tmp_path, *argv, "--status", epochs=8) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == "2 runs: 1 done, 0 running, 0 pending, 1 failed, 0 not submitted"
    (line,) = [line for line in lines if f" seed {killed} " in line]
    assert line.endswith(": failed: its run process ended with exit code -9 (killed: out of host memory? see the "
                         f"job's log) (job 1000, log {tmp_path / 'logs'}/1000_0_log.err)"), line

    assert sweep(data_root, tmp_path, *argv, epochs=8) == 0  # submitted again: only the killed run
    assert "submitted 1 runs in 1 jobs to slurm: job ids 1001" in capsys.readouterr().out
    fake_slurm.wait_all(slurm)
    assert "resumed from " in (tmp_path / "logs" / "1001_0_log.out").read_text()
    df = load_records(tmp_path / "runs")
    assert sorted(df["seed"]) == [1, 2] and list(df["best_epoch"]) == [8, 8]
    record = read_record(df[df["seed"] == killed].iloc[0]["path"])
    assert len(record["train_losses"]) == 8
    assert not list((tmp_path / "runs").rglob("*.lock")) and not list((tmp_path / "runs").rglob("*.state.pt"))
    outcome = json.loads((tmp_path / "logs" / "submissions" / "outcomes" / "1000.json").read_text())
    assert outcome["outcome"] == "done" and outcome["statuses"][killed - 1].startswith("failed: its run process")


@pytest.mark.slow
def test_reproduce_submits_to_slurm_returns_and_its_tables_only_writes_the_table(data_root, tmp_path, slurm, capsys,
                                                                               monkeypatch):
    import shlex

    from huggingface_hub import constants

    from vtab_lily import reproduce
    from vtab_lily import tables as tables_cli
    monkeypatch.setenv("FAKE_SLURM_RUN", "1")
    argv = ["--table", "mini", "--tasks", "digits", "--backbones", "vit-mini", "--methods", "linear", "--seeds", "1",
            "--data-root", str(data_root), "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out"), "--logs",
            str(tmp_path / "logs"), "--calibration", str(tmp_path / "none.json"), "--launcher", "slurm",
            "--slurm", "account=proj7", "--slurm", "qos=high", "--slurm", "gpus_per_node=1"]
    assert reproduce.main(argv) == 0  # returns at once
    out = capsys.readouterr().out
    assert "table mini: preset mini, 1 rows (1 configurations) x 1 tasks x 1 seed(s) = 1 runs" in out
    assert "submitted 1 runs in 1 jobs to slurm: job ids 1000;" in out
    assert out.splitlines()[-1].endswith(f"--status): python -m vtab_lily.reproduce {shlex.join(argv)} --tables-only")
    script = (slurm / "1000.sh").read_text()
    assert "#SBATCH --account=proj7\n" in script and "#SBATCH --qos=high\n" in script
    assert f"export HF_HUB_CACHE={shlex.quote(str(constants.HF_HUB_CACHE))} HF_HUB_OFFLINE=1\n" in script
    assert not (tmp_path / "out").exists()
    fake_slurm.wait_all(slurm)
    assert reproduce.main([*argv, "--tables-only"]) == 0
    assert tables_cli.main(["--table", "mini", "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "t")]) == 0
    for name in ("tablemini_paper.md", "tablemini_paper.csv", "tablemini_paper.tex"):
        assert (tmp_path / "out" / name).read_text() == (tmp_path / "t" / name).read_text()
    (record,) = load_records(tmp_path / "runs").itertuples()
    assert f"{record.best_acc:.1f}" in (tmp_path / "out" / "tablemini_paper.md").read_text()
