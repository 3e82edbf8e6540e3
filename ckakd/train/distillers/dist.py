"""DIST (``"dist"``): Pearson-correlation relations between predictions."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn as nn
from torch import Tensor

from ckakd._checks import renamed_arguments
from ckakd.logit_kd import dist_loss

from .base import Distiller
from .registry import register_distiller

__all__ = ["DIST"]


@register_distiller("dist")
class DIST(Distiller):
    """DIST: Pearson-correlation relations between predictions (``dist_loss``)."""

    one_teacher = True

    @renamed_arguments(T="temperature")
    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        *,
        beta: float = 1.0,
        gamma: float = 1.0,
        temperature: float = 1.0,
        ce_weight: float = 1.0,
        input_shape: Sequence[int] | None = None,
    ) -> None:
        super().__init__(student, teacher, ce_weight=ce_weight, input_shape=input_shape)
        self.beta, self.gamma, self.temperature = float(beta), float(gamma), float(temperature)

    def losses(self, x: Tensor, y: Tensor, logits_s: Tensor) -> dict[str, Tensor]:
        (z_t,) = self.teacher_logits(x)
        return {"dist": dist_loss(logits_s, z_t, self.beta, self.gamma, self.temperature)}
