"""Vision Mamba (Vim, Zhu et al. 2024) as hustvl/Vim defines it: bidirectional Mamba ("bimamba v2")
blocks, a middle class token, and module names that load the official checkpoints with strict=True.

- vim-t / vim-s / vim-b: depth 24, patch 16, d_state 16, d_conv 4, expand 2, dt_rank = ceil(D / 16);
  D = 192 / 384 / 768. Weights: `vim_{t,s,b}_midclstok_*.pth` (under ckpt["model"]) from a local file, or
  from the Hugging Face hub (hustvl/Vim-{tiny,small,base}-midclstok) when online.
- vim-tiny-test: 2 layers of width 32, random init, for tests.
- vim-mini: 4 layers of width 48, patch 8 at 32 px, pretrained on the procedural glyphs task by
  `python -m backbones.pretrain`; its weights ship in backbones/weights/ (the offline mini-benchmark).
Forward: patch embed -> insert the class token at index M//2 -> + pos_embed -> [hook `tokens`] -> blocks with a fused
"add + RMSNorm" residual kept in fp32 -> norm_f -> the token at M//2 -> head.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from timm.layers import DropPath
from torch import nn

from .sites import ConvSite, HookSite, LayerSites, LinearSite, OutputSite, StateSite, TensorSite
from .ssm import causal_conv1d, selective_scan
from .weights import WeightsError, from_hub, load_torch_file, shipped_weights


@dataclass(frozen=True)
class VimSpec:
    dim: int
    depth: int = 24
    hub: tuple[str, str] | None = None  # (repo, file)
    patch_size: int = 16
    img_size: int = 224
    shipped: bool = False  # pretrained weights ship in backbones/weights/ (checked by SHA-256)


VIM_SPECS = {
    "vim-t": VimSpec(192, hub=("hustvl/Vim-tiny-midclstok", "vim_t_midclstok_76p1acc.pth")),
    "vim-s": VimSpec(384, hub=("hustvl/Vim-small-midclstok", "vim_s_midclstok_80p5acc.pth")),
    "vim-b": VimSpec(768, hub=("hustvl/Vim-base-midclstok", "vim_b_midclstok_81p9acc.pth")),
    "vim-tiny-test": VimSpec(32, depth=2),
    "vim-mini": VimSpec(48, depth=4, patch_size=8, img_size=32, shipped=True),
}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        x = x.float()
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()


class Mixer(nn.Module):
    """Bidirectional Mamba mixer: shared in_proj / out_proj, one conv, x_proj, dt_proj, A, D per direction.
    `state` / `state_b`: None, or a method's module that widens the direction's state (StateSite)."""

    def __init__(self, dim: int, d_state: int = 16, d_conv: int = 4, expand: int = 2):
        super().__init__()
        di, self.dt_rank, self.d_state = expand * dim, math.ceil(dim / 16), d_state
        self.in_proj = nn.Linear(dim, 2 * di, bias=False)
        for suffix in ("", "_b"):
            conv = nn.Conv1d(di, di, d_conv, groups=di, padding=d_conv - 1, bias=True)
            x_proj = nn.Linear(di, self.dt_rank + 2 * d_state, bias=False)
            dt_proj = nn.Linear(self.dt_rank, di, bias=True)
            _init_dt(dt_proj, self.dt_rank)
            A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(di, 1)
            self.add_module(f"conv1d{suffix}", conv)
            self.add_module(f"x_proj{suffix}", x_proj)
            self.add_module(f"dt_proj{suffix}", dt_proj)
            self.register_parameter(f"A{suffix}_log", nn.Parameter(torch.log(A)))
            self.register_parameter(f"D{suffix}", nn.Parameter(torch.ones(di)))
            setattr(self, f"state{suffix}", None)
        self.out_proj = nn.Linear(di, dim, bias=False)
        self.scan_input = None  # hook `scan`: a module (xz, suffix) -> k virtual tokens + xz, (b, 2 di, k + l)

    def scan(self, xz, suffix: str):
        """One direction: causal conv + SiLU, x_proj -> (dt, B, C), dt_proj (its bias is the delta bias),
        selective scan gated by SiLU(z). xz: (b, 2 di, l). With a `scan_input` hook, the k tokens it prepends
        run through the conv and the scan and their k outputs are dropped (MambaPEFT's inner prefix)."""
        l = xz.shape[-1]
        if self.scan_input is not None:
            xz = self.scan_input(xz, suffix)
        x, z = xz.chunk(2, dim=1)
        conv = getattr(self, f"conv1d{suffix}")
        x = causal_conv1d(x, conv.weight, conv.bias)
        x_dbl = getattr(self, f"x_proj{suffix}")(x.transpose(1, 2))  # (b, l, dt_rank + 2n)
        dt, B, C = x_dbl.split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        with torch.autocast(x.device.type, enabled=False):  # fp32, bias included (upstream: an fp32 delta_bias)
            dt = getattr(self, f"dt_proj{suffix}")(dt.float()).transpose(1, 2)  # W dt + b: softplus(.) in the scan
        A, B, C = -torch.exp(getattr(self, f"A{suffix}_log").float()), B.transpose(1, 2), C.transpose(1, 2)
        state = getattr(self, f"state{suffix}")
        if state is not None:  # extra state dimensions: A (di, n'), B, C (b, n', l)
            A, B, C = state(x, A, B, C)
        y = selective_scan(x, dt, A, B, C, getattr(self, f"D{suffix}"), z)
        return y if y.shape[-1] == l else y[..., -l:]

    def forward(self, h):
        xz = self.in_proj(h).transpose(1, 2)  # (b, 2 di, l)
        y = self.scan(xz, "") + self.scan(xz.flip(-1), "_b").flip(-1)
        return self.out_proj((y / 2).transpose(1, 2).to(h.dtype))


def _init_dt(dt_proj: nn.Linear, dt_rank: int, dt_min=1e-3, dt_max=0.1):
    """Mamba's dt init: weights uniform in +-dt_rank^-0.5, bias = softplus^-1(dt), dt log-uniform."""
    nn.init.uniform_(dt_proj.weight, -dt_rank ** -0.5, dt_rank ** -0.5)
    dt = torch.exp(torch.rand(dt_proj.out_features) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    with torch.no_grad():
        dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))


