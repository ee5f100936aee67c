"""LN-tune (LayerNorm tuning), as V-PETL Bench (synbol/Parameter-Efficient-Transfer-Learning-Benchmark,
`ImageClassification/train/train_model_lntune.py` L163-169): only the backbone's normalisation layers train (and
the head): every parameter whose name contains `norm`, i.e. the weight and bias of each block's norm1 and norm2 and
of the final norm (the ViT's other `norm` modules, the patch embedding's and fc_norm, are identities there). Here:
every normalisation module of the backbone (nn.LayerNorm, or a class named `...Norm`: Vim's RMSNorm, weight only).

ViT-B/16: 12 x 2 x (768 + 768) + (768 + 768) = 38,400 parameters. The trained values replace the pretrained
ones, so the model is the backbone itself at initialisation and `disable_adapters` cannot undo it (as BitFit).
V-PETL Bench's per-task learning rates and weight decays (`ImageClassification/scripts/run_vit_lntune.sh`):
recipes.LNTUNE_RECIPE.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from backbones import head_of

from .base import register


@dataclass
class LNTuneConfig:
    pass


def is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("Norm")


@register("lntune", LNTuneConfig)
def attach_lntune(model: nn.Module, cfg: LNTuneConfig) -> None:
    head = set(head_of(model).modules())
    for module in model.modules():
        if module not in head and is_norm(module):
            module.requires_grad_(True)
