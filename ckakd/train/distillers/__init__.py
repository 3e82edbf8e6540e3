"""Distillers (mdistiller-style) and pure-torch logit-KD losses.

Every distiller wraps a student and zero or more teachers. Teachers are frozen (``requires_grad=False``)
and stay in eval mode even after ``distiller.train()`` (so their BatchNorm statistics never move).
``forward_train(x, y)`` returns ``(student_logits, {name: weighted_loss})``; the total training loss is
the sum of the dict's values. ``forward(x)`` returns the student's logits. Trainable modules a distiller
adds (projectors) live in ``self.extra`` and are reported by :meth:`Distiller.extra_parameters` /
:meth:`Distiller.num_extra_parameters`; optimize :meth:`Distiller.learnable_parameters`.

Every distiller accepts ``input_shape=(C, H, W)``: one dry forward of a zero batch checks that student and
teacher(s) predict the same number of classes and gives the feature shapes projectors are built from.
The training loop calls :meth:`Distiller.set_epoch` at the start of every epoch (weight schedules, DKD
warmup). Feature-based distillers (:class:`FeatureDistiller`) capture features with :class:`FeatureHooks`
on dotted module paths; by default the last of the model's ``stage_names`` (all of them for :class:`AT`).
:func:`build_distiller` builds any of :data:`DISTILLERS` by name; ``@register_distiller(name)`` adds one.

Layout: ``base`` (the two bases), ``registry``, ``losses`` (kd/dkd/dist/at losses), and one module per
method or family: ``ce``, ``kd`` (kd, lskd), ``dkd``, ``dist``, ``fitnet``, ``at``, ``cka`` (fcka, lcka,
rcka), ``patch_cka``, ``mmd``, ``wkd`` (wkd_l, wkd_f, wkd_lf), ``ensemble``. Importing this package
registers every method, in the order of :data:`DISTILLERS` (the imports below).
"""

from __future__ import annotations

# Names the single-module ``ckakd.train.distillers`` exported, still importable from here.
from ckakd._checks import module_names, resolve_module  # noqa: F401
from ckakd.functional import MIN_PATCHES, PATCH_RESIZE, fit_patch_size, patch_grid, rcka_logit_options  # noqa: F401

from ..distributed import gather_batch  # noqa: F401
from ..hooks import FeatureHooks  # noqa: F401
from .base import Distiller, FeatureDistiller
from .losses import at_loss, cosine_decay_weight, dist_loss, dkd_loss, kd_loss, standardize_logits
from .registry import DISTILLERS, build_distiller, get_distiller, register_distiller

# Registration order = the order of DISTILLERS (and of the "valid names" in error messages).
from .ce import CEOnly  # isort: skip
from .kd import KD, LSKD  # isort: skip
from .dkd import DKD  # isort: skip
from .dist import DIST  # isort: skip
from .fitnet import FitNet  # isort: skip
from .at import AT  # isort: skip
from .cka import FCKA, LCKA, RCKA  # isort: skip
from .patch_cka import PatchCKA  # isort: skip
from .mmd import MMD  # isort: skip
from .wkd import WKDFeature, WKDLogit, WKDLogitFeature  # isort: skip
from .ensemble import STUDENT_VIEW, EnsembleKD  # noqa: F401  # isort: skip

__all__ = [
    "Distiller",
    "CEOnly",
    "KD",
    "LSKD",
    "DKD",
    "DIST",
    "FitNet",
    "AT",
    "FCKA",
    "LCKA",
    "RCKA",
    "PatchCKA",
    "MMD",
    "WKDLogit",
    "WKDFeature",
    "WKDLogitFeature",
    "EnsembleKD",
    "DISTILLERS",
    "build_distiller",
    "kd_loss",
    "dkd_loss",
    "dist_loss",
    "at_loss",
    "standardize_logits",
    "cosine_decay_weight",
    "FeatureDistiller",
    "register_distiller",
    "get_distiller",
]
