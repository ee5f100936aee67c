"""Cross-layer feature differences (paper Fig. 4): a layer x layer matrix of the mean cosine distance
between the token features that two blocks output (1 - cos, averaged over tokens and images; 0 on the
diagonal and for identical layers), as a heat map per method.

    python -m analysis.features --adapter lily.safetensors --adapter lora.safetensors --task dtd --out feat.png
"""
from __future__ import annotations

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from torch import nn

from vtab_lily.errors import cli

from .common import parse_model_args, per_adapter, save_figure


@torch.no_grad()
def block_features(model: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """The output of every block (ViT `blocks`, or Vim `layers`: its mixer output), (batch, tokens, dim)."""
    blocks = model.blocks if hasattr(model, "blocks") else [layer.mixer for layer in model.layers]
    feats, hooks = [], [b.register_forward_hook(lambda m, i, o: feats.append(o.float())) for b in blocks]
    try:
        model(images)
    finally:
        for h in hooks:
            h.remove()
    return feats


def feature_difference(features: list[torch.Tensor]) -> torch.Tensor:
    """(layers, layers): mean over images and tokens of 1 - cos(f_i, f_j)."""
    unit = [F.normalize(f, dim=-1) for f in features]
    n = len(unit)
    out = torch.zeros(n, n)
    for i in range(n):
        for j in range(n):
            out[i, j] = 1 - (unit[i] * unit[j]).sum(-1).mean()
    return out.clamp_min(0)


def plot_differences(matrices: dict[str, torch.Tensor], title: str = ""):
    """One heat map per method (layers numbered from 0), on one colour scale."""
    fig, axes = plt.subplots(1, len(matrices), figsize=(4.2 * len(matrices) + 1, 4), squeeze=False,
                             layout="constrained")
    vmax = max(float(m.max()) for m in matrices.values())
    for ax, (name, m) in zip(axes[0], matrices.items()):
        im = ax.imshow(m.numpy(), cmap="viridis", vmin=0, vmax=vmax)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("layer")
        ax.set_ylabel("layer")
        ticks = range(0, m.shape[0], max(1, m.shape[0] // 6))
        ax.set_xticks(list(ticks))
        ax.set_yticks(list(ticks))
    fig.colorbar(im, ax=axes[0].tolist(), label="mean cosine distance")
    fig.suptitle(title or "Cross-layer feature differences", fontsize=10)
    return fig


@cli
def main(argv=None) -> int:
    args = parse_model_args("python -m analysis.features", __doc__, argv)
    _, matrices = per_adapter(args, lambda model, images: feature_difference(block_features(model, images)))
    title = f"{args.task}: mean cosine distance between the blocks' outputs over {args.n} images"
    print(f"wrote {save_figure(plot_differences(matrices, title), args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
