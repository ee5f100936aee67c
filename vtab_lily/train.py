"""fit / evaluate: the paper's training loop, with resumable state and a guard against NaN losses.

As the official code: AdamW on the trainable parameters, timm's CosineLRScheduler stepped with the
epoch index after each epoch (so epoch e trains at the scheduler's value for e - 1, and the first two
epochs at warmup_lr_init), evaluation every `eval_every` epochs and after the last one. A recipe with
`lr_schedule="mmengine"` (MambaPEFT) warms up per iteration instead (`WarmupCosine`), and `clip_grad` clips
the gradients' total norm before each step.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import pickle
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from timm.scheduler.cosine_lr import CosineLRScheduler
from torch import nn
from tqdm import tqdm

from backbones.weights import UnsafeCheckpoint, load_torch_file

from .data import Batches, to_float
from .errors import write_errors
from .fileio import atomic_path, warn
from .model import param_groups
from .recipes import Recipe


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite."""


class Interrupted(RuntimeError):
    """Training stopped on request after an epoch, its resumable state saved (tests, preemption)."""


def make_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, recipe.weight_decay, recipe.no_decay_1d, recipe.no_decay),
                             lr=recipe.lr)


class WarmupCosine:
    """MambaPEFT's schedule (`_my_base_/schedules/vtab1k_bs32_adamw.py` L21-32), in closed form: mmengine's
    LinearLR (start_factor = warmup_lr_init / lr, by iteration over the first warmup_epochs x steps_per_epoch
    iterations: iteration i trains at lr x (f + (1 - f) i / (T - 1)), T those iterations; mmengine
    `optim/scheduler/param_scheduler.py` L758 total_iters = end - begin - 1, L789-802), then
    CosineAnnealingLR stepped per epoch (begin = warmup_epochs, end = epochs: the runner's default end,
    `runner/runner.py` L1171-1173; T_max = end - begin, L638): epoch e >= warmup_epochs trains at
    lr_min + (lr - lr_min) (1 + cos(pi (e - warmup_epochs) / T_max)) / 2 (L680-705, its chained form).
    The same interface as timm's scheduler in `fit`: step_update(n) after the n-th optimizer step,
    step(epoch) after epoch `epoch` (0-based)."""

    def __init__(self, optimizer, recipe: Recipe, steps_per_epoch: int):
        self.optimizer, self.steps_per_epoch = optimizer, steps_per_epoch
        self.lr, self.lr_min = recipe.lr, recipe.lr_min
        self.warmup_epochs, self.epochs = recipe.warmup_epochs, recipe.epochs
        self.start_factor = recipe.warmup_lr_init / recipe.lr
        self.updates, self.epoch = 0, 0
        self._apply()

    def value(self, epoch: int, update: int) -> float:
        """The learning rate of the optimizer step after `update` steps, in epoch `epoch`."""
        warmup = self.warmup_epochs * self.steps_per_epoch
        if update < warmup:
            f = self.start_factor
            return self.lr * (f + (1 - f) * update / max(warmup - 1, 1))
        t_max = max(self.epochs - self.warmup_epochs, 1)
        cosine = (1 + math.cos(math.pi * (epoch - self.warmup_epochs) / t_max)) / 2
        return self.lr_min + (self.lr - self.lr_min) * cosine

    def _apply(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.value(self.epoch, self.updates)

    def step_update(self, num_updates: int) -> None:
        self.updates = num_updates
        self._apply()

    def step(self, epoch: int) -> None:
        self.epoch = epoch + 1
        self._apply()

    def state_dict(self) -> dict:
        return {"updates": self.updates, "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.updates, self.epoch = state["updates"], state["epoch"]
        self._apply()


def make_scheduler(optimizer, recipe: Recipe, steps_per_epoch: int):
    """`timm`: the Lily / Vim codes' CosineLRScheduler stepped per epoch (module docstring); `mmengine`:
    MambaPEFT's per-iteration warm-up and per-epoch cosine (WarmupCosine)."""
    if recipe.lr_schedule == "mmengine":
        return WarmupCosine(optimizer, recipe, steps_per_epoch)
    return CosineLRScheduler(optimizer, t_initial=recipe.epochs, warmup_t=recipe.warmup_epochs,
                             warmup_lr_init=recipe.warmup_lr_init, lr_min=recipe.lr_min)


def _autocast(device: torch.device, precision: str):
    if device.type == "cuda" and precision == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class Evaluation(NamedTuple):
    acc: float  # top-1 accuracy (percent)
    loss: float  # mean cross-entropy
    preds: torch.Tensor  # [N] int64 on the CPU: the predicted label of each image, in the split's order


@torch.no_grad()
def evaluate(model: nn.Module, batches: Batches, recipe: Recipe) -> Evaluation:
    """Top-1 accuracy, mean cross-entropy and the predicted labels (the batches in the split's order); sums and
    predictions stay on the device until one host transfer at the end."""
    model.eval()
    loss, preds, labels = torch.zeros(1, dtype=torch.float64, device=batches.device), [], []
    for x, y in batches:
        with _autocast(batches.device, recipe.precision):
            logits = model(to_float(x, recipe.normalize)).float()
        preds.append(logits.argmax(-1))
        labels.append(y)
        loss += F.cross_entropy(logits, y, reduction="sum")
    predicted = torch.cat(preds)
    n = len(predicted)
    host = torch.cat([(predicted == torch.cat(labels)).sum(dtype=torch.float64).view(1), loss,
                      predicted.to(torch.float64)]).cpu().numpy()  # labels < 2^53: exact in float64
    return Evaluation(100.0 * float(host[0]) / n, float(host[1]) / n, torch.from_numpy(host[2:].astype(np.int64)))


@dataclass
class History:
    evaluations: list = field(default_factory=list)  # {"epoch", "acc", "loss"}
    predictions: list = field(default_factory=list)  # per evaluation: [N] int tensor, the predicted labels
    lrs: list = field(default_factory=list)  # lr used in each epoch
    train_losses: list = field(default_factory=list)  # mean training loss per epoch
    train_time_s: float = 0.0
    train_images: int = 0
    wall_time_s: float = 0.0  # all sessions of a resumed run together

    def summary(self) -> dict:
        """The record's result fields: best = the highest accuracy over all evaluations (earliest on ties)."""
        best = max(self.evaluations, key=lambda e: e["acc"])
        return dict(evaluations=self.evaluations, lrs=self.lrs, train_losses=self.train_losses,
                    best_acc=best["acc"], best_epoch=best["epoch"], final_acc=self.evaluations[-1]["acc"],
                    wall_time_s=self.wall_time_s, train_time_s=self.train_time_s, train_images=self.train_images,
                    images_per_s=self.train_images / max(self.train_time_s, 1e-9))


def _state(model, optimizer, scheduler, epoch: int, history: History, device: torch.device) -> dict:
    return {"epoch": epoch, "trainable": {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad},
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,  # this run's GPU only
            "history": history.__dict__}


def restore_cuda_rng(saved, device: torch.device) -> None:
    """Put back the CUDA generator of the run's GPU. States saved before one entry per visible GPU
    (get_rng_state_all) give their first, so a resume with fewer GPUs visible (a one-GPU sweep worker) works."""
    if saved is None or device.type != "cuda":
        return
    torch.cuda.set_rng_state(saved[0] if isinstance(saved, list) else saved, device)


def save_state(path: Path, state: dict) -> None:
    """Tensors and plain values only, so that it loads with weights_only=True (load_torch_file)."""
    with atomic_path(path) as tmp, write_errors(path):
        torch.save(state, tmp)


class DamagedState(ValueError):
    """A resumable state file that cannot be loaded or does not fit this run."""


# what torch.load raises on an empty, truncated or foreign file (a truncated archive: OSError EINVAL from its
# reader); UnsafeCheckpoint: a global outside the allow-list; DamagedState (a ValueError): not this run's state
UNREADABLE = (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError,
              UnsafeCheckpoint)


def _check_state(state, model: nn.Module) -> None:
    """Raise DamagedState unless `state` is what `_state` saved for this model."""
    if not isinstance(state, dict):
        raise DamagedState(f"it holds a {type(state).__name__}, not a state dict")
    missing = {"epoch", "trainable", "optimizer", "scheduler", "rng_cpu", "rng_cuda", "history"} - set(state)
    if missing:
        raise DamagedState(f"it lacks {sorted(missing)}")
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    saved = state["trainable"]
    if not isinstance(saved, dict) or set(saved) != set(trainable) or any(
            not isinstance(saved[n], torch.Tensor) or saved[n].shape != p.shape for n, p in trainable.items()):
        raise DamagedState("its trainable tensors do not match this model's")
    rng = state["rng_cpu"]
    if not (isinstance(rng, torch.Tensor) and rng.dtype == torch.uint8 and rng.shape == torch.get_rng_state().shape):
        raise DamagedState("its CPU random state is not a generator state")
    opt = state["optimizer"]
    if not (isinstance(opt, dict) and isinstance(opt.get("state"), dict) and isinstance(opt.get("param_groups"), list)
            and isinstance(state["scheduler"], dict)):
        raise DamagedState("its optimizer or scheduler state is not a state dict")
    names = {f.name for f in dataclasses.fields(History)}
    if not (isinstance(state["history"], dict) and set(state["history"]) == names
            and isinstance(state["history"]["lrs"], list)):
        raise DamagedState("its history does not have the fields of History (a state saved before the history "
                           "kept its predictions is one)")
    preds = state["history"]["predictions"]
    if not (isinstance(preds, list) and len(preds) == len(state["history"]["evaluations"])
            and all(isinstance(p, torch.Tensor) and p.dim() == 1 for p in preds)):
        raise DamagedState("its predictions do not match its evaluations")
    if not (isinstance(state["epoch"], int) and 0 < state["epoch"] == len(state["history"]["lrs"])):
        raise DamagedState(f"its epoch {state['epoch']!r} does not match its history")


def restore_state(path: Path, model: nn.Module, optimizer, scheduler, device: torch.device) -> tuple[History, int]:
    """(history, epoch to start at) from a resumable state file. A damaged file (empty, truncated, unloadable,
    refused by the allow-list, or not this run's) is named in a warning and moved aside to
    `<name>.damaged`, and the run starts at epoch 0, as a fresh run."""
    try:
        state = load_torch_file(path)
        _check_state(state, model)
        optimizer.load_state_dict(state["optimizer"])  # checks its groups before it changes anything
    except UNREADABLE as e:
        aside = path.with_name(path.name + ".damaged")
        os.replace(path, aside)
        warn(f"the resumable state {path} is damaged ({type(e).__name__}: {' '.join(str(e).split())[:300]}); "
             f"moved it to {aside} and starting this run at epoch 0")
        return History(), 0
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(state["trainable"][n])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng_cpu"])
    restore_cuda_rng(state["rng_cuda"], device)
    return History(**state["history"]), state["epoch"]


@contextlib.contextmanager
def tf32(device: torch.device, enabled: bool):
    """On CUDA, TF32 matmuls and convolutions on (precision "tf32") or off (fp32, as the official codes train)
    within the block; the process's flags as they were after it. Nothing changes on other devices."""
    if device.type != "cuda":
        yield
        return
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def fit(model: nn.Module, train: Batches, test: Batches, recipe: Recipe, state_path: Path | None = None,
        interrupt_after: int | None = None, progress: bool = True, on_epoch=()) -> History:
    """Train `model` with `recipe`, evaluating on `test`; resume from `state_path` when it exists.
    Each callable in `on_epoch` gets {"epoch", "lr", "train_loss"[, "acc", "loss"]} after every epoch."""
    optimizer = make_optimizer(model, recipe)
    scheduler = make_scheduler(optimizer, recipe, len(train))
    trainable = [p for g in optimizer.param_groups for p in g["params"]]
    history, start = History(), 0
    session = time.perf_counter()
    if state_path is not None and state_path.exists():
        history, start = restore_state(state_path, model, optimizer, scheduler, train.device)
        if start:  # said in the log of a requeued cluster job, too
            print(f"resumed from {state_path} after epoch {start}", flush=True)
    wall_before = history.wall_time_s
    with tf32(train.device, recipe.precision == "tf32"):
        for epoch in range(start, recipe.epochs):
            model.train()
            train.set_epoch(epoch)
            lr = optimizer.param_groups[-1]["lr"]  # the lr of the epoch's first step
            bar = tqdm(train, desc=f"epoch {epoch + 1}/{recipe.epochs}", leave=False, disable=not progress)
            t, losses = time.perf_counter(), []
            for step, (x, y) in enumerate(bar):
                with _autocast(train.device, recipe.precision):
                    loss = F.cross_entropy(model(to_float(x, recipe.normalize)).float(), y,
                                           label_smoothing=recipe.label_smoothing)
                value = loss.item()  # the one host sync of a step
                if not math.isfinite(value):
                    raise NonFiniteLoss(f"the training loss became {value} at epoch {epoch + 1}, step {step + 1} "
                                        f"(lr {lr:.3g}); lower the learning rate or the adapter scale and run again")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if recipe.clip_grad is not None:  # mmengine OptimWrapper._clip_grad: clip_grad_norm_ over all params
                    torch.nn.utils.clip_grad_norm_(trainable, recipe.clip_grad)
                optimizer.step()
                scheduler.step_update(epoch * len(train) + step + 1)  # timm's: a no-op for its per-epoch schedule
                losses.append(value)
                history.train_images += len(y)
                bar.set_postfix(loss=f"{value:.3f}", lr=f"{lr:.2e}")
            history.train_time_s += time.perf_counter() - t
            history.lrs.append(lr)
            history.train_losses.append(sum(losses) / len(losses))
            scheduler.step(epoch)
            done = epoch + 1
            metrics = {"epoch": done, "lr": lr, "train_loss": history.train_losses[-1]}
            if done % recipe.eval_every == 0 or done == recipe.epochs:
                acc, test_loss, preds = evaluate(model, test, recipe)
                history.evaluations.append({"epoch": done, "acc": acc, "loss": test_loss})
                history.predictions.append(preds.to(torch.int32))
                metrics.update(acc=acc, loss=test_loss)
            for callback in on_epoch:
                callback(metrics)
            history.wall_time_s = wall_before + time.perf_counter() - session
            stop = interrupt_after is not None and done == interrupt_after and done < recipe.epochs
            if state_path is not None and (done % recipe.checkpoint_every == 0 or stop) and done < recipe.epochs:
                save_state(state_path, _state(model, optimizer, scheduler, done, history, train.device))
            if stop:
                raise Interrupted(f"stopped after epoch {done}; run again to resume")
        return history
