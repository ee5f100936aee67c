"""The paper's training recipes and the settings of the rows of its tables (vtab_lily/rows.py).

ViT (Lily / Binary Adapter code): AdamW lr 1e-3, weight decay 1e-4, batch 64 (drop_last),
100 epochs, timm CosineLRScheduler stepped after each epoch (t_initial 100, warmup_t 10,
warmup_lr_init 1e-6, lr_min 1e-5), drop_path 0.1, no normalisation (PETL-ViT `binary_adapter/vtab.py`
`get_data(normalize=...)`), test every 10 epochs. The classic baselines' own codes normalise with ImageNet's
mean / std (`IMAGENET_NORM` below), which their `extended` rows do.
Vim (official Vim main.py): `--lr 1e-2` is linearly scaled by batch/512 -> 1.25e-3; weight decay 1e-3
(timm's create_optimizer: no decay on biases, norms, pos_embed and cls_token: `model.param_groups`), cosine
with 5 warmup epochs, drop_path 0.05, fp32 (its train loop never enters the autocast it sets up).
Both official codes train in fp32, so every recipe defaults to `precision="fp32"`; `"tf32"` (TF32 matmuls
and convolutions on Ampere or newer GPUs: 10-bit mantissa products, fp32 accumulation) and `"bf16"` (bf16
autocast of the forward and backward, fp32 weights and optimizer) are faster options, recorded in the run's
identity. On the CPU every precision computes in fp32, so the identity records "fp32" there.
MambaPEFT (sony/MambaPEFT `vision/configs/mmpretrain/_my_base_/schedules/vtab1k_bs32_adamw.py`,
`_my_base_/datasets/vtab1k_bs32_224.py` and the `optim_wrapper` of every `vim/vtab1k/1_small/*.py`): batch 32
(no drop_last: PyTorch's default, the configs set none), AdamW lr 1e-3, wd 1e-4, no decay on biases, norms and
flat (1-d) tensors and on the custom keys A_log, A_b_log, D, D_b, pos_embed, cls_token (the configs also list
dist_token, absolute_pos_embed, relative_position_bias_table, which Vim does not have); gradient clipping at
norm 5.0; mmengine's LinearLR (start_factor 1e-3, per iteration over 10 epochs) then CosineAnnealingLR
(eta_min 1e-5, per epoch from epoch 10 to 100); ImageNet mean / std; drop_path 0.1 (the model configs). Chosen
with `--set recipe=mambapeft`; the `recipe` field names the base recipe (None: the backbone's own).
Their configs test once, after the last epoch (`val_interval=1000`); this recipe tests every 10 epochs, which
changes no result (evaluation draws no random numbers), so one record gives both epoch rules
(`tables --epoch`).
Mini backbones (the offline mini-benchmark, 32 px): the same recipes with fewer epochs and no warm-up.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar, Literal, get_args

from PIL import Image

from .errors import UserError
from .options import OptionError, check_fields, option
from .tasks import VTAB_TASKS

# a recipe's `interpolation` -> the PIL filter that data.py resizes images with
INTERPOLATIONS = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}
RecipeName = Literal["vit", "vim", "mambapeft", "vpetl"]  # --set recipe=NAME; vit / vim: the Lily and hustvl ones
RECIPE_NAMES = get_args(RecipeName)

@dataclass(frozen=True)
class Recipe:
    lr: float = option(1e-3, "AdamW's peak learning rate", (1e-12, None))
    weight_decay: float = option(1e-4, "AdamW's weight decay", (0.0, None))
    no_decay_1d: bool = option(False, "no weight decay on biases, 1-d tensors and the model's no_weight_decay() "
                                      "names (timm's create_optimizer)")
    batch_size: int = option(64, "training batch size")
    epochs: int = option(100, "training epochs")
    warmup_epochs: int = option(10, "epochs of linear warm-up from warmup_lr_init to lr", (0, None))
    warmup_lr_init: float = option(1e-6, "learning rate at the start of the warm-up", (0.0, None))
    lr_min: float = option(1e-5, "learning rate at the end of the cosine decay", (0.0, None))
    drop_path: float = option(0.1, "the backbone's stochastic-depth rate", (0.0, 1.0))
    normalize: bool = option(False, "normalise images with ImageNet's mean / std (the Lily code does not)")
    eval_every: int = option(10, "epochs between test evaluations")
    eval_batch_size: int = option(256, "evaluation batch size (does not change results)")
    image_size: int = option(224, "side of the resized square images, in pixels", (8, None))
    interpolation: Literal["bicubic", "bilinear", "nearest"] = option("bicubic", "the resize filter (PIL)")
    precision: Literal["fp32", "tf32", "bf16"] = option(
        "fp32", "on CUDA: fp32 (the official codes), TF32 matmuls, or bf16 autocast; the CPU always runs fp32")
    checkpoint_every: int = option(10, "epochs between resumable states (does not change results)")
    # Added after records existed: in the run id only where they differ from these defaults (the behaviour
    # before them), so every earlier run id stays as it was (Recipe.ID_IF_SET).
    recipe: RecipeName | None = option(
        None, "the named base recipe (vit, vim: the Lily and hustvl ones; None: the backbone's own)")
    lr_schedule: Literal["timm", "mmengine"] = option(
        "timm", "timm's CosineLRScheduler per epoch, or mmengine's LinearLR then CosineAnnealingLR (MambaPEFT)")
    clip_grad: float | None = option(None, "max L2 norm of all trainable gradients together (None: off)",
                                     (1e-12, None))
    no_decay: tuple[str, ...] = option((), "parameter names (a dotted name's last part, e.g. A_log) without weight "
                                           "decay, joined by '+'")
    drop_last: bool = option(True, "drop the last incomplete training batch (the Lily / timm loaders; mmengine "
                                   "keeps it)")
    label_smoothing: float = option(0.0, "label smoothing of the training loss (V-PETL Bench: 0.1)", (0.0, 1.0))

    # Left out of the run id: checkpoint_every does not change results; the precision the run computes in
    # (fp32 on the CPU whatever is asked) is in the id's provenance instead.
    NOT_IN_ID: ClassVar[tuple] = ("checkpoint_every", "precision")
    ID_IF_SET: ClassVar[tuple] = ("recipe", "lr_schedule", "clip_grad", "no_decay", "drop_last", "label_smoothing")

    def __post_init__(self):
        check_fields(self)
        object.__setattr__(self, "no_decay", tuple(self.no_decay.split("+")) if isinstance(self.no_decay, str)
                           else tuple(self.no_decay))


RECIPES = {
    "vit": Recipe(),
    "vim": Recipe(lr=1e-2 * 64 / 512, weight_decay=1e-3, no_decay_1d=True, warmup_epochs=5, drop_path=0.05),
}

# MambaPEFT's recipe (module docstring). warmup_lr_init: LinearLR's start_factor 1e-3 x lr 1e-3 (with another
# lr, set warmup_lr_init = 1e-3 x lr to keep their factor).
RECIPES["mambapeft"] = Recipe(
    lr=1e-3, weight_decay=1e-4, no_decay_1d=True, no_decay=("A_log", "A_b_log", "D", "D_b", "pos_embed", "cls_token"),
    batch_size=32, drop_last=False, epochs=100, warmup_epochs=10, warmup_lr_init=1e-3 * 1e-3, lr_min=1e-5,
    lr_schedule="mmengine", clip_grad=5.0, drop_path=0.1, normalize=True, eval_every=10, recipe="mambapeft")

# V-PETL Bench's trainers (synbol/Parameter-Efficient-Transfer-Learning-Benchmark, commit c188fad): the Lily recipe's
# AdamW, batch 64, 100 epochs, 10 warm-up epochs from 1e-6, cosine to 1e-5, drop_path 0.1 (train/train_model_lora.py
# L172, L180-181; configs/model_lora/vtab/cifar100.yaml L6-8; scripts/run_vit_lora.sh --dpr 0.1), plus label
# smoothing 0.1 (cifar100.yaml L5, train_model_lora.py L188-190); per-task lr and wd come from its scripts
# (VPETL_LORA, VPETL_ADAPTFORMER).
RECIPES["vpetl"] = dataclasses.replace(RECIPES["vit"], label_smoothing=0.1, recipe="vpetl")

MINI = dict(epochs=10, warmup_epochs=0, eval_every=10, image_size=32, drop_path=0.0)
MINI_BACKBONES = ("vit-mini", "vim-mini")  # their recipes: RECIPES["<name>-mini"]
for _name in RECIPE_NAMES:
    RECIPES[f"{_name}-mini"] = dataclasses.replace(RECIPES[_name], **MINI)

RECIPE_FIELDS = tuple(f.name for f in dataclasses.fields(Recipe))


def effective_precision(recipe: Recipe, device: str) -> str:
    """What the run computes in: the recipe's precision on CUDA, fp32 elsewhere."""
    return recipe.precision if str(device).startswith("cuda") else "fp32"


