"""Slurm through submitit: the `--slurm KEY=VALUE` parameters, the submission manifest and the jobs' states.

The valid keys are submitit's own: the generic ones of its AutoExecutor (timeout_min, mem_gb, cpus_per_task,
gpus_per_node, ...) and every SlurmExecutor parameter (account, qos, partition, constraint, exclude, setup,
additional_parameters, array_parallelism, ...), read from submitit, plus max_num_timeout (requeues after a
timeout). `setup`, `teardown` and `srun_args` take one line (argument) per `--slurm`, repeated in order;
`additional_parameters.NAME=VALUE` sets any other sbatch option (`#SBATCH --NAME=VALUE`).

A submission writes <logs>/submissions/<job id>.json (atomically): for each Slurm job (array task), the
runs it holds (their specs, and run ids where they resolve) and its log files; each job writes its outcome at
its end to <logs>/submissions/outcomes/<job id>.json (write_outcome); `--status` reads them back, with sacct's
states.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from .fileio import write_json
from .options import OptionError
from .run import parse_value

LIST_KEYS = ("setup", "teardown", "srun_args")  # one item per --slurm KEY=..., in order
EXTRA = "additional_parameters"
DEFAULTS = {"name": "vtab-lily", "gpus_per_node": 1, "signal_delay_s": 120}  # USR2 two minutes before the end
# Slurm states of a job that has not ended (submitit's InfoWatcher.is_done treats them so)
QUEUED = {"PENDING", "REQUEUED", "CONFIGURING", "READY", "SUSPENDED", "RESIZING"}
ACTIVE = {"RUNNING", "COMPLETING", "PREEMPTED"}


def generic_keys() -> dict:
    import submitit
    return submitit.AutoExecutor._typed_parameters()


def valid_keys() -> list[str]:
    import submitit
    return sorted(set(generic_keys()) | submitit.SlurmExecutor._valid_parameters() | {"max_num_timeout"})


def parse_slurm(items: list[str], partition: str | None, timeout_min: int, array_parallelism: int | None) -> dict:
    """The job parameters: our defaults, then --partition / --timeout-min / --array-parallelism, then each
    --slurm KEY=VALUE (a later one wins). An unknown key or a value of the wrong type is an OptionError."""
    params = {**DEFAULTS, "timeout_min": timeout_min, **({"partition": partition} if partition else {}),
              **({"array_parallelism": array_parallelism} if array_parallelism is not None else {})}
    valid, typed = valid_keys(), generic_keys()
    for item in items:
        key, sep, text = item.partition("=")
        name, dot, sub = key.partition(".")
        if not sep or not key or (dot and not sub):
            raise OptionError(f"--slurm expects KEY=VALUE, got {item!r}")
        if name not in valid or (dot and name != EXTRA):
            raise OptionError(f"--slurm {key}: not a Slurm parameter of submitit; valid keys: {', '.join(valid)} "
                              f"(any other sbatch option: {EXTRA}.NAME=VALUE)")
        value = parse_value(text)
        if dot:
            params.setdefault(EXTRA, {})[sub] = value
        elif name in LIST_KEYS:
            params.setdefault(name, []).append(text)
        elif name == EXTRA:
            if not isinstance(value, dict):
                raise OptionError(f"--slurm {EXTRA}={text}: expects a dict, e.g. {EXTRA}.reservation=NAME")
            params[EXTRA] = {**params.get(EXTRA, {}), **value}
        else:
            kind = (int, float) if typed.get(name) is float else typed.get(name)
            if kind and (not isinstance(value, kind) or (kind is int and isinstance(value, bool))):
                raise OptionError(f"--slurm {name}={text}: expects {typed[name].__name__}")
            params[name] = value
    for name, least in (("timeout_min", 1), ("array_parallelism", 1), ("max_num_timeout", 0)):
        value = params.get(name, least)
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise OptionError(f"--slurm {name} must be an integer >= {least}, got {value!r}")
    return params


def make_executor(folder: str | Path, cluster: str, params: dict):
    """submitit's AutoExecutor on `cluster` ("slurm" or "local") with `params` (generic keys as they are,
    the others as slurm_<key>, which the local executor ignores)."""
    import submitit
    params = dict(params)
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster,
                                     slurm_max_num_timeout=params.pop("max_num_timeout", 3))
    generic = generic_keys()
    executor.update_parameters(**{k if k in generic else f"slurm_{k}": v for k, v in params.items()})
    return executor


def spec_key(spec) -> str:
    """A run's key in manifests: its spec before provenance (so it matches before the data are prepared)."""
    return json.dumps(dataclasses.asdict(spec.unresolved()), sort_keys=True, default=str)


