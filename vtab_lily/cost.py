"""The cost of each method, measured: training step time, peak training memory, inference latency (unmerged and
merged), trainable parameters and storage, per backbone, in one process.

    python -m vtab_lily.cost --backbones vit-b vim-s --methods lily lora bitfit [--set lora.r=32] [--batch 8]
        [--rounds 5] [--device cpu|cuda] [--out results/cost.csv]

Per backbone every method's model is built once (random weights, `--image-size` default the backbone's
recipe's, 100 classes), and the timed calls of all methods run round robin, `--rounds` times after one warm-up
round, so that machine drift hits all alike (interleaved_medians, which benchmarks/common.py re-exports); each
figure is the median. `linear` (the frozen backbone, only the head trains) is always measured: the ratios are over it.

- step_ms: one training step on a fixed random batch: zero_grad, forward, cross-entropy, backward, AdamW step
  (synchronised on CUDA). step_ratio = step_ms / linear's step_ms (the frozen backbone's forward plus the head's
  backward).
- memory_mb: peak training memory of one step. CUDA: CUDA_RULE (allocated tensors: weights, batch,
  activations, gradients, optimizer state; the other methods' models, allocated alongside, subtracted). CPU
  (no allocator statistics): MEMORY_RULE, what must be resident when backward starts.
- latency_ms: one eval-mode forward of the batch without autograd; latency_ratio over linear's (the frozen
  backbone's).
- merges: whether the method folds into the backbone for inference (Method.merge: lora, fact, ssf, bitfit).
  Its merged copy's logits must equal the unmerged model's (max |a - b| <= MERGE_TOLERANCE * max |a|) before
  merged_latency_ms is reported; a mismatch is a bug (RuntimeError).
- params, storage_bytes: model.count_params and model.storage_bytes (trainable, head excluded).
The CSV's metadata (`<out>.json`) records these definitions, the batch, image size, rounds, device, threads
and the torch version.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from backbones import check_backbone

from .adapters import get_method
from .errors import UserError, cli
from .fileio import atomic_path
from .model import build_model, count_params, storage_bytes
from .options import check_device, check_image_size
from .recipes import recipe_for
from .run import parse_settings, split_settings

REFERENCE = "linear"  # the frozen backbone: the ratios' denominator
NUM_CLASSES = 100
MERGE_TOLERANCE = 1e-4
MEMORY_RULE = ("CPU: bytes of the unique tensor storages resident when backward starts: every parameter and buffer, "
               "the tensors autograd saved for backward during the forward and loss (torch.autograd.graph."
               "saved_tensors_hooks; a storage shared by several saved tensors or by a parameter counted once), "
               "plus the gradients of the trainable parameters and AdamW's state (exp_avg, exp_avg_sq, step) as "
               "allocated after one step; temporaries freed within the forward are not counted, so it is a lower "
               "bound of the allocator's peak")
CUDA_RULE = ("CUDA: torch.cuda.max_memory_allocated over one training step, after reset_peak_memory_stats, minus "
             "what was allocated before the step, plus this model's own resident storages then (weights, buffers, "
             "gradients, AdamW state, batch): the other methods' models stay allocated during the measurement")
COLUMNS = ["backbone", "method", "options", "batch", "image_size", "params", "storage_bytes", "step_ms", "step_ratio",
           "memory_mb", "latency_ms", "latency_ratio", "merges", "merged_latency_ms", "merged_latency_ratio",
           "merge_max_rel_diff"]


def interleaved_medians(calls, rounds: int) -> list[float]:
    """Median seconds of each call, timed round robin (`rounds` times, after one warm-up round)."""
    for call in calls:
        call()
    times = [[] for _ in calls]
    for _ in range(rounds):
        for i, call in enumerate(calls):
            start = time.perf_counter()
            call()
            times[i].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class Measured:
    """One method's model on one backbone, with its optimizer and fixed batch: the calls the costs time."""

    def __init__(self, backbone: str, method: str, options: dict, batch: int, image_size: int, device: str):
        torch.manual_seed(0)
        self.method, self.options, self.device = method, options, device
        self.model = build_model(backbone, method, NUM_CLASSES, pretrained=False,
                                 backbone_options={"img_size": image_size}, **options).to(device)
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-3)
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(batch, 3, image_size, image_size, generator=g).to(device)
        self.y = torch.randint(0, NUM_CLASSES, (batch,), generator=g).to(device)
        self.merged = None

    def make_merged(self) -> float:
        """The merged copy of the model as it is now (after the timed steps moved its trained tensors away from
        their init, where LoRA's increment is zero) and its logits' max |merged - unmerged| / max |unmerged|;
        RuntimeError above MERGE_TOLERANCE. NaN for a method without a merged form."""
        merge = get_method(self.method).merge
        if merge is None:
            return float("nan")
        self.merged = copy.deepcopy(self.model).eval()
        merge(self.merged)
        want, got = self.infer(), self.infer(self.merged)
        diff = float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))
        if not diff <= MERGE_TOLERANCE:
            raise RuntimeError(f"{self.method}'s merged form differs from the unmerged model: max relative "
                               f"difference {diff:.2e} > {MERGE_TOLERANCE}")
        return diff

    def step(self) -> None:
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(self.model(self.x), self.y).backward()
        self.optimizer.step()
        _sync(self.device)

    @torch.no_grad()
    def infer(self, model: nn.Module | None = None) -> torch.Tensor:
        model = model or self.model
        model.eval()
        out = model(self.x)
        _sync(self.device)
        return out

    def memory_bytes(self) -> int:
        if not self.device.startswith("cuda"):
            return training_memory(self.model, self.optimizer, self.x, self.y)
        # the other methods' models stay allocated: the step's peak above what was allocated before it, plus
        # what of that was this model's own (weights, buffers, gradients, optimizer state, batch)
        own = {_storage_key(t): t.untyped_storage().nbytes() for t in self.resident()}
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.step()
        return torch.cuda.max_memory_allocated(self.device) - before + sum(own.values())

    def resident(self) -> list[torch.Tensor]:
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        state = [v for s in self.optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
        return [*self.model.parameters(), *self.model.buffers(), *grads, *state, self.x, self.y]


def _storage_key(t: torch.Tensor) -> tuple[int, int]:
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


def training_memory(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> int:
    """MEMORY_RULE: bytes of the unique storages of the parameters and buffers, of the tensors autograd saves
    in one forward and loss, and of the gradients and optimizer state after that step."""
    model.train()
    storages = {}

    def keep(t):
        if isinstance(t, torch.Tensor):
            storages.setdefault(_storage_key(t), t.untyped_storage().nbytes())
        return t

    for t in [*model.parameters(), *model.buffers()]:
        keep(t)
    optimizer.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    for p in model.parameters():
        if p.grad is not None:
            keep(p.grad)
    for state in optimizer.state.values():
        for value in state.values():
            keep(value)
    return sum(storages.values())


def measure(backbone: str, methods: list[tuple[str, dict]], batch: int, image_size: int, rounds: int,
            device: str) -> pd.DataFrame:
    """One row per method on `backbone` (COLUMNS); REFERENCE is measured too (first row)."""
    if all(m != REFERENCE for m, _ in methods):
        methods = [(REFERENCE, {}), *methods]
    runs = [Measured(backbone, m, o, batch, image_size, device) for m, o in methods]
    steps = interleaved_medians([r.step for r in runs], rounds)
    diffs = [r.make_merged() for r in runs]  # checked before any merged latency is timed
    calls = [r.infer for r in runs] + [lambda r=r: r.infer(r.merged) for r in runs if r.merged is not None]
    latencies = interleaved_medians(calls, rounds)
    merged = dict(zip([i for i, r in enumerate(runs) if r.merged is not None], latencies[len(runs):]))
    ref = next(i for i, (m, _) in enumerate(methods) if m == REFERENCE)
    rows = []
    for i, r in enumerate(runs):
        rows.append({"backbone": backbone, "method": r.method, "options": json.dumps(r.options, sort_keys=True),
                     "batch": batch, "image_size": image_size, "params": count_params(r.model),
                     "storage_bytes": storage_bytes(r.model), "step_ms": steps[i] * 1e3,
                     "step_ratio": steps[i] / steps[ref], "memory_mb": r.memory_bytes() / 2**20,
                     "latency_ms": latencies[i] * 1e3, "latency_ratio": latencies[i] / latencies[ref],
                     "merges": r.merged is not None,
                     "merged_latency_ms": merged[i] * 1e3 if i in merged else float("nan"),
                     "merged_latency_ratio": merged[i] / latencies[ref] if i in merged else float("nan"),
                     "merge_max_rel_diff": diffs[i]})
    return pd.DataFrame(rows, columns=COLUMNS)


def metadata(args, device: str) -> dict:
    return {"columns": __doc__.split("- step_ms:", 1)[1].split("The CSV's metadata", 1)[0].strip(),
            "memory": CUDA_RULE if device.startswith("cuda") else MEMORY_RULE, "reference": REFERENCE,
            "batch": args.batch, "rounds": args.rounds, "device": device, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "machine": platform.machine(), "weights": "random (pretrained=False)",
            "num_classes": NUM_CLASSES, "merge_tolerance": MERGE_TOLERANCE}


@cli
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vtab_lily.cost", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", nargs="+", required=True)
    parser.add_argument("--methods", nargs="+", required=True, help=f"methods to measure ({REFERENCE} is always "
                        "measured: the ratios' reference)")
    parser.add_argument("--set", action="append", default=[], metavar="METHOD.KEY=VALUE",
                        help="a method option, prefixed by its method (e.g. lora.r=32)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--image-size", type=int, help="default: the backbone's recipe's (224; 32 on the minis)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", help="write the table as CSV here, its metadata beside it (<out>.json)")
    args = parser.parse_args(argv)
    if args.batch < 1 or args.rounds < 1:
        raise UserError(f"--batch and --rounds must be at least 1, got {args.batch} and {args.rounds}")
    check_device(args.device)
    settings = parse_settings(args.set)
    for key in settings:
        if key.split(".", 1)[0] not in args.methods or "." not in key:
            raise UserError(f"--set {key}: prefix each option with one of the measured methods ({args.methods}), "
                            "e.g. lora.r=32")
    methods = []
    for method in dict.fromkeys(args.methods):
        options, _ = split_settings(method, {k: v for k, v in settings.items() if k.startswith(method + ".")})
        methods.append((method, options))
    sizes = {}
    for backbone in args.backbones:
        check_backbone(backbone)
        sizes[backbone] = args.image_size or recipe_for(backbone).image_size
        check_image_size(backbone, sizes[backbone])
        for method, options in methods:  # an unknown method, option or site fails here, before any timing
            build_model(backbone, method, NUM_CLASSES, pretrained=False,
                        backbone_options={"img_size": sizes[backbone]}, **options)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    table = pd.concat([measure(b, methods, args.batch, sizes[b], args.rounds, args.device) for b in args.backbones],
                      ignore_index=True)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    if args.out:
        with atomic_path(args.out) as tmp:
            table.to_csv(tmp, index=False)
        with atomic_path(f"{args.out}.json") as tmp:
            Path(tmp).write_text(json.dumps(metadata(args, args.device), indent=1))
        print(f"wrote {args.out} and {args.out}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
