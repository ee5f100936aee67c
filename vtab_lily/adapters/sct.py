"""SCT (Salient Channel Tuning, Zhao et al. 2023), as its official code (zhaohengyuan1/SCT, mode `sct_attn`, the one
its `run_model_sct.sh` L7 runs and V-PETL Bench's `train/train_model_sct.py` L176 defaults to).

Pre-pass (`train_model_sct.py` getSalientChannels L22-111, called at L219 on the un-augmented training split,
batch 50, L216): the plain pretrained model (eval, drop_path 0) reads the training split; per block, the stream
after the attention's residual sum (the input of norm2, L40, L71) is kept without the class token (L34
`[:, 1:, :]`); per class present, the L2 norm of each channel over that class's images and tokens (L82
`torch.norm(.., dim=(0, 1))`); their mean over the classes (L89); the K channels above the (K+1)-th largest
(L106-108: the top K, ascending order). Here the same pass runs at attach time on the run's training split
(adapters/base.TrainingData: its inputs as training reads them, un-augmented), in float64 sums; the chosen
channels are the buffer `selection` (K per block), saved with the adapter, and their count and SHA-256 go into the
run's record (`prepass`).

Tuning (`models/vision_transformer_sct.py` ChannelAdapter L272-307, Block.forward L343-346): after the
attention's residual sum, x[..., idx] += Linear(K, K)(x[..., idx]) (site `after_attn`), the Linear with weight
trunc_normal(std .02) and a zero bias (L286-290), so the model is not the backbone at init. The config's `scale`
and `scaleonx` are unused: their lines in forward are commented out (L299-302, "this is for test time" L304).
Parameters on ViT-B/16 at K = 96: 12 x (96*96 + 96) = 111,744.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from backbones import adapter_sites, model_sites

from ..options import OptionError, option
from .base import SELECTION, add_stream, prepass_data, record_prepass, register


@dataclass
class SCTConfig:
    k: int = option(96, "salient channels per block, chosen on the training split (run_model_sct.sh L6 topN=96)",
                    (1, None))


class ChannelTuning(nn.Module):
    """f(s): zero but on the K selected channels, where it is Linear(K, K)(s[..., selection])."""

    def __init__(self, k: int):
        super().__init__()
        self.linear = nn.Linear(k, k)
        nn.init.trunc_normal_(self.linear.weight, std=0.02)
        nn.init.zeros_(self.linear.bias)
        self.register_buffer(SELECTION, torch.arange(k))  # set by the pre-pass or loaded with the adapter

    def forward(self, s):
        idx = getattr(self, SELECTION)
        return s.new_zeros(s.shape).index_copy(-1, idx, self.linear(s.index_select(-1, idx)).to(s.dtype))


@torch.no_grad()
def salient_channels(model: nn.Module, sites, prefix: int, batches, k: int) -> list[torch.Tensor]:
    """Per stream site, the k channels of the largest class-mean L2 norm over `batches` (ascending); the model
    reads them as it is (eval mode: `TrainingData.on`)."""
    squares: list[dict[int, torch.Tensor]] = [{} for _ in sites]  # per site: class -> sum of squares per channel
    seen, batch = {}, {}
    handles = []
    for i, site in enumerate(sites):
        def enter(module, args, i=i):
            seen[i] = args[0]

        def leave(module, args, out, i=i):
            stream = (seen.pop(i) + out)[:, prefix:].double()  # the stream after the sum, class token left out
            labels = batch["labels"]
            for c in labels.unique().tolist():
                total = stream[labels == c].square().sum(dim=(0, 1))
                squares[i][c] = squares[i].get(c, 0) + total
        handles += [getattr(site.parent, site.read_attr).register_forward_pre_hook(enter),
                    getattr(site.parent, site.write_attr).register_forward_hook(leave)]
    try:
        for x, batch["labels"] in batches:
            model(x)
    finally:
        for h in handles:
            h.remove()
    picks = []
    for per_class in squares:
        fea = torch.stack([per_class[c].sqrt() for c in sorted(per_class)]).mean(0)
        picks.append(fea.topk(k).indices.sort().values.cpu())
    return picks


@register("sct", SCTConfig)
def attach_sct(model: nn.Module, cfg: SCTConfig) -> None:
    sites = [layer.get("after_attn") for layer in adapter_sites(model)]
    if cfg.k > sites[0].d:
        raise OptionError(f"sct k must be at most the width {sites[0].d}, got {cfg.k}")
    data = prepass_data("its salient channels")
    branches = [ChannelTuning(cfg.k) for _ in sites]
    if data is not None:
        with data.on(model):
            batches = ((data.inputs(x), y) for x, y in data.batches(50, False))
            picks = salient_channels(model, sites, model_sites(model)["blocks"].prefix, batches, cfg.k)
        for branch, idx in zip(branches, picks):
            getattr(branch, SELECTION).copy_(idx)
        record_prepass(model, "salient channels per block (after the attention)", cfg.k, picks)
    for site, branch in zip(sites, branches):
        add_stream(site, branch)
