"""Attention maps (paper Fig. 3): per layer, the class token's attention to the patches, computed from the
adapted q and k (the output of the wrapped qkv), averaged over heads.

    python -m analysis.attention --adapter lily.safetensors --adapter lora.safetensors --task dtd --out attn.png
"""
from __future__ import annotations

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from torch import nn

from backbones import family
from vtab_lily import adapter_config
from vtab_lily.adapters.base import unwrapped
from vtab_lily.errors import cli

from .common import (
    MAX_ROWS,
    UsageError,
    check_layers,
    evenly_spaced,
    parse_model_args,
    per_adapter,
    save_figure,
)


@torch.no_grad()
def cls_attention(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(layers, batch, grid, grid): softmax(q_cls k^T / sqrt(d_head)) over the patches, head-averaged."""
    maps, hooks = [], []
    for block in model.blocks:
        attn = unwrapped(unwrapped(block).attn)  # under the wrappers of methods on a block or beside attention

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


def plot_attention(maps: dict[str, torch.Tensor], images: torch.Tensor, layers: list[int], title: str = "",
                   max_rows: int = MAX_ROWS):
    """Rows: image x method, the first images only (at most `max_rows` rows, whatever the number of
    images); columns: the input, then the chosen layers' maps upsampled over the image, on one colour
    scale (colorbar: the class token's attention weight per patch)."""
    shown = max(1, min(images.shape[0], max_rows // len(maps)))
    rows = [(i, name) for i in range(shown) for name in maps]
    fig, axes = plt.subplots(len(rows), len(layers) + 1, squeeze=False, layout="constrained",
                             figsize=(1.6 * (len(layers) + 1) + 1.2, 1.6 * len(rows) + 0.8))
    size = images.shape[-1]
    vmax = max(float(maps[name][layers, :shown].max()) for name in maps)
    norm = plt.Normalize(0, vmax)
    for r, (i, name) in enumerate(rows):
        picture = images[i].permute(1, 2, 0).clamp(0, 1).numpy()
        axes[r, 0].imshow(picture)
        axes[r, 0].set_ylabel(f"image {i}\n{name}", fontsize=7)
        for c, layer in enumerate(layers, 1):
            m = F.interpolate(maps[name][layer, i][None, None], size=(size, size), mode="bilinear")[0, 0]
            axes[r, c].imshow(picture)
            axes[r, c].imshow(m.numpy(), cmap="jet", alpha=0.5, norm=norm)
    axes[0, 0].set_title("input", fontsize=8)
    for c, layer in enumerate(layers, 1):
        axes[0, c].set_title(f"layer {layer}", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap="jet"), ax=axes, shrink=min(1.0, 3 / len(rows) + 0.3),
                 label="class-token attention per patch")
    note = f" (first {shown} of {images.shape[0]} images)" if shown < images.shape[0] else ""
    fig.suptitle(f"{title or 'Class-token attention to the patches, head-averaged'}{note}", fontsize=9)
    return fig


@cli
def main(argv=None) -> int:
    args = parse_model_args("python -m analysis.attention", __doc__, argv, lambda p: p.add_argument(
        "--layers", type=int, nargs="+", help="layers to show, numbered from 0 (default: 4 evenly spaced)"))
    for adapter in args.adapter:
        if family(adapter_config(adapter)["backbone"]) == "vim":
            raise UsageError(f"{adapter} adapts a Vision Mamba, which has no attention; attention maps need a ViT")
    images, maps = per_adapter(args, cls_attention)
    depth = next(iter(maps.values())).shape[0]
    check_layers(args.layers, depth)
    title = f"{args.task}: class-token attention to the patches (adapted q, k; head-averaged)"
    fig = plot_attention(maps, images, args.layers or evenly_spaced(depth), title)
    print(f"wrote {save_figure(fig, args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
