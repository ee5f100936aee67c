"""Check an install where it runs, on one screen: package versions against constraints.txt; devices; on each
CUDA device, every scan backend that imports against the float64 torch scan (outputs and gradients, fp32 and
bf16), a mini-benchmark run on the GPU against the same run on the CPU, the bf16 and tf32 paths and
`sweep --runs-per-gpu 2`; the training throughput of ViT-B/16 Lily and Vim-S Lily and from it the projected
wall time of one VTAB-1K run and of each table preset on --gpus N (optionally saved with --calibration); the
hub weights in the local cache (never downloaded) and the prepared tasks under --data-root, with the command
that fetches what is missing.

Each line: PASS, FAIL (exit 1), SKIP (cannot run here: why) or WARN (not fatal: a version other than the
tested one, something missing with the command that fetches it). Exit 0 when nothing fails.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import os
import shutil
import statistics
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from backbones import _backbone, family, ssm

from .errors import cli
from .fileio import write_json
from .options import OptionError, check_writable_folder
from .prepare import read_manifest
from .recipes import recipe_for
from .rows import PRESET_TASKS, PRESETS
from .run import DEFAULT_DATA, execute
from .tasks import SPLIT_SIZES, TASK_SETS, VTAB_TASKS, get_task

CONSTRAINTS = Path(__file__).resolve().parent.parent / "constraints.txt"
PACKAGES = ("torch", "timm", "numpy", "submitit", "tensorflow-datasets", "mamba-ssm", "causal-conv1d", "triton")
# max |backend - float64 torch scan| / max |float64 torch scan|, outputs and each gradient
SCAN_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 3e-2}
# a mini run on the GPU against the same run on the CPU (and bf16 / tf32 against fp32 on the GPU): test accuracy
# within this many points, and the last training loss within this fraction of the CPU's
RUN_BAND = {"acc_points": 3.0, "loss_rel": 0.05}
MINI_RUN = dict(backbone="vit-mini", task="digits", method="lily", recipe={"epochs": 3, "eval_every": 3})
THROUGHPUT = {"vit-b": "lily", "vim-s": "lily"}  # backbone -> method timed; a preset row uses its family's line
CPU_BATCH = 2  # the CPU times a smaller batch than the paper's, one step (said on its line)
DEFAULT_CALIBRATION = "results/calibration.json"  # where `doctor --calibration` saves and `reproduce` reads
HUB_BACKBONES = ("vit-b", "vit-b-in1k", "vim-s")  # the backbones of the paper's table presets


@dataclasses.dataclass
class Check:
    section: str
    status: str  # PASS | FAIL | SKIP | WARN
    name: str
    detail: str = ""

    def line(self) -> str:
        return f"  {self.status:<4}  {self.name}" + (f": {self.detail}" if self.detail else "")


# ---- versions and devices -----------------------------------------------------------------------------------

def pinned(path: Path = CONSTRAINTS) -> dict[str, str]:
    """{normalised package name: version} of constraints.txt."""
    pins = {}
    for line in path.read_text().splitlines():
        name, sep, version = line.split("#")[0].strip().partition("==")
        if sep:
            pins[name.lower().replace("_", "-")] = version
    return pins


def version_checks(pins: dict[str, str]) -> list[Check]:
    checks = []
    for package in PACKAGES:
        try:
            have = metadata.version(package)
        except metadata.PackageNotFoundError:
            have = None
        want = pins.get(package)
        if have is None:
            status, detail = "SKIP", "not installed" + (f" (tested with {want})" if want else "")
        elif want is None or have == want:
            status, detail = "PASS", have + ("" if want else " (not in constraints.txt)")
        else:
            status, detail = "WARN", f"{have}, constraints.txt has {want} (pip install -c constraints.txt {package})"
        checks.append(Check("versions", status, package, detail))
    return checks


def device_checks() -> list[Check]:
    checks = [Check("devices", "PASS", "cpu", f"{torch.get_num_threads()} torch threads")]
    if not torch.cuda.is_available():
        return checks + [Check("devices", "SKIP", "cuda", f"no CUDA device (torch {torch.__version__}, CUDA build "
                                                          f"{torch.version.cuda or 'none'})")]
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        checks.append(Check("devices", "PASS", f"cuda:{i}", f"{p.name}, {p.total_memory / 2**30:.0f} GiB, compute "
                            f"capability {p.major}.{p.minor}"))
    return checks


# ---- the scan backends --------------------------------------------------------------------------------------

def mixer_inputs(device, dtype, b=2, d=64, l=None, n=16, k=4, seed=0) -> list[torch.Tensor]:
    """A slice of a Vim-S mixer (x, conv weight and bias, delta, A, B, C, D, z, dt bias), some dt large; its
    sequence: Vim-S's 197 tokens on CUDA, 67 on the CPU (the float64 reference loops over time steps)."""
    l = l or (197 if str(device).startswith("cuda") else 67)
    g = torch.Generator().manual_seed(seed)
    x, delta = torch.randn(b, d, l, generator=g), torch.randn(b, d, l, generator=g) * 2
    delta[0, -1, l // 2] = 40.0
    leaves = [x, torch.randn(d, 1, k, generator=g) * 0.5, torch.randn(d, generator=g) * 0.1, delta,
              -torch.rand(d, n, generator=g) - 0.1, torch.randn(b, n, l, generator=g),
              torch.randn(b, n, l, generator=g),
              torch.randn(d, generator=g), torch.randn(b, d, l, generator=g), torch.randn(d, generator=g)]
    # the scan's A, D and dt bias are fp32 parameters in the model, whatever the activations' dtype
    return [t.to(device, torch.float32 if i in (4, 7, 9) else dtype) for i, t in enumerate(leaves)]


def mixer_core(scan, conv, x, w, cb, delta, A, B, C, D, z, bias):
    return scan(conv(x, w, cb), delta, A, B, C, D, z, bias)


def reference_conv(x, w, cb):
    k = w.shape[-1]
    return torch.nn.functional.silu(torch.nn.functional.conv1d(x, w, cb, padding=k - 1, groups=x.shape[1])
                                    [..., : x.shape[-1]])


def outputs_and_grads(scan, conv, leaves) -> list[torch.Tensor]:
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    out = mixer_core(scan, conv, *leaves)
    g = torch.Generator().manual_seed(1)
    out.backward(torch.randn(out.shape, generator=g).to(out.device, out.dtype))
    return [out.detach()] + [t.grad for t in leaves]


def scan_error(backend: str, leaves: list[torch.Tensor]) -> float:
    """The largest, over the output and every input's gradient, of max|backend - reference| / max|reference|:
    `backend` runs through `ssm.selective_scan` / `ssm.causal_conv1d` on the leaves as given; the reference is
    the torch scan (ChunkedScan) and F.conv1d in float64 on the CPU."""
    previous = ssm._requested["name"]
    ssm.set_backend(backend)
    try:
        got = outputs_and_grads(ssm.selective_scan, ssm.causal_conv1d, leaves)
    finally:
        ssm.set_backend(previous)
    want = outputs_and_grads(ssm.ChunkedScan.apply, reference_conv, [t.detach().cpu().double() for t in leaves])
    return max(((a.cpu().double() - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
               for a, b in zip(got, want))


def backends_for(device_type: str) -> list[tuple[str, str]]:
    """(backend, '' or why it cannot run) for each forced backend on `device_type`."""
    result = []
    for name in ("torch", "triton", "mamba"):
        try:
            ssm.choose(device_type, name)
            result.append((name, ""))
        except ssm.ScanBackendError as e:  # its first clause, without the name: one line on the screen
            result.append((name, str(e).split("; ")[0].removeprefix(f"scan backend {name} cannot run: ")))
    return result


def scan_checks(device: str) -> list[Check]:
    checks, section = [], f"scan backends on {device}"
    for name, why in backends_for(torch.device(device).type):
        if why:
            checks.append(Check(section, "SKIP", name, why))
            continue
        for dtype, tol in SCAN_TOLERANCE.items():
            label = f"{name} {str(dtype).removeprefix('torch.')}"
            err = scan_error(name, mixer_inputs(device, dtype))
            ok = err <= tol  # NaN fails
            checks.append(Check(section, "PASS" if ok else "FAIL", label, f"max error {err:.1e} of the float64 "
                                f"torch scan's magnitude, outputs and gradients (tolerance {tol:.0e})"))
    return checks


# ---- runs on the GPU ----------------------------------------------------------------------------------------

def mini_run(root: Path, device: str, precision: str = "fp32") -> dict:
    """The mini run (MINI_RUN) on `device` with `precision`: {'acc', 'loss'} of its record."""
    from .records import RunSpec, read_record
    spec = RunSpec(MINI_RUN["backbone"], MINI_RUN["task"], MINI_RUN["method"],
                   recipe={**MINI_RUN["recipe"], "precision": precision})
    path = execute(spec, root / f"runs-{device.replace(':', '')}-{precision}", root / "data", device=device,
                   prepare=True, progress=False)
    record = read_record(path)
    return {"acc": record["final_acc"], "loss": record["train_losses"][-1]}


def within_band(got: dict, want: dict, band: dict = RUN_BAND) -> tuple[bool, str]:
    d_acc = abs(got["acc"] - want["acc"])
    d_loss = abs(got["loss"] - want["loss"]) / max(abs(want["loss"]), 1e-12)
    ok = bool(np.isfinite(got["loss"])) and d_acc <= band["acc_points"] and d_loss <= band["loss_rel"]
    return ok, (f"acc {got['acc']:.1f} vs {want['acc']:.1f} (band {band['acc_points']:g} points), last loss "
                f"{got['loss']:.4f} vs {want['loss']:.4f} (band {band['loss_rel']:.0%})")


@contextlib.contextmanager
def output_to(log: Path):
    """Send this process's stdout and stderr (sys.stdout / sys.stderr, and file descriptors 1 and 2: worker
    processes too) to `log`."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(log, "a", buffering=1) as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, copy in zip((1, 2), saved):
                os.dup2(copy, fd)
                os.close(copy)


def gpu_run_checks(device: str, root: Path) -> list[Check]:
    """The mini runs and the sweep under `root`, their output in `root`/log.txt (named on a failed line)."""
    with output_to(root / "log.txt"):
        checks = _gpu_run_checks(device, root)
    return [dataclasses.replace(c, detail=f"{c.detail} (log: {root / 'log.txt'})") if c.status == "FAIL" else c
            for c in checks]


def _gpu_run_checks(device: str, root: Path) -> list[Check]:
    from . import sweep
    section = f"runs on {device}"
    name = f"{MINI_RUN['backbone']} {MINI_RUN['method']} {MINI_RUN['task']}, {MINI_RUN['recipe']['epochs']} epochs"
    cpu = mini_run(root, "cpu")
    gpu = mini_run(root, device)
    ok, detail = within_band(gpu, cpu)
    checks = [Check(section, "PASS" if ok else "FAIL", f"{name}, fp32, against the CPU", detail)]
    for precision in ("tf32", "bf16"):
        ok, detail = within_band(mini_run(root, device, precision), gpu)
        checks.append(Check(section, "PASS" if ok else "FAIL", f"{name}, {precision}, against fp32", detail))
    runs = root / "runs-per-gpu"
    code = sweep.main(["--backbones", MINI_RUN["backbone"], "--methods", MINI_RUN["method"], "--tasks",
                       MINI_RUN["task"], "--seeds", "1", "2", "--set", "epochs=1", "eval_every=1",
                       "--runs-per-gpu", "2", "--gpus", "1", "--data-root", str(root / "data"), "--runs", str(runs)])
    done = len(list(runs.rglob("*.json")))
    checks.append(Check(section, "PASS" if code == 0 and done == 2 else "FAIL", "sweep --runs-per-gpu 2",
                        f"exit {code}, {done} of 2 records"))
    return checks


# ---- throughput and projections -----------------------------------------------------------------------------

def test_split_sizes() -> dict[str, int]:
    """Images in the test split of each of the 19 VTAB-1K tasks."""
    sizes = {}
    for name in VTAB_TASKS:
        task = get_task(name)
        sizes[name] = len(task.test.indices(SPLIT_SIZES[task.builder][task.test.split]))
    return sizes


def projected_run_s(rate: dict, test_images: int, epochs: int = 100, eval_every: int = 10, batch: int | None = None,
                    drop_last: bool = True, train_images: int = 1000) -> float:
    """Seconds of one VTAB-1K run (paper protocol) at `rate` ({'batch', 'train_ips', 'eval_ips'}): `epochs` of
    the training images (the run's `batch`, default the rate's; `drop_last` drops the last incomplete one) and
    one pass over the test split every `eval_every` epochs."""
    batch = batch or rate["batch"]
    trained = train_images // batch * batch if drop_last else train_images
    return epochs * trained / rate["train_ips"] + epochs // eval_every * test_images / rate["eval_ips"]


def run_shape(spec) -> tuple:
    """(backbone, task, epochs, eval_every, batch, drop_last): what the projection of a run needs."""
    recipe = spec.full_recipe()
    return spec.backbone, spec.task, recipe.epochs, recipe.eval_every, recipe.batch_size, recipe.drop_last


@functools.cache
def preset_runs(preset: str) -> tuple:
    """The run_shape of each run of the preset, as the sweep expands it (its default tasks, one seed, paper
    protocol)."""
    from .sweep import expand
    return tuple(run_shape(p.spec) for p in expand(PRESETS[preset], list(TASK_SETS[PRESET_TASKS.get(preset, "all")]),
                                                  [42], {}, {}))


def runs_gpu_s(runs, rates: dict) -> tuple[float, set[str]]:
    """(GPU-seconds of `runs` (run_shape tuples), each timed by its backbone family's rate, the backbones
    without a rate: the mini ones, or a family that `rates` lacks)."""
    sizes, total, lacking = test_split_sizes(), 0.0, set()
    for backbone, task, epochs, eval_every, batch, drop_last in runs:
        kind = "vim-s" if family(backbone) == "vim" else "vit-b"
        if backbone.endswith("-mini") or task not in sizes or kind not in rates:
            lacking.add(backbone)
            continue
        total += projected_run_s(rates[kind], sizes[task], epochs, eval_every, batch, drop_last)
    return total, lacking


def preset_hours(preset: str, rates: dict, gpus: int) -> tuple[int, float | None, str]:
    """(run count, projected wall hours on `gpus` GPUs or None, what it lacks): the preset's runs, each timed
    by its backbone family's rate, packed perfectly on the GPUs."""
    runs = preset_runs(preset)
    total, lacking = runs_gpu_s(runs, rates)
    why = f"no rate for {', '.join(sorted(lacking))}" if lacking else ""
    return len(runs), None if lacking else total / gpus / 3600, why


def throughput(backbone: str, method: str, batch: int, device: str, precision: str) -> dict:
    """{'batch', 'train_ips', 'eval_ips', 'precision', 'device'}: one training epoch of 2 batches on synthetic
    224 px images (after a warm-up epoch on CUDA: cuDNN, allocator, Triton; on the CPU one batch, no warm-up),
    then one test pass."""
    from .data import Batches, Split
    from .model import build_model
    from .train import evaluate, fit
    cuda = device.startswith("cuda")
    images = 2 * batch if cuda else batch
    rng = np.random.default_rng(0)
    split = Split(rng.integers(0, 256, (images, 224, 224, 3), dtype=np.uint8),
                  rng.integers(0, 100, images).astype(np.int64), cache=None)
    precision = precision if device.startswith("cuda") else "fp32"
    recipe = recipe_for(backbone, epochs=1, warmup_epochs=0, batch_size=batch, eval_every=1000, precision=precision,
                        eval_batch_size=batch)
    model = build_model(backbone, method, 100, pretrained=False).to(device)
    train = Batches(split, batch, shuffle=True, drop_last=True, device=device, resident=cuda)
    test = Batches(split, batch, device=device)

    def timed(fn) -> float:
        if cuda:
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize(device)
        return time.perf_counter() - t
    if cuda:
        fit(model, train, test, recipe, progress=False)
    epoch_s = timed(lambda: fit(model, train, test, recipe, progress=False))  # includes one test pass
    eval_s = timed(lambda: evaluate(model, test, recipe))
    return {"batch": batch, "train_ips": images / max(epoch_s - eval_s, 1e-9), "eval_ips": images / eval_s,
            "precision": precision, "device": device}


def duration(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def projection_checks(rates: dict, gpus: int) -> list[Check]:
    section, checks = f"projected wall time at these rates (paper protocol, one seed, {gpus} GPU(s), packed)", []
    sizes = test_split_sizes()
    for backbone, rate in rates.items():
        recipe = recipe_for(backbone)
        mean_s = projected_run_s(rate, statistics.mean(sizes.values()), recipe.epochs, recipe.eval_every,
                                 recipe.batch_size, recipe.drop_last)
        top_s = projected_run_s(rate, max(sizes.values()), recipe.epochs, recipe.eval_every,
                                 recipe.batch_size, recipe.drop_last)
        checks.append(Check(section, "PASS", f"one {backbone} VTAB-1K run", f"{duration(mean_s)} (mean test "
                            f"split), {duration(top_s)} (largest)"))
    for preset in sorted(PRESETS):
        runs, hours, why = preset_hours(preset, rates, gpus)
        checks.append(Check(section, "PASS" if hours is not None else "SKIP", f"preset {preset}",
                            f"{runs} runs, {hours:.1f} h" if hours is not None else f"{runs} runs; {why}"))
    return checks


def throughput_checks(device: str) -> tuple[list[Check], dict]:
    """One line per backbone of THROUGHPUT (Vim: per scan backend that runs, with its ratio to torch) and the
    rates the projections use (Vim: the backend `auto` picks)."""
    rates, checks, section = {}, [], f"training throughput on {device}"
    cuda, kind = device.startswith("cuda"), torch.device(device).type
    for backbone, method in THROUGHPUT.items():
        recipe = recipe_for(backbone)
        batch = recipe.batch_size if cuda else CPU_BATCH
        note = "" if cuda else f" (the CPU times batch {CPU_BATCH}, not the paper's {recipe.batch_size})"
        scans = [name for name, why in backends_for(kind) if not why] if family(backbone) == "vim" else [None]
        measured, previous = {}, ssm._requested["name"]
        for scan in scans:
            if scan:
                ssm.set_backend(scan)
            try:
                rate = measured[scan] = throughput(backbone, method, batch, device, "bf16")
            finally:
                ssm.set_backend(previous)
            torch_ips = measured.get("torch", rate)["train_ips"]
            ratio = f", {rate['train_ips'] / torch_ips:.2f}x torch" if scan not in (None, "torch") else ""
            checks.append(Check(section, "PASS", f"{backbone} {method}" + (f", scan {scan}" if scan else ""),
                                f"batch {batch}, {rate['precision']}: train {rate['train_ips']:.1f} img/s{ratio}, test "
                                f"{rate['eval_ips']:.1f} img/s{note}"))
        rates[backbone] = measured[ssm.choose(kind, "auto")[0] if scans != [None] else None]
    return checks, rates


def write_calibration(path: str | os.PathLike, rates: dict, gpus: int) -> dict:
    """The measured rates and projections as JSON (written atomically): {'device_name', 'torch', 'rates':
    {backbone: rate}, 'gpus', 'presets': {preset: {'runs', 'hours'}}}."""
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    presets = {}
    for preset in sorted(PRESETS):
        runs, hours, _ = preset_hours(preset, rates, gpus)
        presets[preset] = {"runs": runs, "hours": hours}
    calibration = {"device_name": name, "torch": torch.__version__, "rates": rates, "gpus": gpus, "presets": presets}
    write_json(path, calibration)
    return calibration


# ---- weights and data ---------------------------------------------------------------------------------------

def weights_checks() -> list[Check]:
    """Each table backbone's hub file in the local Hugging Face cache (looked up, never downloaded)."""
    from huggingface_hub import try_to_load_from_cache
    checks = []
    for name in HUB_BACKBONES:
        repo, file = _backbone(name).hub_file
        path = try_to_load_from_cache(repo, file)
        if isinstance(path, str):
            checks.append(Check("hub weights (local cache)", "PASS", name, path))
        else:
            checks.append(Check("hub weights (local cache)", "WARN", name, f"{repo}/{file} is not cached; fetch it "
                                f"on a connected machine: hf download {repo} {file}"))
    return checks


def data_checks(root: str | os.PathLike) -> list[Check]:
    """Each VTAB-1K task (and the mini VTAB) prepared under `root` (a complete manifest), one line for the
    prepared, one per missing task set with the command to prepare it, one per manual download still to do."""
    checks, section = [], f"prepared tasks under {root}"
    for set_name in ("all", "mini"):
        names = TASK_SETS[set_name]
        missing = [n for n in names if not prepared(root, n)]
        label = "VTAB-1K" if set_name == "all" else "mini VTAB"
        if not missing:
            checks.append(Check(section, "PASS", label, f"all {len(names)} tasks"))
            continue
        task = missing[0] if len(missing) == 1 else set_name
        checks.append(Check(section, "WARN", label, f"{len(names) - len(missing)} of {len(names)} prepared; "
                            f"missing {', '.join(missing)}; prepare: python -m vtab_lily.prepare --task {task} "
                            f"--root {root}" + (" (on a machine with internet)" if set_name == "all" else "")))
        for name in missing:
            if get_task(name).manual:
                checks.append(Check(section, "WARN", f"{name} (manual download)", get_task(name).manual))
    return checks


def prepared(root: str | os.PathLike, name: str) -> bool:
    task = get_task(name)
    for folder in (task.name, *task.aliases):
        path = Path(root) / folder / "manifest.json"
        if path.is_file() and read_manifest(path)[1] is None:
            return True
    return False


# ---- the screen ---------------------------------------------------------------------------------------------

def run_checks(args):
    """The checks, one at a time (the screen prints each as it ends: the throughput part takes minutes)."""
    yield from version_checks(pinned())
    yield from device_checks()
    cuda = [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    yield from scan_checks("cpu")
    if not cuda:
        yield Check("scan backends on cuda", "SKIP", "triton, mamba against the torch scan", "no CUDA device")
        yield Check("runs on cuda", "SKIP", "mini run against the CPU, tf32, bf16, sweep --runs-per-gpu 2",
                    "no CUDA device")
    for device in cuda:
        yield from scan_checks(device)
        root = Path(tempfile.mkdtemp(prefix="vtab-lily-doctor-"))
        checks = gpu_run_checks(device, root)
        if all(c.status == "PASS" for c in checks):  # a failure keeps its runs and log
            shutil.rmtree(root)
        yield from checks
    if args.quick:
        yield Check("training throughput", "SKIP", "ViT-B/16 and Vim-S Lily", "--quick")
    else:
        found, rates = throughput_checks(cuda[0] if cuda else "cpu")
        yield from found + projection_checks(rates, args.gpus)
        if args.calibration:
            write_calibration(args.calibration, rates, args.gpus)
            yield Check("calibration", "PASS", "rates and projections", f"written to {args.calibration}")
    yield from weights_checks()
    yield from data_checks(args.data_root)


def summary(checks: list[Check]) -> str:
    failed = [c for c in checks if c.status == "FAIL"]
    counts = {s: sum(c.status == s for c in checks) for s in ("PASS", "FAIL", "SKIP", "WARN")}
    return (", ".join(f"{n} {s}" for s, n in counts.items()) +
            (f"; failed: {'; '.join(f'{c.section}: {c.name}' for c in failed)}" if failed else ""))


@cli
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vtab_lily.doctor", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=DEFAULT_DATA, help="the VTAB-1K folder whose tasks are checked")
    parser.add_argument("--gpus", type=int, default=1, metavar="N", help="project the presets' wall time on N GPUs")
    parser.add_argument("--quick", action="store_true", help="skip the throughput part (and the projections)")
    parser.add_argument("--calibration", metavar="PATH", nargs="?", const=DEFAULT_CALIBRATION,
                        help="save the measured rates and projections (JSON); without PATH to "
                        f"{DEFAULT_CALIBRATION}, where `reproduce` reads it")
    args = parser.parse_args(argv)
    if args.gpus < 1:
        raise OptionError(f"--gpus must be at least 1, got {args.gpus}")
    if args.calibration:
        if args.quick:
            raise OptionError("--calibration needs the throughput part: drop --quick")
        check_writable_folder(Path(args.calibration).parent, "the calibration file", "--calibration")
    checks = []
    for check in run_checks(args):
        if not checks or check.section != checks[-1].section:
            print(check.section)
        print(check.line(), flush=True)
        checks.append(check)
    print(summary(checks))
    return 1 if any(c.status == "FAIL" for c in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
