"""Plain cross-entropy training (``"ce"``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn as nn

from .base import Distiller
from .registry import register_distiller

__all__ = ["CEOnly"]


@register_distiller("ce", teachers="optional")
class CEOnly(Distiller):
    """Plain cross-entropy training of the student (a teacher, if given, is ignored)."""

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None = None,
        *,
        ce_weight: float = 1.0,
        input_shape: Sequence[int] | None = None,
    ) -> None:
        super().__init__(student, teacher, ce_weight=ce_weight, input_shape=input_shape)
