"""Sweeps: backbones x methods x tasks x seeds x hyper-parameter grid, on one machine or a Slurm cluster.

    python -m vtab_lily.sweep --backbones vit-b --methods lily --tasks all --seeds 42 \\
        --grid lily.s=0.01,0.1,1,10,100 lily.ne=2,3,4 [--set epochs=100] [--protocol paper|vtab]
    python -m vtab_lily.sweep --preset table4 --tasks all
    python -m vtab_lily.sweep --preset mini --prepare                 # the offline mini-benchmark (CPU)
    ... --launcher slurm --slurm account=A qos=Q ... [--array-parallelism N] [--runs-per-gpu K]   # a job array
    ... --launcher slurm --status                                 # done / running / pending / failed, with reasons
    ... --gpus 4 [--runs-per-gpu 2]                               # local: K worker processes per GPU

Finished runs are skipped; runs are claimed with lock files, so several sweeps over the same grid
share the work without duplicating or corrupting a record. `--preset` with `--methods` (or `--backbones`)
keeps the preset's rows of those methods (backbones). A `--set` or `--grid` key `<method>.key` applies to
that method's rows only; a bare `key` to every row that has it (a recipe field, or an option of the row's
method); a key that no row has is an error. A point that fails, for any reason, is reported as
`failed: <reason>` with its traceback in a file under `--logs`, and the sweep goes on; the last line counts
the jobs (exit code 1 when any failed). Each `ran` line gives the run's best and final accuracy.
`--launcher slurm` submits one job per run (K per job with --runs-per-gpu K) as a job array and returns at
once (`--wait` waits for the jobs); runs done, running or queued already are not submitted again; a job is
requeued on preemption or timeout and its runs resume from their saved state.
`--protocol vtab` first scores every grid point on val200 (trained on train800), then retrains the best
point (final val200 accuracy) per row, task and seed on train800val200 and tests it (report its final accuracy).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import itertools
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

from backbones.ssm import BACKENDS, set_backend

from . import slurm
from .adapters.base import option_names
from .choices import choices_help
from .errors import UserError, cli, error_line, os_error_line
from .locks import LockLost, RunLock
from .options import OptionError, check_seed
from .prepare import ensure_prepared
from .recipes import RECIPE_FIELDS, for_task
from .records import RecordError, RunSpec, finished, read_record, selection_order
from .rows import PRESET_TASKS, PRESETS
from .run import (
    DEFAULT_DATA,
    DEFAULT_RUNS,
    RunBusy,
    check_spec,
    default_device,
    execute,
    parse_settings,
    parse_value,
    resolve,
    split_settings,
)
from .tasks import TASK_SETS, get_task


def parse_grid(items: list[str]) -> dict[str, list]:
    grid = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not values:
            raise OptionError(f"--grid expects KEY=V1,V2,..., got {item!r}")
        grid[key] = [parse_value(v) for v in values.split(",")]
    return grid


def failure(e: BaseException, label: str, logs: str | Path | None) -> str:
    """'failed: <one line>' for an exception caught at a point; with `logs`, its traceback is written to a
    file under <logs>/failed/ that the line names."""
    line = (error_line(e) if isinstance(e, UserError) else os_error_line(e) if isinstance(e, OSError)
            else f"{type(e).__name__}: {error_line(e)}")
    if logs is None:
        return f"failed: {line}"
    path = Path(logs) / "failed" / f"{re.sub(r'[^A-Za-z0-9_.=+-]+', '_', label).strip('_')[:200]}.log"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{label}\n\n{''.join(traceback.format_exception(e))}")
    except OSError as write_error:
        return f"failed: {line} (its traceback could not be written: {os_error_line(write_error)})"
    return f"failed: {line} (traceback: {path})"


@dataclass
class Point:
    """One grid point: its spec, or its status line when it cannot run (reported as failed, never fatal)."""

    label: str
    spec: RunSpec | None = None
    error: str | None = None
    row: int = 0  # the row (backbone, method, fixed options) it belongs to: the vtab protocol chooses per row


def method_fields(method: str) -> set[str] | None:
    """The option names of `method`, or None when the method cannot be resolved (its points fail)."""
    try:
        return set(option_names(method))
    except Exception:  # reported, with its traceback, by each of the method's points
        return None


def scoped(values: dict, method: str) -> dict:
    """The entries of `values` (--set or --grid) that apply to `method`'s rows: `<method>.key` ones, and
    bare keys that are a recipe field or one of the method's options (`<method>.key` wins over `key`); for a
    composition (lora+bitfit) its prefixed options (`lora.r`, which also apply to lora's own rows)."""
    fields = method_fields(method) or set()
    bare = {k: v for k, v in values.items() if "." not in k and (k in RECIPE_FIELDS or k in fields)}
    prefixed = {k: v for k, v in values.items() if k.startswith(f"{method}.") or ("." in k and k in fields)}
    return {**bare, **prefixed}  # the prefixed one wins


def check_keys(rows, values: dict, flag: str) -> None:
    """Every key applies to at least one row; else one clear error naming the rows' methods."""
    methods = sorted({method for _, method, _, _ in rows})
    used = {k for method in methods for k in scoped(values, method)}
    unknown = [k for k in values if k not in used]
    if unknown:
        raise OptionError(f"{flag} {', '.join(unknown)}: no row of this sweep has such a setting (its methods are "
                          f"{methods}; recipe fields are {list(RECIPE_FIELDS)}); prefix a method option with "
                          "its method (e.g. lily.ne)")


def expand(rows, tasks, seeds, grid: dict, settings: dict, eval_split: str = "test",
           logs: str | Path | None = None) -> list[Point]:
    """Points for rows (backbone, method, fixed options, row grid) x tasks x seeds x grid points.
    `grid` and `settings` apply to a row as `scoped` says; PerTask values are chosen per task.
    A point that cannot be made (any error) carries its failure line."""
    points = []
    for row, (backbone, method, fixed, row_grid) in enumerate(rows):
        own = {**row_grid, **scoped(grid, method)}
        keys = list(own)
        for values in itertools.product(*own.values()):
            point = dict(zip(keys, values))
            for task in tasks:
                for seed in seeds:
                    label = f"{backbone} {method} {task} seed {seed} {point or ''} eval {eval_split}".replace("  ", " ")
                    try:
                        options, recipe = split_settings(method, for_task({**scoped(settings, method), **fixed,
                                                                           **point}, task))
                        spec = RunSpec(backbone, task, method, options, seed, eval_split, recipe)
                        check_spec(spec)
                        points.append(Point(label, spec, row=row))
                    except Exception as e:  # this point cannot run: the others still do
                        points.append(Point(label, error=failure(e, label, logs), row=row))
    return points


def accuracy(record: dict) -> str:
    return f"best {record['best_acc']:.2f} at epoch {record['best_epoch']}, final {record['final_acc']:.2f}"


def run_job(spec: RunSpec, runs: str, data_root: str, weights: str | None, prepare: bool,
            logs: str | None = None) -> str:
    """Run one spec; return 'ran (<accuracies>)', 'done' (skipped, finished before), 'busy' or
    'failed: <reason>' (any exception: the sweep goes on; with `logs`, the traceback is kept there)."""
    skipped = []
    try:
        path = execute(spec, runs, data_root, weights=weights, prepare=prepare, progress=False, on_skip=skipped.append)
        return "done" if skipped else f"ran ({accuracy(read_record(path))})"
    except (RunBusy, LockLost):  # held by another process, or taken over by one while this one trained
        return "busy"
    except torch.cuda.OutOfMemoryError as e:  # this run does not fit next to the others: the sweep goes on
        torch.cuda.empty_cache()
        return f"failed: CUDA out of memory ({str(e).splitlines()[0]}); lower the batch size or --runs-per-gpu"
    except Exception as e:  # a user error, a full disk, a NaN loss or a bug: this point fails, the sweep goes on
        label = f"{spec.backbone} {spec.method} {spec.task} seed {spec.seed} {spec.options} eval {spec.eval_split}"
        return failure(e, label, logs)


@dataclass(frozen=True)
class SweepOptions:
    """What the sweep's stages read, parsed once by `main` from the command line: where records, data and
    logs go, the weights, whether to prepare data, the launcher (and the stage a worker process runs), the
    command line (given again to worker processes), the workers' CUDA_VISIBLE_DEVICES, submitit's
    parameters, runs per GPU, whether to wait for cluster jobs, the scan backend."""

    runs: str
    data_root: str
    weights: str | None
    prepare: bool
    logs: str
    launcher: str
    stage: str | None
    argv: tuple[str, ...]
    workers: tuple[str | None, ...] = ()
    slurm_params: dict = dataclasses.field(default_factory=dict)
    runs_per_gpu: int = 1
    wait: bool = False
    scan_backend: str | None = None


def best_on_val(points: list[Point], opts: SweepOptions) -> list[RunSpec]:
    """VTAB protocol: per row, task and seed, the grid point whose val200 record comes first in
    records.selection_order (the best final val200 accuracy; ties: the smaller run id), as a spec that
    trains on train800val200 and tests. Points without a finished record are left out."""
    best = {}
    for point in points:
        record = record_of(point.spec, opts) if point.spec is not None else None
        if record is None:
            continue  # invalid, not finished, or reported as failed in the first stage
        key = (point.row, point.spec.task, point.spec.seed)
        if key not in best or selection_order(record) < selection_order(best[key][0]):
            best[key] = (record, point.spec)
    return [dataclasses.replace(spec, eval_split="test") for _, spec in best.values()]


def dry_run_status(point: Point, opts: SweepOptions) -> str:
    """'done', 'to run', 'to run (...)' when the identity cannot be resolved yet (e.g. data not prepared),
    or the point's failure."""
    if point.error is not None:
        return point.error
    try:
        ensure_prepared(point.spec.task, opts.data_root, prepare=False)
        resolved = resolve(point.spec, opts.data_root, opts.weights, device=default_device())[0]
        return "done" if finished(resolved.path(opts.runs)) else f"to run ({resolved.run_id})"
    except (UserError, OSError) as e:
        return f"to run (cannot check: {error_line(e)})"
    except Exception as e:  # a bug: this point's line says so, the listing goes on
        return failure(e, point.label, opts.logs)


def launch(points: list[Point], opts: SweepOptions, stage: str, statuses: list[str]) -> None:
    """Run the valid points (through the chosen launcher) and append every point's status to `statuses`
    (invalid points 'failed'), printing one line per point."""
    if opts.launcher in ("slurm", "submitit-local"):
        statuses += submit(points, opts)
        return
    if len(opts.workers) > 1 and not opts.stage:
        statuses += launch_workers(points, opts, stage)
        return
    for i, point in enumerate(points, 1):
        if point.error is not None:
            status = point.error
        else:
            status = run_job(point.spec, opts.runs, opts.data_root, opts.weights, opts.prepare, opts.logs)
        print(f"[{i}/{len(points)}] {point.label}: {status}", flush=True)
        statuses.append(status)


def worker_gpus(gpus: int, runs_per_gpu: int) -> list[str | None]:
    """CUDA_VISIBLE_DEVICES of each worker process: the first `gpus` of the GPUs this process sees (the
    parent's CUDA_VISIBLE_DEVICES, else all), each `runs_per_gpu` times; None (the CPU) without a GPU."""
    count = torch.cuda.device_count()
    mask = os.environ.get("CUDA_VISIBLE_DEVICES")
    visible = [g.strip() for g in mask.split(",")][:count] if mask is not None else [str(g) for g in range(count)]
    if gpus > max(len(visible), 1):
        raise OptionError(f"--gpus {gpus}: this process sees {len(visible)} GPU(s)"
                          + (f" (CUDA_VISIBLE_DEVICES={mask})" if mask is not None else "") + "; lower --gpus")
    return [gpu for gpu in (visible[:gpus] or [None]) for _ in range(runs_per_gpu)]


def launch_workers(points: list[Point], opts: SweepOptions, stage: str) -> list[str]:
    """Worker processes over the same job list (of `stage`), lock files splitting the work; each point's
    status comes from its record afterwards."""
    before = [record_of(p.spec, opts) is not None if p.spec else False for p in points]
    procs = [subprocess.Popen([sys.executable, "-m", "vtab_lily.sweep", *opts.argv, "--stage", stage],
                              env={**os.environ, **({"CUDA_VISIBLE_DEVICES": gpu} if gpu is not None else {})})
             for gpu in opts.workers]
    codes = [p.wait() for p in procs]
    statuses = []
    for point, done_before in zip(points, before):
        if point.error is not None:
            statuses.append(point.error)
        elif done_before:
            statuses.append("done")
        elif (record := record_of(point.spec, opts)) is not None:
            statuses.append(f"ran ({accuracy(record)})")
        else:
            statuses.append(f"failed: not finished by the workers (exit codes {codes}; see their output)")
    return statuses


def record_of(spec: RunSpec, opts: SweepOptions) -> dict | None:
    """The finished record of `spec` under opts.runs, or None (also when its identity cannot be resolved)."""
    try:
        return finished(resolve(spec, opts.data_root, opts.weights)[0].path(opts.runs))
    except (UserError, OSError):
        return None


class SubmissionRefused(UserError):
    """The cluster refused the submission (an unknown account, QOS or partition, resources it cannot give)."""


class Job:
    """One submitit job (a Slurm array task): its runs, in one process each when there are several (K runs
    share the job's GPU, as --runs-per-gpu does on one machine). On preemption or timeout submitit calls
    `checkpoint` and requeues the job: finished runs are skipped, the others resume from their saved state.
    `scan`: the sweep's --scan-backend, chosen in the job's process and in each of its run processes."""

    def __init__(self, scan: str | None = None):
        self.scan = scan

    def __call__(self, specs, runs, data_root, weights, prepare, logs) -> list[str]:
        """The runs' statuses; the job's outcome file says them (or why the job itself failed)."""
        try:
            statuses = self.run_all(specs, runs, data_root, weights, prepare, logs)
        except Exception as e:  # the job's own failure (a run's failure is that run's status)
            import submitit
            line = failure(e, f"submitit job {submitit.JobEnvironment().job_id}", logs)
            slurm.write_outcome(logs, reason=line.removeprefix("failed: "))
            raise
        slurm.write_outcome(logs, statuses)
        return statuses

    def run_all(self, specs, runs, data_root, weights, prepare, logs) -> list[str]:
        calls = [(spec, runs, data_root, weights, prepare, logs) for spec in specs]
        if self.scan:
            set_backend(self.scan)
        if len(calls) == 1:
            return [run_job(*calls[0])]
        context = multiprocessing.get_context("spawn")
        pipes = [context.Pipe(duplex=False) for _ in calls]
        procs = [context.Process(target=run_process, args=(call, send, self.scan))
                 for call, (_, send) in zip(calls, pipes)]
        try:
            for proc in procs:
                proc.start()
            for proc in procs:
                proc.join()
        finally:  # also when submitit's signal handler stops the job: the runs unwind, releasing their locks
            for proc in procs:
                if proc.is_alive():
                    proc.terminate()
            for proc in procs:
                proc.join()
        return [receive.recv() if receive.poll() else f"failed: its run process ended with exit code {proc.exitcode} "
                "(killed: out of host memory? see the job's log)" for proc, (receive, _) in zip(procs, pipes)]

    def checkpoint(self, *args, **kwargs):
        from submitit.core.utils import DelayedSubmission
        return DelayedSubmission(self, *args, **kwargs)  # the same runs again, which resume from their state


def run_process(call: tuple, send, scan: str | None = None) -> None:
    """A run of a job of several, in its own process: SIGTERM (the job stopping) unwinds the run (its lock is
    released, its state kept from the last saved epoch); submitit's preemption signal is the job's to handle."""
    if scan:
        set_backend(scan)
    def stop(signum, frame):
        raise SystemExit(f"stopped by signal {signum}")
    signal.signal(signal.SIGTERM, stop)
    signal.signal(getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")), signal.SIG_IGN)
    send.send(run_job(*call))


def job_identity(spec: RunSpec, opts: SweepOptions) -> RunSpec | None:
    """The spec resolved as its job will resolve it (on a GPU when the Slurm jobs get one: the precision is part
    of the run id), or None when it cannot be here (e.g. data not prepared yet: the job's state says the rest)."""
    gpu = opts.launcher == "slurm" and opts.slurm_params.get("gpus_per_node")
    try:
        return resolve(spec, opts.data_root, opts.weights, device="cuda" if gpu else None)[0]
    except (UserError, OSError):
        return None


def cluster_state(point: Point, opts: SweepOptions, jobs: dict, states: dict) -> tuple[str, str]:
    """(done | running | pending | failed | not submitted, the status line) of a point, from its record, its
    lock and its latest submitit job (`jobs`: slurm.latest_jobs, `states`: slurm.job_states)."""
    if point.error is not None:
        return "failed", point.error
    resolved = job_identity(point.spec, opts)
    record = None
    if resolved is not None:
        path = resolved.path(opts.runs)
        if (done := finished(path)) is not None:
            return "done", f"done ({accuracy(done)})"
        lock = RunLock(resolved.path(opts.runs, ".lock"))
        if lock.live():
            return "running", f"running ({lock.describe()})"
        try:
            record = read_record(path) if path.exists() else None
        except RecordError:
            record = None
    job = jobs.get(slurm.spec_key(point.spec))
    if job is None:
        return ("failed", f"failed: {record['error']}") if record else ("not submitted", "not submitted")
    where = f"job {job['job_id']}, log {job['stderr']}"
    state = states.get(job["job_id"], "UNKNOWN")
    outcome = slurm.job_outcome(opts.logs, job)
    if outcome is None and state in slurm.QUEUED | {"UNKNOWN"}:
        return "pending", f"pending ({state}, job {job['job_id']})"
    if outcome is None and state in slurm.ACTIVE:
        return "running", f"running ({state}, {where})"
    if record is not None:
        return "failed", f"failed: {record['error']} ({where})"
    if outcome is not None and outcome.startswith("failed"):
        return "failed", f"{outcome} ({where})"
    if outcome == "busy":
        return "failed", f"failed: job {job['job_id']} found the run held by another process, which did not " \
                         f"finish it ({where})"
    return "failed", f"failed: job {job['job_id']} ended {state} without finishing the run ({where})"


def submit(points: list[Point], opts: SweepOptions) -> list[str]:
    """Submit, through submitit, the points that are neither done, running nor queued, K (--runs-per-gpu) to a
    job, as one job array; write the manifest; with --wait (always for submitit-local) wait for the jobs.
    Returns each point's status; prints one line per point."""
    from submitit.core.utils import FailedJobError
    cluster = "slurm" if opts.launcher == "slurm" else "local"
    jobs = slurm.latest_jobs(opts.logs) if cluster == "slurm" else {}
    states = slurm.job_states(opts.logs, [job["job_id"] for job in jobs.values()]) if jobs else {}
    lines, todo = [], []
    for i, point in enumerate(points):
        kind, line = cluster_state(point, opts, jobs, states)
        if kind in ("not submitted", "failed") and point.spec is not None:
            todo.append(i)
        lines.append(line)
    chunks = [todo[i:i + opts.runs_per_gpu] for i in range(0, len(todo), opts.runs_per_gpu)]
    if chunks:
        executor = slurm.make_executor(opts.logs, cluster, opts.slurm_params)
        n = len(chunks)
        refusal = io.StringIO()  # submitit prints sbatch's complaint, then raises it: one line instead
        try:
            with contextlib.redirect_stderr(refusal):
                submitted = executor.map_array(Job(opts.scan_backend),
                                               [[points[i].spec for i in chunk] for chunk in chunks],
                                               [opts.runs] * n, [opts.data_root] * n, [opts.weights] * n,
                                               [opts.prepare] * n, [opts.logs] * n)
        except FailedJobError as e:
            raise SubmissionRefused(f"sbatch refused the jobs: {' '.join(str(e).split()) or refusal.getvalue()} "
                                    "(check --partition and --slurm account / qos / the resources asked)") from None
        run_ids = {slurm.spec_key(points[i].spec): getattr(job_identity(points[i].spec, opts), "run_id", None)
                   for i in todo}  # None: resolved in the job (e.g. after its --prepare)
        manifest = slurm.write_manifest(opts.logs, cluster, submitted,
                                        [[(points[i].label, points[i].spec) for i in chunk] for chunk in chunks],
                                        run_ids)
        ids = [job.job_id for job in submitted]
        print(f"submitted {len(todo)} runs in {n} jobs to {cluster}: job ids {ids[0]}"
              + (f" .. {ids[-1]}" if n > 1 else "") + f"; logs: {Path(submitted[0].paths.stdout).parent} "
              f"(<job id>_0_log.out/.err); manifest: {manifest}", flush=True)
        for job, chunk in zip(submitted, chunks):
            for i in chunk:
                lines[i] = f"submitted (job {job.job_id}, log {job.paths.stderr})"
        if opts.wait or cluster == "local":
            for job, chunk in zip(submitted, chunks):
                for i, status in zip(chunk, job_status(job, opts, len(chunk))):
                    lines[i] = status
        else:
            print("they run on their own; follow them with: python -m vtab_lily.sweep "
                  f"{' '.join(opts.argv)} --status", flush=True)
    statuses = []
    for i, (point, line) in enumerate(zip(points, lines), 1):
        print(f"[{i}/{len(points)}] {point.label}: {line}", flush=True)
        statuses.append(line if line.startswith(("ran", "failed", "submitted")) else
                        "done" if line.startswith("done") else "busy")
    return statuses


def report_status(points: list[Point], opts: SweepOptions) -> int:
    """--status: each point's state (from records, locks and the submitit jobs of earlier submissions) and the
    counts; exit 1 when any failed."""
    jobs = slurm.latest_jobs(opts.logs)
    states = slurm.job_states(opts.logs, [job["job_id"] for job in jobs.values()]) if jobs else {}
    kinds = []
    for point in points:
        kind, line = cluster_state(point, opts, jobs, states)
        print(f"{point.label}: {line}", flush=True)
        kinds.append(kind)
    print(f"{len(kinds)} runs: " + ", ".join(f"{kinds.count(k)} {k}" for k in STATES))
    return 1 if "failed" in kinds else 0


STATES = ("done", "running", "pending", "failed", "not submitted")


def job_status(job, opts: SweepOptions, count: int) -> list[str]:
    """A submitted job's statuses (one per run) once it ended, from the outcome file it wrote (never from
    submitit's result pickle); a job that died (killed, node lost) left none: its runs are failed points, not
    a dead sweep."""
    job.wait()
    statuses = [slurm.job_outcome(opts.logs, {"job_id": job.job_id, "index": i}) for i in range(count)]
    return [status or f"failed: job {job.job_id} ended {job.state} without finishing the run (log "
            f"{job.paths.stderr})" for status in statuses]


def select_rows(args) -> list:
    """The sweep's rows: a preset's (kept to --methods / --backbones when given), else --backbones x --methods."""
    if not args.preset:
        if not (args.backbones and args.methods):
            raise OptionError("give --preset, or --backbones and --methods")
        return [(b, m, {}, {}) for b in args.backbones for m in args.methods]
    rows = list(PRESETS[args.preset])
    for flag, names, at in (("--methods", args.methods, 1), ("--backbones", args.backbones, 0)):
        missing = sorted(set(names) - {row[at] for row in rows})
        if missing:
            raise OptionError(f"{flag} {' '.join(missing)}: preset {args.preset} has no such rows; its "
                              f"{flag.lstrip('-')} are {sorted({row[at] for row in rows})}")
        rows = [row for row in rows if not names or row[at] in names]
    return rows


def check_launcher(args) -> dict:
    """The launcher's options checked; submitit's parameters ({} for the local launcher)."""
    if args.launcher == "slurm" and not args.status:
        missing = [c for c in ("sbatch", "srun") if shutil.which(c) is None]
        if missing:
            verb = "is" if len(missing) == 1 else "are"
            raise OptionError(f"--launcher slurm: Slurm's {' and '.join(missing)} {verb} not on PATH (run the sweep "
                              "on a Slurm login node, or use --launcher local)")
    if args.timeout_min < 1:
        raise OptionError(f"--timeout-min must be >= 1, got {args.timeout_min}")
    if min(args.gpus, args.runs_per_gpu) < 1:
        raise OptionError(f"--gpus and --runs-per-gpu must be at least 1, got {args.gpus} and {args.runs_per_gpu}")
    if args.launcher in ("slurm", "submitit-local"):
        try:
            import submitit  # noqa: F401
        except ImportError:
            raise OptionError(f"--launcher {args.launcher} needs submitit: pip install submitit") from None
        return slurm.parse_slurm(args.slurm, args.partition, args.timeout_min, args.array_parallelism)
    if args.slurm or args.array_parallelism is not None or args.wait:
        raise OptionError("--slurm, --array-parallelism and --wait are for --launcher slurm (or submitit-local)")
    return {}


def count_line(statuses: list[str]) -> str:
    ran = sum(s.startswith("ran") for s in statuses)
    failed = sum(s.startswith("failed") for s in statuses)
    submitted = statuses.count("submitted") + sum(s.startswith("submitted (") for s in statuses)
    return (f"{len(statuses)} jobs: {ran} ran, {statuses.count('done')} already done, {statuses.count('busy')} "
            f"run elsewhere, {failed} failed" + (f", {submitted} submitted" if submitted else ""))


def parse_args(argv=None) -> tuple[argparse.Namespace, dict]:
    """The sweep's options and submitit's parameters, the launcher's checked (an OptionError names a wrong
    one)."""
    parser = argparse.ArgumentParser(prog="python -m vtab_lily.sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), help="the rows of a paper table (only those of "
                        "--methods / --backbones when given)")
    parser.add_argument("--backbones", nargs="+", default=[], help=choices_help("backbone", "each "))
    parser.add_argument("--methods", nargs="+", default=[], help=choices_help("method", "each ") +
                        ", or a composition a+b (e.g. lora+bitfit; its options prefixed: --grid lora.r=2,4)")
    parser.add_argument("--tasks", nargs="+", help=choices_help("task", "'all' (the 19 of VTAB-1K), 'mini' (the "
                        "mini VTAB), or each ") + "; default: the preset's tasks, else all")
    parser.add_argument("--seeds", nargs="+", type=int, default=[42])
    parser.add_argument("--grid", nargs="+", default=[], metavar="KEY=V1,V2")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="fixed settings: `<method>.key=V` for that method's rows, `key=V` for every row "
                        "that has the key (a recipe field or the row's method option)")
    parser.add_argument("--protocol", default="paper", choices=["paper", "vtab"])
    parser.add_argument("--launcher", default="local", choices=["local", "slurm", "submitit-local"])
    parser.add_argument("--gpus", type=int, default=1, help="local launcher: GPUs to use (of those visible)")
    parser.add_argument("--runs-per-gpu", type=int, default=1, metavar="K",
                        help="local launcher: K runs share each GPU (K worker processes per GPU; on a machine "
                        "without a GPU, K processes on the CPU)")
    parser.add_argument("--scan-backend", choices=BACKENDS, help="Vim's selective scan in every run (as run's option)")
    parser.add_argument("--slurm", action="append", default=[], metavar="KEY=VALUE",
                        help="a submitit Slurm parameter, repeatable: account=A qos=Q mem_gb=32 cpus_per_task=8 "
                        "gpus_per_node=1 constraint=a100 exclude=node1 setup='module load cuda' (one line each) "
                        "additional_parameters.NAME=VALUE (any sbatch option); an unknown key lists the valid ones")
    parser.add_argument("--partition", help="Slurm partition (= --slurm partition=P)")
    parser.add_argument("--timeout-min", type=int, default=240, help="each job's time limit (= --slurm timeout_min=M)")
    parser.add_argument("--array-parallelism", type=int, metavar="N", help="at most N jobs of the array run at once")
    parser.add_argument("--wait", action="store_true", help="--launcher slurm: wait for the jobs and print their "
                        "results (else the submission returns at once; follow it with --status)")
    parser.add_argument("--status", action="store_true", help="report the sweep's runs: done, running, pending, "
                        "failed (reason, log), from records, locks and the submitted jobs (sacct); runs nothing")
    parser.add_argument("--logs", help="submitit's job logs, and the tracebacks of failed points (under failed/); "
                        "default: slurm-logs beside the --runs folder (results/slurm-logs)")
    parser.add_argument("--weights")
    parser.add_argument("--data-root", default=DEFAULT_DATA)
    parser.add_argument("--runs", default=DEFAULT_RUNS)
    parser.add_argument("--prepare", action="store_true")
    parser.add_argument("--dry-run", action="store_true", help="list the runs and whether they are done")
    parser.add_argument("--stage", choices=["all", "select", "final"], help=argparse.SUPPRESS)  # a worker's
    args = parser.parse_args(argv)
    return args, check_launcher(args)


def plan(args) -> tuple[list, list[str], dict, dict]:
    """The sweep's rows, tasks, --set settings and --grid, checked (an OptionError names a wrong one)."""
    rows = select_rows(args)
    tasks = args.tasks or [PRESET_TASKS.get(args.preset, "all")]
    tasks = list(TASK_SETS[tasks[0]]) if len(tasks) == 1 and tasks[0] in TASK_SETS else tasks
    for task in tasks:
        get_task(task)
    for seed in args.seeds:
        check_seed(seed)
    settings = parse_settings(args.set)
    grid = parse_grid(args.grid)
    check_keys(rows, settings, "--set")
    check_keys(rows, grid, "--grid")
    return rows, tasks, settings, grid


@cli
def main(argv=None) -> int:
    args, slurm_params = parse_args(argv)
    rows, tasks, settings, grid = plan(args)
    if args.scan_backend:  # this process's runs; worker processes get --scan-backend, submitit's jobs Job(scan)
        set_backend(args.scan_backend)
    local = args.launcher == "local" and not args.stage  # a worker (--stage) runs in this process
    opts = SweepOptions(args.runs, args.data_root, args.weights, args.prepare,
                        args.logs or str(Path(args.runs).parent / "slurm-logs"), args.launcher, args.stage,
                        tuple(sys.argv[1:] if argv is None else argv),
                        tuple(worker_gpus(args.gpus, args.runs_per_gpu)) if local else (), slurm_params,
                        args.runs_per_gpu, args.wait, args.scan_backend)
    stage1 = expand(rows, tasks, args.seeds, grid, settings, "val200" if args.protocol == "vtab" else "test",
                    opts.logs)
    def final():
        return [Point(f"{s.backbone} {s.method} {s.task} seed {s.seed} {s.options} eval test", s)
                for s in best_on_val(stage1, opts)]

    if args.status:
        return report_status(stage1 + (final() if args.protocol == "vtab" else []), opts)
    if args.dry_run:
        statuses = []
        for point in stage1:
            status = dry_run_status(point, opts)
            print(f"{point.label}: {status}", flush=True)
            statuses.append(status)
        failed = sum(s.startswith("failed") for s in statuses)
        print(f"{len(statuses)} runs: {statuses.count('done')} done, {len(statuses) - failed - statuses.count('done')} "
              f"to run, {failed} failed")
        return 1 if failed else 0

    statuses: list[str] = []
    try:
        if args.stage:  # a worker process of --gpus N: run its stage's list
            launch(final() if args.stage == "final" else stage1, opts, args.stage, statuses)
        else:
            launch(stage1, opts, "select" if args.protocol == "vtab" else "all", statuses)
            if args.protocol == "vtab" and any(s.startswith(("submitted", "busy")) for s in statuses):
                print("--protocol vtab: the final stage (the best point on val200, retrained on train800val200) "
                      "is submitted by this same command once these runs are done (see --status)", flush=True)
            elif args.protocol == "vtab":
                launch(final(), opts, "final", statuses)
    finally:  # also when interrupted: what ran so far is counted
        print(count_line(statuses), flush=True)
    return 1 if any(s.startswith("failed") for s in statuses) else 0


if __name__ == "__main__":
    sys.exit(main())
