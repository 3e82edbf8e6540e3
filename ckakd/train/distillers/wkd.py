"""Wasserstein KD: logits (``"wkd_l"``), features (``"wkd_f"``) and both (``"wkd_lf"``)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.nn as nn
from torch import Tensor

from ckakd._checks import renamed_arguments
from ckakd.feature_kd import match_spatial
from ckakd.interrelation import cost_from_interrelation, load_interrelation
from ckakd.wasserstein import wkd_feature_loss
from ckakd.wkd import wkd_logit_loss

from .base import Distiller, FeatureDistiller, check_feature_map
from .losses import cosine_decay_weight
from .registry import register_distiller

__all__ = ["WKDLogit", "WKDFeature", "WKDLogitFeature"]


def _load_cost(cost: object, sharpen: float) -> Tensor:
    """A WKD-L cost (C, C) from a tensor (used as given) or an interrelation file (``save_interrelation``)."""
    if not sharpen > 0:
        raise ValueError(f"sharpen must be > 0, got {sharpen}")
    if isinstance(cost, str | os.PathLike):
        ir, _ = load_interrelation(cost)
        c = cost_from_interrelation(ir, sharpen=sharpen)
    else:
        if sharpen != 1.0:
            raise ValueError(
                f"sharpen={sharpen} applies only to a cost built from an interrelation file (cost=path); a cost "
                "tensor is used as given (build it with ckakd.cost_from_interrelation(ir, sharpen=...))"
            )
        try:
            c = torch.as_tensor(cost)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(
                "cost must be a (C, C) tensor or a path to a file written by ckakd.save_interrelation, got "
                f"{type(cost).__name__}"
            ) from None
        c = c.detach().clone()
        if not c.is_floating_point():
            c = c.float()
    if c.dim() != 2 or c.shape[0] != c.shape[1]:
        raise ValueError(f"cost must be a square (C, C) matrix, got shape {tuple(c.shape)}")
    return c


_SCHEDULES = ("constant", "cosine")


@register_distiller("wkd_l")
class WKDLogit(Distiller):
    """WKD-L via ``ckakd.wkd_logit_loss`` over a fixed (C, C) class cost (stored as the buffer ``cost``).

    ``cost``: a (C, C) tensor (used as given) or a path (str / PathLike) to an interrelation file written by
    ``ckakd.save_interrelation``, turned into ``ckakd.cost_from_interrelation(ir, sharpen=sharpen)``. C must
    equal the logit width (checked at construction with ``input_shape``, else at first use).
    ``use_target=True``: target separation (the labels are passed to the loss; the WD part is weighted by
    gamma, the target term is not). ``gamma_schedule="cosine"``: gamma is constant for 0-based epochs
    ``< decay_start`` and then cosine-decays to 0 at the last epoch (:func:`cosine_decay_weight`, the WKD
    public code; needs :meth:`set_epoch`, before which gamma is constant). Defaults follow the public
    ImageNet setting (T=2, gamma=30); CIFAR-100 uses T=8, gamma=600, cosine from epoch 150 of 240.
    Loss key ``"wkd_l"``.
    """

    one_teacher = True

    @renamed_arguments(T="temperature")
    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        cost: Tensor | str | os.PathLike,
        *,
        temperature: float = 2.0,
        gamma: float = 30.0,
        use_target: bool = True,
        eps: float = 0.05,
        iters: int = 10,
        sharpen: float = 1.0,
        gamma_schedule: str = "constant",
        decay_start: int = 0,
        ce_weight: float = 1.0,
        input_shape: Sequence[int] | None = None,
    ) -> None:
        super().__init__(student, teacher, ce_weight=ce_weight, input_shape=input_shape)
        self._init_wkd_logit(cost, temperature, gamma, use_target, eps, iters, sharpen, gamma_schedule, decay_start)

    def _init_wkd_logit(
        self,
        cost: Tensor | str | os.PathLike,
        temperature: float,
        gamma: float,
        use_target: bool,
        eps: float,
        iters: int,
        sharpen: float,
        gamma_schedule: str,
        decay_start: int,
    ) -> None:
        """The WKD-L options and cost (after the base constructor: the cost width is checked against the
        dry forward's class count)."""
        if gamma_schedule not in _SCHEDULES:
            raise ValueError(
                f"gamma_schedule must be one of {', '.join(map(repr, _SCHEDULES))}; got {gamma_schedule!r}"
            )
        if not isinstance(decay_start, int) or isinstance(decay_start, bool) or decay_start < 0:
            raise ValueError(f"decay_start must be an int >= 0 (0-based epoch), got {decay_start!r}")
        self.register_buffer("cost", _load_cost(cost, sharpen))
        if self.num_classes is not None:
            self._check_cost_width(self.num_classes)
        self.temperature, self.gamma, self.use_target = float(temperature), float(gamma), bool(use_target)
        self.eps, self.iters, self.sharpen = float(eps), int(iters), float(sharpen)
        self.gamma_schedule, self.decay_start = gamma_schedule, decay_start

    def _check_cost_width(self, num_classes: int) -> None:
        if tuple(self.cost.shape) != (num_classes, num_classes):
            raise ValueError(
                f"cost is {tuple(self.cost.shape)} but the models predict C={num_classes} classes; the WKD-L cost "
                f"must be (C, C) = ({num_classes}, {num_classes})"
            )

    @property
    def uses_total_epochs(self) -> bool:  # type: ignore[override]
        """``gamma_schedule="cosine"`` decays gamma over the total epochs."""
        return self.gamma_schedule != "constant"

    def _scheduled(self, weight: float) -> float:
        if self.gamma_schedule == "constant" or self.epoch is None or self.total_epochs is None:
            return weight
        return cosine_decay_weight(weight, self.epoch, self.total_epochs, self.decay_start)

    @property
    def current_gamma(self) -> float:
        """gamma at the epoch last given to :meth:`set_epoch` (after the schedule)."""
        return self._scheduled(self.gamma)

    def _wkd_l(self, y: Tensor, logits_s: Tensor, z_t: Tensor) -> Tensor:
        self._check_cost_width(logits_s.shape[1])
        return wkd_logit_loss(
            logits_s,
            z_t,
            self.cost.to(device=logits_s.device),
            temperature=self.temperature,
            eps=self.eps,
            iters=self.iters,
            target=y if self.use_target else None,
            gamma=self.current_gamma,
        )

    def losses(self, x: Tensor, y: Tensor, logits_s: Tensor) -> dict[str, Tensor]:
        (z_t,) = self.teacher_logits(x)
        return {"wkd_l": self._wkd_l(y, logits_s, z_t)}


def _check_feature_options(mean_weight: float, grid: object, cov: str) -> tuple[float, tuple[int, int], str]:
    """WKD-F options, validated: (mean_weight, grid as a pair, cov)."""
    if cov not in ("diag", "full"):
        raise ValueError(f"cov must be 'diag' or 'full'; got {cov!r}")
    if not mean_weight >= 0:
        raise ValueError(f"mean_weight must be >= 0, got {mean_weight}")
    g = (grid, grid) if isinstance(grid, int) else tuple(grid) if isinstance(grid, tuple | list) else ()
    if len(g) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in g):
        raise ValueError(f"grid must be a positive int or a pair of positive ints, got {grid!r}")
    return float(mean_weight), g, cov  # type: ignore[return-value]


