"""Shared helpers of the figure functions: models from adapter files, images from a task, saving."""
from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from vtab_lily import adapter_config, load_model  # noqa: E402
from vtab_lily.data import load_split, to_float  # noqa: E402
from vtab_lily.fileio import atomic_path  # noqa: E402


def load_trained(adapter: str | Path, weights: str | None = None, pretrained: bool = True,
                 image_size: int = 224) -> nn.Module:
    """The model an adapter file was saved from, at `image_size`, in eval mode."""
    return load_model(adapter, weights, pretrained, backbone_options={"img_size": image_size})


def task_images(data_root: str | Path, task: str, n: int, size: int = 224, split: str = "test",
                normalize: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The first n images (float, (n, 3, size, size)) and labels of a task split."""
    data = load_split(data_root, task, split, size=size, progress=False)
    images = torch.from_numpy(data.images[:n].copy()).permute(0, 3, 1, 2)
    return to_float(images, normalize), torch.from_numpy(data.labels[:n])


def save_figure(fig, path: str | Path) -> Path:
    """Write a figure atomically (format from the suffix: .png or .pdf)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def model_arguments(parser: argparse.ArgumentParser) -> None:
    """--adapter (repeatable: one per method compared), --weights, --task, --data-root, --n, --out."""
    parser.add_argument("--adapter", action="append", required=True,
                        help="a trained adapter (<run-id>.safetensors); repeat to compare methods")
    parser.add_argument("--weights", help="local pretrained backbone weights")
    parser.add_argument("--task", required=True)
    parser.add_argument("--data-root", default="data/vtab-1k")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--n", type=int, default=4, help="images")
    parser.add_argument("--out", required=True, help="figure path (.png or .pdf)")


def label_of(adapter: str | Path) -> str:
    cfg = adapter_config(adapter)
    return f"{cfg['method']} ({Path(adapter).stem})"


def parse_model_args(prog: str, doc: str, argv=None, extra=None) -> argparse.Namespace:
    """The command line of a figure over trained adapters: model_arguments plus `extra(parser)`."""
    parser = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_arguments(parser)
    if extra:
        extra(parser)
    return parser.parse_args(argv)


def per_adapter(args: argparse.Namespace, measure) -> tuple[torch.Tensor, dict]:
    """The task's images and {label: measure(model, images)} for every --adapter."""
    images, _ = task_images(args.data_root, args.task, args.n, args.image_size)
    return images, {label_of(a): measure(load_trained(a, args.weights, image_size=args.image_size), images)
                    for a in args.adapter}


def evenly_spaced(depth: int, k: int = 4) -> list[int]:
    """k layers spread over 0..depth-1 (fewer when the model is shallower)."""
    return sorted({round(i * (depth - 1) / (k - 1)) for i in range(k)})
