"""Partial tuning (MambaPEFT, Yoshimura et al. 2025): a chosen subset of the backbone's own tensors trains.

`parts` ('+'-joined): `A` (A_log and A_b_log of every layer), `D` (D, D_b), `conv1d` (the kernels of both causal
convs), `dt_bias` (the biases of dt_proj and dt_proj_b: the scan's delta bias), `cls_token`, `pos_embed`: the
backbone's tensor sites. As the official `vim_peft_all.py` (set_peft L784-792, L910-1017; their use in
forward_mamba_peft L92-95, L110-113, L173-185, L260, L273 and forward_features L415-436):

- `delta=True` (their `learnable_*_v2`, every Vim-S config `3_small_learnable_*_v2_*.py`): a learnable delta of
  the tensor's shape, zero-initialised, is added to the frozen tensor wherever the model reads it (A_log + dA
  before -exp, D + dD, conv weight + dW with the conv bias frozen, dt bias + db, cls_token + dc, pos_embed + dp),
  so the model is unchanged at init and `disable_adapters` restores the plain backbone.
- `delta=False`: the tensor itself trains (their non-v2 form; their conv1d part then also trains the conv
  biases, L1275, which here belong to no part). `disable_adapters` cannot undo it.

`wd_mult`: the method's tensors decay at weight_decay * wd_mult whatever the recipe's no-decay rules say, as
mmengine's paramwise custom_keys, which override its bias / norm / 1-d rules (DefaultOptimWrapperConstructor
.add_params). Their configs: x10 for A (`3_small_learnable_A_v2_wd_x10.py` L70), D (`..._D_v2_wd_x10.py` L70) and
conv1d (`..._conv1d_v2_wd_x10.py` L69), x100 for the dt bias (`..._bias_v2_wd_x100.py` L70); the class token and
position embedding have no config (their deltas match no custom key and decay at x1).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from backbones import TensorSite, adapter_sites, model_sites

from ..errors import UnknownName
from ..options import option
from .base import Switch, register, split_names

PARTS = ("A", "D", "conv1d", "dt_bias", "cls_token", "pos_embed")


@dataclass
class PartialConfig:
    parts: tuple[str, ...] = option(("conv1d",), "trained tensors joined by '+' (A, D, conv1d, dt_bias, cls_token, "
                                                 "pos_embed; conv1d: their best partial-tuning row)")
    delta: bool = option(True, "train an increment on the frozen tensor (learnable_*_v2=True, L20 of their configs)")
    wd_mult: float = option(1.0, "weight-decay multiplier of the trained tensors (their custom keys: x10 / x100)",
                            (0.0, None))

    def __post_init__(self):
        self.parts = split_names(self.parts, PARTS, "partial parts")


class Delta(Switch, nn.Module):
    """A parametrization: the frozen tensor plus a learnable delta, zero at init (the frozen tensor alone while
    disabled)."""

    def __init__(self, like: torch.Tensor):
        super().__init__()
        self.delta = nn.Parameter(torch.zeros_like(like))
        self.enabled = True

    def forward(self, frozen):
        return frozen + self.delta if self.enabled else frozen


def part_sites(model: nn.Module, part: str) -> list[TensorSite]:
    whole = model_sites(model)
    if isinstance(whole.get(part), TensorSite):
        return [whole[part]]
    sites = [site for layer in adapter_sites(model) for site in layer.tensors.get(part, ())]
    if not sites:
        known = sorted({n for layer in adapter_sites(model) for n in layer.tensors}
                       | {n for n, s in whole.items() if isinstance(s, TensorSite)})
        raise UnknownName(f"partial part {part!r} is not a tensor of {model.backbone_name}; it has {known}")
    return sites


@register("partial", PartialConfig)
def attach_partial(model: nn.Module, cfg: PartialConfig) -> None:
    for site in [site for part in cfg.parts for site in part_sites(model, part)]:
        if cfg.delta:
            parametrize.register_parametrization(site.parent, site.attr, Delta(getattr(site.parent, site.attr)))
            tensor = getattr(site.parent.parametrizations, site.attr)[0].delta
        else:
            tensor = getattr(site.parent, site.attr)
            tensor.requires_grad_(True)
        tensor.wd_mult = cfg.wd_mult  # read by model.param_groups