def write_manifest(logs: str | Path, cluster: str, jobs, chunks, run_ids) -> Path:
    """<logs>/submissions/<job id>.json: each job's id, log files and runs (label, spec, run id or None)."""
    entries = [{"job_id": job.job_id, "stdout": str(job.paths.stdout), "stderr": str(job.paths.stderr),
                "runs": [{"label": label, "spec": dataclasses.asdict(spec.unresolved()), "key": spec_key(spec),
                          "run_id": run_ids.get(spec_key(spec))} for label, spec in chunk]}
               for job, chunk in zip(jobs, chunks)]
    path = Path(logs) / "submissions" / f"{jobs[0].job_id.split('_')[0]}.json"
    write_json(path, {"submitted": time.time(), "cluster": cluster, "jobs": entries})
    return path


def latest_jobs(logs: str | Path) -> dict[str, dict]:
    """spec key -> {"job_id", "stdout", "stderr", "index" (the run's place in its job)} of the latest
    submission that holds that run; unreadable manifests are skipped."""
    manifests = []
    for path in (Path(logs) / "submissions").glob("*.json"):
        try:
            manifests.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    latest = {}
    for manifest in sorted(manifests, key=lambda m: m.get("submitted", 0)):
        for entry in manifest.get("jobs", []):
            for index, run in enumerate(entry["runs"]):
                latest[run["key"]] = {**{k: entry[k] for k in ("job_id", "stdout", "stderr")}, "index": index}
    return latest


def job_states(logs: str | Path, job_ids) -> dict[str, str]:
    """Each Slurm job's state from one sacct call through submitit's watcher ("UNKNOWN" when sacct does not
    know it, or fails: submitit warns)."""
    from submitit.slurm.slurm import SlurmJob
    jobs = [SlurmJob(folder=logs, job_id=job_id) for job_id in sorted(set(job_ids))]
    if not jobs:
        return {}
    SlurmJob.watcher.update()
    return {job.job_id: job.watcher.get_state(job.job_id, mode="cache").split()[0] for job in jobs}


def outcome_path(logs: str | Path, job_id: str) -> Path:
    """Where a job writes its outcome: <logs>/submissions/outcomes/<job id>.json."""
    return Path(logs) / "submissions" / "outcomes" / f"{job_id}.json"


def write_outcome(logs: str | Path, statuses: list[str] | None = None, reason: str | None = None) -> Path:
    """In a job, at its end: {"job_id", "outcome": "done", "statuses": one per run} or {"job_id", "outcome":
    "failed", "reason"}, written atomically (`--status` reads it, never submitit's result pickle)."""
    import submitit
    job_id = submitit.JobEnvironment().job_id
    path = outcome_path(logs, job_id)
    write_json(path, {"job_id": job_id, "outcome": "done", "statuses": statuses} if reason is None else
               {"job_id": job_id, "outcome": "failed", "reason": reason})
    return path


def job_outcome(logs: str | Path, job: dict) -> str | None:
    """A finished job's word on its run, read from the outcome file it wrote (JSON: data, never code): the
    status it returned for the run (e.g. 'failed: ...'), or 'failed: <reason>' when the job itself raised;
    None when it left no (readable) outcome."""
    try:
        outcome = json.loads(outcome_path(logs, job["job_id"]).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(outcome, dict):
        return None
    statuses, reason = outcome.get("statuses"), outcome.get("reason")
    if outcome.get("outcome") == "done" and isinstance(statuses, list) and job["index"] < len(statuses):
        status = statuses[job["index"]]
        return status if isinstance(status, str) else None
    if outcome.get("outcome") == "failed" and isinstance(reason, str):
        return f"failed: {reason}"
    return None
