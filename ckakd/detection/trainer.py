"""Detector training and feature distillation on FPN levels.

* :class:`DetectionDistiller` wraps a student and a frozen teacher detector (RetinaNet / FCOS): its
  :meth:`~DetectionDistiller.forward_train` returns the student's detection losses plus one distillation
  term on the FPN features (PCKA, PCKA + mimic, KD / AT / DIST "w/ patch").
* :func:`train_detector` trains a detector or a distiller with SGD (linear warmup, step decay), logs
  per-epoch losses and COCO AP to ``metrics.jsonl`` / ``metrics.csv`` and writes an atomic ``latest.pt``
  (resumable).
* :func:`evaluate_detector` gives the six COCO metrics of a detector on a dataset.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ckakd.detection.data import make_detection_loader
from ckakd.detection.distill import (
    PatchMimic,
    at_patch_loss,
    dist_patch_loss,
    kd_patch_loss,
    mmd_patch_loss,
    pcka_loss,
    with_background_cost,
    wkd_feature_fpn_loss,
    wkd_logit_dense_loss,
)
from ckakd.detection.evaluation import METRIC_NAMES
from ckakd.detection.task import DetectionTask, coco_ground_truth, detector_of
from ckakd.train.engine import Trainer, TrainSettings

__all__ = [
    "DISTILL_METHODS",
    "DetectionDistiller",
    "train_detector",
    "evaluate_detector",
    "detection_settings",
    "coco_ground_truth",
]

DISTILL_METHODS = (
    "none",
    "pcka",
    "pcka_mimic",
    "kd_patch",
    "at_patch",
    "dist_patch",
    "mmd_patch",
    "wkd_f",
    "wkd_l",
    "wkd_lf",
)
_WKD_L = ("wkd_l", "wkd_lf")
_REDUCES = ("channel", "batch", "spatial", "mix")


def _fpn(model: nn.Module) -> Any:
    backbone = getattr(model, "backbone", None)
    if backbone is None or not hasattr(backbone, "levels") or not hasattr(model, "features"):
        raise TypeError(f"expected a DenseDetector (RetinaNet / FCOS), got {type(model).__name__}")
    return backbone


class DetectionDistiller(nn.Module):
    """Student detector + frozen teacher detector + a distillation loss on their FPN levels or cls logits.

    Args:
        student, teacher: detectors with the ``features`` / ``head_outputs`` / ``compute_losses`` protocol;
            they must have the same number of FPN levels (``ValueError`` otherwise).
        method: ``"none"`` (student losses only), ``"pcka"``, ``"pcka_mimic"`` (PCKA + a 1×1-conv projector
            trained with MSE to the teacher), ``"kd_patch"``, ``"at_patch"``, ``"dist_patch"``, ``"mmd_patch"``
            ``"wkd_f"`` (WKD-F per FPN level), ``"wkd_l"`` (WKD-L on the classification branch:
            :func:`~ckakd.detection.distill.wkd_logit_dense_loss` on the teacher-confident locations) or
            ``"wkd_lf"`` (WKD-L + WKD-F, reported as ``"distill"`` and ``"distill_feat"``).
        weight: the loss weight (γ for PCKA, WKD-L's weight for wkd_l / wkd_lf); default 10 for PCKA, 30 for
            WKD-L (WKD's ImageNet γ), 1 otherwise.
        patch_size, reduce: the patch (P_H, P_W) and PCKA's reduction (channel / batch / spatial / mix).
        mimic_weight: weight of the mimic MSE (``"pcka_mimic"``).
        levels: indices of the FPN levels to distil (default: all); WKD-L uses the cls logits of these levels.
        cost: WKD-L's class cost, (K, K) (``ckakd.cost_from_interrelation(detection_class_interrelation(
            teacher, dataset))``) or (K+1, K+1) with the background bin last; required for wkd_l / wkd_lf.
        temperature, score_thresh, topk, background_cost: WKD-L's knobs (T = 2, WKD's ImageNet value; the
            teacher-confidence threshold and per-image cap of the compared locations; the background bin's cost).
        feature_weight: WKD-F's weight in ``"wkd_lf"`` (as ``"wkd_f"``'s default, 1).

    The teacher is frozen (``requires_grad=False``) and stays in eval mode under ``.train()``. A projector
    (``self.extra``, a :class:`PatchMimic`) exists for ``"pcka_mimic"`` and whenever the student's and the
    teacher's FPN channels differ; the distillation losses then see the projected student features (PCKA
    with mimic and equal channels is computed on the raw student features). ``"wkd_l"`` compares logits only:
    no projector, and the teacher's head runs (under no_grad) only for wkd_l / wkd_lf.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        *,
        method: str = "pcka",
        weight: float | None = None,
        patch_size: int | Sequence[int] = (4, 4),
        reduce: str = "channel",
        mimic_weight: float = 1.0,
        levels: Sequence[int] | None = None,
        cost: Tensor | None = None,
        temperature: float = 2.0,
        score_thresh: float = 0.05,
        topk: int | None = 100,
        background_cost: float = 1.0,
        feature_weight: float = 1.0,
    ) -> None:
        super().__init__()
        if method not in DISTILL_METHODS:
            raise ValueError(f"method must be one of {DISTILL_METHODS}, got {method!r}")
        if reduce not in _REDUCES:
            raise ValueError(f"reduce must be one of {_REDUCES}, got {reduce!r}")
        s_fpn, t_fpn = _fpn(student), _fpn(teacher)
        n_s, n_t = len(s_fpn.levels), len(t_fpn.levels)
        if n_s != n_t:
            raise ValueError(
                f"student and teacher must have the same number of FPN levels, got {n_s} ({tuple(s_fpn.levels)}) "
                f"and {n_t} ({tuple(t_fpn.levels)})"
            )
        self.levels = list(range(n_s)) if levels is None else [int(i) for i in levels]
        if not self.levels or any(not 0 <= i < n_s for i in self.levels):
            raise ValueError(f"levels must be non-empty indices in [0, {n_s}), got {levels}")
        self.student, self.teacher = student, teacher
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        self.method = method
        default_weight = 10.0 if method.startswith("pcka") else 30.0 if method in _WKD_L else 1.0
        self.weight = float(weight if weight is not None else default_weight)
        self.patch_size = patch_size
        self.reduce = reduce
        self.mimic_weight = float(mimic_weight)
        s_ch, t_ch = int(s_fpn.out_channels), int(t_fpn.out_channels)
        self.channels_differ = s_ch != t_ch
        if method not in ("none", "wkd_l") and (method == "pcka_mimic" or self.channels_differ):
            n = len(self.levels)
            self.extra: PatchMimic | None = PatchMimic([s_ch] * n, [t_ch] * n)
        else:
            self.extra = None
        self.temperature, self.score_thresh, self.topk = float(temperature), float(score_thresh), topk
        self.feature_weight = float(feature_weight)
        self.cost: Tensor | None
        if method in _WKD_L:
            self.register_buffer("cost", self._wkd_cost(student, teacher, method, cost, background_cost), False)
        else:
            self.cost = None

    @staticmethod
    def _wkd_cost(student: nn.Module, teacher: nn.Module, method: str, cost: Tensor | None, bg: float) -> Tensor:
        """The (K+1, K+1) WKD-L cost with the background bin, built once (so ``ckakd.sinkhorn`` caches its kernel)."""
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
            cost = with_background_cost(cost, bg)
        elif tuple(cost.shape) != (k_s + 1, k_s + 1):
            raise ValueError(
                f"cost must be ({k_s}, {k_s}) or ({k_s + 1}, {k_s + 1}) (background last) for {k_s} classes, "
                f"got {tuple(cost.shape)}"
            )
        if not bool(torch.isfinite(cost).all()) or bool((cost < 0).any()):
            raise ValueError(f"cost must be finite and nonnegative, got {tuple(cost.shape)} with bad entries")
        return cost.detach().clone()

    def train(self, mode: bool = True) -> DetectionDistiller:
        super().train(mode)
        self.teacher.eval()
        return self

    def distill_loss(
        self,
        f_s: Sequence[Tensor],
        f_t: Sequence[Tensor],
        s_cls: Sequence[Tensor] | None = None,
        t_cls: Sequence[Tensor] | None = None,
    ) -> dict[str, Tensor]:
        """The distillation term(s) on the selected levels: ``{"distill": ...}`` (+ ``"mimic"``, ``"distill_feat"``).
        WKD-L also takes the per-level cls logits (B, N_l, K) of student and teacher, ``s_cls`` and ``t_cls``."""
        s = [f_s[i] for i in self.levels]
        t = [f_t[i].detach() for i in self.levels]
        out: dict[str, Tensor] = {}
        projected = self.extra(s) if self.extra is not None else s
        # centered CKA needs >= 2 positions: PCKA skips levels of a single position (e.g. P7 of a 64x64 image)
        big = [j for j, f in enumerate(t) if f.shape[-2] * f.shape[-1] >= 2]
        if self.method == "pcka_mimic":
            src = projected if self.channels_differ else s
            out["distill"] = pcka_loss(
                [src[j] for j in big],
                [t[j] for j in big],
                patch_size=self.patch_size,
                reduce=self.reduce,
                gamma=self.weight,
            )
            out["mimic"] = self.mimic_weight * sum(
                torch.nn.functional.mse_loss(p, q) for p, q in zip(projected, t, strict=True)
            )
        elif self.method == "pcka":
            out["distill"] = pcka_loss(
                [projected[j] for j in big],
                [t[j] for j in big],
                patch_size=self.patch_size,
                reduce=self.reduce,
                gamma=self.weight,
            )
        elif self.method == "kd_patch":
            out["distill"] = kd_patch_loss(projected, t, patch_size=self.patch_size, weight=self.weight)
        elif self.method == "at_patch":
            out["distill"] = at_patch_loss(projected, t, patch_size=self.patch_size, weight=self.weight)
        elif self.method == "dist_patch":
            out["distill"] = self.weight * dist_patch_loss(projected, t, patch_size=self.patch_size)
        elif self.method == "mmd_patch":
            out["distill"] = mmd_patch_loss(projected, t, patch_size=self.patch_size, weight=self.weight)
        elif self.method == "wkd_f":  # mean weight r = 2 (WKD's ImageNet value); grid 1 on the small FPN maps
            out["distill"] = wkd_feature_fpn_loss(projected, t, weight=self.weight)
        elif self.method in _WKD_L:
            if s_cls is None or t_cls is None:
                raise ValueError(f"method={self.method!r} needs the cls logits s_cls and t_cls (head_outputs)")
            out["distill"] = wkd_logit_dense_loss(
                [s_cls[i] for i in self.levels],
                [t_cls[i].detach() for i in self.levels],
                self.cost,
                temperature=self.temperature,
                weight=self.weight,
                score_thresh=self.score_thresh,
                topk=self.topk,
            )
            if self.method == "wkd_lf":
                out["distill_feat"] = wkd_feature_fpn_loss(projected, t, weight=self.feature_weight)
        return out

    def forward_train(
        self, images: Tensor, targets: Sequence[dict[str, Tensor]], image_sizes: Sequence[tuple[int, int]] | None = None
    ) -> dict[str, Tensor]:
        """Student detection losses + the distillation loss (teacher features under ``no_grad``)."""
        feats = self.student.features(images)
        outs = self.student.head_outputs(feats)
        losses = dict(self.student.compute_losses(outs, feats, images, targets))
        if self.method != "none":
            t_cls = None
            with torch.no_grad():
                t_feats = self.teacher.features(images)
                if self.method in _WKD_L:
                    t_cls = self.teacher.head_outputs(t_feats)["cls_logits"]
            if len(t_feats) != len(feats):
                raise ValueError(f"student gave {len(feats)} FPN levels, teacher {len(t_feats)}")
            s_cls = outs["cls_logits"] if t_cls is not None else None
            losses.update(self.distill_loss(feats, t_feats, s_cls, t_cls))
        return losses

    def forward(self, images: Tensor, targets=None, image_sizes=None):
        """Training with ``targets``: :meth:`forward_train`; otherwise the student's detections."""
        if self.training and targets is not None:
            return self.forward_train(images, targets, image_sizes)
        return self.student(images, image_sizes=image_sizes)


