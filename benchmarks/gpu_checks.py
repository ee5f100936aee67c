"""The GPU checks of the runner and Vim issues, as one script for a machine with a GPU (it also runs on the
CPU with small sizes, to check the script itself):
1. one Lily ViT-B epoch on synthetic 224 px images (batch 64, bf16 autocast, training set resident on the
   device), a test pass, and the projected time of a VTAB-1K task: 100 epochs of the 960 images drop_last
   trains + 10 evaluations of the test split (20,416 images on average over the 19 tasks, 73,728 at most);
   with --concurrent K, K such processes share the GPU at once (as `sweep --runs-per-gpu K`);
2. Vim-S forward+backward at batch 64 with each scan backend that can run (torch, triton, mamba).

    python benchmarks/gpu_checks.py                       # on the GPU machine
    python benchmarks/gpu_checks.py --concurrent 2        # part 1 only, two processes at once
    python benchmarks/gpu_checks.py --device cpu --backbone vit-tiny --vim vim-tiny-test --images 128 --batch 16
"""
import argparse
import statistics
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from backbones import ssm
from vtab_lily import build_model
from vtab_lily.data import Batches, Split
from vtab_lily.recipes import recipe_for
from vtab_lily.tasks import SPLIT_SIZES, VTAB_TASKS, get_task
from vtab_lily.train import evaluate, fit


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def test_split_sizes() -> list[int]:
    """Images in the test split of each of the 19 VTAB-1K tasks."""
    sizes = []
    for name in VTAB_TASKS:
        test = get_task(name).test
        sizes.append(len(test.indices(SPLIT_SIZES[get_task(name).builder][test.split])))
    return sizes


def projected_task_s(train_ips: float, eval_ips: float, batch: int, epochs: int = 100, evals: int = 10,
                     train_images: int = 1000) -> tuple[float, float]:
    """Seconds of one VTAB-1K run (mean test split, largest test split): `epochs` of the images drop_last
    keeps, `evals` passes over the test split."""
    trained = epochs * (train_images // batch) * batch / train_ips
    sizes = test_split_sizes()
    return trained + evals * statistics.mean(sizes) / eval_ips, trained + evals * max(sizes) / eval_ips


def timed(fn, device: str) -> float:
    """Wall seconds of fn(), the device synchronised before and after."""
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def vit_epoch(args) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.images, 224, 224, 3), dtype=np.uint8)
    split = Split(images, rng.integers(0, 100, args.images).astype(np.int64), cache=None)
    precision = args.precision if args.device.startswith("cuda") else "fp32"
    recipe = recipe_for(args.backbone, epochs=1, warmup_epochs=0, batch_size=args.batch, eval_every=1000,
                        precision=precision)
    model = build_model(args.backbone, "lily", 100, pretrained=False).to(args.device)
    train = Batches(split, args.batch, shuffle=True, drop_last=True, device=args.device,
                    resident=args.device.startswith("cuda"))
    test = Batches(split, recipe.eval_batch_size, device=args.device)
    fit(model, train, test, recipe, progress=False)  # warm-up epoch (cuDNN / allocator)
    epoch_s = timed(lambda: fit(model, train, test, recipe, progress=False), args.device)  # + one test pass
    eval_s = timed(lambda: evaluate(model, test, recipe), args.device)
    train_ips = len(train) * args.batch / (epoch_s - eval_s)
    eval_ips = args.images / eval_s
    mean_s, largest_s = projected_task_s(train_ips, eval_ips, args.batch)
    print(f"{args.backbone} Lily, batch {args.batch}, {precision} on {args.device}: train {train_ips:.0f} img/s, "
          f"test {eval_ips:.0f} img/s; projected VTAB-1K run (100 epochs of {1000 // args.batch * args.batch} "
          f"images + 10 test passes): {mean_s / 60:.1f} min for the mean test split, {largest_s / 60:.1f} min "
          "for the largest", flush=True)


def concurrent(args) -> None:
    """K copies of part 1 at once on one device; their lines and the wall time of all."""
    argv = [a for a in sys.argv[1:] if a not in ("--concurrent", str(args.concurrent))]
    t = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, __file__, *argv, "--only-vit"]) for _ in range(args.concurrent)]
    codes = [p.wait() for p in procs]
    print(f"{args.concurrent} processes at once on {args.device}: {time.perf_counter() - t:.0f} s wall "
          f"(exit codes {codes})")


def vim_step(args) -> None:
    torch.manual_seed(0)
    model = build_model(args.vim, "lily", 100, pretrained=False).to(args.device)
    x = torch.randn(args.batch, 3, 224, 224, device=args.device)
    y = torch.randint(0, 100, (args.batch,), device=args.device)

    def steps():
        for _ in range(args.repeats):
            F.cross_entropy(model(x), y).backward()

    device = torch.device(args.device).type
    for name in ("torch", "triton", "mamba"):
        try:
            ssm.set_backend(name)
            ssm.backend(device)
        except ssm.ScanBackendError as e:
            print(f"{args.vim}, {name}: cannot run here ({e})")
            continue
        F.cross_entropy(model(x), y).backward()  # warm-up (Triton compiles here)
        print(f"{args.vim} fwd+bwd batch {args.batch} on {args.device}, scan {name}: "
              f"{args.batch * args.repeats / timed(steps, args.device):.1f} img/s", flush=True)
    ssm.set_backend("auto")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--backbone", default="vit-b")
    parser.add_argument("--vim", default="vim-s")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--precision", default="bf16", choices=["fp32", "tf32", "bf16"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--concurrent", type=int, default=1, metavar="K", help="part 1 in K processes at once")
    parser.add_argument("--only-vit", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.concurrent > 1:
        return concurrent(args)
    vit_epoch(args)
    if not args.only_vit:
        vim_step(args)


if __name__ == "__main__":
    main()
