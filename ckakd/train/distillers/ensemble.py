"""Multi-teacher KD (``"ensemble_kd"``), optionally each teacher on its own augmented view."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ckakd._checks import renamed_arguments
from ckakd.logit_kd import kd_loss, kd_to_probs, standardize_logits

from .base import Distiller, teacher_list
from .registry import register_distiller

__all__ = ["STUDENT_VIEW", "EnsembleKD"]


STUDENT_VIEW = "student"


@register_distiller("ensemble_kd", teachers="many")
class EnsembleKD(Distiller):
    """KD from any number of teachers, optionally each on its own augmented view of the batch.

    ``reduce="mean_loss"``: mean over teachers of ``kd_loss(z_s, z_t_i)`` (the paper's code);
    ``reduce="mean_target"``: KD to the average of the teachers' ``softmax(z_t_i / T)``.
    ``standardize=True``: logit-standardized KD, every net's logits z-scored per sample first
    (:func:`standardize_logits`; the paper uses T=2, KD weight 9 with it). With one teacher both reductions
    equal :class:`KD` (value and gradient).

    Views (per-model augmentation, the T1{w,s} T2{w,s} S{w,s} grid): when ``x`` is a ``{view: Tensor}``
    mapping (a :class:`~ckakd.train.data.MultiView` loader), the student sees ``x["student"]`` (its CE and
    KD terms both use those logits) and teacher ``i`` sees ``x[teacher_views[i]]`` (default
    ``"teacher{i}"``; name ``"student"`` to give a teacher the student's exact view). A missing view raises
    ``KeyError`` naming it. When ``x`` is a Tensor every model sees it. :meth:`forward` (evaluation) takes a
    plain tensor (a mapping: its ``"student"`` view).
    """

    accepts_views = True

    @renamed_arguments(T="temperature")
    def __init__(
        self,
        student: nn.Module,
        teachers: nn.Module | Sequence[nn.Module],
        *,
        temperature: float = 4.0,
        reduce: str = "mean_loss",
        standardize: bool = False,
        ce_weight: float = 0.1,
        kd_weight: float = 0.9,
        teacher_views: Sequence[str] | None = None,
        input_shape: Sequence[int] | None = None,
    ) -> None:
        teachers = teacher_list(teachers)
        if len(teachers) == 0:
            raise ValueError("EnsembleKD needs at least one teacher")
        if reduce not in ("mean_loss", "mean_target"):
            raise ValueError(f"reduce must be 'mean_loss' or 'mean_target', got {reduce!r}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if teacher_views is None:
            views = [f"teacher{i}" for i in range(len(teachers))]
        else:
            if isinstance(teacher_views, str):
                raise ValueError(f"teacher_views must be a list of view names (one per teacher), got {teacher_views!r}")
            views = list(teacher_views)
            if len(views) != len(teachers) or not all(isinstance(v, str) and v for v in views):
                raise ValueError(
                    f"teacher_views must name one view (a non-empty string) per teacher ({len(teachers)}), "
                    f"got {teacher_views!r}"
                )
        super().__init__(student, teachers, ce_weight=ce_weight, input_shape=input_shape)
        self.temperature, self.reduce = float(temperature), reduce
        self.standardize, self.kd_weight = bool(standardize), float(kd_weight)
        self.teacher_views: tuple[str, ...] = tuple(views)

    @property
    def view_names(self) -> list[str]:
        """The views a multi-view batch must hold: ``"student"`` then the teachers' (without repeats)."""
        return list(dict.fromkeys([STUDENT_VIEW, *self.teacher_views]))

    @staticmethod
    def _view(x: Tensor | Mapping[str, Tensor], name: str, role: str) -> Tensor:
        if isinstance(x, Tensor):
            return x
        if isinstance(x, Mapping):
            if name not in x:
                raise KeyError(
                    f"EnsembleKD: the multi-view batch has no view {name!r} for {role}; it has {list(x)} (build the "
                    f"loader with a MultiView holding {name!r}, or pass teacher_views naming existing views)"
                )
            return x[name]
        raise TypeError(f"EnsembleKD: expected a Tensor or a {{view: Tensor}} mapping, got {type(x).__name__}")

    def _check_views(self, x: Tensor | Mapping[str, Tensor]) -> None:
        if isinstance(x, Mapping):
            roles = [("the student", STUDENT_VIEW)] + [(f"teacher {i}", v) for i, v in enumerate(self.teacher_views)]
            for role, name in roles:
                self._view(x, name, role)

    def forward(self, x: Tensor | Mapping[str, Tensor]) -> Tensor:
        return self.student(self._view(x, STUDENT_VIEW, "the student"))

    def student_logits(self, x: Tensor | Mapping[str, Tensor]) -> Tensor:
        return self.student(self._view(x, STUDENT_VIEW, "the student"))

    @torch.no_grad()
    def teacher_logits(self, x: Tensor | Mapping[str, Tensor]) -> list[Tensor]:
        return [
            t(self._view(x, name, f"teacher {i}"))
            for i, (t, name) in enumerate(zip(self.teachers, self.teacher_views, strict=True))
        ]

    def forward_train(self, x: Tensor | Mapping[str, Tensor], y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        self._check_views(x)  # a missing view fails before any forward
        return super().forward_train(x, y)  # type: ignore[arg-type]

    def losses(self, x: Tensor | Mapping[str, Tensor], y: Tensor, logits_s: Tensor) -> dict[str, Tensor]:
        zts = self.teacher_logits(x)
        for i, z in enumerate(zts):
            if z.shape != logits_s.shape:
                raise ValueError(
                    f"teacher {i} returned logits of shape {tuple(z.shape)} but the student {tuple(logits_s.shape)} "
                    "(multi-view batches: every view must hold the same samples, and the nets as many classes)"
                )
        if self.reduce == "mean_loss":
            loss = torch.stack(
                [kd_loss(logits_s, z_t, self.temperature, standardize=self.standardize) for z_t in zts]
            ).mean()
        else:
            z_s = standardize_logits(logits_s) if self.standardize else logits_s
            p_t = torch.stack(
                [F.softmax((standardize_logits(z) if self.standardize else z) / self.temperature, dim=1) for z in zts]
            ).mean(0)
            loss = kd_to_probs(z_s, p_t, self.temperature)
        return {"kd": self.kd_weight * loss}
