"""Patch CKA (``"patch_cka"``, PCKA) over paired feature maps."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn as nn
from torch import Tensor

from ckakd.feature_kd import match_spatial
from ckakd.functional import MIN_PATCHES, PATCH_RESIZE, fit_patch_size, mix_reduction, patch_cka_loss, patch_grid

from .base import FeatureDistiller, check_feature_map, check_mode
from .registry import register_distiller

__all__ = ["PatchCKA"]


_PATCH_REDUCTIONS = ("channel", "batch", "spatial", "mix")


@register_distiller("patch_cka")
class PatchCKA(FeatureDistiller):
    """Patch CKA (PCKA): ``weight · Σ_levels ckakd.patch_cka_loss(F_s, F_t)`` over paired (B, C, H, W) maps.

    ``reduce="mix"``: level 0 averages over the batch, level 1 over space, later levels over channels
    (Zhou et al., IJCAI 2024, Table 5); otherwise "channel" | "batch" | "spatial" for every level. Each
    map is resized by ``resize`` (``ckakd.patch_grid``: "nearest" multiple of the patch, or "ceil", the
    authors' rule, which also upsamples a map smaller than the patch to one patch; default "ceil" for
    ``mode="uncentered"``, the authors' setting, else "nearest"), and the patch is shrunk by
    ``ckakd.functional.fit_patch_size`` until the map holds enough patches for an informative CKA
    (``MIN_PATCHES``: 3 for centered, as centered CKA of 2 samples is identically 1). If a pair's
    channel counts differ, a conv1×1 projector student→teacher channels is built in ``self.extra``
    (needs ``input_shape``); differing spatial sizes are adaptive-average-pooled to the smaller. Paths
    default to the last ``stage_names``. Loss key ``"patch_cka"``.
    """

    projector = "mismatched"

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        feature_paths_s: Sequence[str] | str | None = None,
        feature_paths_t: Sequence[str] | str | None = None,
        *,
        weight: float = 10.0,
        patch_size: int | tuple[int, int] = (4, 4),
        reduce: str = "mix",
        mode: str = "centered",
        resize: str | None = None,
        ce_weight: float = 1.0,
        input_shape: Sequence[int] | None = None,
    ) -> None:
        ps: tuple = ()
        if isinstance(patch_size, int):
            ps = (patch_size, patch_size)
        elif isinstance(patch_size, tuple | list):
            ps = tuple(patch_size)
        if len(ps) != 2 or not all(isinstance(p, int) and not isinstance(p, bool) and p >= 1 for p in ps):
            raise ValueError(f"patch_size must be a positive int or a pair of positive ints, got {patch_size!r}")
        if reduce not in _PATCH_REDUCTIONS:
            raise ValueError(f"reduce must be one of {', '.join(map(repr, _PATCH_REDUCTIONS))}; got {reduce!r}")
        mode = check_mode(mode)
        if resize is None:
            resize = "ceil" if mode == "uncentered" else "nearest"
        if resize not in PATCH_RESIZE:
            raise ValueError(f"resize must be one of {', '.join(map(repr, PATCH_RESIZE))}; got {resize!r}")
        super().__init__(
            student, teacher, feature_paths_s, feature_paths_t, ce_weight=ce_weight, input_shape=input_shape
        )
        self.mode, self.resize = mode, resize
        self.weight, self.patch_size, self.reduce = float(weight), ps, reduce

    def losses(self, x: Tensor, y: Tensor, logits_s: Tensor) -> dict[str, Tensor]:
        self.teacher_logits(x)
        feats_s, feats_t = self._hooked()
        loss = None
        for i, (f_s, f_t) in enumerate(zip(feats_s, feats_t, strict=True)):
            path_s, path_t = self._hooks_s.paths[i], self._hooks_t.paths[i]
            check_feature_map(f_s, "student", path_s)
            check_feature_map(f_t, "teacher", path_t)
            key = self._proj_keys[i]
            if key is not None:
                f_s = self.extra[key](f_s)
            elif f_s.shape[1] != f_t.shape[1]:
                raise ValueError(
                    f"PatchCKA: the student feature {path_s!r} has {f_s.shape[1]} channels but the teacher feature "
                    f"{path_t!r} has {f_t.shape[1]}; pass input_shape=(C, H, W) so a conv1x1 projector can be built"
                )
            f_s, f_t = match_spatial(f_s, f_t)
            h, w = f_s.shape[-2:]
            patch = fit_patch_size((h, w), self.patch_size, mode=self.mode, resize=self.resize)
            gh, gw = patch_grid((h, w), patch, self.resize)
            if (gh // patch[0]) * (gw // patch[1]) < MIN_PATCHES[self.mode]:
                raise ValueError(
                    f"PatchCKA: the feature maps at {path_s!r} / {path_t!r} are {h}x{w}, too small for mode="
                    f"{self.mode!r} (needs at least {MIN_PATCHES[self.mode]} patches); hook larger feature maps"
                )
            reduce = mix_reduction(i) if self.reduce == "mix" else self.reduce
            term = patch_cka_loss(f_s, f_t, patch_size=patch, reduce=reduce, mode=self.mode, resize=self.resize)
            loss = term if loss is None else loss + term
        return {"patch_cka": self.weight * loss}