class Block(nn.Module):
    def __init__(self, dim: int, drop_path: float):
        super().__init__()
        self.norm = RMSNorm(dim)
        self.mixer = Mixer(dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, h, residual):
        residual = h.float() if residual is None else residual + self.drop_path(h).float()
        return self.mixer(self.norm(residual).to(h.dtype)), residual


class VisionMamba(nn.Module):
    def __init__(self, dim: int, depth: int, num_classes: int = 1000, img_size: int = 224, patch_size: int = 16,
                 drop_path_rate: float = 0.05):
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, patch_size, stride=patch_size)
        self.num_patches = (img_size // patch_size) ** 2
        self.token_position = self.num_patches // 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches + 1, dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        rates = [0.0] + torch.linspace(0, drop_path_rate, depth).tolist()  # layer i uses rates[i]
        self.layers = nn.ModuleList(Block(dim, rates[i]) for i in range(depth))
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()
        self.norm_f = RMSNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self.insert_tokens = None  # hook `tokens`: a module (x, class index) -> (x with tokens inserted, new index)

    def get_classifier(self) -> nn.Module:
        return self.head

    def no_weight_decay(self) -> set[str]:
        """Parameters timm's optimizer factory leaves undecayed (hustvl/Vim `vim/models_mamba.py` L378-379)."""
        return {"pos_embed", "cls_token"}

    def forward_features(self, x):
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        m = self.token_position
        x = torch.cat([x[:, :m], self.cls_token.expand(x.shape[0], -1, -1), x[:, m:]], dim=1) + self.pos_embed
        if self.insert_tokens is not None:
            x, m = self.insert_tokens(x, m)
        h, residual = x, None
        for layer in self.layers:
            h, residual = layer(h, residual)
        return self.norm_f(residual + self.drop_path(h).float())[:, m]

    def forward(self, x):
        return self.head(self.forward_features(x).to(self.head.weight.dtype))


def vim_sites(model: VisionMamba) -> list[LayerSites]:
    """Per layer: in_proj, x_proj, x_proj_b, dt_proj, dt_proj_b, out_proj (whole outputs); slices of the fused
    outputs, as MambaPEFT's partial LoRA: in_proj_x / in_proj_z (the x and z halves of in_proj), x_proj_dt /
    x_proj_B / x_proj_C and the same of x_proj_b (the dt, B, C rows); serial site `norm` (the block's RMSNorm
    output); hook `scan` (Mixer.scan_input: tokens prepended to each scan direction's input xz, width
    2 d_inner); state sites `state`, `state_b` (each scan direction's A, B, C); tensors (both scan directions
    each): A (A_log, A_b_log), D (D, D_b), conv1d (the two causal conv kernels), dt_bias (the two dt_proj
    biases, the scan's delta bias)."""
    layers = []
    for i, layer in enumerate(model.layers):
        m = layer.mixer
        linear = {name: LinearSite(m, name, getattr(m, name).in_features, slice(0, getattr(m, name).out_features))
                  for name in ("in_proj", "x_proj", "x_proj_b", "dt_proj", "dt_proj_b", "out_proj")}
        di, r, n = m.out_proj.in_features, m.dt_rank, m.d_state
        linear.update(in_proj_x=LinearSite(m, "in_proj", m.in_proj.in_features, slice(0, di)),
                      in_proj_z=LinearSite(m, "in_proj", m.in_proj.in_features, slice(di, 2 * di)))
        for s in ("", "_b"):
            for name, rows in (("dt", slice(0, r)), ("B", slice(r, r + n)), ("C", slice(r + n, r + 2 * n))):
                linear[f"x_proj{s}_{name}"] = LinearSite(m, f"x_proj{s}", di, rows)
        serial = {"norm": OutputSite(layer, "norm", m.out_proj.out_features)}
        state = {f"state{s}": StateSite(m, f"state{s}", getattr(m, f"A{s}_log")) for s in ("", "_b")}
        tensors = {"A": (TensorSite(m, "A_log"), TensorSite(m, "A_b_log")),
                   "D": (TensorSite(m, "D"), TensorSite(m, "D_b")),
                   "conv1d": (TensorSite(m.conv1d, "weight"), TensorSite(m.conv1d_b, "weight")),
                   "dt_bias": (TensorSite(m.dt_proj, "bias"), TensorSite(m.dt_proj_b, "bias"))}
        hooks = {"scan": HookSite(m, "scan_input", 2 * m.D.shape[0])}  # 2 d_inner, whatever wraps in_proj
        layers.append(LayerSites(index=i, linear=linear, serial=serial, tensors=tensors, state=state,
                                  hooks=hooks))
    return layers


def vim_model_sites(model: VisionMamba) -> dict:
    """`norm_f`: the final RMSNorm's output; `patch_embed`: the patch conv (channel-first; the causal convs have
    no site); the tensors `cls_token` and `pos_embed`; hook `tokens` (VisionMamba.insert_tokens: the embedded
    sequence, class token and positions included, before the first block; the class token is read where the
    hook says it is)."""
    proj, d = model.patch_embed.proj, model.head.in_features
    return {"norm_f": OutputSite(model, "norm_f", d),
            "patch_embed": ConvSite(model.patch_embed, "proj", proj.in_channels, proj.out_channels, proj.kernel_size,
                                    proj.stride, proj.padding),
            "cls_token": TensorSite(model, "cls_token"), "pos_embed": TensorSite(model, "pos_embed"),
            "tokens": HookSite(model, "insert_tokens", d)}


def create_vim(name: str, num_classes: int, pretrained: bool = True, weights: str | None = None,
               drop_path_rate: float = 0.05, img_size: int | None = None) -> VisionMamba:
    spec = VIM_SPECS[name]
    model = VisionMamba(spec.dim, spec.depth, num_classes, img_size=img_size or spec.img_size,
                        patch_size=spec.patch_size, drop_path_rate=drop_path_rate)
    if weights is None and pretrained and spec.shipped:
        weights = shipped_weights(name)
    if weights is None and pretrained and spec.hub is not None:
        from huggingface_hub import hf_hub_download
        weights = from_hub(f"{spec.hub[1]} of {spec.hub[0]}", lambda: hf_hub_download(*spec.hub))
    if weights is not None:
        load_vim_weights(model, weights)
    return model


def vim_hub_file(name: str) -> tuple[str, str] | None:
    return VIM_SPECS[name].hub


def load_vim_weights(model: VisionMamba, path: str | os.PathLike) -> None:
    """Load an official checkpoint (weights under ckpt["model"], read as data: weights.load_torch_file) or a
    .safetensors state dict strictly; the head is dropped when its class count differs and pos_embed is
    resized around the middle class token when the size differs."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            ckpt = load_torch_file(path)
            state = dict(ckpt.get("model", ckpt))
    except WeightsError:
        raise
    except Exception as e:  # a text file, a truncated download, a foreign pickle
        raise WeightsError(f"{path} is not a readable Vim checkpoint ({type(e).__name__}: {str(e)[:200]}); "
                           "pass the official vim_*_midclstok_*.pth (weights under ckpt['model'])") from e
    if not all(isinstance(state.get(k), torch.Tensor) for k in ("pos_embed", "head.weight")):
        raise WeightsError(f"{path} holds no Vim weights (no pos_embed / head.weight tensors); pass the official "
                           "vim_*_midclstok_*.pth")
    model.head_loaded = state.get("head.weight") is not None and state["head.weight"].shape == model.head.weight.shape
    if state.get("head.weight") is not None and not model.head_loaded:
        state["head.weight"], state["head.bias"] = model.head.weight.detach(), model.head.bias.detach()
    try:
        if state["pos_embed"].shape != model.pos_embed.shape:
            state["pos_embed"] = resize_pos_embed(state["pos_embed"], model.num_patches)
        model.load_state_dict(state, strict=True)
    except (RuntimeError, ValueError) as e:
        raise WeightsError(f"{path} does not fit {type(model).__name__}: {e}") from e


def resize_pos_embed(pos: torch.Tensor, num_patches: int) -> torch.Tensor:
    """Bicubic resize of the patch positions; the class slot is index M//2 (not 0, as the official
    fine-tuning code assumes; a no-op at 224 px)."""
    old = pos.shape[1] - 1
    cls_at = old // 2
    cls, patches = pos[:, cls_at:cls_at + 1], torch.cat([pos[:, :cls_at], pos[:, cls_at + 1:]], dim=1)
    g_old, g_new = int(math.isqrt(old)), int(math.isqrt(num_patches))
    grid = patches.reshape(1, g_old, g_old, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(g_new, g_new), mode="bicubic", align_corners=False)
    patches = grid.permute(0, 2, 3, 1).reshape(1, num_patches, -1)
    m = num_patches // 2
    return torch.cat([patches[:, :m], cls, patches[:, m:]], dim=1)


def vim_head(model: VisionMamba) -> nn.Module:
    return model.head
