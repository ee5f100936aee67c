"""Sweeps: backbones x methods x tasks x seeds x hyper-parameter grid, on one machine or a Slurm cluster.

    python -m vtab_lily.sweep --backbones vit-b --methods lily --tasks all --seeds 42 \\
        --grid lily.s=0.01,0.1,1,10,100 lily.ne=2,3,4 [--set epochs=100] [--protocol paper|vtab]
    python -m vtab_lily.sweep --preset table4 --tasks all
    python -m vtab_lily.sweep --preset mini --prepare                 # the offline mini-benchmark (CPU)
    ... --launcher slurm --partition gpu [--timeout-min 240]     # one Slurm job per run, requeued on preemption
    ... --gpus 4 [--runs-per-gpu 2]                               # local: K worker processes per GPU

Finished runs are skipped; runs are claimed with lock files, so several sweeps over the same grid
share the work without duplicating or corrupting a record. `--protocol vtab` first scores every grid
point on val200 (trained on train800), then retrains the best point (final val200 accuracy) per row, task
and seed on train800val200 and tests it (report its final accuracy).
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import subprocess
import sys
from dataclasses import dataclass

import torch

from backbones.ssm import BACKENDS, set_backend

from .choices import choices_help
from .options import error_line
from .prepare import ensure_prepared
from .recipes import PRESET_TASKS, PRESETS, for_task
from .records import RunSpec, finished, selection_order
from .run import (
    DEFAULT_DATA,
    DEFAULT_RUNS,
    USER_ERRORS,
    RunBusy,
    default_device,
    execute,
    parse_value,
    resolve,
    split_settings,
)
from .tasks import TASK_SETS, get_task
from .train import NonFiniteLoss


def parse_grid(items: list[str]) -> dict[str, list]:
    grid = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not values:
            raise KeyError(f"--grid expects KEY=V1,V2,..., got {item!r}")
        grid[key] = [parse_value(v) for v in values.split(",")]
    return grid


@dataclass
class Point:
    """One grid point: its spec, or the reason it is invalid (reported as failed, never fatal)."""

    label: str
    spec: RunSpec | None = None
    error: str | None = None
    row: int = 0  # the row (backbone, method, fixed options) it belongs to: the vtab protocol chooses per row


def expand(rows, tasks, seeds, grid: dict, settings: dict, eval_split: str = "test") -> list[Point]:
    """Points for rows (backbone, method, fixed options, row grid) x tasks x seeds x grid points.
    A grid key prefixed '<method>.' applies to that method only; PerTask values are chosen per task.
    Invalid points carry their error."""
    points = []
    for row, (backbone, method, fixed, row_grid) in enumerate(rows):
        own = {**row_grid, **{k: v for k, v in grid.items() if "." not in k or k.startswith(f"{method}.")}}
        keys = list(own)
        for values in itertools.product(*own.values()):
            point = dict(zip(keys, values))
            for task in tasks:
                for seed in seeds:
                    label = f"{backbone} {method} {task} seed {seed} {point or ''} eval {eval_split}".replace("  ", " ")
                    try:
                        options, recipe = split_settings(method, for_task({**settings, **fixed, **point}, task))
                        points.append(Point(label, RunSpec(backbone, task, method, options, seed, eval_split, recipe),
                                            row=row))
                    except USER_ERRORS as e:
                        points.append(Point(label, error=error_line(e), row=row))
    return points


def run_job(spec: RunSpec, runs: str, data_root: str, weights: str | None, prepare: bool) -> str:
    """Run one spec; return 'ran', 'done' (skipped, finished before), 'busy' or 'failed: <reason>'."""
    skipped = []
    try:
        execute(spec, runs, data_root, weights, prepare=prepare, progress=False, on_skip=skipped.append)
    except RunBusy:
        return "busy"
    except torch.cuda.OutOfMemoryError as e:  # this run does not fit next to the others: the sweep goes on
        torch.cuda.empty_cache()
        return f"failed: CUDA out of memory ({str(e).splitlines()[0]}); lower the batch size or --runs-per-gpu"
    except (NonFiniteLoss, OSError, *USER_ERRORS) as e:
        return f"failed: {error_line(e)}"
    return "done" if skipped else "ran"


def best_on_val(points: list[Point], args) -> list[RunSpec]:
    """VTAB protocol: per row, task and seed, the grid point whose val200 record comes first in
    records.selection_order (the best final val200 accuracy; ties: the smaller run id), as a spec that
    trains on train800val200 and tests. Points without a finished record are left out."""
    best = {}
    for point in points:
        record = record_of(point.spec, args) if point.spec is not None else None
        if record is None:
            continue  # invalid, not finished, or reported as failed in the first stage
        key = (point.row, point.spec.task, point.spec.seed)
        if key not in best or selection_order(record) < selection_order(best[key][0]):
            best[key] = (record, point.spec)
    return [dataclasses.replace(spec, eval_split="test") for _, spec in best.values()]


def dry_run_status(spec: RunSpec, args) -> str:
    """'done', 'to run', or 'to run (...)' when the identity cannot be resolved yet (e.g. data not prepared)."""
    try:
        ensure_prepared(spec.task, args.data_root, prepare=False)
        resolved = resolve(spec, args.data_root, args.weights, device=default_device())[0]
    except USER_ERRORS as e:
        return f"to run (cannot check: {error_line(e)})"
    return "done" if finished(resolved.path(args.runs)) else f"to run ({resolved.run_id})"


def launch(points: list[Point], args, stage: str) -> list[str]:
    """Run the valid points (through the chosen launcher); every point gets a status, invalid ones 'failed'."""
    specs = [p.spec for p in points if p.spec is not None]
    if args.launcher in ("slurm", "submitit-local"):
        results = iter(launch_submitit(specs, args))
    elif len(args.workers) > 1 and not args.stage:
        return launch_workers(points, args, stage)
    else:
        results = None
    statuses = []
    for i, point in enumerate(points, 1):
        if point.error is not None:
            status = f"failed: {point.error}"
        elif results is not None:
            status = next(results)
        else:
            status = run_job(point.spec, args.runs, args.data_root, args.weights, args.prepare)
        print(f"[{i}/{len(points)}] {point.label}: {status}", flush=True)
        statuses.append(status)
    return statuses


def worker_gpus(gpus: int, runs_per_gpu: int) -> list[str | None]:
    """CUDA_VISIBLE_DEVICES of each worker process: the first `gpus` of the GPUs this process sees (the
    parent's CUDA_VISIBLE_DEVICES, else all), each `runs_per_gpu` times; None (the CPU) without a GPU."""
    count = torch.cuda.device_count()
    mask = os.environ.get("CUDA_VISIBLE_DEVICES")
    visible = [g.strip() for g in mask.split(",")][:count] if mask is not None else [str(g) for g in range(count)]
    if gpus > max(len(visible), 1):
        raise KeyError(f"--gpus {gpus}: this process sees {len(visible)} GPU(s)"
                       + (f" (CUDA_VISIBLE_DEVICES={mask})" if mask is not None else "") + "; lower --gpus")
    return [gpu for gpu in (visible[:gpus] or [None]) for _ in range(runs_per_gpu)]


def launch_workers(points: list[Point], args, stage: str) -> list[str]:
    """Worker processes over the same job list (of `stage`), lock files splitting the work; each point's
    status comes from its record afterwards."""
    before = [record_of(p.spec, args) is not None if p.spec else False for p in points]
    procs = [subprocess.Popen([sys.executable, "-m", "vtab_lily.sweep", *args.argv, "--stage", stage],
                              env={**os.environ, **({"CUDA_VISIBLE_DEVICES": gpu} if gpu is not None else {})})
             for gpu in args.workers]
    codes = [p.wait() for p in procs]
    statuses = []
    for point, done_before in zip(points, before):
        if point.error is not None:
            statuses.append(f"failed: {point.error}")
        elif done_before or record_of(point.spec, args) is not None:
            statuses.append("done" if done_before else "ran")
        else:
            statuses.append(f"failed: not finished by the workers (exit codes {codes}; see their output)")
    return statuses


def record_of(spec: RunSpec, args) -> dict | None:
    """The finished record of `spec` under args.runs, or None."""
    try:
        return finished(resolve(spec, args.data_root, args.weights)[0].path(args.runs))
    except USER_ERRORS:
        return None


def launch_submitit(specs: list[RunSpec], args) -> list[str]:
    import submitit

    class Job(submitit.helpers.Checkpointable):
        """Requeued on preemption or timeout; the run resumes from its saved state."""

        def __call__(self, spec, runs, data_root, weights, prepare):
            return run_job(spec, runs, data_root, weights, prepare)

    cluster = "slurm" if args.launcher == "slurm" else "local"
    executor = submitit.AutoExecutor(folder=args.logs, cluster=cluster)
    params = dict(timeout_min=args.timeout_min, name="vtab-lily")
    if cluster == "slurm":
        params.update(gpus_per_node=1, slurm_partition=args.partition, slurm_signal_delay_s=120)
    executor.update_parameters(**params)
    n = len(specs)
    jobs = executor.map_array(Job(), specs, [args.runs] * n, [args.data_root] * n, [args.weights] * n,
                              [args.prepare] * n)
    print(f"submitted {n} jobs to {cluster} (logs: {args.logs})", flush=True)
    return [job.result() for job in jobs]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vtab_lily.sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), help="the rows of a paper table")
    parser.add_argument("--backbones", nargs="+", default=[], help=choices_help("backbone", "each "))
    parser.add_argument("--methods", nargs="+", default=[], help=choices_help("method", "each "))
    parser.add_argument("--tasks", nargs="+", help=choices_help("task", "'all' (the 19 of VTAB-1K), 'mini' (the "
                        "mini VTAB), or each ") + "; default: the preset's tasks, else all")
    parser.add_argument("--seeds", nargs="+", type=int, default=[42])
    parser.add_argument("--grid", nargs="+", default=[], metavar="KEY=V1,V2")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="fixed settings for all runs")
    parser.add_argument("--protocol", default="paper", choices=["paper", "vtab"])
    parser.add_argument("--launcher", default="local", choices=["local", "slurm", "submitit-local"])
    parser.add_argument("--gpus", type=int, default=1, help="local launcher: GPUs to use (of those visible)")
    parser.add_argument("--runs-per-gpu", type=int, default=1, metavar="K",
                        help="local launcher: K runs share each GPU (K worker processes per GPU; on a machine "
                        "without a GPU, K processes on the CPU)")
    parser.add_argument("--scan-backend", choices=BACKENDS, help="Vim's selective scan in every run (as run's option)")
    parser.add_argument("--partition", help="Slurm partition")
    parser.add_argument("--timeout-min", type=int, default=240)
    parser.add_argument("--logs", default="results/slurm-logs")
    parser.add_argument("--weights")
    parser.add_argument("--data-root", default=DEFAULT_DATA)
    parser.add_argument("--runs", default=DEFAULT_RUNS)
    parser.add_argument("--prepare", action="store_true")
    parser.add_argument("--dry-run", action="store_true", help="list the runs and whether they are done")
    parser.add_argument("--stage", choices=["all", "select", "final"], help=argparse.SUPPRESS)  # a worker's
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if args.launcher == "slurm" and not args.partition:
            raise KeyError("--launcher slurm needs --partition")
        rows = list(PRESETS[args.preset]) if args.preset else []
        rows += [(b, m, {}, {}) for b in args.backbones for m in args.methods]
        if not rows:
            raise KeyError("give --preset, or --backbones and --methods")
        tasks = args.tasks or [PRESET_TASKS.get(args.preset, "all")]
        tasks = list(TASK_SETS[tasks[0]]) if len(tasks) == 1 and tasks[0] in TASK_SETS else tasks
        settings = {k: parse_value(v) for k, _, v in (s.partition("=") for s in args.set)}
        for task in tasks:
            get_task(task)
        grid = parse_grid(args.grid)
        if args.scan_backend:
            os.environ["VTAB_LILY_SCAN"] = args.scan_backend  # worker processes and local jobs inherit it
            set_backend(args.scan_backend)
        if min(args.gpus, args.runs_per_gpu) < 1:
            raise KeyError(f"--gpus and --runs-per-gpu must be at least 1, got {args.gpus} and {args.runs_per_gpu}")
        local = args.launcher == "local" and not args.stage  # a worker (--stage) runs in this process
        args.workers = worker_gpus(args.gpus, args.runs_per_gpu) if local else []
        stage1 = expand(rows, tasks, args.seeds, grid, settings, "val200" if args.protocol == "vtab" else "test")
    except USER_ERRORS as e:
        print(f"error: {error_line(e)}", file=sys.stderr)
        return 2
    if args.dry_run:
        statuses = []
        for point in stage1:
            status = f"failed: {point.error}" if point.error else dry_run_status(point.spec, args)
            print(f"{point.label}: {status}")
            statuses.append(status)
        failed = sum(s.startswith("failed") for s in statuses)
        print(f"{len(statuses)} runs: {statuses.count('done')} done, {len(statuses) - failed - statuses.count('done')} "
              f"to run, {failed} failed (invalid settings)")
        return 1 if failed else 0
    def final():
        return [Point(f"{s.backbone} {s.method} {s.task} seed {s.seed} {s.options} eval test", s)
                for s in best_on_val(stage1, args)]

    if args.stage:  # a worker process of --gpus N: run its stage's list
        statuses = launch(final() if args.stage == "final" else stage1, args, args.stage)
    else:
        statuses = launch(stage1, args, "select" if args.protocol == "vtab" else "all")
        if args.protocol == "vtab":
            statuses += launch(final(), args, "final")
    failed = [s for s in statuses if s.startswith("failed")]
    print(f"{len(statuses)} jobs: {statuses.count('ran')} ran, {statuses.count('done')} already done, "
          f"{statuses.count('busy')} run elsewhere, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
