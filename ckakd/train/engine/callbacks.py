"""Trainer callbacks: the protocol (:class:`TrainerCallback`), its checks (:func:`check_callbacks`,
:func:`metric_value`), :func:`call_hook`, the per-step logging (:class:`StepMeter`) and the per-epoch call that
merges their values into the metrics row (:func:`run_epoch_callbacks`)."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import Tensor

if TYPE_CHECKING:
    from .trainer import Trainer

__all__ = [
    "CALLBACK_HOOKS",
    "StepMeter",
    "TrainerCallback",
    "call_hook",
    "check_callbacks",
    "metric_value",
    "run_epoch_callbacks",
]


class TrainerCallback:
    """Optional base class documenting the callback protocol of :class:`Trainer` (any object with at least one
    of these methods is a callback; subclassing is not required).

    - ``on_fit_start(trainer) -> None``: once per :meth:`Trainer.fit`, after the run folder exists and a resume
      was restored, before the first epoch (loggers record the config here).
    - ``on_train_step(trainer, step, values) -> None``: rank 0, every ``train.log_every`` optimizer steps;
      ``step`` the global optimizer step (1-based, resumed ones counted), ``values`` ``{"train/loss": ...,
      "train/<term>": ..., "lr": ..., "train/images_per_s": ...}`` of that step (the throughput since the previous
      log step).
    - ``on_epoch_end(trainer, epoch) -> dict[str, float] | None``: called after every epoch's validation
      (``epoch`` 0-based; ``trainer.epoch`` is the same) on every rank, before the metrics row is written.
      The returned ``{name: number}`` (``None`` or ``{}``: nothing this epoch) is merged into that epoch's
      row: ``metrics.csv`` / ``metrics.jsonl``, the loggers and the checkpoints' ``history``, so it
      survives resume. Names must not clash with the trainer's own columns (``epoch``, ``lr``,
      ``train/*``, ``val/*``, ``cka/*``, ``epoch_time_s``) or another callback's. Only rank 0's values are
      written; callbacks doing collectives must make them on every rank.
    - ``on_epoch_logged(trainer, epoch, values) -> None``: rank 0, after the epoch's row was written; ``values``
      the row plus ``train/images_per_s`` (the epoch's training throughput, all ranks).
    - ``on_fit_end(trainer) -> None``: called once when :meth:`Trainer.fit` completes normally (after
      the last checkpoint and the plots; not when training raises).
    - ``on_fit_exit(trainer, error) -> None``: once when :meth:`Trainer.fit` leaves, normally (``error`` None,
      after ``on_fit_end``) or by an exception (``error``; ``latest.pt`` already holds the last good epoch):
      where loggers flush and close.

    Useful attributes: ``trainer.model`` (the Distiller or classifier), ``trainer.student``,
    ``trainer.device``, ``trainer.out_dir``, ``trainer.epoch``, ``trainer.global_step``, ``trainer.history``,
    ``trainer.is_main``, ``trainer.val_loader``, ``trainer.settings``.
    """

    def on_fit_start(self, trainer: Trainer) -> None:
        return None

    def on_train_step(self, trainer: Trainer, step: int, values: Mapping[str, float]) -> None:
        return None

    def on_epoch_end(self, trainer: Trainer, epoch: int) -> dict[str, float] | None:
        return None

    def on_epoch_logged(self, trainer: Trainer, epoch: int, values: Mapping[str, Any]) -> None:
        return None

    def on_fit_end(self, trainer: Trainer) -> None:
        return None

    def on_fit_exit(self, trainer: Trainer, error: BaseException | None) -> None:
        return None


CALLBACK_HOOKS = ("on_fit_start", "on_train_step", "on_epoch_end", "on_epoch_logged", "on_fit_end", "on_fit_exit")


def call_hook(callbacks: Sequence[Any], hook: str, *args: Any) -> None:
    """``cb.<hook>(*args)`` for every callback that has it, in order."""
    for cb in callbacks:
        fn = getattr(cb, hook, None)
        if callable(fn):
            fn(*args)


def check_callbacks(callbacks: Sequence[Any]) -> list[Any]:
    if callbacks is None:
        return []
    if isinstance(callbacks, str | bytes) or not isinstance(callbacks, Iterable):
        raise TypeError(f"callbacks must be a sequence of callback objects, got {type(callbacks).__name__}")
    out = list(callbacks)
    for cb in out:
        if not any(callable(getattr(cb, h, None)) for h in CALLBACK_HOOKS):
            raise TypeError(
                f"callback {cb!r} ({type(cb).__name__}) has neither on_epoch_end(trainer, epoch) nor "
                f"on_fit_end(trainer) nor another hook of TrainerCallback ({', '.join(CALLBACK_HOOKS)})"
            )
    return out


def metric_value(v: Any, what: str) -> float | None:
    """A callback's value as a float (0-dim tensors, numpy scalars, ints and bools accepted); None stays None."""
    if v is None:
        return None
    if isinstance(v, Tensor):
        if v.numel() != 1:
            raise TypeError(f"{what} must be a number, got a tensor of shape {tuple(v.shape)}")
        return float(v.detach().cpu().item())
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, bool | int | float):
        return float(v)
    raise TypeError(f"{what} must be a number (or None), got {type(v).__name__}")


def run_epoch_callbacks(
    callbacks: Sequence[Any], trainer: Trainer, epoch: int, row: dict[str, Any]
) -> dict[str, float | None]:
    """Call every callback's ``on_epoch_end``; their merged, checked values (see :class:`TrainerCallback`)."""
    out: dict[str, float | None] = {}
    for cb in callbacks:
        hook = getattr(cb, "on_epoch_end", None)
        if not callable(hook):
            continue
        values = hook(trainer, epoch)
        if values is None:
            continue
        name = type(cb).__name__
        if not isinstance(values, Mapping):
            raise TypeError(
                f"callback {name}.on_epoch_end must return a {{name: number}} mapping or None, "
                f"got {type(values).__name__}"
            )
        for k, v in values.items():
            if not isinstance(k, str) or not k:
                raise TypeError(f"callback {name}.on_epoch_end returned a non-string key {k!r}")
            if k in row or k in out or k == "epoch_time_s":
                raise ValueError(
                    f"callback {name}.on_epoch_end returned {k!r}, which is already a column of this epoch's "
                    "metrics row (trainer or another callback): use a distinct name, e.g. a 'diag/' prefix"
                )
            out[k] = metric_value(v, f"callback {name}.on_epoch_end value {k!r}")
    return out


class StepMeter:
    """The training throughput of one epoch and, every ``train.log_every`` batches, the ``on_train_step`` call
    (see :class:`TrainerCallback`) with that batch's loss terms, the lr and the images/s since the previous one."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.start = self.last = time.perf_counter()
        self.samples = 0.0  # since the last log step, this rank

    def update(self, step: int, samples: int, names: Sequence[str], values: Sequence[float]) -> None:
        """After batch ``step`` (0-based) of ``samples`` images whose ``values`` are (total, *terms ``names``*)."""
        t = self.trainer
        self.samples += samples
        if not t.is_main or (step + 1) % t.settings.train.log_every != 0:
            return
        now = time.perf_counter()
        logged = {"train/loss": values[0], **{f"train/{k}": x for k, x in zip(names, values[1:], strict=True)}}
        logged["lr"] = float(t.optimizer.param_groups[0]["lr"])
        logged["train/images_per_s"] = self.samples * t.world_size / max(now - self.last, 1e-9)
        self.last, self.samples = now, 0.0
        call_hook(t.callbacks, "on_train_step", t, t.global_step, logged)

    def epoch_rate(self, samples: float) -> float:
        """Images per second over the epoch so far, for ``samples`` images (all ranks)."""
        return samples / max(time.perf_counter() - self.start, 1e-9)
