"""Training-step time of the classic VTAB-1K baselines over LoRA (q,v, r=8) on ViT-B/16, batch 8 at 224 px,
timed interleaved in one run; each with its trainable parameter count (VPT-deep's cost grows with the
prompt tokens it adds to every block)."""
import argparse

from common import interleaved_medians
from train_step import train_step

from vtab_lily import build_model, count_params
from vtab_lily.adapters.base import FROM_FILE

CONFIGS = [
    ("lora", dict(r=8)),
    ("vpt", dict(deep=False, length=50)),
    ("vpt", dict(deep=True, length=10)),
    ("vpt", dict(deep=True, length=50)),
    ("bitfit", {}),
    ("ssf", {}),
    ("adapter", dict(width=8)),
    ("fact", dict(type="tt", r=8)),
    ("fact", dict(type="tk", r=32)),
    ("repadapter", {}),
    ("lntune", {}),
    ("convpass", {}),
    ("adapterplus", {}),
    # V-PETL Bench's (issue 23); SCT's and GPS's selection as a loaded adapter's (no pre-pass: its cost is one pass)
    ("hydra", {}),
    ("sct", dict(data=FROM_FILE)),
    ("dtl", {}),
    ("gps", dict(data=FROM_FILE)),
]


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    times = interleaved_medians([train_step(m, args.batch, **o) for m, o in CONFIGS], args.repeats)
    print(f"train step, ViT-B/16, batch {args.batch} @224, median of {args.repeats} (interleaved)")
    print("| method | options | params | ms | / LoRA |\n|---|---|---|---|---|")
    for (method, options), t in zip(CONFIGS, times):
        params = count_params(build_model("vit-b", method, 100, pretrained=False, **options))
        shown = {k: v for k, v in options.items() if k != "data"}
        print(f"| {method} | {shown} | {params:,} | {t * 1e3:.0f} | {t / times[0]:.2f} |")


if __name__ == "__main__":
    main()
