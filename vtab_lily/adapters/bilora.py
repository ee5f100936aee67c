"""Bi-LoRA (Binary Adapters, Jie et al. 2023): LoRA on q and v whose weights are 1-bit in the forward.

As the Binary Adapter code (PETL-ViT `binary_adapter/utils.py: QLinear`): each weight matrix is
standardised by its mean and std (std + 1e-5), mapped to the 2-level codebook {-c, +c} with
c = Phi^-1(0.75) = 0.6745 (the code's iterated quantile midpoints, not Lloyd-Max's 0.798), gradients pass
straight through, and the result is rescaled by std and shifted by the mean. Latent weights stay fp32 for
training; `export_bits` stores one bit per weight plus each matrix's mean and std.

Not zero-initialised: the up projection starts from trunc_normal(std 0.001, +-0.002) as the original (a
zero matrix has no std to quantise against), so the adapter starts with a tiny, non-zero update.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from scipy.stats import norm
from torch import nn

from ..errors import write_errors
from ..fileio import atomic_path
from ..options import option
from .base import attach_each, register
from .lora import LoRABranch, LoRAConfig

CODE = float(norm.ppf(0.75))  # 0.6744897...


def binarize(w: torch.Tensor) -> torch.Tensor:
    """1-bit fake quantisation with a straight-through gradient."""
    mean, std = w.mean(), w.std()
    z = (w - mean) / (std + 1e-5)
    q = torch.sign(z) * CODE
    return (q.detach() + z - z.detach()) * std + mean


class BiLinear(nn.Linear):
    """A Linear whose weight is binarised in the forward (until `load_bits` fixes it)."""

    def __init__(self, d_in: int, d_out: int, bias: bool = False):
        super().__init__(d_in, d_out, bias=bias)
        self.fake_quant = True

    def forward(self, x):
        return F.linear(x, binarize(self.weight) if self.fake_quant else self.weight, self.bias)

    def storage_bytes(self) -> int:
        return self.weight.numel() // 8 + 8  # the bits, plus mean and std in fp32


@dataclass
class BiLoRAConfig(LoRAConfig):
    r: int = option(32, "rank of the 1-bit low-rank update (Binary Adapter code: 32)")


class BiLoRABranch(LoRABranch):
    linear = BiLinear

    def __init__(self, d_in: int, d_out: int, r: int, s: float, dropout: float):
        super().__init__(d_in, d_out, r, s, dropout)
        nn.init.trunc_normal_(self.up.weight, mean=0.0, std=0.001, a=-0.002, b=0.002)


@register("bilora", BiLoRAConfig)
def attach_bilora(model: nn.Module, cfg: BiLoRAConfig) -> None:
    attach_each(model, cfg.targets, lambda site: BiLoRABranch(site.d_in, site.d_out, cfg.r, cfg.s, cfg.dropout))


def _bilinears(model: nn.Module) -> dict[str, BiLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, BiLinear)}


def export_bits(model: nn.Module, path: str | os.PathLike) -> int:
    """Write every BiLinear as packed sign bits (uint8) + fp32 mean and std, the other trainable tensors
    (the head) as fp32; return the bytes of the adapter bits and statistics."""
    tensors, adapter_bytes = {}, 0
    for name, m in _bilinears(model).items():
        w = m.weight.detach().cpu()
        bits = np.packbits((w >= w.mean()).numpy().reshape(-1))
        tensors[f"{name}.bits"] = torch.from_numpy(bits)
        tensors[f"{name}.stats"] = torch.stack([w.mean(), w.std()])
        adapter_bytes += bits.nbytes + 8
    owned = {id(m.weight) for m in _bilinears(model).values()}
    for n, p in model.named_parameters():
        if p.requires_grad and id(p) not in owned:
            tensors[n] = p.detach().cpu().contiguous()
    with atomic_path(path) as tmp, write_errors(path):
        save_file(tensors, str(tmp), metadata={"vtab_lily": json.dumps(model.peft_config)})
    return adapter_bytes


def load_bits(model: nn.Module, path: str | os.PathLike) -> None:
    """Load an `export_bits` file: each BiLinear gets its dequantised weight and stops re-quantising."""
    tensors = load_file(str(path))
    with torch.no_grad():
        for name, m in _bilinears(model).items():
            mean, std = tensors[f"{name}.stats"]
            signs = np.unpackbits(tensors[f"{name}.bits"].numpy())[: m.weight.numel()].astype(np.float32) * 2 - 1
            m.weight.copy_(torch.from_numpy(signs).view_as(m.weight) * CODE * std + mean)
            m.fake_quant = False
        for n, p in model.named_parameters():
            if n in tensors:
                p.copy_(tensors[n])
