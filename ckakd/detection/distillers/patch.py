"""The "w/ patch" baselines on the FPN levels: KD, AT, DIST and MMD per patch (``"kd_patch"``, ``"at_patch"``,
``"dist_patch"``, ``"mmd_patch"``), the comparisons of Zhou et al. (IJCAI 2024)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from ckakd._checks import renamed_arguments
from ckakd.detection.distill import at_patch_loss, dist_patch_loss, kd_patch_loss, mmd_patch_loss
from ckakd.train.distillers.registry import register_distiller

from .base import DETECTION, DetectionDistiller

__all__ = ["PatchBaseline", "KDPatch", "ATPatch", "DISTPatch", "MMDPatch"]


class PatchBaseline(DetectionDistiller):
    """Base of the patch baselines: ``weight`` (default 1) and ``patch_size`` (P_H, P_W); a projector exists when
    the channels differ and the loss (key ``"distill"``) sees the projected student maps."""

    family = "patch baseline"

    @renamed_arguments(student_paths="feature_paths_s", teacher_paths="feature_paths_t")
    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        *,
        weight: float | None = None,
        patch_size: int | Sequence[int] = (4, 4),
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
        self.patch_size = patch_size

    def patch_loss(self, projected: list[Tensor], t: list[Tensor]) -> Tensor:
        """The weighted loss of the projected student levels against the teacher's."""
        raise NotImplementedError

    def distill_loss(
        self,
        f_s: Sequence[Tensor],
        f_t: Sequence[Tensor],
        s_cls: Sequence[Tensor] | None = None,
        t_cls: Sequence[Tensor] | None = None,
    ) -> dict[str, Tensor]:
        _, t, projected = self.select_levels(f_s, f_t)
        return {"distill": self.patch_loss(projected, t)}


@register_distiller("kd_patch", task=DETECTION)
class KDPatch(PatchBaseline):
    """KD w/ patch (:func:`~ckakd.detection.distill.kd_patch_loss`)."""

    def patch_loss(self, projected: list[Tensor], t: list[Tensor]) -> Tensor:
        return kd_patch_loss(projected, t, patch_size=self.patch_size, weight=self.weight)


@register_distiller("at_patch", task=DETECTION)
class ATPatch(PatchBaseline):
    """AT w/ patch (:func:`~ckakd.detection.distill.at_patch_loss`)."""

    def patch_loss(self, projected: list[Tensor], t: list[Tensor]) -> Tensor:
        return at_patch_loss(projected, t, patch_size=self.patch_size, weight=self.weight)


@register_distiller("dist_patch", task=DETECTION)
class DISTPatch(PatchBaseline):
    """DIST w/ patch (``weight`` · :func:`~ckakd.detection.distill.dist_patch_loss`)."""

    def patch_loss(self, projected: list[Tensor], t: list[Tensor]) -> Tensor:
        return self.weight * dist_patch_loss(projected, t, patch_size=self.patch_size)


@register_distiller("mmd_patch", task=DETECTION)
class MMDPatch(PatchBaseline):
    """MMD w/ patch (:func:`~ckakd.detection.distill.mmd_patch_loss`)."""

    def patch_loss(self, projected: list[Tensor], t: list[Tensor]) -> Tensor:
        return mmd_patch_loss(projected, t, patch_size=self.patch_size, weight=self.weight)
