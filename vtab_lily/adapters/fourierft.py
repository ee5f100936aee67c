"""FourierFT (Gao et al. 2024): per target, n trainable spectral coefficients at fixed random locations.

dW = real(ifft2(dense spectrum)) * scale, with the n locations drawn by `torch.randperm(d_out * d_in)`
from a fixed seed, so every layer uses the same locations (the paper's ViT setup, and peft's). ViT setup:
q and v, n = 3000, scale 300. Initialisation: coefficients ~ N(0, 1), as the official code and peft's
default (so the model does NOT start as the plain backbone); `init="zeros"` starts at dW = 0.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..options import OptionError, option
from .base import TargetedConfig, attach_each, register


@dataclass
class FourierFTConfig(TargetedConfig):
    n: int = option(3000, "number of trained spectral coefficients per weight (the paper's n)")
    scale: float = option(300.0, "scale of the inverse DFT's output (the paper's alpha)")
    loc_seed: int = option(777, "seed of the spectral locations (peft's random_loc_seed default)", (0, None))
    init: Literal["normal", "zeros"] = option("normal", "init of the coefficients: N(0, 1) (the paper) or zeros")


class FourierFTBranch(nn.Module):
    def __init__(self, d_in: int, d_out: int, cfg: FourierFTConfig):
        super().__init__()
        if not 0 < cfg.n <= d_in * d_out:
            raise OptionError(f"fourierft n={cfg.n} must be in 1..{d_in * d_out} for a {d_out}x{d_in} weight")
        loc = torch.randperm(d_out * d_in, generator=torch.Generator().manual_seed(cfg.loc_seed))[: cfg.n]
        self.register_buffer("rows", loc // d_in, persistent=False)
        self.register_buffer("cols", loc % d_in, persistent=False)
        self.spectrum = nn.Parameter(torch.randn(cfg.n) if cfg.init == "normal" else torch.zeros(cfg.n))
        self.shape, self.scale = (d_out, d_in), cfg.scale

    def delta_weight(self) -> torch.Tensor:
        dense = torch.zeros(self.shape, device=self.spectrum.device)
        dense[self.rows, self.cols] = self.spectrum.float()
        return torch.fft.ifft2(dense).real * self.scale

    def forward(self, x):
        return F.linear(x, self.delta_weight().to(x.dtype))


@register("fourierft", FourierFTConfig)
def attach_fourierft(model: nn.Module, cfg: FourierFTConfig) -> None:
    attach_each(model, cfg.targets, lambda site: FourierFTBranch(site.d_in, site.d_out, cfg))
