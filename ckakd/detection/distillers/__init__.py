"""Detection distillers: one registry (``ckakd.train.distillers.registry``, ``task="detection"``) for every
detection method, on the shared base :class:`DetectionDistiller` (FPN hooks, level probing, projectors).

Layout: ``base`` (the base, :func:`detection_distiller`, the hook helpers) and one module per family:
``none``, ``pcka`` (pcka, pcka_mimic), ``patch`` (kd_patch, at_patch, dist_patch, mmd_patch), ``wkd`` (wkd_f,
wkd_l, wkd_lf). Importing this package registers every method, in the order of :data:`DISTILL_METHODS`.
``DetectionDistiller(student, teacher, method=name, **kwargs)``, :func:`detection_distiller` and
``build_distiller(name, student, teacher, task="detection", **kwargs)`` build the same thing.
"""

from __future__ import annotations

from .base import DETECTION, DetectionDistiller, detection_distiller, detection_methods, detector_protocol, hooked_maps

# Registration order = the order of DISTILL_METHODS (and of the names in error messages).
from .none import StudentOnly  # isort: skip
from .pcka import PCKA, PCKAMimic  # isort: skip
from .patch import ATPatch, DISTPatch, KDPatch, MMDPatch, PatchBaseline  # isort: skip
from .wkd import WKDFeatureFPN, WKDLogitDense, WKDLogitFeatureDense, wkd_detection_cost  # isort: skip

DISTILL_METHODS = detection_methods()

__all__ = [
    "DETECTION",
    "DISTILL_METHODS",
    "DetectionDistiller",
    "detection_distiller",
    "detection_methods",
    "detector_protocol",
    "hooked_maps",
    "StudentOnly",
    "PCKA",
    "PCKAMimic",
    "PatchBaseline",
    "KDPatch",
    "ATPatch",
    "DISTPatch",
    "MMDPatch",
    "WKDFeatureFPN",
    "WKDLogitDense",
    "WKDLogitFeatureDense",
    "wkd_detection_cost",
]
