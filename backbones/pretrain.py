"""Pretrain the mini backbones on the procedural shapes task and write their shipped weights.

    python -m backbones.pretrain --backbone vit-mini [--out PATH] [--steps N]

Source task (backbones/shapes.py): which of 64 random glyphs, a fresh batch drawn for every step from a
seeded generator, so there is no fixed training set to overfit; the glyphs' affine jitter ramps up from 0
over the first `jitter_steps` (a curriculum: from scratch, a ViT stays on the loss plateau of the fully
jittered task). AdamW with linear warm-up and cosine decay per step, no drop_path, on the CPU, 2 threads.
Same seed, CPU type, torch and numpy versions -> the same bytes; the command compares the result with the
SHA-256 recorded in backbones/weights.py, replaces the shipped file only when they match, and otherwise
keeps the new file beside it (pass it with --weights PATH).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from . import BACKBONES
from .errors import UserError, cli, write_errors
from .shapes import SOURCE_CLASSES, source_task
from .weights import SHIPPED, sha256, shipped_path


@dataclass(frozen=True)
class Pretraining:
    steps: int
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 100
    jitter_steps: int = 1000  # the source task's jitter grows linearly from 0 to 1 over these steps
    seed: int = 0


PRETRAINING = {
    "vit-mini": Pretraining(steps=2500),
    "vim-mini": Pretraining(steps=1000, jitter_steps=500),
}


def source_batch(rng: np.random.Generator, n: int, jitter: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """n source-task images as floats in [0, 1], (n, 3, 32, 32), and their labels."""
    images, labels = source_task(rng, n, jitter)
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255), torch.from_numpy(labels)


def lr_at(step: int, p: Pretraining) -> float:
    if step < p.warmup_steps:
        return p.lr * (step + 1) / p.warmup_steps
    return 0.5 * p.lr * (1 + math.cos(math.pi * (step - p.warmup_steps) / max(1, p.steps - p.warmup_steps)))


@torch.no_grad()
def source_accuracy(model: nn.Module, n: int = 2048, seed: int = 10_000) -> float:
    """Top-1 accuracy (%) on n held-out source images (a generator seed never used in training)."""
    model.eval()
    x, y = source_batch(np.random.default_rng(seed), n)
    return 100.0 * (torch.cat([model(b).argmax(-1) for b in x.split(256)]) == y).float().mean().item()


def pretrain(name: str, p: Pretraining, log=print) -> nn.Module:
    """Train backbone `name` from its seeded random init on the source task for p.steps steps."""
    torch.manual_seed(p.seed)
    rng = np.random.default_rng(p.seed)
    # the constructor's own init, head included (create_backbone would re-initialise a new head the official
    # fine-tuning way, which is for task heads)
    model = BACKBONES[name].create(SOURCE_CLASSES, pretrained=False, weights=None, drop_path_rate=0.0)
    opt = torch.optim.AdamW(model.parameters(), lr=p.lr, weight_decay=p.weight_decay)
    model.train()
    losses = []
    for step in range(p.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, p)
        x, y = source_batch(rng, p.batch_size, min(1.0, step / p.jitter_steps))
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if (step + 1) % 100 == 0 or step + 1 == p.steps:
            log(f"step {step + 1}/{p.steps}: loss {np.mean(losses[-100:]):.3f}")
    return model.eval()


def save_weights(model: nn.Module, path: Path) -> None:
    with write_errors(path):
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


@cli
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m backbones.pretrain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", required=True, choices=sorted(PRETRAINING))
    parser.add_argument("--steps", type=int, help="training steps (default: the recipe's)")
    parser.add_argument("--out", help="write here instead of checking against and replacing the shipped file")
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        raise UserError(f"--steps must be a positive integer, got {args.steps}")
    p = PRETRAINING[args.backbone]
    if args.steps is not None:
        p = Pretraining(**{**p.__dict__, "steps": args.steps})
    torch.set_num_threads(2)  # as when the shipped weights were made
    started = time.time()
    model = pretrain(args.backbone, p)
    print(f"{args.backbone}: {p.steps} steps of {p.batch_size} in {time.time() - started:.0f} s; "
          f"source-task accuracy {source_accuracy(model):.1f}% ({SOURCE_CLASSES} classes)")
    if args.out:
        save_weights(model, Path(args.out))
        print(f"wrote {args.out} (SHA-256 {sha256(args.out)})")
        return 0
    shipped = shipped_path(args.backbone)
    rebuilt = shipped.with_name(f"{args.backbone}.rebuilt.safetensors")
    save_weights(model, rebuilt)
    digest = sha256(rebuilt)
    if digest == SHIPPED[args.backbone]:
        rebuilt.replace(shipped)
        print(f"wrote {shipped}: SHA-256 {digest} matches the recorded one")
        return 0
    print(f"{rebuilt}: SHA-256 {digest} differs from the recorded {SHIPPED[args.backbone] or '(none)'} "
          "(other CPU, torch or numpy: different rounding); the shipped file is unchanged. Use the new one "
          f"with --weights {rebuilt}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
