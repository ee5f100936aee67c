"""Fake Slurm commands for tests: `install(bin_dir, state_dir)` writes sbatch, srun, sacct, scancel and
scontrol scripts into bin_dir (put it first on PATH); each records its arguments in <state_dir>/calls.jsonl
and keeps the jobs' states in <state_dir>/jobs.json.

- sbatch FILE: refuses an account not in FAKE_SLURM_ACCOUNTS (when set), as Slurm does; hands out job ids
  from 1000, keeps a copy of FILE (<id>.sh), reads its `#SBATCH --array`, and
  leaves every job (array task) PENDING; with FAKE_SLURM_RUN=1 a detached runner then runs each array task
  in turn, as Slurm would: the script under bash with SLURM_* set, RUNNING, then COMPLETED or FAILED by its
  exit code, or, when the job asked `scontrol requeue` meanwhile, REQUEUED and run again.
- srun OPTIONS COMMAND: runs COMMAND with its --output / --error files (%A %a %j %t expanded); with
  FAKE_SLURM_TIMEOUT=<array task>:<glob>, on that task's first attempt it waits for a file matching the glob,
  then sends the job the USR2 that Slurm sends before a time limit (sbatch --signal=USR2@...).
- sacct -o JobID,State,NodeList --parsable2 -j ID ...: the states, as Slurm prints them.
- scancel ID: CANCELLED. scontrol requeue ID: marks the job for the runner to run again.
"""
from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

COMMANDS = ("sbatch", "srun", "sacct", "scancel", "scontrol")


def install(bin_dir: Path, state_dir: Path) -> None:
    bin_dir.mkdir(parents=True, exist_ok=True)
    state_dir.mkdir(parents=True, exist_ok=True)
    for name in COMMANDS:
        path = bin_dir / name
        path.write_text(f"#!/bin/sh\nFAKE_SLURM_DIR='{state_dir}' exec '{sys.executable}' '{__file__}' {name} \"$@\"\n")
        path.chmod(0o755)


def calls(state_dir: Path, name: str | None = None) -> list[list[str]]:
    path = state_dir / "calls.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [line[1:] for line in lines if name is None or line[0] == name]


