"""Shared helpers of the figure functions and their command lines: models from adapter files, images
from a task, checked options, saving (their command lines report errors through vtab_lily.errors.cli)."""
from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from safetensors import SafetensorError  # noqa: E402
from torch import nn  # noqa: E402

from vtab_lily import adapter_config, load_model  # noqa: E402
from vtab_lily.choices import choices_help  # noqa: E402
from vtab_lily.data import load_split, to_float  # noqa: E402
from vtab_lily.errors import UserError  # noqa: E402
from vtab_lily.fileio import atomic_path  # noqa: E402
from vtab_lily.prepare import ensure_prepared  # noqa: E402
from vtab_lily.tasks import get_task  # noqa: E402

FORMATS = (".png", ".pdf")
MAX_ROWS = 8  # image rows drawn by attention (more images are measured, not drawn)


class UsageError(UserError, ValueError):
    """A mistake in a figure's command line; the message says what to do."""


def load_trained(adapter: str | Path, weights: str | None = None, pretrained: bool | None = None,
                 image_size: int | None = None) -> nn.Module:
    """The model an adapter file was saved from, on the weights it was trained on (vtab_lily.load_model
    checks them), at its training image size unless `image_size` is given (a different one is refused),
    in eval mode."""
    return load_model(adapter, weights, pretrained, backbone_options=None if image_size is None else
                      {**(adapter_config(adapter).get("backbone_options") or {}), "img_size": image_size})


def trained_image_size(adapters: list[str | Path], image_size: int | None = None) -> int:
    """The image size the adapters were trained at (they must agree), or `image_size` when given;
    224 for adapter files saved before the size was kept."""
    if image_size is not None:
        return image_size
    sizes = {(adapter_config(a).get("backbone_options") or {}).get("img_size", 224) for a in adapters}
    if len(sizes) > 1:
        raise UsageError(f"the adapters were trained at different image sizes {sorted(sizes)}; compare adapters "
                         "of one size")
    return sizes.pop()


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


def check_adapter(path: str | Path, method: str | None = None) -> dict:
    """The saved config of an adapter file; UsageError when it is missing, not an adapter, or (with
    `method`) of another method."""
    if not Path(path).is_file():
        raise UsageError(f"adapter file {path} does not exist; pass the <run-id>.safetensors beside a run record")
    try:
        cfg = adapter_config(path)
    except (SafetensorError, OSError, KeyError, ValueError) as e:
        raise UsageError(f"{path} is not an adapter saved by vtab_lily ({type(e).__name__}: {e}); pass the "
                         "<run-id>.safetensors beside a run record") from e
    if method and cfg["method"] != method:
        raise UsageError(f"{path} is a {cfg['method']} adapter; this figure needs a {method} adapter")
    return cfg


def check_out(path: str | Path) -> None:
    if Path(path).suffix not in FORMATS or Path(path).is_dir():
        raise UsageError(f"--out {path}: give a file name ending in {' or '.join(FORMATS)}")


def check_layers(layers: list[int] | None, depth: int) -> None:
    bad = [layer for layer in layers or [] if not 0 <= layer < depth]
    if bad:
        raise UsageError(f"--layers {' '.join(map(str, bad))} out of range: the model has {depth} layers, "
                         f"numbered 0..{depth - 1}")


def model_arguments(parser: argparse.ArgumentParser) -> None:
    """--adapter (repeatable: one per method compared), --weights, --task, --data-root, --prepare, --n, --out."""
    parser.add_argument("--adapter", action="append", required=True,
                        help="a trained adapter (<run-id>.safetensors); repeat to compare methods")
    parser.add_argument("--weights", help="local pretrained backbone weights")
    parser.add_argument("--task", required=True, help=choices_help("task"))
    parser.add_argument("--data-root", default="data/vtab-1k")
    parser.add_argument("--prepare", action="store_true", help="prepare the task's data first if it is missing")
    parser.add_argument("--image-size", type=int, help="default: the size the adapters were trained at")
    parser.add_argument("--n", type=int, default=4, help="images")
    parser.add_argument("--out", required=True, help="figure path (.png or .pdf)")


def label_of(adapter: str | Path) -> str:
    cfg = adapter_config(adapter)
    return f"{cfg['method']} ({Path(adapter).stem})"


def parse_model_args(prog: str, doc: str, argv=None, extra=None, method: str | None = None) -> argparse.Namespace:
    """The command line of a figure over trained adapters (model_arguments plus `extra(parser)`), checked:
    UsageError for a bad option, and the task prepared first with --prepare."""
    parser = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_arguments(parser)
    if extra:
        extra(parser)
    args = parser.parse_args(argv)
    for adapter in args.adapter:
        check_adapter(adapter, method)
    check_out(args.out)
    if args.n < 1 or (args.image_size is not None and args.image_size < 1):
        raise UsageError(f"--n ({args.n}) and --image-size ({args.image_size}) must be positive")
    get_task(args.task)
    ensure_prepared(args.task, args.data_root, args.prepare)
    return args


def per_adapter(args: argparse.Namespace, measure) -> tuple[torch.Tensor, dict]:
    """The task's images and {label: measure(model, images)} for every --adapter."""
    size = trained_image_size(args.adapter, args.image_size)
    images, _ = task_images(args.data_root, args.task, args.n, size)
    return images, {label_of(a): measure(load_trained(a, args.weights, image_size=args.image_size), images)
                    for a in args.adapter}


def evenly_spaced(depth: int, k: int = 4) -> list[int]:
    """k layers spread over 0..depth-1 (fewer when the model is shallower)."""
    return sorted({round(i * (depth - 1) / (k - 1)) for i in range(k)})
