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

from backbones import adapter_sites
from vtab_lily.adapters import Adapted
from vtab_lily.adapters.lily import LilyBranch
from vtab_lily.adapters.lora import LoRABranch
from vtab_lily.errors import cli

from .common import UsageError, parse_model_args, per_adapter, save_figure
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


def linear_branches(model: nn.Module) -> dict[str, nn.Module]:
    """{"<target>.<layer>": branch} for the branches at the model's linear sites. The sites are read from
    the backbone with its wrapped modules briefly unwrapped (the sites describe the plain backbone)."""
    wrapped = [(parent, attr, w) for parent in model.modules() for attr, w in parent.named_children()
               if isinstance(w, Adapted)]
    for parent, attr, w in wrapped:
        setattr(parent, attr, w.base)
    try:
        layers = adapter_sites(model)
    finally:
        for parent, attr, w in wrapped:
            setattr(parent, attr, w)
    found = {}
    for layer in layers:
        for target, site in layer.linear.items():
            wrapper = getattr(site.parent, site.attr)
            if isinstance(wrapper, Adapted) and site.out in wrapper.slices:
                found[f"{target}.{layer.index}"] = wrapper.branches[wrapper.slices.index(site.out)]
    return found


@torch.no_grad()
def updates(model: nn.Module, images: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """{"<target>.<layer>": dW} for the model's LoRA (and Bi-LoRA) or Lily branches. Lily's router weights
    come from `images` (required when the model has routers)."""
    out = {}
    for name, branch in linear_branches(model).items():
        if isinstance(branch, LoRABranch):
            out[name] = branch.s * branch.up.weight @ branch.down.weight
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


def plot_spectra(spectra: dict[str, dict[str, torch.Tensor]], title: str = ""):
    """Left: every update's normalised singular values, coloured by method. Right: effective rank per
    layer (numbered from 0), one line per method and target."""
    fig, (ax_s, ax_r) = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    styles = [("-", "o"), ("--", "s"), (":", "^"), ("-.", "D")]
    largest = 1
    for color, (name, ups) in zip(plt.cm.tab10.colors, spectra.items()):
        for i, dw in enumerate(ups.values()):
            s = torch.linalg.svdvals(dw.double())
            keep = s[: max(1, numerical_rank(dw)) + 1]
            largest = max(largest, len(keep))
            ax_s.semilogy(range(1, len(keep) + 1), (keep / s.max()).clamp_min(1e-12).numpy(), color=color,
                          alpha=0.4, label=name if i == 0 else None)
        targets = sorted({key.rsplit(".", 1)[0] for key in ups})
        for style, target in zip(styles * len(targets), targets):
            layers = sorted(int(key.rsplit(".", 1)[1]) for key in ups if key.rsplit(".", 1)[0] == target)
            ax_r.plot(layers, [effective_rank(ups[f"{target}.{layer}"]) for layer in layers], style[0],
                      marker=style[1], color=color, label=f"{name}: {target}")
    ax_s.set_title("singular values of each update (up to its numerical rank + 1)", fontsize=9)
    ax_s.set_xlabel("singular value index")
    ax_s.set_ylabel("s / s_max")
    ax_s.set_xlim(0.5, largest + 0.5)
    ax_s.legend(fontsize=7)
    depth = 1 + max((int(k.rsplit(".", 1)[1]) for ups in spectra.values() for k in ups), default=0)
    ax_r.set_xticks(range(0, depth, max(1, depth // 12)))
    ax_r.set_title("effective rank per layer and target", fontsize=9)
    ax_r.set_xlabel("layer")
    ax_r.set_ylabel("effective rank")
    ax_r.legend(fontsize=7)
    fig.suptitle(title or "Rank of the weight updates", fontsize=10)
    return fig


@cli
def main(argv=None) -> int:
    args = parse_model_args("python -m analysis.rank", __doc__, argv)
    _, spectra = per_adapter(args, updates)
    for name, ups in spectra.items():
        if not ups:
            raise UsageError(f"{name} has no linear low-rank update to measure (rank takes LoRA, Bi-LoRA and "
                             "Lily adapters; Lily's MLP adapter is left out)")
    for name, ups in spectra.items():
        ranks = [effective_rank(u) for u in ups.values()]
        print(f"{name}: {len(ups)} updates, effective rank mean {sum(ranks) / len(ranks):.2f}, "
              f"numerical rank max {max(numerical_rank(u) for u in ups.values())}")
    title = f"{args.task}: rank of the weight updates (Lily's router weights over {args.n} images)"
    print(f"wrote {save_figure(plot_spectra(spectra, title), args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
