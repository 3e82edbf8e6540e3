"""The MMD baseline of RCKA (``"mmd"``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn as nn
from torch import Tensor

from ckakd.functional import mmd_loss

from .base import FeatureDistiller
from .registry import register_distiller

__all__ = ["MMD"]


@register_distiller("mmd")
class MMD(FeatureDistiller):
    """The MMD baseline of RCKA (Zhou et al., IJCAI 2024, Theorem 2): ``weight · ckakd.mmd_loss(F_s, F_t)``
    summed over the pairs (features flattened to (B, −1)). ``global_batch=True`` gathers over DDP ranks
    first. Paths default to the last ``stage_names``. Loss key ``"mmd"``.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        feature_paths_s: Sequence[str] | str | None = None,
        feature_paths_t: Sequence[str] | str | None = None,
        *,
        weight: float = 1.0,
        global_batch: bool = False,
        ce_weight: float = 1.0,
        input_shape: Sequence[int] | None = None,
    ) -> None:
        super().__init__(
            student, teacher, feature_paths_s, feature_paths_t, ce_weight=ce_weight, input_shape=input_shape
        )
        self.weight, self.global_batch = float(weight), bool(global_batch)

    def losses(self, x: Tensor, y: Tensor, logits_s: Tensor) -> dict[str, Tensor]:
        self.teacher_logits(x)
        feats_s, feats_t = self._hooked(gather=self.global_batch)
        return {"mmd": self.weight * mmd_loss(feats_s, feats_t)}
