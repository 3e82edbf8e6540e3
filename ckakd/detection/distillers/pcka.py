"""PCKA on the FPN levels (``"pcka"``) and PCKA + mimic (``"pcka_mimic"``), Zhou et al. (IJCAI 2024)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from ckakd._checks import renamed_arguments
from ckakd.detection.distill import pcka_loss
from ckakd.functional import PATCH_RESIZE
from ckakd.train.distillers.registry import register_distiller

from .base import DETECTION, DetectionDistiller

__all__ = ["PCKA", "PCKAMimic", "PCKA_REDUCES", "PCKA_MODES"]

PCKA_REDUCES = ("channel", "batch", "spatial", "mix")
PCKA_MODES = ("centered", "uncentered", "debiased")


@register_distiller("pcka", task=DETECTION)
class PCKA(DetectionDistiller):
    """PCKA (:func:`~ckakd.detection.distill.pcka_loss`) on the distilled FPN levels, loss key ``"distill"``.

    ``weight`` is γ (default 10); ``patch_size`` (P_H, P_W) and ``reduce`` (channel / batch / spatial / mix);
    ``mode``, ``resize``, ``inter_weight``: the CKA (``"centered"`` | ``"uncentered"``, the authors' |
    ``"debiased"``), the resize rule (``"nearest"`` | ``"ceil"``, the authors'; default ``"ceil"`` with
    ``"uncentered"``, else ``"nearest"``) and the inter-term weight (0: off). Centered CKA needs >= 2 positions:
    levels of a single position (e.g. P7 of a 64×64 image) are skipped. A projector exists when the channels
    differ; PCKA then sees the projected student maps.
    """

    family = "PCKA"
    default_weight = 10.0

    @renamed_arguments(student_paths="feature_paths_s", teacher_paths="feature_paths_t")
    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        *,
        weight: float | None = None,
        patch_size: int | Sequence[int] = (4, 4),
        reduce: str = "channel",
        mode: str = "centered",
        resize: str | None = None,
        inter_weight: float = 0.0,
        levels: Sequence[int] | None = None,
        feature_paths_s: Sequence[str] | str | None = None,
        feature_paths_t: Sequence[str] | str | None = None,
    ) -> None:
        if reduce not in PCKA_REDUCES:
            raise ValueError(f"reduce must be one of {PCKA_REDUCES}, got {reduce!r}")
        if mode not in PCKA_MODES:
            raise ValueError(f"mode must be one of {PCKA_MODES}, got {mode!r}")
        if resize is not None and resize not in PATCH_RESIZE:
            raise ValueError(f"resize must be one of {PATCH_RESIZE} or None, got {resize!r}")
        inter_weight = float(inter_weight)
        if not math.isfinite(inter_weight) or inter_weight < 0:
            raise ValueError(f"inter_weight must be finite and >= 0, got {inter_weight}")
        if inter_weight > 0 and mode == "debiased":
            raise ValueError("inter_weight > 0 needs mode 'centered' or 'uncentered' (the inter term is not debiased)")
        super().__init__(
            student,
            teacher,
            weight=weight,
            levels=levels,
            feature_paths_s=feature_paths_s,
            feature_paths_t=feature_paths_t,
        )
        self.patch_size = patch_size
        self.reduce = reduce
        self.mode, self.resize, self.inter_weight = mode, resize, inter_weight

    def pcka_term(self, src: Sequence[Tensor], t: Sequence[Tensor]) -> Tensor:
        """γ · PCKA of the student maps ``src`` against the teacher's ``t`` on the levels of >= 2 positions."""
        big = [j for j, f in enumerate(t) if f.shape[-2] * f.shape[-1] >= 2]
        return pcka_loss(
            [src[j] for j in big],
            [t[j] for j in big],
            patch_size=self.patch_size,
            reduce=self.reduce,
            gamma=self.weight,
            mode=self.mode,
            resize=self.resize,
            inter_weight=self.inter_weight,
        )

    def distill_loss(
        self,
        f_s: Sequence[Tensor],
        f_t: Sequence[Tensor],
        s_cls: Sequence[Tensor] | None = None,
        t_cls: Sequence[Tensor] | None = None,
    ) -> dict[str, Tensor]:
        _, t, projected = self.select_levels(f_s, f_t)
        return {"distill": self.pcka_term(projected, t)}


@register_distiller("pcka_mimic", task=DETECTION)
class PCKAMimic(PCKA):
    """PCKA + a 1×1-conv projector trained with MSE to the teacher ("Ours + mimic", following DIST+mimic):
    ``{"distill": PCKA, "mimic": mimic_weight · Σ_l MSE(proj(f_s), f_t)}``. With equal channels PCKA compares the
    raw student maps (the projector serves the MSE), else the projected ones."""

    projector = "always"

    @renamed_arguments(student_paths="feature_paths_s", teacher_paths="feature_paths_t")
    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        *,
        weight: float | None = None,
        patch_size: int | Sequence[int] = (4, 4),
        reduce: str = "channel",
        mode: str = "centered",
        resize: str | None = None,
        inter_weight: float = 0.0,
        mimic_weight: float = 1.0,
        levels: Sequence[int] | None = None,
        feature_paths_s: Sequence[str] | str | None = None,
        feature_paths_t: Sequence[str] | str | None = None,
    ) -> None:
        super().__init__(
            student,
            teacher,
            weight=weight,
            patch_size=patch_size,
            reduce=reduce,
            mode=mode,
            resize=resize,
            inter_weight=inter_weight,
            levels=levels,
            feature_paths_s=feature_paths_s,
            feature_paths_t=feature_paths_t,
        )
        self.mimic_weight = float(mimic_weight)

    def distill_loss(
        self,
        f_s: Sequence[Tensor],
        f_t: Sequence[Tensor],
        s_cls: Sequence[Tensor] | None = None,
        t_cls: Sequence[Tensor] | None = None,
    ) -> dict[str, Tensor]:
        s, t, projected = self.select_levels(f_s, f_t)
        return {
            "distill": self.pcka_term(projected if self.channels_differ else s, t),
            "mimic": self.mimic_weight * sum(F.mse_loss(p, q) for p, q in zip(projected, t, strict=True)),
        }
