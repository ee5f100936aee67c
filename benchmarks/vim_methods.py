"""Training-step time of each PEFT method on Vim-S (random weights, batch 2 at 224 px, the CPU) over MambaPEFT's
LoRA(in_proj) (r=32, s=0.1: `2_small_lora_in_proj_32.py`), timed interleaved in one run, with its trainable
parameter count: every row of `sweep --preset mambapeft` at their configs' sizes (rows.mambapeft_rows), one
composition (lorap+partial) and the suite's other Vim methods; then one scan direction alone (fwd+bwd,
d_inner 768, L=197) at Vim's 16 states and at addscan's 16 + 6, the part of addscan's cost that grows with the
state."""
import argparse

import torch
from common import interleaved_medians
from train_step import train_step
from vim import scan_step

from backbones import ssm
from vtab_lily import build_model, count_params
from vtab_lily.rows import mambapeft_rows

BASELINE = ("lora", dict(targets=("in_proj",), r=32, s=0.1))
MAMBAPEFT = [(r.method, r.fixed) for r in mambapeft_rows("vim-s", {})]
assert BASELINE in MAMBAPEFT
CONFIGS = [BASELINE, *[c for c in MAMBAPEFT if c != BASELINE],  # (method, options)
           ("lorap+partial", {"lorap.targets": "x", "partial.parts": "conv1d", "partial.wd_mult": 10}),
           ("lily", {}), ("bitfit", {}), ("ssf", {})]


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", nargs="+", help="time only these methods (and the LoRA(in_proj) baseline)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    configs = [c for c in CONFIGS if c == BASELINE or not args.methods or c[0] in args.methods]
    times = interleaved_medians([train_step(m, args.batch, backbone="vim-s", **o) for m, o in configs],
                                args.repeats)
    print(f"train step, Vim-S, batch {args.batch} @224 on the CPU, median of {args.repeats} (interleaved)")
    print("| method | options | params | ms | / LoRA(in_proj) |\n|---|---|---|---|---|")
    for (method, options), t in zip(configs, times):
        params = count_params(build_model("vim-s", method, 100, pretrained=False, **options))
        print(f"| {method} | {options} | {params:,} | {t * 1e3:.0f} | {t / times[0]:.2f} |")
    n16, n22 = interleaved_medians([scan_step(ssm.selective_scan, n, args.batch) for n in (16, 22)], args.repeats)
    print(f"one scan direction alone, fwd+bwd, batch {args.batch}, L=197: 16 states {n16 * 1e3:.0f} ms, 22 states "
          f"{n22 * 1e3:.0f} ms = {n22 / n16:.2f}x (x 48 per step: {(n22 - n16) * 48 * 1e3:.0f} ms more)")


if __name__ == "__main__":
    main()
