"""Diagnostics for knowledge distillation (Guo et al., "Why does Knowledge Distillation Work? Rethink its
Attention and Fidelity Mechanism"), for any teacher(s), student and loader yielding ``(x, y)`` batches, and as a
trainer callback.

Modules: :mod:`~ckakd.diagnostics.fidelity_measures` (agreement, KL(p_T ‖ p_S), ensembles),
:mod:`~ckakd.diagnostics.mutual_info` (MI of top-1 predictions), :mod:`~ckakd.diagnostics.attention`
(CAM, Grad-CAM, attention IoU), :mod:`~ckakd.diagnostics.calibration` (accuracy, Affinity, train–val gap, ECE),
:mod:`~ckakd.diagnostics.layer_cka` (student × teacher layer CKA heatmap), :mod:`~ckakd.diagnostics.plots`
(matplotlib, imported on use), :mod:`~ckakd.diagnostics.callback` (:func:`diagnose`, :class:`DiagnosticsCallback`).

Conventions: accuracies, agreements and IoUs are fractions in [0, 1]; KL and MI are in nats. Every loader
function puts the models in eval mode (no BatchNorm statistics updates, no dropout) and restores each
submodule's train/eval flag afterwards; none of them moves a model: inputs go to ``device`` (default: each
model's own parameter device). An empty loader is a ``ValueError``.
"""

from __future__ import annotations

from ckakd.diagnostics._common import ENSEMBLE_NAME
from ckakd.diagnostics._common import LayerArg as LayerArg  # public type aliases of the signatures
from ckakd.diagnostics._common import ModelsArg as ModelsArg
from ckakd.diagnostics.attention import (
    IoUAccumulator,
    attention_iou,
    attention_iou_over_loader,
    attention_masks,
    cam,
    default_cam_layer,
    grad_cam,
)
from ckakd.diagnostics.calibration import (
    ECEAccumulator,
    accuracy,
    affinity,
    expected_calibration_error,
    expected_calibration_error_over_loader,
    train_val_gap,
)
from ckakd.diagnostics.callback import DiagnosticsCallback, diagnose
from ckakd.diagnostics.fidelity_measures import FidelityAccumulator, agreement, ensemble_logits, fidelity, predictive_kl
from ckakd.diagnostics.layer_cka import layer_cka_heatmap
from ckakd.diagnostics.mutual_info import (
    ConfusionAccumulator,
    confusion_matrix,
    mutual_information,
    mutual_information_from_confusion,
    prediction_mi,
)
from ckakd.diagnostics.plots import plot_cka_heatmap

__all__ = [
    "ENSEMBLE_NAME",
    "agreement",
    "predictive_kl",
    "ensemble_logits",
    "FidelityAccumulator",
    "fidelity",
    "confusion_matrix",
    "ConfusionAccumulator",
    "mutual_information",
    "mutual_information_from_confusion",
    "prediction_mi",
    "default_cam_layer",
    "cam",
    "grad_cam",
    "attention_masks",
    "attention_iou",
    "IoUAccumulator",
    "attention_iou_over_loader",
    "affinity",
    "accuracy",
    "train_val_gap",
    "expected_calibration_error",
    "ECEAccumulator",
    "expected_calibration_error_over_loader",
    "layer_cka_heatmap",
    "plot_cka_heatmap",
    "diagnose",
    "DiagnosticsCallback",
]
