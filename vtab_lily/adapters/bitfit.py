"""BitFit (Ben Zaken et al. 2022): only the backbone's bias terms train (and the head).

Every bias of the backbone (`*.bias`: the patch embedding, the norms, qkv, proj, fc1, fc2 and the final
norm on ViT; the patch embedding, the causal convs and dt_proj on Vim) becomes trainable; its trained
value replaces the pretrained one, so the merged form is the model itself. As VPT's bias baseline (which
the common VTAB-1K tables quote: 0.10M on ViT-B/16 = 102,912 here), LayerNorm biases included.

`disable_adapters` cannot undo BitFit (it trains the backbone's own biases). The official Bias baseline
(KMnP/vpt "tinytl-bias") trains with the encoder in eval mode (`src/models/vit_models.py` L33-35, L173-174), so
the `extended` preset runs it with drop_path 0 (and ImageNet-normalised inputs).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from backbones import head_of

from .base import merges, register


@dataclass
class BitFitConfig:
    pass


@register("bitfit", BitFitConfig)
def attach_bitfit(model: nn.Module, cfg: BitFitConfig) -> None:
    """Each backbone bias is re-registered as a fresh Parameter holding the pretrained value: build_model
    trains the parameters a method adds, so exactly these train. Biases already trainable belong to a
    method attached before it in a composition (e.g. adaptformer+bitfit) and are left to it."""
    head = set(head_of(model).modules())
    for module in model.modules():
        bias = getattr(module, "bias", None)
        if module not in head and isinstance(bias, nn.Parameter) and not bias.requires_grad:
            module.bias = nn.Parameter(bias.detach().clone())


@merges("bitfit")
def merge_bitfit(model: nn.Module) -> None:
    """BitFit's trained biases are the backbone's own: the model is already its merged form."""
