"""GPS (Gradient-based Parameter Selection, Zhang et al. CVPR 2024), as its official code (FightingFighting/GPS).

Pre-pass (`train_gps.py` L483-489, calculate_gradient L572-627, `utils/pruning.py` L5-40): one pass over the
training split, shuffled, batch 32 (`train_scripts/vit/vtab/<task>/train_gps.sh` bz=32, timm's training loader:
the last incomplete batch dropped), each image as two augmented views (`--contrast-aug`:
`data/transforms_factory.py` transforms_contrastaug_train L80-110: RandomResizedCrop (0.08-1, 3/4-4/3),
horizontal flip, colour jitter (0.4, 0.4, 0.4, 0.1) with p 0.8, grayscale with p 0.2); the loss is the supervised
contrastive loss (`--contrastive`, `utils/loss_utils.py` SupConLoss, temperature 0.07) of the pre-head features
(the class token after the final norm, `models/vision_transformer.py` L549-556); gradients add up over the
batches. Per weight matrix (every Linear and the patch convolution, its kernel flattened per output channel,
pruning.py L15-20), each output row keeps its k = `times_para` entries of the largest |gradient| (L23-28).
Here the pass runs at attach time on the run's training split (adapters/base.TrainingData, normalised as the run),
in train mode as theirs (drop path at the run's rate: their per-task --drop-path), its randomness (order, views,
drop path) drawn from the run's seed; the selection is the buffer `selection` of each weight's delta, saved with
the adapter, and its count and SHA-256 go into the run's record (`prepass`).

Tuning (pruning.py L10-13, `utils/cuda.py` L25-29 maks_gradient: the gradient of every unselected entry is
zeroed; their optimizer is Adam with weight decay 0, train_gps.sh): the selected entries train, as a zero-init
delta on them (the same updates under Adam without decay); every bias of those Linears and the convolution trains
in place (mask 0 for "bias", L12), the norms, class token and position embedding stay frozen (L10). GPS combines
with no adapter in its ViT code (`--tuning-mode part`). At init the model is the backbone.
Parameters on ViT-B/16 at k = 1: weights 768 (patch) + 12 x (2304 + 768 + 3072 + 768) = 83,712 rows, biases as
many: 167,424.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torchvision.transforms import v2

from backbones import head_of

from ..options import OptionError, option
from .base import SELECTION, Switch, TrainingData, prepass_data, record_prepass, register


@dataclass
class GPSConfig:
    k: int = option(1, "weight entries tuned per output row, by largest |gradient| (train_gps.sh --times_para 1)",
                    (1, None))
    prepass_batch: int = option(32, "batch of the gradient pass (train_gps.sh bz=32, their training batch too)",
                                (2, None))
    loss: Literal["supcon", "ce"] = option("supcon", "the gradient pass's loss: supcon (train_gps.sh --contrastive) "
                                           "or ce (cross-entropy on the un-augmented images)")
    temperature: float = option(0.07, "SupCon's temperature (SupConLoss(temperature=0.07), loss_utils.py L9)",
                                (1e-6, None))


class SparseDelta(Switch, nn.Module):
    """A parametrization: the frozen weight plus a learnable delta on k entries per output row (`selection`, the
    entries' columns in the row flattened), zero at init."""

    def __init__(self, weight: torch.Tensor, k: int):
        super().__init__()
        rows = weight.shape[0]
        self.values = nn.Parameter(torch.zeros(rows, k, dtype=weight.dtype))
        self.register_buffer(SELECTION, torch.zeros(rows, k, dtype=torch.int64))
        self.enabled = True

    def forward(self, frozen):
        if not self.enabled:
            return frozen
        flat = frozen.reshape(len(frozen), -1)
        return flat.scatter_add(1, getattr(self, SELECTION), self.values.to(flat.dtype)).view_as(frozen)


def sup_con(features: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """SupConLoss (loss_utils.py L17-97, contrast_mode 'all', base_temperature = temperature): features (b, 2, d)."""
    f = F.normalize(features, dim=2)
    z = torch.cat(f.unbind(1))
    logits = z @ z.T / temperature
    logits = logits - logits.max(1, keepdim=True).values.detach()
    lab = labels.repeat(2)
    off_self = 1 - torch.eye(len(z), device=z.device, dtype=z.dtype)
    positive = (lab[:, None] == lab[None]).to(z.dtype) * off_self
    log_prob = logits - torch.log((torch.exp(logits) * off_self).sum(1, keepdim=True))
    return (-(positive * log_prob).sum(1) / positive.sum(1)).mean()


def two_views(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """transforms_contrastaug_train applied twice to each image of x (B, 3, H, W) in [0, 1]."""
    size = x.shape[-2:]
    augment = v2.Compose([v2.RandomResizedCrop(size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), antialias=True),
                          v2.RandomHorizontalFlip(), v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
                          v2.RandomGrayscale(p=0.2)])
    views = [torch.stack([augment(img) for img in x.cpu()]).to(x.device) for _ in range(2)]
    return views[0], views[1]


def weight_gradients(model: nn.Module, modules: list[nn.Module], data: TrainingData, cfg: GPSConfig) -> list:
    """calculate_gradient: the gradients of the modules' weights, summed over the pass (module docstring)."""
    weights = [m.weight for m in modules]
    for w in weights:
        w.requires_grad_(True)
    sums = [torch.zeros_like(w) for w in weights]
    try:
        for x, y in data.batches(cfg.prepass_batch, True):
            if len(y) < cfg.prepass_batch:  # timm's training loader drops the last incomplete batch
                continue
            if cfg.loss == "supcon":
                a, b = two_views(x)
                feats = model.forward_head(model.forward_features(data.inputs(torch.cat([a, b]))), pre_logits=True)
                loss = sup_con(torch.stack(feats.split(len(y)), 1), y, cfg.temperature)
            else:
                loss = F.cross_entropy(model(data.inputs(x)), y)
            for s, g in zip(sums, torch.autograd.grad(loss, weights)):
                s += g
    finally:
        for w in weights:
            w.requires_grad_(False)
    return sums


@register("gps", GPSConfig)
def attach_gps(model: nn.Module, cfg: GPSConfig) -> None:
    head = set(head_of(model).modules())
    modules = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and m not in head]
    too_wide = [m for m in modules if cfg.k > m.weight[0].numel()]
    if too_wide:
        raise OptionError(f"gps k must be at most a weight row's length {too_wide[0].weight[0].numel()}, got {cfg.k}")
    data = prepass_data("the weights it tunes")
    deltas = [SparseDelta(m.weight, cfg.k) for m in modules]
    if data is not None:
        cuda = [data.device] if str(data.device).startswith("cuda") else []
        with data.on(model, train=True), torch.random.fork_rng(devices=cuda):
            torch.manual_seed(data.seed)
            grads = weight_gradients(model, modules, data, cfg)
        for delta, g in zip(deltas, grads):
            getattr(delta, SELECTION).copy_(g.reshape(len(g), -1).abs().topk(cfg.k, dim=1).indices.sort(1).values)
        record_prepass(model, f"{cfg.k} weight entries per output row (largest |gradient|, {cfg.loss})", cfg.k,
                       [getattr(d, SELECTION) for d in deltas])
    for m, delta in zip(modules, deltas):
        parametrize.register_parametrization(m, "weight", delta.to(m.weight.device))
        if isinstance(m.bias, nn.Parameter) and not m.bias.requires_grad:
            m.bias = nn.Parameter(m.bias.detach().clone())
