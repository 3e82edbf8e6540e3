"""The CKA distillers: feature CKA (``"fcka"``), logit CKA (``"lcka"``) and RCKA (``"rcka"``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch.nn as nn
from torch import Tensor

from ckakd.functional import cka_loss, lcka_loss, rcka_logit_options, rcka_loss

from ..distributed import gather_batch
from .base import Distiller, FeatureDistiller, check_mode
from .registry import register_distiller

__all__ = ["FCKA", "LCKA", "RCKA"]


def _rcka_logit_options(mode: str, with_l2_norm: bool, soften: bool, temperature: float | None) -> dict[str, Any]:
    """The RCKA authors' logit-term options (``ckakd.rcka_loss``: with_l2_norm, soften, temperature), validated."""
    l2, soft, t = rcka_logit_options(mode, with_l2_norm, soften, temperature)
    return {"with_l2_norm": l2, "soften": soft, "temperature": t}


@register_distiller("fcka")
class FCKA(FeatureDistiller):
    """Feature CKA: ``alpha · Σ_pairs (1 − CKA(F_s, F_t))`` via ``ckakd.cka_loss`` (features flattened to
    (B, −1)). ``global_batch=True`` gathers the features over DDP ranks first. Paths default to the last
    ``stage_names``. Loss key ``"fcka"``.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        feature_paths_s: Sequence[str] | str | None = None,
        feature_paths_t: Sequence[str] | str | None = None,
        *,
        alpha: float = 5.0,
        mode: str = "centered",
        global_batch: bool = False,
        ce_weight: float = 1.0,
        input_shape: Sequence[int] | None = None,
    ) -> None:
        mode = check_mode(mode)
        super().__init__(
            student, teacher, feature_paths_s, feature_paths_t, ce_weight=ce_weight, input_shape=input_shape
        )
        self.mode, self.alpha, self.global_batch = mode, float(alpha), bool(global_batch)

    def losses(self, x: Tensor, y: Tensor, logits_s: Tensor) -> dict[str, Tensor]:
        self.teacher_logits(x)
        feats_s, feats_t = self._hooked(gather=self.global_batch)
        return {"fcka": self.alpha * cka_loss(feats_s, feats_t, mode=self.mode)}


@register_distiller("lcka")
class LCKA(Distiller):
    """Logit CKA via ``ckakd.functional.lcka_loss`` (the logit part of ``ckakd.rcka_loss``):
    ``beta · [(1 − CKA(z_s, z_t)) + (1 − CKA(z_sᵀ, z_tᵀ))]`` (intra-class over the batch, inter-class over the
    classes). ``with_l2_norm`` / ``soften`` + ``temperature``: the RCKA authors' options (see
    ``ckakd.rcka_loss``). ``global_batch=True`` gathers the logits over DDP ranks first. Loss key ``"lcka"``.
    """

    one_teacher = True

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        *,
        beta: float = 5.0,
        mode: str = "centered",
        with_l2_norm: bool = False,
        soften: bool = False,
        temperature: float | None = None,
        global_batch: bool = False,
        ce_weight: float = 1.0,
        input_shape: Sequence[int] | None = None,
    ) -> None:
        super().__init__(student, teacher, ce_weight=ce_weight, input_shape=input_shape)
        self.beta, self.mode, self.global_batch = float(beta), check_mode(mode), bool(global_batch)
        self.logit_options = _rcka_logit_options(self.mode, with_l2_norm, soften, temperature)

    def losses(self, x: Tensor, y: Tensor, logits_s: Tensor) -> dict[str, Tensor]:
        (z_t,) = self.teacher_logits(x)
        z_s = logits_s
        if self.global_batch:
            z_s, z_t = gather_batch(z_s), gather_batch(z_t)
        return {"lcka": lcka_loss(z_s, z_t, beta=self.beta, mode=self.mode, **self.logit_options)}


@register_distiller("rcka")
class RCKA(FeatureDistiller):
    """RCKA: ``alpha · Σ (1 − CKA(F_s, F_t)) + beta · (intra + inter logit 1 − CKA)`` via ``ckakd.rcka_loss``.

    Features are captured with :class:`FeatureHooks` on the given dotted module paths of each net (paired
    in order; default: the last of each model's ``stage_names``). ``global_batch=True`` gathers features
    and logits over DDP ranks first. ``with_l2_norm`` / ``soften`` + ``temperature``: the RCKA authors' options
    for the logit terms (see ``ckakd.rcka_loss``). Returned losses: ``"fcka"`` (alpha-weighted) and ``"lcka"``
    (beta-weighted). Call :meth:`remove_hooks` when done with the distiller.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        feature_paths_s: Sequence[str] | str | None = None,
        feature_paths_t: Sequence[str] | str | None = None,
        *,
        alpha: float = 5.0,
        beta: float = 5.0,
        mode: str = "centered",
        with_l2_norm: bool = False,
        soften: bool = False,
        temperature: float | None = None,
        global_batch: bool = False,
        ce_weight: float = 1.0,
        input_shape: Sequence[int] | None = None,
    ) -> None:
        mode = check_mode(mode)
        logit_options = _rcka_logit_options(mode, with_l2_norm, soften, temperature)
        super().__init__(
            student, teacher, feature_paths_s, feature_paths_t, ce_weight=ce_weight, input_shape=input_shape
        )
        self.mode, self.logit_options = mode, logit_options
        self.alpha, self.beta, self.global_batch = float(alpha), float(beta), bool(global_batch)

    def losses(self, x: Tensor, y: Tensor, logits_s: Tensor) -> dict[str, Tensor]:
        (z_t,) = self.teacher_logits(x)
        feats_s, feats_t = self._hooked(gather=self.global_batch)
        z_s = logits_s
        if self.global_batch:
            z_s, z_t = gather_batch(z_s), gather_batch(z_t)
        parts = rcka_loss(
            feats_s,
            feats_t,
            z_s,
            z_t,
            alpha=self.alpha,
            beta=self.beta,
            mode=self.mode,
            return_parts=True,
            **self.logit_options,
        )
        return {"fcka": self.alpha * parts["fcka"], "lcka": self.beta * (parts["intra_lcka"] + parts["inter_lcka"])}
