"""A method's pre-pass on the training split at attach time (SCT's salient channels, GPS's gradient selection):
the split handed to it (TrainingData, set by `training_data` around building the model), and its record."""
from __future__ import annotations

import hashlib
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..data import IMAGENET_MEAN, IMAGENET_STD
from ..errors import UserError
from .wrappers import current_method


class NeedsTrainingData(UserError, ValueError):
    """A method with a pre-pass on the training split was built without the split."""


@dataclass(frozen=True)
class TrainingData:
    """The training split for a method's pre-pass at attach time (SCT's salient channels, GPS's gradient
    selection). `batches(batch_size, shuffle)` iterates (x, y) over the whole split once: x float (B, 3, H, W)
    in [0, 1] at the run's image size (no augmentation; `inputs(x)` normalises it as training does), y int64
    labels; with `shuffle`, the order follows `seed` (so does any other randomness of a pre-pass); `device`:
    where the batches are (a pre-pass runs the model there, `TrainingData.on`)."""

    batches: Callable[[int, bool], Any]
    seed: int = 0
    device: str = "cpu"
    normalize: bool = False

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        """x in [0, 1] as the model reads it in training (ImageNet-normalised when the run normalises)."""
        if not self.normalize:
            return x
        mean, std = (torch.tensor(v, device=x.device, dtype=x.dtype).view(1, 3, 1, 1) for v in (IMAGENET_MEAN,
                                                                                               IMAGENET_STD))
        return (x - mean) / std

    @contextmanager
    def on(self, model: nn.Module, train: bool = False):
        """Within the block the model (in eval mode, or train mode with `train`) is on the batches' device; then
        back as it was."""
        device, training = next(model.parameters()).device, model.training
        model.to(self.device).train(train)
        try:
            yield
        finally:
            model.to(device).train(training)


FROM_FILE = "from-file"  # load_model: the selection is read from the adapter file, no pre-pass
SELECTION = "selection"  # the buffer name of a pre-pass's selection: saved and loaded with the adapter
_DATA: list[TrainingData | str | None] = [None]


@contextmanager
def training_data(data: TrainingData | str | None):
    """Within the block, methods attaching read `data` (TrainingData, or FROM_FILE while load_model rebuilds)."""
    _DATA.append(data)
    try:
        yield
    finally:
        _DATA.pop()


def prepass_data(what: str) -> TrainingData | None:
    """The training split for the current method's pre-pass (`what` it selects, for the error); None while
    load_model rebuilds a saved model (the selection buffers are then loaded from the adapter file)."""
    data = _DATA[-1]
    if data == FROM_FILE:
        return None
    if data is None:
        raise NeedsTrainingData(f"{current_method() or 'this method'} selects {what} from the training split before "
                                "it trains: build it through `python -m vtab_lily.run` (or pass "
                                "data=TrainingData(...) to build_model)")
    return data


def record_prepass(model: nn.Module, what: str, k: int, selections: list[torch.Tensor]) -> None:
    """Keep a pre-pass's summary on the model, for the run's record: what it selected, k, how many entries and the
    SHA-256 of their indices (int64, concatenated in order)."""
    joined = torch.cat([t.flatten() for t in selections]).to("cpu", torch.int64)
    if not hasattr(model, "prepass"):
        model.prepass = {}
    model.prepass[current_method() or "method"] = {"what": what, "k": k, "count": joined.numel(),
                                                   "sha256": hashlib.sha256(joined.numpy().tobytes()).hexdigest()}
