"""Attention maps (paper Fig. 3): per layer, the class token's attention to the patches, computed from the
adapted q and k (the output of the wrapped qkv), averaged over heads.

    python -m analysis.attention --adapter lily.safetensors --adapter lora.safetensors --task dtd --out attn.png
"""
from __future__ import annotations

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from torch import nn

from .common import evenly_spaced, parse_model_args, per_adapter, save_figure


@torch.no_grad()
def cls_attention(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(layers, batch, grid, grid): softmax(q_cls k^T / sqrt(d_head)) over the patches, head-averaged."""
    maps, hooks = [], []
    for block in model.blocks:
        attn = block.attn

        def hook(module, inputs, qkv, attn=attn):
            b, n, _ = qkv.shape
            q, k, _ = qkv.reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
            q, k = attn.q_norm(q), attn.k_norm(k)
            weights = (q[:, :, :1] @ k.transpose(-1, -2) * attn.scale).softmax(-1)  # (b, heads, 1, n)
            maps.append(weights.mean(1)[:, 0, model.num_prefix_tokens:])
        hooks.append(attn.qkv.register_forward_hook(hook))
    try:
        model(images)
    finally:
        for h in hooks:
            h.remove()
    grid = int(maps[0].shape[-1] ** 0.5)
    return torch.stack(maps).reshape(len(maps), images.shape[0], grid, grid)


def plot_attention(maps: dict[str, torch.Tensor], images: torch.Tensor, layers: list[int]):
    """Rows: image x method; columns: the input, then the chosen layers' maps upsampled to the image."""
    rows = [(i, name) for i in range(images.shape[0]) for name in maps]
    fig, axes = plt.subplots(len(rows), len(layers) + 1, figsize=(1.8 * (len(layers) + 1), 1.8 * len(rows)),
                             squeeze=False)
    size = images.shape[-1]
    for r, (i, name) in enumerate(rows):
        axes[r, 0].imshow(images[i].permute(1, 2, 0).clamp(0, 1).numpy())
        axes[r, 0].set_ylabel(name, fontsize=7)
        for c, layer in enumerate(layers, 1):
            m = F.interpolate(maps[name][layer, i][None, None], size=(size, size), mode="bilinear")[0, 0]
            axes[r, c].imshow(images[i].permute(1, 2, 0).clamp(0, 1).numpy())
            axes[r, c].imshow(m.numpy(), cmap="jet", alpha=0.5)
            if r == 0:
                axes[r, c].set_title(f"layer {layer + 1}", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    return fig


def main(argv=None) -> int:
    args = parse_model_args("python -m analysis.attention", __doc__, argv, lambda p: p.add_argument(
        "--layers", type=int, nargs="+", help="0-based layers to show (default: 4 evenly spaced)"))
    images, maps = per_adapter(args, cls_attention)
    layers = args.layers or evenly_spaced(next(iter(maps.values())).shape[0])
    print(f"wrote {save_figure(plot_attention(maps, images, layers), args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