class _WKDFeaturePart(FeatureDistiller):
    """WKD-F pieces shared by :class:`WKDFeature` and :class:`WKDLogitFeature`: one feature pair, the public
    code's conv1x1 ``ConvReg(use_relu=True, use_bn=True)`` projector (``self.extra["proj"]``)."""

    single_feature = True
    projector = "proj"

    def _wkd_feature_loss(self) -> Tensor:
        """Unweighted WKD-F loss of the latest forwards (call after the teacher forward)."""
        (f_s,), (f_t,) = self._hooked()
        check_feature_map(f_s, "student", self._hooks_s.paths[0])
        check_feature_map(f_t, "teacher", self._hooks_t.paths[0])
        f_s, f_t = match_spatial(self.extra["proj"](f_s), f_t)
        return wkd_feature_loss(f_s, f_t, grid=self.grid, mean_weight=self.mean_weight, cov=self.cov)


@register_distiller("wkd_f")
class WKDFeature(_WKDFeaturePart):
    """WKD-F: ``weight · ckakd.wkd_feature_loss(proj(F_s), F_t)``, Wasserstein distance between per-cell
    channel Gaussians of one feature pair.

    ``proj``: conv1×1 + BN + ReLU student→teacher channels (the public CIFAR projector) in
    ``self.extra["proj"]``; needs ``input_shape``. Defaults are the public CIFAR-100 setting
    (γ_F = 0.08, mean weight r = 4, grid 1; ImageNet: 0.02, 2, 4). Paths default to the last
    ``stage_names``. Loss key ``"wkd_f"``.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        feature_path_s: str | None = None,
        feature_path_t: str | None = None,
        *,
        weight: float = 0.08,
        mean_weight: float = 4.0,
        grid: int | tuple[int, int] = 1,
        cov: str = "diag",
        ce_weight: float = 1.0,
        input_shape: Sequence[int] | None = None,
    ) -> None:
        options = _check_feature_options(mean_weight, grid, cov)
        super().__init__(student, teacher, feature_path_s, feature_path_t, ce_weight=ce_weight, input_shape=input_shape)
        self.mean_weight, self.grid, self.cov = options
        self.weight = float(weight)

    def losses(self, x: Tensor, y: Tensor, logits_s: Tensor) -> dict[str, Tensor]:
        self.teacher_logits(x)
        return {"wkd_f": self.weight * self._wkd_feature_loss()}


@register_distiller("wkd_lf")
class WKDLogitFeature(WKDLogit, _WKDFeaturePart):
    """WKD-L+F: :class:`WKDLogit` (key ``"wkd_l"``) plus :class:`WKDFeature` (key ``"wkd_f"``, weight
    ``feature_weight``). ``gamma_schedule`` / ``decay_start`` scale both weights, as the public code does.
    """

    @renamed_arguments(T="temperature")
    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        cost: Tensor | str | os.PathLike,
        feature_path_s: str | None = None,
        feature_path_t: str | None = None,
        *,
        temperature: float = 2.0,
        gamma: float = 30.0,
        use_target: bool = True,
        eps: float = 0.05,
        iters: int = 10,
        sharpen: float = 1.0,
        gamma_schedule: str = "constant",
        decay_start: int = 0,
        feature_weight: float = 0.08,
        mean_weight: float = 4.0,
        grid: int | tuple[int, int] = 1,
        cov: str = "diag",
        ce_weight: float = 1.0,
        input_shape: Sequence[int] | None = None,
    ) -> None:
        # WKD-L's setup and then the feature part, each once: the bases' own constructors are not chained here
        Distiller.__init__(self, student, teacher, ce_weight=ce_weight, input_shape=input_shape)
        self._init_wkd_logit(cost, temperature, gamma, use_target, eps, iters, sharpen, gamma_schedule, decay_start)
        self.mean_weight, self.grid, self.cov = _check_feature_options(mean_weight, grid, cov)
        self._init_features(feature_path_s, feature_path_t)
        self.feature_weight = float(feature_weight)

    @property
    def current_feature_weight(self) -> float:
        """feature_weight at the epoch last given to :meth:`set_epoch` (after the schedule)."""
        return self._scheduled(self.feature_weight)

    def losses(self, x: Tensor, y: Tensor, logits_s: Tensor) -> dict[str, Tensor]:
        (z_t,) = self.teacher_logits(x)
        return {
            "wkd_l": self._wkd_l(y, logits_s, z_t),
            "wkd_f": self.current_feature_weight * self._wkd_feature_loss(),
        }
