"""Decoupled KD (``"dkd"``) with mdistiller"s linear warmup."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn as nn
from torch import Tensor

from ckakd._checks import renamed_arguments
from ckakd.logit_kd import dkd_loss

from .base import Distiller
from .registry import register_distiller

__all__ = ["DKD"]


@register_distiller("dkd")
class DKD(Distiller):
    """Decoupled KD; mdistiller CIFAR defaults CE 1, alpha 1, beta 8, T 4, and a linear warmup of the DKD
    weight: ``scale = min(E / warmup, 1)`` with mdistiller's 1-based epoch ``E`` (0 disables the warmup).

    ``E = epoch + 1`` for the 0-based epoch of :meth:`set_epoch`; ``forward_train(x, y, epoch=E)`` (the older
    interface, 1-based like mdistiller) overrides it for that call. Without either, no warmup.
    """

    one_teacher = True

    @renamed_arguments(T="temperature")
    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        *,
        alpha: float = 1.0,
        beta: float = 8.0,
        temperature: float = 4.0,
        ce_weight: float = 1.0,
        warmup: int = 0,
        input_shape: Sequence[int] | None = None,
    ) -> None:
        super().__init__(student, teacher, ce_weight=ce_weight, input_shape=input_shape)
        if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 0:
            raise ValueError(f"warmup must be an int >= 0 (epochs), got {warmup!r}")
        self.alpha, self.beta, self.temperature, self.warmup = float(alpha), float(beta), float(temperature), warmup
        self._call_epoch: int | None = None

    @property
    def warmup_scale(self) -> float:
        """The current DKD weight scale in [0, 1]."""
        if self.warmup == 0:
            return 1.0
        if self._call_epoch is not None:
            e = self._call_epoch
        elif self.epoch is not None:
            e = self.epoch + 1
        else:
            return 1.0
        return min(e / self.warmup, 1.0)

    def forward_train(self, x: Tensor, y: Tensor, epoch: int | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        self._call_epoch = epoch
        return super().forward_train(x, y)

    def losses(self, x: Tensor, y: Tensor, logits_s: Tensor) -> dict[str, Tensor]:
        (z_t,) = self.teacher_logits(x)
        return {"dkd": self.warmup_scale * dkd_loss(logits_s, z_t, y, self.alpha, self.beta, self.temperature)}
