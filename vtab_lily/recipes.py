"""The paper's training recipes and the presets behind each row of Tables 4 and 5.

ViT (Lily / Binary Adapter / FacT code): AdamW lr 1e-3, weight decay 1e-4, batch 64 (drop_last),
100 epochs, timm CosineLRScheduler stepped after each epoch (t_initial 100, warmup_t 10,
warmup_lr_init 1e-6, lr_min 1e-5), drop_path 0.1, no normalisation, test every 10 epochs.
Vim (official Vim main.py): `--lr 1e-2` is linearly scaled by batch/512 -> 1.25e-3; weight decay 1e-3
(timm's create_optimizer: no decay on biases and norms), cosine with 5 warmup epochs, drop_path 0.05,
fp32 (its train loop never enters the autocast it sets up).
Both official codes train in fp32, so every recipe defaults to `precision="fp32"`; `"tf32"` (TF32 matmuls
and convolutions on Ampere or newer GPUs: 10-bit mantissa products, fp32 accumulation) and `"bf16"` (bf16
autocast of the forward and backward, fp32 weights and optimizer) are faster options, recorded in the run's
identity. On the CPU every precision computes in fp32, so the identity records "fp32" there.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from .data import INTERPOLATIONS
from .options import OptionError, check_fields

PRECISIONS = ("fp32", "tf32", "bf16")


@dataclass(frozen=True)
class Recipe:
    lr: float = 1e-3
    weight_decay: float = 1e-4
    no_decay_1d: bool = False  # timm create_optimizer: no weight decay on biases and norm weights
    batch_size: int = 64
    epochs: int = 100
    warmup_epochs: int = 10
    warmup_lr_init: float = 1e-6
    lr_min: float = 1e-5
    drop_path: float = 0.1
    normalize: bool = False
    eval_every: int = 10
    eval_batch_size: int = 256
    image_size: int = 224
    interpolation: str = "bicubic"
    precision: str = "fp32"  # on CUDA: "fp32" (official), "tf32" or "bf16" autocast; the CPU always runs fp32
    checkpoint_every: int = 10  # epochs between resumable states (does not change results)

    RANGES: ClassVar[dict] = {"lr": (1e-12, None), "weight_decay": (0.0, None), "warmup_epochs": (0, None),
                              "warmup_lr_init": (0.0, None), "lr_min": (0.0, None), "image_size": (8, None)}
    # Left out of the run id: checkpoint_every does not change results; the precision the run computes in
    # (fp32 on the CPU whatever is asked) is in the id's provenance instead.
    NOT_IN_ID: ClassVar[tuple] = ("checkpoint_every", "precision")

    def __post_init__(self):
        check_fields(self)
        if self.precision not in PRECISIONS:
            raise OptionError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise OptionError(f"interpolation must be one of {sorted(INTERPOLATIONS)}, got {self.interpolation!r}")


RECIPES = {
    "vit": Recipe(),
    "vim": Recipe(lr=1e-2 * 64 / 512, weight_decay=1e-3, no_decay_1d=True, warmup_epochs=5, drop_path=0.05),
}

RECIPE_FIELDS = tuple(f.name for f in dataclasses.fields(Recipe))


def effective_precision(recipe: Recipe, device: str) -> str:
    """What the run computes in: the recipe's precision on CUDA, fp32 elsewhere."""
    return recipe.precision if str(device).startswith("cuda") else "fp32"


def recipe_for(backbone: str, **overrides) -> Recipe:
    family = "vim" if backbone.startswith("vim") else "vit"
    return dataclasses.replace(RECIPES[family], **overrides)


# Rows of the paper's tables: (backbone, method, fixed options, searched grid).
# Lily on ViT: rank 16, lily_s in {0.01, 0.1, 1, 10, 100}, ne_1 = ne_2 = ne in {2, 3, 4}, chosen per task
# (the official per-task choices are unpublished, so the row is a sweep).
PRESETS = {
    "table4": [
        ("vit-b", "fft", {}, {}),
        ("vit-b", "linear", {}, {}),
        ("vit-b", "adaptformer", {"width": 32}, {}),
        ("vit-b", "bilora", {"r": 32}, {}),
        ("vit-b", "lora", {"r": 32}, {}),
        ("vit-b", "fourierft", {"n": 3000, "scale": 300.0}, {}),
        ("vit-b", "mora", {"r": 29, "type": 6}, {}),  # 24 x 210^2 = 1,058,400: Table 4's 1.058M
        ("vit-b", "lily", {"r": 16}, {"s": [0.01, 0.1, 1.0, 10.0, 100.0], "ne": [2, 3, 4]}),
    ],
    "table5": [
        ("vim-s", "fft", {}, {}),
        ("vim-s", "linear", {}, {}),
        ("vim-s", "lora", {"r": 1, "targets": ("in_proj",)}, {}),
        ("vim-s", "lily", {"preset": "lily-s"}, {}),
        ("vim-s", "lily", {"preset": "lily-l"}, {}),
        ("vit-b-in1k", "fft", {}, {}),
        ("vit-b-in1k", "linear", {}, {}),
        ("vit-b-in1k", "adaptformer", {"width": 8}, {}),
        ("vit-b-in1k", "lora", {"r": 8}, {}),
    ],
    # Appendix D: Lily on different modules without LP sharing (one LP per layer); the paper tunes the
    # settings to similar parameter counts without publishing them, so the row is a sweep over s and ne_2.
    "table15": [
        ("vit-b", "lily", {"targets": targets, "ne_1": 12}, {"s": [0.01, 0.1, 1.0, 10.0, 100.0], "ne_2": [2, 3, 4]})
        for targets in (("q", "v"), ("mlp",), ("q", "v", "mlp"), ("k", "v", "mlp"))
    ],
}
