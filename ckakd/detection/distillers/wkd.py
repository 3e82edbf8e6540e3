"""Wasserstein KD on a detector: WKD-F per FPN level (``"wkd_f"``), WKD-L on the dense classification branch
(``"wkd_l"``) and both (``"wkd_lf"``), after Lv et al. (NeurIPS 2024)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ckakd._checks import renamed_arguments
from ckakd.detection.distill import with_background_cost, wkd_feature_fpn_loss, wkd_logit_dense_loss
from ckakd.train.distillers.registry import register_distiller

from .base import DETECTION, DetectionDistiller

__all__ = ["WKDFeatureFPN", "WKDLogitDense", "WKDLogitFeatureDense", "wkd_detection_cost"]


def wkd_detection_cost(
    student: nn.Module, teacher: nn.Module, method: str, cost: Tensor | None, background_cost: float
) -> Tensor:
    """The (K+1, K+1) WKD-L cost with the background bin last, from a (K, K) or (K+1, K+1) ``cost`` (built once,
    so ``ckakd.sinkhorn`` caches its kernel); checks that both detectors have the same K classes."""
    k_s, k_t = getattr(student, "num_classes", None), getattr(teacher, "num_classes", None)
    if k_s != k_t:
        raise ValueError(f"method={method!r} needs the same classes: student has {k_s}, teacher {k_t}")
    if cost is None:
        raise ValueError(
            f"method={method!r} needs cost=, a ({k_s}, {k_s}) class cost, e.g. ckakd.cost_from_interrelation("
            "ckakd.detection.distill.detection_class_interrelation(teacher, dataset))"
        )
    if not isinstance(cost, Tensor) or not cost.is_floating_point():
        raise TypeError(f"cost must be a floating-point tensor, got {getattr(cost, 'dtype', type(cost).__name__)}")
    if tuple(cost.shape) == (k_s, k_s):
        cost = with_background_cost(cost, background_cost)
    elif tuple(cost.shape) != (k_s + 1, k_s + 1):
        raise ValueError(
            f"cost must be ({k_s}, {k_s}) or ({k_s + 1}, {k_s + 1}) (background last) for {k_s} classes, "
            f"got {tuple(cost.shape)}"
        )
    if not bool(torch.isfinite(cost).all()) or bool((cost < 0).any()):
        raise ValueError(f"cost must be finite and nonnegative, got {tuple(cost.shape)} with bad entries")
    return cost.detach().clone()


@register_distiller("wkd_f", task=DETECTION)
class WKDFeatureFPN(DetectionDistiller):
    """WKD-F per FPN level (:func:`~ckakd.detection.distill.wkd_feature_fpn_loss`: mean weight r = 2, WKD's
    ImageNet value; grid 1 on the small FPN maps), loss key ``"distill"``; a projector when the channels differ."""

    family = "WKD-F"

    def distill_loss(
        self,
        f_s: Sequence[Tensor],
        f_t: Sequence[Tensor],
        s_cls: Sequence[Tensor] | None = None,
        t_cls: Sequence[Tensor] | None = None,
    ) -> dict[str, Tensor]:
        _, t, projected = self.select_levels(f_s, f_t)
        return {"distill": wkd_feature_fpn_loss(projected, t, weight=self.weight)}


@register_distiller("wkd_l", task=DETECTION)
class WKDLogitDense(DetectionDistiller):
    """WKD-L on the classification branch: :func:`~ckakd.detection.distill.wkd_logit_dense_loss` on the
    teacher-confident locations of the distilled levels' cls logits, loss key ``"distill"``. No projector.

    ``cost``: WKD-L's class cost, (K, K) (``ckakd.cost_from_interrelation(detection_class_interrelation(
    teacher, dataset))``) or (K+1, K+1) with the background bin last; required. ``weight`` defaults to 30 and
    ``temperature`` to 2 (WKD's ImageNet values); ``score_thresh`` and ``topk``: the teacher-confidence
    threshold and per-image cap of the compared locations; ``background_cost``: the background bin's cost.
    The (K+1, K+1) cost is the buffer ``cost``.
    """

    family = "WKD-L"
    default_weight = 30.0
    projector = "never"
    reads_logits = True

    @renamed_arguments(student_paths="feature_paths_s", teacher_paths="feature_paths_t")
    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        *,
        cost: Tensor | None = None,
        weight: float | None = None,
        temperature: float = 2.0,
        score_thresh: float = 0.05,
        topk: int | None = 100,
        background_cost: float = 1.0,
        levels: Sequence[int] | None = None,
        feature_paths_s: Sequence[str] | str | None = None,
        feature_paths_t: Sequence[str] | str | None = None,
    ) -> None:
        super().__init__(
            student,
            teacher,
            weight=weight,
            levels=levels,
            feature_paths_s=feature_paths_s,
            feature_paths_t=feature_paths_t,
        )
        self.temperature, self.score_thresh, self.topk = float(temperature), float(score_thresh), topk
        self.cost: Tensor
        self.register_buffer("cost", wkd_detection_cost(student, teacher, self.method, cost, background_cost), False)

    def logit_term(self, s_cls: Sequence[Tensor] | None, t_cls: Sequence[Tensor] | None) -> Tensor:
        """Weighted WKD-L of the distilled levels' cls logits (B, N_l, K) of student and teacher."""
        if s_cls is None or t_cls is None:
            raise ValueError(f"method={self.method!r} needs the cls logits s_cls and t_cls (head_outputs)")
        return wkd_logit_dense_loss(
            [s_cls[i] for i in self.levels],
            [t_cls[i].detach() for i in self.levels],
            self.cost,
            temperature=self.temperature,
            weight=self.weight,
            score_thresh=self.score_thresh,
            topk=self.topk,
        )

    def distill_loss(
        self,
        f_s: Sequence[Tensor],
        f_t: Sequence[Tensor],
        s_cls: Sequence[Tensor] | None = None,
        t_cls: Sequence[Tensor] | None = None,
    ) -> dict[str, Tensor]:
        return {"distill": self.logit_term(s_cls, t_cls)}


@register_distiller("wkd_lf", task=DETECTION)
class WKDLogitFeatureDense(WKDLogitDense):
    """WKD-L + WKD-F: ``{"distill": WKD-L, "distill_feat": feature_weight · WKD-F}`` (``feature_weight`` as
    ``"wkd_f"``'s default, 1); a projector for WKD-F when the channels differ."""

    projector = "mismatched"

    @renamed_arguments(student_paths="feature_paths_s", teacher_paths="feature_paths_t")
    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        *,
        cost: Tensor | None = None,
        weight: float | None = None,
        temperature: float = 2.0,
        score_thresh: float = 0.05,
        topk: int | None = 100,
        background_cost: float = 1.0,
        feature_weight: float = 1.0,
        levels: Sequence[int] | None = None,
        feature_paths_s: Sequence[str] | str | None = None,
        feature_paths_t: Sequence[str] | str | None = None,
    ) -> None:
        super().__init__(
            student,
            teacher,
            cost=cost,
            weight=weight,
            temperature=temperature,
            score_thresh=score_thresh,
            topk=topk,
            background_cost=background_cost,
            levels=levels,
            feature_paths_s=feature_paths_s,
            feature_paths_t=feature_paths_t,
        )
        self.feature_weight = float(feature_weight)

    def distill_loss(
        self,
        f_s: Sequence[Tensor],
        f_t: Sequence[Tensor],
        s_cls: Sequence[Tensor] | None = None,
        t_cls: Sequence[Tensor] | None = None,
    ) -> dict[str, Tensor]:
        _, t, projected = self.select_levels(f_s, f_t)
        return {
            "distill": self.logit_term(s_cls, t_cls),
            "distill_feat": wkd_feature_fpn_loss(projected, t, weight=self.feature_weight),
        }
