"""A paper table in one command: prepare its tasks, fetch its backbones' weights, project its GPU-hours, run
its preset's sweep and write the table beside the paper's numbers.

    python -m vtab_lily.reproduce --table 4 --dry-run                 # what it would do; runs and writes nothing
    python -m vtab_lily.reproduce --table mini                        # the offline mini benchmark, on this machine
    python -m vtab_lily.reproduce --table 4 --seeds 42 43 44 --launcher slurm --partition gpu \\
        --slurm account=A --slurm qos=Q [--array-parallelism N] [--runs-per-gpu K] [--wait]
    python -m vtab_lily.reproduce --table 4 ... --tables-only         # once the jobs are done: the table only

In order: (1) the tasks of the sweep that are not prepared under --data-root are prepared (tfds downloads
into --data-dir; a task that tfds cannot download, resisc45 and retinopathy, is an error naming the files to
put in place, before any work); (2) each backbone's pretrained weights are fetched once into the Hugging Face
cache (HF_HOME), which Slurm jobs read with HF_HUB_OFFLINE=1 (a `--slurm setup=` line that reproduce adds);
(3) the run count and the projected GPU-hours, from the rates that `doctor --calibration` saved (--calibration,
default results/calibration.json), are printed; (4) the preset's sweep runs (local) or is submitted (slurm:
returns at once unless --wait; then come back with --tables-only); (5) `tables --table T` writes the table and
its paper comparison under --out. Every other option is the sweep's (--seeds, --tasks, --methods, --set,
--launcher, --slurm, --partition, --timeout-min, --array-parallelism, --runs-per-gpu, --gpus, --wait, --logs,
--weights, --scan-backend), passed through to it.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from backbones import _backbone, pretrained_file
from backbones.weights import SHIPPED

from . import doctor, sweep, tables
from .errors import cli
from .options import OptionError, check_writable_folder
from .prepare import manual_download, prepare_task, tfds_data_dir
from .rows import TABLE_PRESET
from .run import DEFAULT_DATA, DEFAULT_RUNS
from .tasks import get_task

TABLES = ("4", "5", "15", "extended", "mini")  # the tables with a preset to sweep
OWN = ("--preset", "--prepare", "--status", "--stage")  # sweep options that reproduce does not pass through


def parse_args(argv) -> tuple[argparse.Namespace, argparse.Namespace, list[str]]:
    """(reproduce's options, the sweep's (checked), the sweep's argv); an OptionError names a wrong one."""
    parser = argparse.ArgumentParser(prog="python -m vtab_lily.reproduce", description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", help=f"one of {', '.join(TABLES)}")
    parser.add_argument("--protocol", default="paper", choices=["paper", "vtab"])
    parser.add_argument("--data-root", default=DEFAULT_DATA, help="the prepared tasks (shared with the jobs)")
    parser.add_argument("--data-dir", help="tfds' data dir for the downloads (default $TFDS_DATA_DIR or "
                        "~/tensorflow_datasets); manual downloads go in its downloads/manual/")
    parser.add_argument("--runs", default=DEFAULT_RUNS)
    parser.add_argument("--out", default="results/tables", help="where the table is written")
    parser.add_argument("--calibration", default=doctor.DEFAULT_CALIBRATION, metavar="PATH",
                        help="the rates `python -m vtab_lily.doctor --calibration` saved")
    parser.add_argument("--dry-run", action="store_true", help="print what it would do; run and write nothing")
    parser.add_argument("--tables-only", action="store_true", help="write the table from the records only")
    args, rest = parser.parse_known_args(argv)
    if args.table not in TABLES:
        raise OptionError(f"--table {args.table}: reproduce makes tables {', '.join(TABLES)}" if args.table else
                          f"give --table, one of {', '.join(TABLES)}")
    if clash := [a for a in rest if a.split("=")[0] in OWN]:
        raise OptionError(f"{clash[0]}: not an option of reproduce (--table sets the sweep's preset, the tasks are "
                          "prepared before the sweep; follow Slurm jobs with the sweep command it prints and --status)")
    sweep_argv = ["--preset", TABLE_PRESET[args.table], "--protocol", args.protocol, "--data-root", args.data_root,
                  "--runs", args.runs, *rest]
    sweep_args, _ = sweep.parse_args(sweep_argv)
    if sweep_args.launcher == "slurm":  # the jobs read the weights that step 2 put in this cache, offline
        from huggingface_hub import constants
        sweep_argv += ["--slurm", f"setup=export HF_HUB_CACHE={shlex.quote(str(constants.HF_HUB_CACHE))} "
                       "HF_HUB_OFFLINE=1"]
        sweep_args, _ = sweep.parse_args(sweep_argv)
    check_writable_folder(args.out, "tables", "--out")
    return args, sweep_args, sweep_argv


def read_calibration(path: str) -> tuple[dict | None, str]:
    """(rates, what they are) from a calibration file, or (None, why there are none)."""
    try:
        calibration = json.loads(Path(path).read_text())
        rates = calibration["rates"]
        if not (isinstance(rates, dict) and all(isinstance(r, dict) for r in rates.values())):
            raise TypeError("its rates are not {backbone: rate}")
    except FileNotFoundError:
        return None, f"no calibration at {path} (measure one on a GPU node: python -m vtab_lily.doctor " \
                     f"--calibration {path})"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return None, f"the calibration {path} is unreadable ({type(e).__name__}: {e}); measure it again: " \
                     f"python -m vtab_lily.doctor --calibration {path}"
    return rates, f"{path}: {calibration.get('device_name', '?')}, " + ", ".join(
        f"{b} {r.get('train_ips', 0):.1f} img/s" for b, r in sorted(rates.items()))


def hub_weights(backbone: str, weights: str | None) -> tuple[str, tuple | None]:
    """(what the backbone's weights are, (repo, file) when they must still be fetched into the hub cache)."""
    from huggingface_hub import try_to_load_from_cache
    hub = _backbone(backbone).hub_file
    if weights:
        return f"--weights {weights}", None
    if backbone in SHIPPED:
        return "shipped with the code", None
    if hub is None:
        return "no pretrained weights", None
    cached = try_to_load_from_cache(*hub)
    if isinstance(cached, str):
        return f"cached: {cached}", None
    from huggingface_hub import constants
    return f"to fetch into {constants.HF_HUB_CACHE} (hf download {hub[0]} {hub[1]})", hub


def plan(args, sweep_args) -> tuple[list[str], list[str]]:
    """Print what reproduce will do; return (the tasks to prepare, the backbones whose weights to fetch).
    A manual download still to do is an OptionError here, unless --dry-run."""
    rows, tasks, settings, grid = sweep.plan(sweep_args)
    points = sweep.expand(rows, tasks, sweep_args.seeds, grid, settings,
                          "val200" if args.protocol == "vtab" else "test")
    preset = TABLE_PRESET[args.table]
    extra = " (then, --protocol vtab, one retrain on train800val200 per row, task and seed)" \
        if args.protocol == "vtab" else ""
    configurations = len(points) // max(len(tasks) * len(sweep_args.seeds), 1)
    print(f"table {args.table}: preset {preset}, {len(rows)} rows ({configurations} configurations) x {len(tasks)} "
          f"tasks x {len(sweep_args.seeds)} seed(s) = {len(points)} runs{extra}")
    missing = [t for t in tasks if not doctor.prepared(args.data_root, t)]
    tfds_dir = tfds_data_dir(args.data_dir)
    manual = [line for t in missing if (line := manual_download(get_task(t), tfds_dir)) is not None]
    print(f"data under {args.data_root}: {len(tasks) - len(missing)} of {len(tasks)} tasks prepared"
          + (f"; to prepare: {' '.join(missing)}" if missing else ""))
    for line in manual:
        name = line.split(":")[0]
        print(f"  manual download: {line}; then: python -m vtab_lily.prepare --task {name} --root {args.data_root}"
              + (f" --data-dir {args.data_dir}" if args.data_dir else ""))
    if manual and not args.dry_run:
        raise OptionError(f"{len(manual)} task(s) need a manual download first: {'; '.join(manual)}; then run "
                          "this command again (or leave them out with --tasks)")
    fetch = []
    for backbone in sorted({row[0] for row in rows}):
        what, hub = hub_weights(backbone, sweep_args.weights)
        print(f"weights of {backbone}: {what}")
        fetch += [backbone] if hub else []
    rates, source = read_calibration(args.calibration)
    if rates is None:
        print(f"projected GPU-hours: none, {source}")
    else:
        seconds, lacking = doctor.runs_gpu_s([doctor.run_shape(p.spec) for p in points if p.spec], rates)
        print(f"projected GPU-hours: {seconds / 3600:.1f}" + (f" (without the runs of {', '.join(sorted(lacking))}: "
              "no rate for them)" if lacking else "") + f", from {source}")
    return missing, fetch


def tables_argv(args) -> list[str]:
    return ["--table", args.table, "--protocol", args.protocol, "--runs", args.runs, "--out", args.out]


@cli
def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, sweep_args, sweep_argv = parse_args(argv)
    if args.tables_only and not args.dry_run:
        return tables.main(tables_argv(args))
    missing, fetch = plan(args, sweep_args)
    print(f"sweep: python -m vtab_lily.sweep {shlex.join(sweep_argv)}")
    print(f"table: python -m vtab_lily.tables {shlex.join(tables_argv(args))}")
    later = sweep_args.launcher == "slurm" and not sweep_args.wait
    come_back = ("the submission returns at once; once the jobs are done (follow them with the sweep command above "
                 f"and --status): python -m vtab_lily.reproduce {shlex.join(a for a in argv if a != '--dry-run')} "
                 "--tables-only")
    if args.dry_run:
        if later:
            print(come_back)
        return 0
    for task in missing:
        manifest = prepare_task(task, args.data_root, data_dir=args.data_dir)
        print(f"prepared {task}: {manifest['counts']}", flush=True)
    for backbone in fetch:
        print(f"fetched the weights of {backbone}: {pretrained_file(backbone)[0]}", flush=True)
    code = sweep.main(sweep_argv)
    if later or code == 2:  # submitted (come back later), or the sweep stopped with an error line
        print(come_back)
        return code
    return max(code, tables.main(tables_argv(args)))


if __name__ == "__main__":
    sys.exit(main())
