"""FitNets hints (``"fitnet"``): MSE between projected student and teacher features."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn as nn
from torch import Tensor

from ckakd.feature_kd import fitnet_loss

from .base import FeatureDistiller
from .registry import register_distiller

__all__ = ["FitNet"]


@register_distiller("fitnet")
class FitNet(FeatureDistiller):
    """FitNets hint loss: ``hint_weight · MSE(proj(F_s), F_t)`` on one feature pair (mdistiller: weight 100).

    ``proj`` is conv1×1 + BN + ReLU (mdistiller's ``ConvReg`` with its defaults) from the student's to the
    teacher's channels, in ``self.extra["proj"]``; if the spatial sizes differ, the larger map is adaptive-
    average-pooled to the smaller. Needs ``input_shape`` (the projector is sized from a dry forward).
    Paths default to the last of each model's ``stage_names``. Loss key ``"fitnet"``.
    """

    single_feature = True
    projector = "proj"

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        feature_path_s: str | None = None,
        feature_path_t: str | None = None,
        *,
        hint_weight: float = 100.0,
        ce_weight: float = 1.0,
        input_shape: Sequence[int] | None = None,
    ) -> None:
        super().__init__(student, teacher, feature_path_s, feature_path_t, ce_weight=ce_weight, input_shape=input_shape)
        self.hint_weight = float(hint_weight)

    def losses(self, x: Tensor, y: Tensor, logits_s: Tensor) -> dict[str, Tensor]:
        self.teacher_logits(x)
        (f_s,), (f_t,) = self._hooked()
        return {"fitnet": self.hint_weight * fitnet_loss(self.extra["proj"](f_s), f_t)}
