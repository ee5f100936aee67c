"""One VTAB-1K run: build backbone + method, train with the paper's recipe, write a run record.

    python -m vtab_lily.run --backbone vit-b --task cifar100 [--method lily] [--seed 42]
        [--set s=10 --set ne=3 --set lr=1e-3 ...] [--weights PATH] [--data-root DIR] [--eval test|val200]

`--eval test` (default, the paper's protocol) trains on train800val200 and tests every 10 epochs;
`--eval val200` trains on train800 and scores val200 (VTAB's hyper-parameter selection stage).
A finished run with the same config and seed is skipped unless --force; an interrupted one resumes.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import sys
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from backbones import family
from backbones.ssm import BACKENDS, set_backend
from backbones.ssm import chosen as scan_backend

from .adapters.base import TrainingData, option_names
from .adapters.config import families, option_table
from .choices import choices_help
from .data import Batches, load_split, read_list, task_dir, to_float
from .errors import UnknownName, UserError, cli
from .locks import RunLock
from .model import build_model, count_params, save_adapter, storage_bytes
from .options import (
    OptionError,
    check_device,
    check_image_size,
    check_seed,
    check_writable_folder,
    describe,
    range_text,
)
from .predictions import Predictions, predictions_path, write_predictions
from .prepare import ensure_prepared
from .provenance import data_provenance, file_sha256, weights_provenance
from .recipes import RECIPE_FIELDS, RECIPES, Recipe, effective_precision, recipe_for
from .records import RunSpec, environment, finished, read_record, write_record
from .tasks import get_task
from .train import NonFiniteLoss, fit

DEFAULT_DATA = "data/vtab-1k"
DEFAULT_RUNS = "results/runs"


class RunBusy(UserError, RuntimeError):
    """Another process holds this run's lock."""


def parse_value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_settings(items: list[str]) -> dict:
    """--set KEY=VALUE items -> {key: value} (values as Python literals where they parse)."""
    settings = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise OptionError(f"--set expects KEY=VALUE, got {item!r}")
        settings[key] = parse_value(value)
    return settings


def split_settings(method: str, settings: dict) -> tuple[dict, dict]:
    """key=value settings -> (method options, recipe overrides). Keys may be prefixed '<method>.'; a
    composition's options must be ('lora.r' for lora+bitfit: its option names, adapters/compose.py)."""
    fields = option_names(method)
    options, recipe = {}, {}
    for key, value in settings.items():
        bare = key.split(".", 1)[1] if key.startswith(f"{method}.") else key
        if bare in fields:
            options[bare] = value
        elif bare in RECIPE_FIELDS and "." not in key:
            recipe[bare] = value
        else:
            hint = (f"{method} composes methods, so its options take their method's prefix: {fields}"
                    if "+" in method else f"{method} options are {fields}")
            raise UnknownName(f"unknown setting {key!r}: {hint}; recipe fields are {list(RECIPE_FIELDS)}")
    return options, recipe


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve(spec: RunSpec, data_root: str | Path, weights: str | None = None, pretrained: bool = True,
            device: str | None = None) -> tuple[RunSpec, str | None]:
    """The spec with its provenance (weights, data lists, precision) set, and the local weights file to
    load (None: random init). A pretrained hub backbone's file is fetched here."""
    wprov, wfile = weights_provenance(spec.backbone, weights, pretrained, spec.seed)
    provenance = {"weights": wprov, "data": data_provenance(data_root, spec.task, (spec.train_split, spec.eval_split)),
                  "precision": effective_precision(spec.full_recipe(), device or default_device())}
    return dataclasses.replace(spec, provenance=provenance), wfile


def check_spec(spec: RunSpec) -> None:
    """What a spec asks for that cannot run, before any work: a bad seed, an image size the backbone's
    patches do not fit (the method, its options and the recipe's ranges are checked by RunSpec and Recipe)."""
    check_seed(spec.seed)
    check_image_size(spec.backbone, spec.full_recipe().image_size)


def check_batch_size(spec: RunSpec, data_root: str | Path) -> None:
    recipe = spec.full_recipe()
    task = get_task(spec.task)
    n = len(read_list(task_dir(data_root, task), spec.train_split, task.num_classes)[0])
    if recipe.drop_last and recipe.batch_size > n:
        raise OptionError(f"batch_size {recipe.batch_size} is larger than the training split {spec.train_split} "
                          f"({n} images; the last incomplete batch is dropped, so nothing would train); "
                          f"use batch_size <= {n}")


