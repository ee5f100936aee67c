"""Training-step time of ViT-B/16 with Lily (kvmlp, r=16, ne=4) over LoRA (q,v, r=8), batch 8 at
224 px, and the cost of Eq. 18 (combine HPs, one matmul) vs Eq. 17 (ne expert matmuls) at the same
sizes. Prints ratios measured in one run."""
import argparse

import torch
import torch.nn.functional as F
from common import interleaved_medians, median_seconds

from vtab_lily import build_model


def train_step(method: str, batch: int, device: str = "cpu", backbone: str = "vit-b", **options):
    """One AdamW step of `backbone` (random weights, 224 px) with `method` on a fixed random batch
    (synchronised on CUDA)."""
    torch.manual_seed(0)
    model = build_model(backbone, method, 100, pretrained=False, **options).to(device).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    x, y = torch.randn(batch, 3, 224, 224, device=device), torch.randint(0, 100, (batch,), device=device)

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    return step


def combine_times(batch: int, repeats: int) -> tuple[float, float]:
    h, hps = torch.randn(batch, 197, 16), torch.randn(4, 16, 768)
    w = torch.softmax(torch.randn(4), 0)

    def eq18():
        return h @ torch.einsum("e,erd->rd", w, hps)

    def eq17():
        return sum(w[j] * (h @ hps[j]) for j in range(4))
    assert torch.allclose(eq17(), eq18(), atol=1e-4)
    return median_seconds(eq18, repeats=repeats * 20), median_seconds(eq17, repeats=repeats * 20)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    lora, lily = interleaved_medians([train_step("lora", args.batch, r=8),
                                      train_step("lily", args.batch, r=16, ne=4)], args.repeats)
    print(f"train step, batch {args.batch} @224: LoRA q,v r=8 {lora * 1e3:.0f} ms, "
          f"Lily kvmlp r=16 ne=4 {lily * 1e3:.0f} ms, Lily/LoRA = {lily / lora:.3f}")
    e18, e17 = combine_times(args.batch, args.repeats)
    print(f"HP combination at B={args.batch}, N=197, r=16, ne=4, d=768: Eq.18 {e18 * 1e3:.2f} ms, "
          f"Eq.17 {e17 * 1e3:.2f} ms, Eq.18/Eq.17 = {e18 / e17:.3f}")


if __name__ == "__main__":
    main()