def _student(model: nn.Module) -> nn.Module:
    return detector_of(model)


def evaluate_detector(
    model: nn.Module, dataset: Any, batch_size: int = 8, device: str | torch.device = "cpu", coco_gt: Any = None
) -> dict[str, float]:
    """COCO ``{"AP", "AP50", "AP75", "APs", "APm", "APl"}`` (in [0, 1]) of ``model`` (a detector or a
    :class:`DetectionDistiller`, whose student is scored) on ``dataset``. Predicted boxes are rescaled from
    the loaded image size to the target's ``orig_size`` when it has one."""
    task = DetectionTask(coco_gt=coco_gt, gather=False)  # the whole dataset, in this process
    task._ground_truth(_Loader(dataset))  # a clear error before any forward when there is no ground truth
    loader = make_detection_loader(dataset, batch_size=batch_size, shuffle=False, seed=0)
    metrics = task.evaluate(model, loader, torch.device(device))
    return {k: metrics[k] / 100.0 for k in METRIC_NAMES}


class _Loader:
    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset


def detection_settings(
    *,
    epochs: int,
    lr: float,
    out_dir: str | Path,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
    resume: bool = False,
    grad_clip: float | None = 10.0,
    warmup_iters: int = 100,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    eval_every: int = 1,
    amp: bool = False,
    **kwargs: Any,
) -> TrainSettings:
    """The detection recipe as :class:`~ckakd.train.engine.TrainSettings`: SGD, step warmup over
    ``warmup_iters`` optimizer steps (lr/10 -> lr), ×0.1 from 80 % of the epochs on (when epochs >= 3),
    gradient clipping at 10."""
    milestones = [int(math.ceil(0.8 * epochs))] if epochs >= 3 else []
    return TrainSettings(
        epochs=epochs,
        out_dir=out_dir,
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        schedule="step",
        milestones=milestones,
        warmup_steps=warmup_iters,
        device=str(device),
        amp=amp,
        grad_clip=grad_clip,
        seed=seed,
        progress=progress,
        eval_every=eval_every,
        resume=resume,
        **kwargs,
    )