class PerTask(dict):
    """A preset value that depends on the task (a paper's per-task settings), keyed by task name."""


class NoTaskSetting(UserError, KeyError):
    """A preset's per-task value does not cover the task asked for."""


def for_task(settings: dict, task: str) -> dict:
    """`settings` with every PerTask value resolved for `task` (NoTaskSetting when one does not cover it)."""
    missing = [k for k, v in settings.items() if isinstance(v, PerTask) and task not in v]
    if missing:
        raise NoTaskSetting(f"no per-task setting of {missing} for task {task!r}: this preset gives them for the 19 "
                       "VTAB-1K tasks only")
    return {k: v[task] if isinstance(v, PerTask) else v for k, v in settings.items()}


def _per_task(values: str, kind=float) -> PerTask:
    """PerTask from 19 values listed in VTAB_TASKS order (the tables' column order)."""
    items = values.split()
    if len(items) != len(VTAB_TASKS):
        raise ValueError(f"expected {len(VTAB_TASKS)} per-task values, got {len(items)}")
    return PerTask(zip(VTAB_TASKS, map(kind, items)))


# FacT's per-task rank and scale: JieShibo/PETL-ViT FacT/configs/{tt,tk}/<task>.yaml (its run.sh reads them).
FACT_RANK = {"tt": _per_task("8 16 8 16 8 16 8 8 8 8 8 16 4 16 16 16 16 16 8", int),
             "tk": _per_task("32 32 16 32 16 32 16 32 32 32 16 32 16 32 32 32 32 32 16", int)}
