"""Trainer callbacks: the protocol (:class:`TrainerCallback`), its checks (:func:`check_callbacks`,
:func:`metric_value`) and the per-epoch call that merges their values into the metrics row
(:func:`run_epoch_callbacks`)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import Tensor

if TYPE_CHECKING:
    from .trainer import Trainer

__all__ = ["CALLBACK_HOOKS", "TrainerCallback", "check_callbacks", "metric_value", "run_epoch_callbacks"]


class TrainerCallback:
    """Optional base class documenting the callback protocol of :class:`Trainer` (any object with one or
    both of these methods is a callback; subclassing is not required).

    - ``on_epoch_end(trainer, epoch) -> dict[str, float] | None``: called after every epoch's validation
      (``epoch`` 0-based; ``trainer.epoch`` is the same) on every rank, before the metrics row is written.
      The returned ``{name: number}`` (``None`` or ``{}``: nothing this epoch) is merged into that epoch's
      row: ``metrics.csv`` / ``metrics.jsonl``, TensorBoard and the checkpoints' ``history``, so it
      survives resume. Names must not clash with the trainer's own columns (``epoch``, ``lr``,
      ``train/*``, ``val/*``, ``cka/*``, ``epoch_time_s``) or another callback's. Only rank 0's values are
      written; callbacks doing collectives must make them on every rank.
    - ``on_fit_end(trainer) -> None``: called once when :meth:`Trainer.fit` completes normally (after
      the last checkpoint and the plots; not when training raises).

    Useful attributes: ``trainer.model`` (the Distiller or classifier), ``trainer.student``,
    ``trainer.device``, ``trainer.out_dir``, ``trainer.epoch``, ``trainer.history``, ``trainer.is_main``,
    ``trainer.val_loader``, ``trainer.settings``.
    """

    def on_epoch_end(self, trainer: Trainer, epoch: int) -> dict[str, float] | None:
        return None

    def on_fit_end(self, trainer: Trainer) -> None:
        return None


CALLBACK_HOOKS = ("on_epoch_end", "on_fit_end")


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
                "on_fit_end(trainer)"
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
