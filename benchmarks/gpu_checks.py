"""The GPU checks of the runner and Vim issues, as one script for a machine with a GPU (it also runs on the
CPU with small sizes, to check the script itself):
1. one Lily ViT-B epoch on synthetic 224 px images (batch 64, bf16 autocast, training set resident on the
   device), a test pass, and the projected time of a VTAB-1K task (100 epochs + 10 evaluations of 10,000 images);
2. Vim-S forward+backward at batch 64: the pure-PyTorch scan vs the mamba-ssm kernels when they import.

    python benchmarks/gpu_checks.py                       # on the GPU machine
    python benchmarks/gpu_checks.py --device cpu --backbone vit-tiny --vim vim-tiny-test --images 128 --batch 16
"""
import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from backbones import ssm
from vtab_lily import build_model
from vtab_lily.data import Batches, Split
from vtab_lily.recipes import recipe_for
from vtab_lily.train import evaluate, fit


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def vit_epoch(args) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.images, 224, 224, 3), dtype=np.uint8)
    split = Split(images, rng.integers(0, 100, args.images).astype(np.int64), cache=None)
    recipe = recipe_for(args.backbone, epochs=1, warmup_epochs=0, batch_size=args.batch, eval_every=1000)
    model = build_model(args.backbone, "lily", 100, pretrained=False).to(args.device)
    train = Batches(split, args.batch, shuffle=True, drop_last=True, device=args.device,
                    resident=args.device.startswith("cuda"))
    test = Batches(split, recipe.eval_batch_size, device=args.device)
    fit(model, train, test, recipe, progress=False)  # warm-up epoch (cuDNN / allocator)
    sync(args.device)
    t = time.perf_counter()
    history = fit(model, train, test, recipe, progress=False)
    sync(args.device)
    epoch_s = time.perf_counter() - t
    eval_s = time.perf_counter()
    evaluate(model, test, recipe)
    sync(args.device)
    eval_s = time.perf_counter() - eval_s
    train_ips = history.train_images / history.train_time_s
    eval_ips = args.images / eval_s
    task_s = 100 * 1000 / train_ips + 10 * 10_000 / eval_ips
    precision = recipe.precision if args.device.startswith("cuda") else "fp32"
    print(f"{args.backbone} Lily, batch {args.batch}, {precision} on {args.device}: train {train_ips:.0f} img/s "
          f"(one epoch incl. its test pass {epoch_s:.1f} s), test {eval_ips:.0f} img/s; projected VTAB-1K task "
          f"(100 epochs of 1,000 images + 10 tests of 10,000): {task_s / 60:.1f} min")


def vim_step(args) -> None:
    torch.manual_seed(0)
    model = build_model(args.vim, "lily", 100, pretrained=False).to(args.device)
    x = torch.randn(args.batch, 3, 224, 224, device=args.device)
    y = torch.randint(0, 100, (args.batch,), device=args.device)

    def step():
        F.cross_entropy(model(x), y).backward()
        sync(args.device)

    kernels = ssm.cuda_kernels() if args.device.startswith("cuda") else None
    for name in ["pure PyTorch"] + (["mamba-ssm kernels"] if kernels is not None else []):
        original = ssm.cuda_kernels
        if name == "pure PyTorch":
            ssm.cuda_kernels = lambda: None
        try:
            step()
            t = time.perf_counter()
            for _ in range(args.repeats):
                step()
            print(f"{args.vim} fwd+bwd batch {args.batch} on {args.device}, {name}: "
                  f"{args.batch * args.repeats / (time.perf_counter() - t):.1f} img/s")
        finally:
            ssm.cuda_kernels = original
    if kernels is None:
        print("mamba-ssm / causal-conv1d kernels: not importable here")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--backbone", default="vit-b")
    parser.add_argument("--vim", default="vim-s")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    vit_epoch(args)
    vim_step(args)


if __name__ == "__main__":
    main()