@contextlib.contextmanager
def jobs(state_dir: Path):
    """The jobs database, locked while it is read and changed: {"next": id, "jobs": {id: [states...]}}."""
    with open(state_dir / "jobs.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        path = state_dir / "jobs.json"
        db = json.loads(path.read_text()) if path.exists() else {"next": 1000, "jobs": {}}
        yield db
        path.write_text(json.dumps(db))


def set_state(state_dir: Path, job: str, state: str) -> None:
    with jobs(state_dir) as db:
        db["jobs"][job].append(state)


def history(state_dir: Path, job: str) -> list[str]:
    with jobs(state_dir) as db:
        return list(db["jobs"][job])


def wait_all(state_dir: Path, timeout_s: float = 120) -> None:
    end = time.time() + timeout_s
    while time.time() < end:
        with jobs(state_dir) as db:
            if all(h[-1] in ("COMPLETED", "FAILED", "CANCELLED") for h in db["jobs"].values()):
                return
        time.sleep(0.2)
    raise TimeoutError("fake Slurm jobs still running")


def sbatch(state_dir: Path, argv: list[str]) -> int:
    text = Path(argv[-1]).read_text()
    if "--account=" in text and os.environ.get("FAKE_SLURM_ACCOUNTS") is not None:
        account = re.search(r"^#SBATCH --account=(.*)$", text, re.M).group(1)
        if account not in os.environ["FAKE_SLURM_ACCOUNTS"].split(","):
            print("sbatch: error: Batch job submission failed: Invalid account or account/partition combination "
                  "specified", file=sys.stderr)
            return 1
    array = re.search(r"^#SBATCH --array=0-(\d+)%\d+$", text, re.M)
    with jobs(state_dir) as db:
        job_id = db["next"]
        db["next"] += 1
        names = [f"{job_id}_{i}" for i in range(int(array.group(1)) + 1)] if array else [str(job_id)]
        db["jobs"].update({name: ["PENDING"] for name in names})
    script = state_dir / f"{job_id}.sh"
    script.write_text(text)
    if os.environ.get("FAKE_SLURM_RUN"):
        subprocess.Popen([sys.executable, __file__, "run", str(script), *names], start_new_session=True,
                         stdout=subprocess.DEVNULL, stderr=open(state_dir / "runner.err", "a"))
    print(f"Submitted batch job {job_id}")
    return 0


def run(state_dir: Path, script: str, names: list[str]) -> None:
    for name in names:
        job_id, _, task = name.partition("_")
        env = {**os.environ, "SLURM_JOB_ID": job_id, "SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
               "SLURM_NODEID": "0", "SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_NODELIST": "node1",
               **({"SLURM_ARRAY_JOB_ID": job_id, "SLURM_ARRAY_TASK_ID": task} if task else {})}
        for attempt in range(1, 5):
            set_state(state_dir, name, "RUNNING")
            code = subprocess.call(["bash", script], env={**env, "FAKE_SLURM_ATTEMPT": str(attempt)})
            requeue = state_dir / f"requeue-{name}"
            if requeue.exists():
                requeue.unlink()
                set_state(state_dir, name, "REQUEUED")
                continue
            if history(state_dir, name)[-1] == "RUNNING":
                set_state(state_dir, name, "COMPLETED" if code == 0 else "FAILED")
            break


def srun(state_dir: Path, argv: list[str]) -> int:
    files = {}
    while argv[0].startswith("--"):
        option = argv.pop(0)
        if option in ("--output", "--error"):
            files[option] = argv.pop(0)
    array_id, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    expand = {"%A": array_id or "", "%a": task or "", "%j": os.environ["SLURM_JOB_ID"], "%t": "0"}
    for option, path in files.items():
        for tag, value in expand.items():
            path = path.replace(tag, value)
        files[option] = open(path, "a")
    proc = subprocess.Popen(argv, stdout=files.get("--output"), stderr=files.get("--error", subprocess.STDOUT))
    timeout = os.environ.get("FAKE_SLURM_TIMEOUT", "")
    target, _, pattern = timeout.partition(":")
    if timeout and target == (task or "") and os.environ.get("FAKE_SLURM_ATTEMPT") == "1":
        while proc.poll() is None and not glob.glob(pattern, recursive=True):
            time.sleep(0.01)
        if proc.poll() is None:
            name = f"{array_id}_{task}" if task else os.environ["SLURM_JOB_ID"]
            log(state_dir, ["signal", "USR2", name, glob.glob(pattern, recursive=True)[0]])
            proc.send_signal(signal.SIGUSR2)
    return proc.wait()


def sacct(state_dir: Path, argv: list[str]) -> None:
    wanted = [argv[i + 1] for i, a in enumerate(argv) if a == "-j"]
    print("JobID|State|NodeList")
    with jobs(state_dir) as db:
        for name, states in db["jobs"].items():
            if name.split("_")[0] in wanted:
                print(f"{name}|{states[-1]}|node1")


def log(state_dir: Path, line: list[str]) -> None:
    with open(state_dir / "calls.jsonl", "a") as f:
        f.write(json.dumps(line) + "\n")


def main() -> int:
    state_dir = Path(os.environ.get("FAKE_SLURM_DIR", "."))
    name, argv = sys.argv[1], sys.argv[2:]
    if name == "run":
        run(state_dir, argv[0], argv[1:])
        return 0
    log(state_dir, [name, *argv])
    if name == "sbatch":
        return sbatch(state_dir, argv)
    elif name == "srun":
        return srun(state_dir, argv)
    elif name == "sacct":
        sacct(state_dir, argv)
    elif name == "scancel":
        set_state(state_dir, argv[0], "CANCELLED")
    elif name == "scontrol" and argv[0] == "requeue":
        (state_dir / f"requeue-{argv[1]}").touch()
    return 0


if __name__ == "__main__":
    sys.exit(main())
