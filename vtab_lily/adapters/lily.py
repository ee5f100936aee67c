"""Lily: low-rank interconnected adaptation across layers (the paper's method, official semantics).

Per adapted target (e.g. the K slice of qkv) and layer: an LP (d_in -> r, no bias) shared by a group of
consecutive layers; a router (r -> ne_2, no bias) reading the LP output; ne_2 zero-initialised HP experts
(r -> d_out) shared by ALL layers; output = s * LP(x) @ sum_j w_j HP_j (Eq. 18). All Lily parameters live
once in `model.lily` (a LilyModule); the per-layer branches only refer to it.

ViT defaults (official ViT code): targets k, v, mlp; the MLP adapter is 2r wide with a ReLU after its LP;
LPs shared by consecutive layers, stride = depth // ne_1 layers each (the official grouping: a new LP where
layer % stride == 0, so ne_1 = 5 on 12 layers gives 6 LPs and ne_1 = 7 or 8 give 12); one router per layer
and target; routing averaged over batch and tokens ("batch"): one weight vector per forward pass, so a test
prediction depends on the rest of its batch.
Vim defaults (official Vim code): target in_proj with one LP per layer, dropout 0.1 on the LP output, ONE
router for the whole model, per-token routing; plus, with dt_r > 0, a low-rank update of dt_proj and
dt_proj_b: a per-layer down (dt_rank -> dt_r) and one shared zero-initialised up (dt_r -> d_inner) per
scan direction, i.e. Lily targets with a single HP expert and no router. s is fixed at 1. The official Vim
code's custom backward omits the dt-adapter term from the gradient of x_dbl (the `delta_proj_weight` line
of its lily.py backward); ours is autograd-exact, so with dt_r > 0 the gradients reaching x_proj's input
differ from the official code's.

Options: routing "batch" | "sample" (per sample) | "token" (per token: Eq. 17 with per-token weights,
computed as (w (x) h) @ HP_flat, never materialising per-token HP matrices); router "layer" | "lp" (one per
LP) | "model" (one for all layers) | "none" (the router-free ablation of Appendix G: HPs summed and
scaled by 1/ne_2).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from backbones import adapter_sites

from ..options import OptionError, option
from .base import add_branch, register, split_targets

# Vim-S presets (Table 5). The paper's ranks are lost in its PDF; these settings reproduce its parameter
# counts: P = r (24 * 384 + 1537 ne_2) + 2688 dt_r on Vim-S (see README).
PRESETS = {
    "lily-s": {"ne_2": 3, "r": 4, "dt_r": 7},  # 74,124 parameters (paper: 0.074M)
    "lily-l": {"ne_2": 6, "r": 8, "dt_r": 18},  # 195,888 parameters (paper: 0.196M)
}


@dataclass
class LilyConfig:
    r: int | None = option(None, "rank of the LPs and HPs")
    s: float = option(1.0, "scale of the output, s * LP(x) @ sum_j w_j HP_j (Eq. 18)")
    ne_1: int | None = option(None, "LPs per target, each shared by depth // ne_1 consecutive layers "
                                    "(None: one per layer)")
    ne_2: int | None = option(None, "HP experts per target, shared by all layers")
    ne: int | None = option(None, "shorthand: ne_1 = ne_2 = ne (the paper's ViT sweeps)")
    targets: tuple[str, ...] | None = option(None, "adapted sites joined by '+'")
    mlp_r: int | None = option(None, "LP width of parallel targets such as mlp (None: 2r, official)")
    mlp_relu: bool = option(True, "ReLU after the LP of parallel targets (official)")
    router: Literal["layer", "lp", "model", "none"] | None = option(
        None, "one router per layer, one per LP, one for the whole model, or none (HPs averaged: Appendix G)")
    routing: Literal["batch", "sample", "token"] | None = option(
        None, "router weights averaged over the batch and tokens, per sample, or per token")
    lp_dropout: float | None = option(None, "dropout on the LP output", (0.0, 1.0))
    dt_r: int | None = option(None, "Vim: rank of the dt_proj / dt_proj_b update (0: off)", (0, None))
    preset: Literal["lily-s", "lily-l"] | None = option(
        None, "Vim-S settings of Table 5 (r, ne_2, dt_r), for the options not given")

    FAMILY_DEFAULTS: ClassVar[dict] = {
        "vit": dict(r=16, ne_1=4, ne_2=4, targets=("k", "v", "mlp"), router="layer", routing="batch",
                    lp_dropout=0.0, dt_r=0),
        "vim": dict(r=8, ne_2=5, targets=("in_proj",), router="model", routing="token", lp_dropout=0.1, dt_r=4),
    }

    def __post_init__(self):
        for key, value in PRESETS.get(self.preset, {}).items():  # an unknown preset: make_config names it
            if getattr(self, key) is None:
                setattr(self, key, value)
        if self.ne is not None:
            self.ne_1 = self.ne_2 = self.ne
        self.targets = split_targets(self.targets)


@dataclass(frozen=True)
class TargetSpec:
    d_in: int
    r: int
    d_out: int
    n_lp: int  # ne_1 as asked; consecutive layers share an LP, stride = depth // n_lp (official grouping)
    ne: int  # HP experts
    router: str  # "layer" | "lp" | "model" | "none"
    dropout: float
    relu: bool


class LilyModule(nn.Module):
    """The model-wide Lily parameters: lps[t][j], hps[t] (ne, r, d_out), routers[t][i]."""

    def __init__(self, specs: dict[str, TargetSpec], num_layers: int, routing: str, s: float):
        super().__init__()
        self.specs, self.num_layers, self.routing, self.s = specs, num_layers, routing, s
        self.lps = nn.ModuleDict()
        self.hps = nn.ParameterDict()
        self.routers = nn.ModuleDict()
        for t, sp in specs.items():
            if not 1 <= sp.n_lp <= num_layers:
                raise OptionError(f"lily ne_1={sp.n_lp} (LPs for {t!r}) must be between 1 and the number of layers "
                                 f"({num_layers})")
            n_lp = len(range(0, num_layers, self.stride(t)))
            self.lps[t] = nn.ModuleList(nn.Linear(sp.d_in, sp.r, bias=False) for _ in range(n_lp))
            self.hps[t] = nn.Parameter(torch.zeros(sp.ne, sp.r, sp.d_out))
            n_routers = {"layer": num_layers, "lp": n_lp, "model": 1, "none": 0}[sp.router]
            if n_routers:
                self.routers[t] = nn.ModuleList(nn.Linear(sp.r, sp.ne, bias=False) for _ in range(n_routers))

    def stride(self, target: str) -> int:
        """Consecutive layers sharing one LP: depth // ne_1, as the official code (a remainder adds an LP)."""
        return self.num_layers // self.specs[target].n_lp

    def lp_index(self, target: str, layer: int) -> int:
        return layer // self.stride(target)

    def router_for(self, target: str, layer: int) -> nn.Linear | None:
        kind = self.specs[target].router
        if kind == "none":
            return None
        return self.routers[target][{"layer": layer, "lp": self.lp_index(target, layer), "model": 0}[kind]]

    def project(self, target: str, layer: int, x: torch.Tensor, dropout: nn.Module | None = None) -> torch.Tensor:
        """The LP step of `layer`'s branch: x -> its LP (shared by a group of layers) -> dropout -> ReLU (parallel
        targets, official): the h that the router and the HP experts read."""
        h = self.lps[target][self.lp_index(target, layer)](x)
        if dropout is not None:
            h = dropout(h)
        return F.relu(h) if self.specs[target].relu else h

    def router_probs(self, target: str, layer: int, h: torch.Tensor) -> torch.Tensor:
        """(..., ne): `layer`'s router weights of h over the HP experts (an equal share without a router)."""
        return route(h, self.router_for(target, layer), self.hps[target].shape[0])