def print_epoch(m: dict) -> None:
    if "acc" in m:
        print(f"epoch {m['epoch']}: train loss {m['train_loss']:.4f}, lr {m['lr']:.3g}, acc {m['acc']:.2f}")


def summary_writer():
    """TensorBoard's SummaryWriter class; one clear error when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("--tensorboard needs the tensorboard package: pip install -e '.[tensorboard]'") from None
    return SummaryWriter


class TensorBoardLog:
    """Per-epoch scalars (train/loss, train/lr, eval/acc, eval/loss) under <dir>/<run-id>."""

    def __init__(self, writer):
        self.writer = writer

    def __call__(self, m: dict) -> None:
        self.writer.add_scalar("train/loss", m["train_loss"], m["epoch"])
        self.writer.add_scalar("train/lr", m["lr"], m["epoch"])
        if "acc" in m:
            self.writer.add_scalar("eval/acc", m["acc"], m["epoch"])
            self.writer.add_scalar("eval/loss", m["loss"], m["epoch"])
        self.writer.flush()


@contextmanager
def new_folders_removed_on_error(folder: Path):
    """Within the block `folder` may be made (with the folders above it: the run's lock makes them); when the
    block fails, those of them that did not exist before and are left empty are removed again, so a run
    refused while its model is built (weights that do not fit, methods that clash) leaves nothing behind."""
    new = [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        yield
    except BaseException:
        for p in new:  # innermost first; a folder something was written to stays, with those above it
            try:
                p.rmdir()
            except OSError:
                break
        raise


@dataclass(frozen=True)
class RunOptions:
    """How `execute` runs a spec, beside where (runs, data_root): the weights file and whether the backbone
    is pretrained (both part of the run's provenance), the device, whether to prepare missing data, to run a
    finished run again, to show progress, to log TensorBoard scalars; `on_skip(path)` is called for a run
    that is already finished; `interrupt_after` stops training after that many epochs (a test hook for
    resuming)."""

    weights: str | None = None
    pretrained: bool = True
    device: str | None = None
    prepare: bool = False
    force: bool = False
    progress: bool = True
    tensorboard: str | Path | None = None
    on_skip: Callable[[Path], None] | None = None
    interrupt_after: int | None = None


def prepass_split(spec: RunSpec, recipe, data_root: str | Path, device: str, progress: bool) -> TrainingData:
    """The run's training split for a method's pre-pass (adapters/base.TrainingData): decoded as training reads
    it, without augmentation, normalised as the run (`inputs`); read only if the method asks for it."""
    def batches(batch_size: int, shuffle: bool):
        split = load_split(data_root, spec.task, spec.train_split, recipe.image_size, recipe.interpolation,
                           progress=progress)
        for x, y in Batches(split, batch_size, shuffle=shuffle, device=device, seed=spec.seed):
            yield to_float(x), y
    return TrainingData(batches, spec.seed, device, recipe.normalize)


def execute(spec: RunSpec, runs: str | Path = DEFAULT_RUNS, data_root: str | Path = DEFAULT_DATA,
            options: RunOptions | None = None, **flags) -> Path:
    """Run `spec` (or skip it when its record is done) and return the record's path. `flags` are RunOptions
    fields that replace those of `options` (execute(spec, runs, data, progress=False)).

    Everything a run can refuse is checked first, then the run's lock is taken, and only then is the
    record's state read (once: a finished run is skipped) and the model built."""
    o = dataclasses.replace(options or RunOptions(), **flags)
    device = o.device or default_device()
    check_device(device)
    check_spec(spec)
    writer = summary_writer() if o.tensorboard else None
    ensure_prepared(spec.task, data_root, o.prepare)
    spec, weights_file = resolve(spec, data_root, o.weights, o.pretrained, device)
    check_batch_size(spec, data_root)
    scan = scan_backend(torch.device(device).type) if family(spec.backbone) == "vim" else None  # may refuse
    check_writable_folder(runs, "run records", "--runs")
    record_path = spec.path(runs)
    with new_folders_removed_on_error(record_path.parent), RunLock(spec.path(runs, ".lock")) as lock:
        held = lock.acquire()
        if finished(record_path) and not o.force:  # records are written atomically: readable without the lock
            if o.on_skip:
                o.on_skip(record_path)
            return record_path
        if not held:
            raise RunBusy(f"run {spec.run_id} is held by {lock.describe()}")
        recipe = spec.full_recipe()
        task = get_task(spec.task)
        # the random init (head, adapters, a random backbone) follows the seed, which the adapter file keeps
        model = build_model(spec.backbone, spec.method, task.num_classes, pretrained=o.pretrained,
                            weights=weights_file, drop_path_rate=recipe.drop_path,
                            backbone_options={"img_size": recipe.image_size}, seed=spec.seed,
                            provenance=spec.provenance["weights"],
                            data=prepass_split(spec, recipe, data_root, device, o.progress), **spec.options).to(device)
        for tmp in record_path.parent.glob(f".{spec.run_id}.*.tmp"):
            tmp.unlink(missing_ok=True)  # left by a killed process
        predictions_path(record_path).unlink(missing_ok=True)  # a done run's are written with its record
        state_path = spec.path(runs, ".state.pt")
        if o.force:
            state_path.unlink(missing_ok=True)
        train_split, eval_split = (load_split(data_root, spec.task, s, recipe.image_size, recipe.interpolation,
                                              progress=o.progress) for s in (spec.train_split, spec.eval_split))
        resident = device.startswith("cuda")
        train = Batches(train_split, recipe.batch_size, shuffle=True, drop_last=recipe.drop_last, device=device,
                        resident=resident, seed=spec.seed)
        test = Batches(eval_split, recipe.eval_batch_size, device=device)
        common = dict(params=count_params(model), storage_bytes=storage_bytes(model), environment=environment(device),
                      weights=weights_file, data_root=str(data_root), device=device,
                      split_sizes={spec.train_split: len(train_split.labels), spec.eval_split: len(eval_split.labels)},
                      scan=dict(zip(("backend", "reason"), scan)) if scan else None,
                      **({"prepass": model.prepass} if hasattr(model, "prepass") else {}))
        # a holder that was taken over (its heartbeat found another token) stops before it writes anything
        on_epoch = [lambda _: lock.check()] + ([print_epoch] if o.progress else []) + (
            [TensorBoardLog(writer(log_dir=str(Path(o.tensorboard) / spec.run_id)))] if writer else [])
        try:
            history = fit(model, train, test, recipe, state_path, interrupt_after=o.interrupt_after,
                          progress=o.progress, on_epoch=on_epoch)
        except NonFiniteLoss as e:
            lock.check()
            write_record(spec, runs, status="failed", error=str(e), **common)
            state_path.unlink(missing_ok=True)
            raise
        lock.check()
        save_adapter(model, spec.path(runs, ".safetensors"))
        write_predictions(record_path, Predictions(
            labels=eval_split.labels, epochs=np.array([e["epoch"] for e in history.evaluations]),
            preds=torch.stack(history.predictions).numpy(),
            eval_sha256=file_sha256(task_dir(data_root, task) / f"{spec.eval_split}.txt")))
        path = write_record(spec, runs, status="done", **common, **history.summary())
        state_path.unlink(missing_ok=True)
        return path


def summary(path: Path) -> str:
    r = read_record(path)
    head = "| backbone | method | task | params | best acc (epoch) | final acc | wall (s) | train img/s |"
    row = (f"| {r['backbone']} | {r['method']} | {r['task']} | {r['params']:,} | {r['best_acc']:.2f} "
           f"({r['best_epoch']}) | {r['final_acc']:.2f} | {r['wall_time_s']:.0f} | {r['images_per_s']:.0f} |")
    return "\n".join([head, "|---|---|---|---|---|---|---|---|", row, f"record: {path}"])


def list_options(method: str, backbone: str | None = None) -> str:
    """`--list-options`: the method's options, then the recipe's, each with its type, default (per backbone
    family where the families differ; the backbone's alone with `backbone`), range or choices, and help."""
    recipes = {family(backbone): recipe_for(backbone)} if backbone else {f: RECIPES[f] for f in families()}
    recipe_rows = describe(Recipe)
    for row in recipe_rows:
        values = {f: getattr(r, row["name"]) for f, r in recipes.items()}
        row["defaults"] = values if len({repr(v) for v in values.values()}) > 1 else {None: values.popitem()[1]}
    where = f" on {backbone}" if backbone else ""
    return "\n".join([*_option_lines(f"{method} options{where} (--set NAME=VALUE):", option_table(method, backbone)),
                      "", *_option_lines(f"recipe options{where} (--set NAME=VALUE):", recipe_rows)])


def _option_lines(title: str, rows: list[dict]) -> list[str]:
    lines = [title] if rows else [title, "  (none)"]
    for row in rows:
        default = ", ".join(f"{f}: {_shown(v)}" if f else _shown(v) for f, v in row["defaults"].items())
        allowed = (f"one of {', '.join(map(str, row['choices']))}" if row["choices"]
                   else range_text(*row["range"]) if row["range"] else "")
        lines.append(f"  {row['name']} ({row['type']}) default {default}" + (f"; {allowed}" if allowed else ""))
        if row["help"]:
            lines.append(f"      {row['help']}")
    return lines


def _shown(value) -> str:
    """A default as --set takes it: names joined by '+'."""
    if isinstance(value, tuple) and all(isinstance(v, str) for v in value):
        return "+".join(value) if value else "(none)"
    return str(value)


@cli(os_hint="; fix it and run again (an interrupted run resumes from its last saved state)")
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vtab_lily.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", help=choices_help("backbone") + ", or timm:<model name>[.<tag>] "
                        "(any timm ViT-family model)")
    parser.add_argument("--task", help=choices_help("task"))
    parser.add_argument("--list-options", action="store_true",
                        help="list the options of --method (and the recipe's): type, default per backbone family "
                        "(or --backbone's), range or choices, help; then exit")
    parser.add_argument("--method", default="lily", help=choices_help("method", "default lily; ") + ", or "
                        "peft:<tuner> (e.g. peft:lora), or your own: <module>:<name> or an entry-point name; "
                        "compose methods with '+' (e.g. lora+bitfit: attached in that order, options prefixed: "
                        "--set lora.r=4)")
    parser.add_argument("--seed", type=int, default=42, help="0 .. 2^64 / 100003 (the shuffle's seeds)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a method option (e.g. s=10, lily.ne=3; a composition's take their method's prefix: "
                        "lora.targets=q+v) or a recipe field (e.g. lr=1e-3, epochs=20); recipe=mambapeft trains with "
                        "MambaPEFT's recipe instead of the backbone's own (Lily's on ViT, hustvl's on Vim; "
                        "recipe=vit|vim names those)")
    parser.add_argument("--epochs", type=int, help="shorthand for --set epochs=N")
    parser.add_argument("--eval", default="test", choices=["test", "val200"])
    parser.add_argument("--weights", help="local pretrained weights (.npz, .safetensors, .pth)")
    parser.add_argument("--random-init", action="store_true",
                        help="random backbone weights instead of pretrained ones (recorded in the run's provenance)")
    parser.add_argument("--data-root", default=DEFAULT_DATA)
    parser.add_argument("--runs", default=DEFAULT_RUNS, help="where run records go")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--prepare", action="store_true", help="prepare the task's data first if it is missing")
    parser.add_argument("--force", action="store_true", help="run again even if a record exists")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--tensorboard", metavar="DIR", help="also write TensorBoard scalars to DIR/<run-id>")
    parser.add_argument("--scan-backend", choices=BACKENDS, help="Vim's selective scan (default auto: the mamba-ssm "
                        "kernels, else Triton, on CUDA; PyTorch elsewhere); the record says which ran")
    args = parser.parse_args(argv)
    if args.list_options:
        print(list_options(args.method, args.backbone))
        return 0
    missing = [f"--{name}" for name in ("backbone", "task") if getattr(args, name) is None]
    if missing:
        parser.error(f"the following arguments are required: {', '.join(missing)}")
    if args.scan_backend:
        set_backend(args.scan_backend)
    settings = parse_settings(args.set)
    if args.epochs is not None:
        settings["epochs"] = args.epochs
    options, recipe = split_settings(args.method, settings)
    spec = RunSpec(args.backbone, args.task, args.method, options, args.seed, args.eval, recipe)
    try:
        options = RunOptions(args.weights, not args.random_init, args.device, args.prepare, args.force,
                             not args.no_progress, args.tensorboard, on_skip=lambda p: print(
                                 f"skipped: this run is already finished ({p}); --force runs it again"))
        path = execute(spec, args.runs, args.data_root, options)
    except NonFiniteLoss as e:
        print(f"error: {e}; the record is marked failed", file=sys.stderr)
        return 1
    print(summary(path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
