"""Router selectivity (paper Fig. 6): the total router weight each HP expert receives at chosen layers
over a dataset (probability mass summed over all tokens of all images), as bar charts. ViT and Vim.

    python -m analysis.routers --adapter lily.safetensors --task dtd --n 64 --target k --out routers.png
"""
from __future__ import annotations

from collections import defaultdict

import matplotlib.pyplot as plt
import torch
from torch import nn

from vtab_lily.adapters.lily import LilyBranch
from vtab_lily.errors import cli

from .common import (
    UsageError,
    check_layers,
    evenly_spaced,
    load_trained,
    parse_model_args,
    save_figure,
    task_images,
    trained_image_size,
)


@torch.no_grad()
def router_weights(model: nn.Module, images: torch.Tensor, target: str, batch_size: int = 64) -> torch.Tensor:
    """(layers, ne): the router probability mass per expert, summed over tokens and images. Without a
    router (router="none") every expert gets an equal share."""
    totals: dict[int, torch.Tensor] = defaultdict(lambda: 0)
    shared = model.lily

    def hook(branch, inputs, output):  # the branch's own LP step and router (LilyModule), on its input
        probs = shared.router_probs(target, branch.layer, shared.project(target, branch.layer, inputs[0]))
        totals[branch.layer] = totals[branch.layer] + probs.reshape(-1, probs.shape[-1]).sum(0)

    branches = [m for m in model.modules() if isinstance(m, LilyBranch) and m.target == target]
    if not branches:
        raise UsageError(f"the model has no Lily branch for target {target!r}; it has {list(shared.specs)}")
    hooks = [b.register_forward_hook(hook) for b in branches]
    try:
        for i in range(0, len(images), batch_size):
            model(images[i:i + batch_size])
    finally:
        for h in hooks:
            h.remove()
    return torch.stack([totals[layer] for layer in sorted(totals)])


def plot_router_weights(weights: torch.Tensor, layers: list[int], title: str, per_row: int = 6):
    """One bar chart per chosen layer (numbered from 0, as --layers), `per_row` to a row: each HP expert's
    share of the router weight."""
    rows = -(-len(layers) // per_row)
    cols = min(len(layers), per_row)
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols + 0.6, 2.3 * rows + 0.7), squeeze=False,
                             sharey=True, layout="constrained")
    share = weights / weights.sum(-1, keepdim=True)
    experts = range(share.shape[1])
    for ax, layer in zip(axes.flat, layers):
        ax.bar(experts, share[layer].numpy(), color="tab:blue")
        ax.set_title(f"layer {layer}", fontsize=9)
        ax.set_xlabel("HP expert")
        ax.set_xticks(experts)
    for ax in axes.flat[len(layers):]:
        ax.set_visible(False)
    for row in axes:
        row[0].set_ylabel("share of router weight")
    fig.suptitle(title, fontsize=10)
    return fig


@cli
def main(argv=None) -> int:
    def extra(parser):
        parser.add_argument("--target", default=None, help="Lily target (default: the first one)")
        parser.add_argument("--layers", type=int, nargs="+",
                            help="layers to show, numbered from 0 (default: 4 evenly spaced)")
    args = parse_model_args("python -m analysis.routers", __doc__, argv, extra, method="lily")
    model = load_trained(args.adapter[0], args.weights, image_size=args.image_size)
    target = args.target or next(iter(model.lily.specs))
    if target not in model.lily.specs:
        raise UsageError(f"--target {target}: this Lily adapter has the targets {' '.join(model.lily.specs)}")
    check_layers(args.layers, model.lily.num_layers)
    images, _ = task_images(args.data_root, args.task, args.n, trained_image_size(args.adapter, args.image_size))
    weights = router_weights(model, images, target)
    fig = plot_router_weights(weights, args.layers or evenly_spaced(len(weights)),
                              f"{args.task}: share of router weight per HP expert, target {target}, "
                              f"summed over the tokens of {len(images)} images")
    print(f"wrote {save_figure(fig, args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
