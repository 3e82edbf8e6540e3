"""``"none"``: the student detector's own losses, no distillation (the baseline run of a distillation config)."""

from __future__ import annotations

from ckakd.train.distillers.registry import register_distiller

from .base import DETECTION, DetectionDistiller

__all__ = ["StudentOnly"]


@register_distiller("none", task=DETECTION)
class StudentOnly(DetectionDistiller):
    """The student's detection losses only; the teacher never runs and there is no projector."""

    projector = "never"
    distills = False