FACT_SCALE = {"tt": _per_task("1 10 0.01 1 1 100 1 10 100 0.1 1 1 10 10 10 100 1 100 10"),
              "tk": _per_task("0.1 10 0.01 1 10 100 1 10 100 10 1 10 10 10 10 100 1 100 10")}
# SSF's per-task recipe: dongzelian/SSF train_scripts/vit/vtab/<task>/train_ssf.sh (2 GPUs x batch 32, AdamW
# through timm's optimizer factory: no weight decay on 1-d tensors, i.e. on every SSF parameter).
SSF_RECIPE = {
    "lr": _per_task("5e-3 1e-3 5e-3 5e-3 5e-3 1e-2 5e-3 5e-3 3e-3 2e-3 5e-3 2e-3 5e-2 5e-3 1e-2 1e-2 5e-3 2e-2 5e-3"),
    "weight_decay": _per_task("5e-5 5e-2 5e-5 5e-5 5e-5 5e-5 5e-5 5e-5 5e-2 5e-5 5e-5 5e-2 5e-2 5e-5 5e-5 5e-5 5e-5 "
                              "5e-5 5e-2"),
    "drop_path": _per_task("0 0.1 0 0 0 0 0 0 0.2 0.1 0.2 0.1 0.1 0.1 0 0 0.2 0.1 0.2"),
    "batch_size": 64, "warmup_lr_init": 1e-7, "lr_min": 1e-8, "no_decay_1d": True,
}
# VPT's prompt-length search set (paper, Sec. 4.1; its per-task choices are kept outside the repository).
VPT_LENGTHS = [1, 5, 10, 50, 100, 200]
# Inputs normalised with ImageNet's mean / std, as the official codes of FacT (PETL-ViT `FacT/vtab.py` L81),
# NOAH's Adapter (NOAH `lib/datasets.py` L241: its VTAB script passes no --inception), VPT and its Bias
# baseline (KMnP/vpt `src/data/datasets/tf_dataset.py` L75-76, `src/data/transforms.py` L8-10).
IMAGENET_NORM = {"normalize": True}
# NOAH's VTAB Adapter (configs/Adapter/VTAB/slurm_train_adapter_vtab.sh: lr 1e-3, wd 1e-4, batch 64, 100 epochs;
# supernet_train_prompt.py L365 timm's create_optimizer, filter_bias_and_bn: no weight decay on 1-d tensors).
NOAH_ADAPTER = {"width": 8, "no_decay_1d": True, **IMAGENET_NORM}
# VPT's Bias baseline ("tinytl-bias") trains with the encoder in eval mode (KMnP/vpt `src/models/vit_models.py`
# L33-35 froze_enc, L173-174 `self.enc.eval()`): no backbone dropout, i.e. drop_path 0.
BITFIT = {"drop_path": 0.0, **IMAGENET_NORM}
# RepAdapter's per-task scale s: luogen1996/RepAdapter configs/repblock/<task>.yaml (`scale`, read by train.py L107);
# its recipe is the ViT one with ImageNet-normalised inputs (dataset.py L64, L93).
REPADAPTER_SCALE = _per_task("0.1 5 1 0.5 0.1 10 0.1 1 1 5 0.1 0.5 0.1 5 5 5 0.1 10 1")
# ConvPass's per-task scale s and conv init: JieShibo/PETL-ViT convpass/vtab/configs/convpass/<task>.yaml (`scale`,
# `xavier_init`, read by train.py L65-69); its recipe is the ViT one with ImageNet-normalised inputs (vtab.py L55).
CONVPASS = {
    "s": _per_task("0.1 1 0.01 0.1 1 100 0.1 10 10 10 1 1 0.1 10 10 100 0.1 100 1"),
    "xavier_init": _per_task("F F T T T T F F F F F F T F T T T T T", lambda v: v == "T"),
    **IMAGENET_NORM,
}
# Adapter+'s recipe (visinf/adapter_plus conf/train/default.yaml L3-7, modeling/adaptermodel.py L112-126, L159-177):
# AdamW lr 1e-3, wd 1e-4 without decay on 1-d tensors and biases, warm-up from lr / 100, cosine to lr / 1000; ImageNet
# mean / std (data/vtab.py L43-44).
ADAPTER_PLUS = {"warmup_lr_init": 1e-3 / 100, "lr_min": 1e-3 / 1000, "no_decay_1d": True, **IMAGENET_NORM}
# LN-tune's per-task lr and weight decay: V-PETL Bench ImageClassification/scripts/run_vit_lntune.sh L16-52 (AdamW, the
# ViT schedule, batch 64, drop_path 0.1: train/train_model_lntune.py L171-180; ImageNet-normalised inputs:
# dataloader/vtab.py L74). Its configs also set label smoothing 0.1 (configs/model_lntune/vtab/<task>.yaml), which
# the suite's trainer does not have (docs/methods-vit.md).
LNTUNE_RECIPE = {
    "lr": _per_task("0.008 0.005 0.0032 0.05 0.0007 0.001 0.0017 0.0072 0.06 0.01 0.004 0.0033 0.0018 0.009 0.0072 "
                    "0.003 0.01 0.0062 0.0011"),
    "weight_decay": _per_task("0.01 0.01 0.04 0.11 0.8 0.005 0.01 0.002 0.001 0.01 0.0003 0.01 0.005 0.1 0.0001 "
                              "0.001 0.05 0.005 0.0005"),
    **IMAGENET_NORM,
}

