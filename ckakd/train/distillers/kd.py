"""Hinton KD (``"kd"``) and its logit-standardized preset (``"lskd"``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn as nn
from torch import Tensor

from ckakd._checks import renamed_arguments
from ckakd.logit_kd import kd_loss

from .base import Distiller
from .registry import register_distiller

__all__ = ["KD", "LSKD"]


@register_distiller("kd")
class KD(Distiller):
    """Hinton KD; mdistiller defaults CE 0.1, KD 0.9, T 4. ``standardize=True``: logit-standardized KD
    (the paper uses T=2, KD weight 9 with it; see :class:`LSKD`)."""

    one_teacher = True

    @renamed_arguments(T="temperature")
    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        *,
        temperature: float = 4.0,
        ce_weight: float = 0.1,
        kd_weight: float = 0.9,
        standardize: bool = False,
        input_shape: Sequence[int] | None = None,
    ) -> None:
        super().__init__(student, teacher, ce_weight=ce_weight, input_shape=input_shape)
        self.temperature, self.kd_weight, self.standardize = float(temperature), float(kd_weight), bool(standardize)

    def losses(self, x: Tensor, y: Tensor, logits_s: Tensor) -> dict[str, Tensor]:
        (z_t,) = self.teacher_logits(x)
        return {"kd": self.kd_weight * kd_loss(logits_s, z_t, self.temperature, standardize=self.standardize)}


@register_distiller("lskd")
class LSKD(KD):
    """Logit-standardized KD (Sun et al. 2024) preset: :class:`KD` with ``standardize=True``, T=2, KD weight 9,
    CE weight 0.1."""

    @renamed_arguments(T="temperature")
    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        *,
        temperature: float = 2.0,
        ce_weight: float = 0.1,
        kd_weight: float = 9.0,
        input_shape: Sequence[int] | None = None,
    ) -> None:
        super().__init__(
            student,
            teacher,
            temperature=temperature,
            ce_weight=ce_weight,
            kd_weight=kd_weight,
            standardize=True,
            input_shape=input_shape,
        )
