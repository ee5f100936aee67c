"""Training-step time of ViT-B/16 with peft's LoRA (`peft:lora`) over the built-in LoRA at the same rank,
scale, dropout and targets (the whole qkv of every block), batch 8 at 224 px. Prints the ratio measured
in one run (timed interleaved)."""
import argparse

import torch
from common import interleaved_medians
from train_step import train_step


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_grad_enabled(True)
    ours, theirs = interleaved_medians([
        train_step("lora", args.batch, args.device, r=8, s=1.0, dropout=0.1, targets="qkv"),
        train_step("peft:lora", args.batch, args.device, r=8, lora_alpha=8, lora_dropout=0.1, targets="qkv"),
    ], args.repeats)
    print(f"train step, ViT-B/16, batch {args.batch} @224 on {args.device}, LoRA r=8 on qkv: built-in "
          f"{ours * 1e3:.1f} ms, peft {theirs * 1e3:.1f} ms, peft/built-in = {theirs / ours:.3f}")


if __name__ == "__main__":
    main()
