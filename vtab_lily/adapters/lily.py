"""Lily: low-rank interconnected adaptation across layers (the paper's method, official ViT semantics).

Per adapted target (e.g. the K slice of qkv) and layer: an LP (d_in -> r, no bias) shared by a group
of consecutive layers; a router (r -> ne_2, no bias) reading the LP output; ne_2 zero-initialised HP
experts (r -> d_out) shared by ALL layers; output = s * LP(x) @ sum_j w_j HP_j (Eq. 18).
Parallel targets (the MLP) use a 2r-wide LP followed by a ReLU, as the official code.

All Lily parameters live once in `model.lily` (a LilyModule); the per-layer branches only refer to it.

Routing (`routing`):
- "batch" (default, official): softmax over experts, averaged over batch and tokens: one weight vector
  per forward pass, so a test prediction depends on the rest of its batch (official eval batch: 256).
- "sample": averaged over tokens, one vector per sample; "token": one vector per token (Eq. 17 with
  per-token weights), computed as (w (x) h) @ HP_flat without per-token HP matrices.
Router placement (`router`): "layer" (official: one per layer and target), "lp" (one per LP),
"none" (the router-free ablation of Appendix G: HPs summed and scaled by 1/ne_2).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from backbones import adapter_sites

from .base import add_branch, register

ROUTINGS = ("batch", "sample", "token")
ROUTERS = ("layer", "lp", "none")


@dataclass
class LilyConfig:
    r: int = 16
    s: float = 1.0
    ne_1: int = 4
    ne_2: int = 4
    ne: int | None = None  # shorthand: sets ne_1 = ne_2 = ne (the paper's ViT sweeps)
    targets: tuple[str, ...] = ("k", "v", "mlp")
    mlp_r: int | None = None  # LP width of parallel targets; None: 2r (official)
    mlp_relu: bool = True  # ReLU after the LP of parallel targets (official)
    router: str = "layer"
    routing: str = "batch"

    def __post_init__(self):
        if self.ne is not None:
            self.ne_1 = self.ne_2 = self.ne
        self.targets = tuple(self.targets.split("+") if isinstance(self.targets, str) else self.targets)
        if self.routing not in ROUTINGS:
            raise ValueError(f"lily routing must be one of {ROUTINGS}, got {self.routing!r}")
        if self.router not in ROUTERS:
            raise ValueError(f"lily router must be one of {ROUTERS}, got {self.router!r}")


class LilyModule(nn.Module):
    """The model-wide Lily parameters: lps[t][j], hps[t] (ne_2, r_t, d_out), routers[t][i]."""

    def __init__(self, cfg: LilyConfig, dims: dict[str, tuple[int, int, int]], num_layers: int):
        super().__init__()
        if num_layers % cfg.ne_1:
            raise ValueError(f"lily ne_1={cfg.ne_1} must divide the number of layers ({num_layers})")
        self.cfg = cfg
        self.stride = num_layers // cfg.ne_1
        self.lps = nn.ModuleDict()
        self.hps = nn.ParameterDict()
        self.routers = nn.ModuleDict()
        n_routers = {"layer": num_layers, "lp": cfg.ne_1, "none": 0}[cfg.router]
        for t, (d_in, r, d_out) in dims.items():
            self.lps[t] = nn.ModuleList(nn.Linear(d_in, r, bias=False) for _ in range(cfg.ne_1))
            self.hps[t] = nn.Parameter(torch.zeros(cfg.ne_2, r, d_out))
            if n_routers:
                self.routers[t] = nn.ModuleList(nn.Linear(r, cfg.ne_2, bias=False) for _ in range(n_routers))

    def lp_index(self, layer: int) -> int:
        return layer // self.stride

    def router_for(self, target: str, layer: int) -> nn.Linear | None:
        if self.cfg.router == "none":
            return None
        return self.routers[target][layer if self.cfg.router == "layer" else self.lp_index(layer)]


def lily_combine(h: torch.Tensor, hps: torch.Tensor, router: nn.Linear | None, routing: str) -> torch.Tensor:
    """Project h (..., r) up through the HP experts hps (ne, r, d_out) weighted by the router."""
    ne = hps.shape[0]
    if router is None:
        return h @ (hps.sum(0) / ne)
    probs = F.softmax(router(h), dim=-1)
    if routing == "batch":
        w = probs.reshape(-1, ne).mean(0)
        return h @ torch.einsum("e,erd->rd", w, hps)  # Eq. 18: combine the HPs, one matmul
    if routing == "sample":
        probs = probs.mean(dim=tuple(range(1, probs.dim() - 1)), keepdim=True)
    weighted = (probs.unsqueeze(-1) * h.unsqueeze(-2)).flatten(-2)  # (..., ne * r)
    return weighted @ hps.flatten(0, 1)


class LilyBranch(nn.Module):
    """One layer's Lily branch for one target; parameters are looked up in the shared LilyModule."""

    def __init__(self, shared: LilyModule, target: str, layer: int, relu: bool):
        super().__init__()
        object.__setattr__(self, "shared", shared)  # not registered: stored once, in model.lily
        self.target, self.layer, self.relu = target, layer, relu

    def forward(self, x):
        shared = self.shared
        h = shared.lps[self.target][shared.lp_index(self.layer)](x)
        if self.relu:
            h = F.relu(h)
        router = shared.router_for(self.target, self.layer)
        return lily_combine(h, shared.hps[self.target], router, shared.cfg.routing) * shared.cfg.s

    def extra_repr(self):
        return f"target={self.target}, layer={self.layer}, lp={self.shared.lp_index(self.layer)}"


@register("lily", LilyConfig)
def attach_lily(model: nn.Module, cfg: LilyConfig) -> None:
    layers = adapter_sites(model)
    dims = {}
    for t in cfg.targets:
        site = layers[0].get(t)
        parallel = t in layers[0].parallel
        r = (cfg.mlp_r or 2 * cfg.r) if parallel else cfg.r
        dims[t] = (site.d_in, r, site.d_out)
    model.lily = LilyModule(cfg, dims, len(layers))
    for layer in layers:
        for t in cfg.targets:
            relu = cfg.mlp_relu and t in layer.parallel
            add_branch(layer.get(t), LilyBranch(model.lily, t, layer.index, relu))