def route(h: torch.Tensor, router: nn.Linear | None, ne: int) -> torch.Tensor:
    """(..., ne): the router's softmax over the HP experts for h (..., r); an equal share without a router."""
    return F.softmax(router(h), dim=-1) if router is not None else h.new_full((*h.shape[:-1], ne), 1 / ne)


def lily_combine(h: torch.Tensor, hps: torch.Tensor, router: nn.Linear | None, routing: str) -> torch.Tensor:
    """Project h (..., r) up through the HP experts hps (ne, r, d_out) weighted by the router."""
    ne = hps.shape[0]
    if router is None:
        return h @ (hps.sum(0) / ne)
    probs = route(h, router, ne)
    if routing == "batch":
        w = probs.reshape(-1, ne).mean(0)
        return h @ torch.einsum("e,erd->rd", w, hps)  # Eq. 18: combine the HPs, one matmul
    if routing == "sample":
        probs = probs.mean(dim=tuple(range(1, probs.dim() - 1)), keepdim=True)
    weighted = (probs.unsqueeze(-1) * h.unsqueeze(-2)).flatten(-2)  # (..., ne * r)
    return weighted @ hps.flatten(0, 1)


class LilyBranch(nn.Module):
    """One layer's Lily branch for one target; parameters are looked up in the shared LilyModule."""

    def __init__(self, shared: LilyModule, target: str, layer: int):
        super().__init__()
        object.__setattr__(self, "shared", shared)  # not registered: stored once, in model.lily
        self.target, self.layer = target, layer
        self.dropout = nn.Dropout(shared.specs[target].dropout)

    def forward(self, x):
        shared, t = self.shared, self.target
        h = shared.project(t, self.layer, x, self.dropout)
        return lily_combine(h, shared.hps[t], shared.router_for(t, self.layer), shared.routing) * shared.s

    def extra_repr(self):
        return f"target={self.target}, layer={self.layer}, lp={self.shared.lp_index(self.target, self.layer)}"


def target_specs(layer0, cfg: LilyConfig, num_layers: int) -> dict[str, TargetSpec]:
    specs = {}
    n_lp = cfg.ne_1 or num_layers
    for t in cfg.targets:
        site = layer0.get(t)
        parallel = t in layer0.parallel
        r = (cfg.mlp_r or 2 * cfg.r) if parallel else cfg.r
        specs[t] = TargetSpec(site.d_in, r, site.d_out, n_lp, cfg.ne_2, cfg.router, cfg.lp_dropout,
                              cfg.mlp_relu and parallel)
    if cfg.dt_r:
        for t in ("dt_proj", "dt_proj_b"):
            site = layer0.get(t)
            specs[t] = TargetSpec(site.d_in, cfg.dt_r, site.d_out, num_layers, 1, "none", 0.0, False)
    return specs


@register("lily", LilyConfig)
def attach_lily(model: nn.Module, cfg: LilyConfig) -> None:
    layers = adapter_sites(model)
    model.lily = LilyModule(target_specs(layers[0], cfg, len(layers)), len(layers), cfg.routing, cfg.s)
    for layer in layers:
        for t in model.lily.specs:
            add_branch(layer.get(t), LilyBranch(model.lily, t, layer.index))
