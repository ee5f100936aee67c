"""Update rank: does Lily's weight update escape LoRA's rank bound? Per layer and target, the effective
weight update dW (d_out x d_in) and its singular values:
- LoRA: s * up @ down (rank <= r);
- Lily (linear targets): s * (sum_j w_j HP_j)^T @ LP_l, with w the router weights seen over a dataset
  (the averaged router's weights; `router_weights`). Targets with a ReLU after the LP (the MLP adapter)
  are not linear maps and are left out.
Effective rank = exp(entropy of the normalised singular values) (Roy & Vetterli 2007); numerical rank =
singular values above max(d) * eps * s_max.

    python -m analysis.rank --adapter lily.safetensors --adapter lora.safetensors --task dtd --out rank.png
"""
from __future__ import annotations

import matplotlib.pyplot as plt
import torch
from torch import nn

from vtab_lily.adapters.lily import LilyBranch
from vtab_lily.adapters.lora import LoRABranch

from .common import parse_model_args, per_adapter, save_figure
from .routers import router_weights


def effective_rank(matrix: torch.Tensor) -> float:
    s = torch.linalg.svdvals(matrix.double())
    if s.max() == 0:
        return 0.0
    p = s / s.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def numerical_rank(matrix: torch.Tensor) -> int:
    s = torch.linalg.svdvals(matrix.double())
    return int((s > max(matrix.shape) * torch.finfo(torch.float32).eps * s.max()).sum()) if s.max() > 0 else 0


@torch.no_grad()
def updates(model: nn.Module, images: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """{name: dW} for the model's LoRA branches (their module paths) or Lily branches ("<target>.<layer>").
    Lily's router weights come from `images` (required when the model has routers)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, LoRABranch):
            out[name] = m.s * m.up.weight @ m.down.weight
    shared = getattr(model, "lily", None)
    if shared is None:
        return out
    for target, spec in shared.specs.items():
        if spec.relu:
            continue
        if spec.router == "none":
            mix = torch.full((shared.num_layers, spec.ne), 1 / spec.ne)
        else:
            if images is None:
                raise ValueError("Lily's effective update needs images to see its router weights")
            totals = router_weights(model, images, target)
            mix = totals / totals.sum(-1, keepdim=True)
        hps = shared.hps[target]
        for branch in (b for b in model.modules() if isinstance(b, LilyBranch) and b.target == target):
            lp = shared.lps[target][shared.lp_index(target, branch.layer)].weight
            combined = torch.einsum("e,erd->rd", mix[branch.layer], hps)
            out[f"{target}.{branch.layer}"] = shared.s * combined.T @ lp
    return out


def plot_spectra(spectra: dict[str, dict[str, torch.Tensor]]):
    fig, (ax_s, ax_r) = plt.subplots(1, 2, figsize=(10, 3.6))
    for color, (name, ups) in zip(plt.cm.tab10.colors, spectra.items()):
        ranks = []
        for i, dw in enumerate(ups.values()):
            s = torch.linalg.svdvals(dw.double())
            ax_s.semilogy(range(1, len(s) + 1), (s / s.max()).clamp_min(1e-12).numpy(), color=color, alpha=0.4,
                          label=name if i == 0 else None)
            ranks.append(effective_rank(dw))
        ax_r.plot(range(1, len(ranks) + 1), ranks, marker="o", color=color, label=name)
    ax_s.set_xlabel("singular value index")
    ax_s.set_ylabel("s / s_max")
    ax_s.set_xlim(1, 64)
    ax_s.legend(fontsize=7)
    ax_r.set_xlabel("adapted matrix (layer, target)")
    ax_r.set_ylabel("effective rank")
    ax_r.legend(fontsize=7)
    return fig


def main(argv=None) -> int:
    args = parse_model_args("python -m analysis.rank", __doc__, argv)
    _, spectra = per_adapter(args, updates)
    for name, ups in spectra.items():
        ranks = [effective_rank(u) for u in ups.values()]
        print(f"{name}: {len(ups)} updates, effective rank mean {sum(ranks) / len(ranks):.2f}, "
              f"numerical rank max {max(numerical_rank(u) for u in ups.values())}")
    print(f"wrote {save_figure(plot_spectra(spectra), args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
