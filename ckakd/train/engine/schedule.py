"""The optimizer (:func:`build_optimizer`) and the learning-rate schedules: the per-epoch schedule with its linear
warmup (:func:`lr_at_epoch`, :func:`lr_factor`) and the step warmup on top of it (:func:`apply_step_warmup`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from .settings import TrainSettings

__all__ = ["apply_step_warmup", "build_optimizer", "lr_at_epoch", "lr_factor"]


def lr_at_epoch(settings: TrainSettings, epoch: int) -> float:
    """Learning rate used during (0-based) ``epoch``: linear warmup ``lr·(e+1)/W`` for ``e < W``, then

    - ``"step"``: ``lr · gamma^(number of milestones <= e)``,
    - ``"cosine"``: ``lr · ½(1 + cos(π (e − W) / (epochs − W)))``,
    - ``"constant"``: ``lr``.
    """
    return settings.optim.lr * lr_factor(settings, epoch)


def lr_factor(settings: TrainSettings, epoch: int) -> float:
    """The factor of ``optim.lr`` during (0-based) ``epoch`` (see :func:`lr_at_epoch`)."""
    s = settings.schedule
    w = int(s.warmup_epochs)
    if epoch < w:
        return (epoch + 1) / w
    if s.kind == "step":
        return float(s.gamma) ** sum(1 for m in s.milestones if epoch >= m)
    if s.kind == "cosine":
        span = max(int(s.epochs) - w, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(epoch - w, span) / span))
    return 1.0


def apply_step_warmup(optimizer: Any, scheduler: Any, global_step: int, warmup_steps: int) -> None:
    """``warmup_steps``: scale the scheduled lr by 0.1 -> 1 linearly over the first optimizer steps (detectors
    diverge without it); the epoch schedule's own lr is restored after the warmup."""
    w = int(warmup_steps)
    if w <= 0 or global_step > w:
        return
    factor = 1.0 if global_step == w else 0.1 + 0.9 * global_step / w
    for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr(), strict=True):
        group["lr"] = lr * factor


def build_optimizer(params: Sequence[nn.Parameter], settings: TrainSettings) -> torch.optim.Optimizer:
    """``settings.optim`` over ``params``: SGD (momentum, weight decay, Nesterov) or AdamW."""
    s = settings.optim
    if s.name == "sgd":
        return torch.optim.SGD(params, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay, nesterov=s.nesterov)
    return torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