# Hydra's per-task settings: extremebird/Hydra vtab1k/configs/hydra_both/<task>.yaml (lr, wd, scale, dropout,
# batchsize), rank 2 (scripts/train_hydra.sh L5), inputs ImageNet-normalised (vtab1k/dataset.py L50); its
# schedule (train.py L113-114: cosine with t_initial 500 over 100 epochs) is not this suite's (docs/methods-vit.md).
HYDRA = {
    "r": 2,
    "lr": _per_task("5e-4 1e-3 1e-3 5e-3 1e-3 1e-3 1e-3 5e-3 5e-4 5e-3 5e-4 5e-4 5e-4 1e-3 5e-4 1e-3 1e-3 5e-3 5e-4"),
    "weight_decay": _per_task("1e-4 1e-4 1e-4 1e-4 1e-4 1e-4 1e-4 1e-4 1e-4 1e-4 1e-4 1e-4 1e-4 1e-4 1e-4 1e-4 1e-4 "
                              "1e-5 1e-4"),
    "s": _per_task("0.1 4 0.1 0.1 0.1 3 0.1 0.1 0.1 0.1 4.5 1.5 0.1 4.5 4.5 4.5 2.5 3 1"),
    "dropout": _per_task("0.2 0.1 0.2 0 0 0 0.2 0.2 0.2 0.2 0.2 0.2 0 0.2 0.2 0.2 0.2 0.2 0.2"),
    "batch_size": _per_task("16 32 32 64 32 16 64 64 64 64 64 64 16 64 64 16 64 64 64", int),
    **IMAGENET_NORM,
}

# SCT's per-task lr and wd: zhaohengyuan1/SCT run_model_sct.sh (L9-L45, one line per task; --dpr 0.1, topN 96 at L6),
# batch 64, 100 epochs, 10 warm-up (configs/model_sct/vtab/<task>.yaml), ImageNet-normalised inputs (vtab.py L74).
# Their label smoothing (0.1 on 12 tasks) and RandAugment (`train_aug` on 11) are not this suite's recipe.
SCT = {
    "k": 96,
    "lr": _per_task("0.013 0.006 0.0032 0.05 0.0007 0.075 0.0017 0.0072 0.06 0.01 0.004 0.0033 0.0018 0.009 0.0072 "
                    "0.003 0.01 0.0062 0.0011"),
    "weight_decay": _per_task("1.0 0.35 0.04 0.11 0.8 0.03 0.01 0.002 0.001 0.01 0.0003 0.01 0.005 0.1 0.0001 0.001 "
                              "0.05 0.005 0.0005"),
    "batch_size": 64, "drop_path": 0.1, **IMAGENET_NORM,
}