def train_detector(
    model: nn.Module,
    train_loader: Any,
    val_dataset: Any,
    *,
    epochs: int,
    lr: float,
    out_dir: str | Path,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
    resume: bool = False,
    grad_clip: float | None = 10.0,
    warmup_iters: int | None = None,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    eval_batch_size: int = 8,
    eval_every: int = 1,
    callbacks: Sequence[Any] = (),
) -> dict[str, Any]:
    """Train a detector or a :class:`DetectionDistiller` with the shared :class:`~ckakd.train.engine.Trainer`
    (:class:`~ckakd.detection.task.DetectionTask`) and the recipe of :func:`detection_settings`;
    ``warmup_iters`` defaults to a third of the first epoch, at most 100 steps.

    Returns ``{"history", "final", "epochs_run" (all completed epochs, resumed ones included), "train_time_s",
    "out_dir"}`` where ``final`` holds the last
    epoch's six COCO metrics in [0, 1] (the ``metrics.csv`` rows have them in percent, as ``val/AP`` ...).
    Outputs: ``metrics.csv`` / ``metrics.jsonl``, ``latest.pt`` / ``best.pt`` (by AP), ``curves.png``;
    ``resume=True`` continues from ``latest.pt``. A NaN/inf loss raises
    :class:`ckakd.train.engine.NonFiniteLossError`; ``latest.pt`` keeps the last good epoch.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if warmup_iters is None:
        warmup_iters = min(100, max(1, len(train_loader) // 3))
    val_loader = None
    if val_dataset is not None and len(val_dataset) > 0 and coco_ground_truth(val_dataset) is not None:
        val_loader = make_detection_loader(val_dataset, batch_size=eval_batch_size, shuffle=False, seed=0)
    settings = detection_settings(
        epochs=epochs,
        lr=lr,
        out_dir=out_dir,
        seed=seed,
        device=device,
        progress=progress,
        resume=resume,
        grad_clip=grad_clip,
        warmup_iters=warmup_iters,
        momentum=momentum,
        weight_decay=weight_decay,
        eval_every=eval_every,
    )
    trainer = Trainer(model, train_loader, val_loader, settings, task=DetectionTask(), callbacks=callbacks)
    result = trainer.fit()
    history = trainer.history
    last = history[-1] if history else {}
    final = {k: last[f"val/{k}"] / 100.0 for k in METRIC_NAMES if last.get(f"val/{k}") is not None}
    return {
        "history": history,
        "final": final,
        "epochs_run": result["epochs_completed"],
        "train_time_s": result["train_time_s"],
        "out_dir": result["out_dir"],
    }
