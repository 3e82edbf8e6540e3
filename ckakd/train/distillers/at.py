"""Attention transfer (``"at"``) over paired feature maps."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn as nn
from torch import Tensor

from ckakd.feature_kd import at_loss

from .base import FeatureDistiller, check_feature_map
from .registry import register_distiller

__all__ = ["AT"]


@register_distiller("at")
class AT(FeatureDistiller):
    """Attention transfer: ``at_weight · Σ_pairs at_loss(F_s, F_t, p)`` (mdistiller: weight 1000, p 2).

    Paths default to all of each model's ``stage_names`` (paired in order; the counts must match). No
    projector (attention maps average over channels). Loss key ``"at"``.
    """

    all_stages = True

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        feature_paths_s: Sequence[str] | str | None = None,
        feature_paths_t: Sequence[str] | str | None = None,
        *,
        at_weight: float = 1000.0,
        p: float = 2.0,
        ce_weight: float = 1.0,
        input_shape: Sequence[int] | None = None,
    ) -> None:
        if not p > 0:
            raise ValueError(f"p must be > 0, got {p}")
        super().__init__(
            student, teacher, feature_paths_s, feature_paths_t, ce_weight=ce_weight, input_shape=input_shape
        )
        self.at_weight, self.p = float(at_weight), float(p)

    def losses(self, x: Tensor, y: Tensor, logits_s: Tensor) -> dict[str, Tensor]:
        self.teacher_logits(x)
        feats_s, feats_t = self._hooked()
        loss = None
        for path_s, path_t, f_s, f_t in zip(self._hooks_s.paths, self._hooks_t.paths, feats_s, feats_t, strict=True):
            check_feature_map(f_s, "student", path_s)
            check_feature_map(f_t, "teacher", path_t)
            term = at_loss(f_s, f_t, self.p)
            loss = term if loss is None else loss + term
        return {"at": self.at_weight * loss}