# DTL's per-task lr and drop path: heekhero/DTL train_scripts/vit/vtab/<task>/train_dtl.sh (r 2, beta 100, batch 32,
# wd 0.05, 100 epochs + 10 warm-up); train_vit_vtab.py L178-204: no decay on biases, warmup_lr_init 1e-7, lr_min
# 1e-8. Its inputs are normalised with mean = std = 0.5 (utils/utils.py L51-52, L68-69), which the suite's
# `normalize` (ImageNet's) is not, so the row runs unnormalised, as the Lily recipe.
DTL = {
    "r": 2, "beta": 100.0,
    "lr": _per_task("3e-4 1e-3 3e-4 8e-3 3e-4 8e-3 5e-4 8e-3 8e-3 8e-3 1e-4 1e-3 5e-4 8e-4 8e-3 1e-2 8e-3 3e-3 1e-3"),
    "drop_path": _per_task("0.1 0 0.1 0.2 0.1 0.2 0.1 0.1 0 0.1 0.1 0.2 0.2 0.2 0.1 0 0 0.2 0.2"),
    "weight_decay": 0.05, "batch_size": 32, "warmup_lr_init": 1e-7, "lr_min": 1e-8,
}

# GPS's per-task settings: FightingFighting/GPS train_scripts/vit/vtab/<task>/train_gps.sh (bz: the training and
# the gradient pass's batch, lr, --drop-path, --times_para); Adam with weight decay 0 (= AdamW at 0), warm-up lr
# 1e-7 over 10 epochs, min lr 1e-8, 100 epochs.
GPS_BATCH = _per_task("32 16 16 16 32 32 16 32 16 16 32 16 16 16 16 32 16 32 32", int)
GPS = {
    "k": _per_task("1 1 1 1 1 1 1 2 1 1 1 1 1 1 1 1 1 1 1", int),
    "lr": _per_task("0.01 0.002 0.002 0.002 0.003 0.005 0.0025 0.004 0.002 0.0015 0.002 0.0003 0.002 0.0015 0.001 "
                    "0.007 0.0005 0.003 0.0003"),
    "drop_path": _per_task("0 0 0 0 0 0 0 0 0 0.1 0.2 0.1 0.1 0.1 0 0 0.2 0.1 0.2"),
    "batch_size": GPS_BATCH, "prepass_batch": GPS_BATCH,
    "weight_decay": 0.0, "warmup_lr_init": 1e-7, "lr_min": 1e-8,
}


def recipe_for(backbone: str, recipe: str | None = None, **overrides) -> Recipe:
    """The named recipe (`recipe`, e.g. "mambapeft"; None or the backbone's family: its own) with `overrides`;
    on a mini backbone its mini variant. The result's `recipe` field is None for the backbone's own recipe,
    so naming it changes no run id."""
    from backbones import family as backbone_family  # here: tables import recipes without torch
    family = backbone_family(backbone)
    if recipe is not None and recipe not in RECIPE_NAMES:
        raise OptionError(f"recipe must be one of {RECIPE_NAMES}, got {recipe!r}")
    name = recipe or family
    base = RECIPES[f"{name}-mini" if backbone in MINI_BACKBONES else name]
    return dataclasses.replace(base, recipe=None if name == family else name, **overrides)


# V-PETL Bench's per-task lr and weight decay (ImageClassification/scripts/run_vit_lora.sh L16-52, every second
# line, VTAB_TASKS order; run_vit_adaptformer.sh L16-52: the same but cifar100's lr 0.01, wd 1.0).
VPETL_LORA = {"recipe": "vpetl",
              "lr": _per_task("0.005 0.006 0.0032 0.05 0.0007 0.001 0.0017 0.0072 0.06 0.01 0.004 0.0033 0.0018 0.009 "
                              "0.0072 0.003 0.01 0.0062 0.0011"),
              "weight_decay": _per_task("0.005 0.35 0.04 0.11 0.8 0.005 0.01 0.002 0.001 0.01 0.0003 0.01 0.005 0.1 "
                                        "0.0001 0.001 0.05 0.005 0.0005")}
VPETL_ADAPTFORMER = {**VPETL_LORA, "lr": PerTask({**VPETL_LORA["lr"], "cifar100": 0.01}),
                     "weight_decay": PerTask({**VPETL_LORA["weight_decay"], "cifar100": 1.0})}
