"""The optimizer (:func:`build_optimizer`, parameter groups included) and the learning-rate schedules: the
built-in per-epoch schedule with its linear warmup (:func:`lr_at_epoch`, :func:`lr_factor`) or a
:mod:`torch.optim.lr_scheduler` class (:func:`build_scheduler`, stepped by :func:`step_scheduler`), and the step
warmup on top of either (:func:`apply_step_warmup`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from .optim import assign_param_groups, optimizer_class, optimizer_kwargs, scheduler_class
from .settings import TrainSettings

__all__ = [
    "apply_step_warmup",
    "build_optimizer",
    "build_scheduler",
    "is_plateau",
    "lr_at_epoch",
    "lr_factor",
    "step_scheduler",
]


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


def build_optimizer(
    params: Sequence[nn.Parameter], settings: TrainSettings, names: Sequence[str] | None = None
) -> torch.optim.Optimizer:
    """``settings.optim`` over ``params``: the built-in SGD (momentum, weight decay, Nesterov) or AdamW, or any
    optimizer class (see :mod:`~ckakd.train.engine.optim`) with ``optim.kwargs``. With ``optim.param_groups``,
    ``names`` (one per parameter, :func:`~ckakd.train.engine.optim.trainable_names`) are matched against each
    group's globs: the default group (the unmatched parameters, first) and then each group in order."""
    s = settings.optim
    cls = optimizer_class(s.name)
    fields = {"lr": s.lr, "weight_decay": s.weight_decay, "momentum": s.momentum, "nesterov": s.nesterov}
    kwargs = optimizer_kwargs(cls, s.name, fields, s.kwargs)
    if not s.param_groups:
        return cls(params, **kwargs)
    if names is None or len(names) != len(params):
        raise ValueError("optim.param_groups need the parameter names (one per parameter)")
    owner = assign_param_groups(names, [g.params for g in s.param_groups])
    groups: list[dict[str, Any]] = []
    default = [p for p, o in zip(params, owner, strict=True) if o < 0]
    if default:
        groups.append({"params": default})
    for i, g in enumerate(s.param_groups):
        group: dict[str, Any] = {"params": [p for p, o in zip(params, owner, strict=True) if o == i], **g.kwargs}
        if g.lr is not None:
            group["lr"] = g.lr
        if g.weight_decay is not None:
            group["weight_decay"] = g.weight_decay
        groups.append(group)
    return cls(groups, **kwargs)


def is_plateau(scheduler: Any) -> bool:
    """Whether ``scheduler`` steps on a metric (``ReduceLROnPlateau``)."""
    return isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)


def build_scheduler(optimizer: torch.optim.Optimizer, settings: TrainSettings) -> Any:
    """The schedule of ``settings.schedule`` over ``optimizer``: the built-in one as a ``LambdaLR`` of
    :func:`lr_factor` (per epoch), else its class with ``schedule.kwargs`` (``ReduceLROnPlateau``: ``mode="max"``
    unless given, the task metrics being higher-is-better). Every group's lr is scaled alike."""
    cls = scheduler_class(settings.schedule.kind)
    if cls is None:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: lr_factor(settings, e))
    kwargs = dict(settings.schedule.kwargs)
    if issubclass(cls, torch.optim.lr_scheduler.ReduceLROnPlateau):
        kwargs.setdefault("mode", "max")
    try:
        return cls(optimizer, **kwargs)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"schedule.kwargs: {cls.__name__}({kwargs}) failed: {exc}") from exc


def step_scheduler(scheduler: Any, optimizer: Any, metric: float | None = None) -> None:
    """One scheduler step (a ``ReduceLROnPlateau`` on ``metric``; none without one). Every group's lr is first
    set back to the scheduled one, so that a step warmup's factor never enters a chained schedule."""
    for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr(), strict=True):
        group["lr"] = lr
    if is_plateau(scheduler):
        if metric is not None:
            scheduler.step(metric)
    else:
        scheduler.step()
