"""Detector distillation and training on the shared trainer.

* :class:`DetectionDistiller` wraps a student and a frozen teacher detector (RetinaNet / FCOS / a
  :class:`~ckakd.detection.adapters.TorchvisionDetector`): its :meth:`~DetectionDistiller.forward_train`
  returns the student's detection losses plus the distillation term(s) on the feature maps captured by forward
  hooks (default: the FPN levels) or on the classification branch (PCKA, PCKA + mimic, KD / AT / DIST / MMD
  "w/ patch", WKD-F, WKD-L, WKD-LF).
* :func:`train_detector` trains a detector or a distiller with :class:`~ckakd.train.engine.Trainer` and
  :class:`~ckakd.detection.task.DetectionTask` (SGD, step warmup, step decay; AMP, DDP, checkpoints, resume,
  COCO AP per epoch, ``best.pt`` by AP) — the function behind ``ckakd detect-demo``; the config-driven
  commands go through :mod:`ckakd.detection.runner`.
* :func:`evaluate_detector` gives the six COCO metrics of a detector on a dataset.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
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
from ckakd.functional import PATCH_RESIZE
from ckakd.train.engine import Trainer, TrainSettings
from ckakd.train.hooks import FeatureHooks

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
_PCKA_MODES = ("centered", "uncentered", "debiased")


def _protocol(model: nn.Module, who: str) -> tuple[int, int, list[str]]:
    """(FPN levels, FPN channels, hook paths of the levels) of a detector following the DenseDetector protocol."""
    missing = [
        a for a in ("features", "head_outputs", "compute_losses", "num_levels", "fpn_channels") if not hasattr(model, a)
    ]
    if missing:
        raise TypeError(
            f"{who} must be a detector with the DenseDetector protocol (RetinaNet / FCOS / TorchvisionDetector), "
            f"got {type(model).__name__} lacking {missing}"
        )
    return int(model.num_levels), int(model.fpn_channels), list(getattr(model, "feature_names", []))


def _hooked_maps(hooks: FeatureHooks, who: str) -> list[Tensor]:
    """The feature maps the hooks saw, in path order; a path whose output is a mapping or a sequence of maps
    (torchvision's ``backbone`` gives an ``OrderedDict`` of levels) contributes all of them."""
    seen = hooks.features
    out: list[Tensor] = []
    for path in hooks.paths:
        if path not in seen:
            raise ValueError(
                f"{who} hook path {path!r} did not run in the detector's features / head forward; hook a module "
                "of the backbone, the FPN or the head"
            )
        value = seen[path]
        maps = (
            list(value.values())
            if isinstance(value, Mapping)
            else list(value)
            if isinstance(value, list | tuple)
            else [value]
        )
        for m in maps:
            if not isinstance(m, Tensor) or m.dim() != 4:
                what = tuple(m.shape) if isinstance(m, Tensor) else type(m).__name__
                raise ValueError(f"{who} hook path {path!r} gave {what}, expected (B, C, H, W) feature maps")
        out += maps
    return out


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
        mode, resize, inter_weight: PCKA's CKA (``"centered"`` | ``"uncentered"``, the authors' |
            ``"debiased"``), resize rule (``"nearest"`` | ``"ceil"``, the authors'; default ``"ceil"`` with
            ``"uncentered"``, else ``"nearest"``) and inter-term weight (0: off); see
            :func:`~ckakd.detection.distill.pcka_loss`. PCKA methods only.
        mimic_weight: weight of the mimic MSE (``"pcka_mimic"``).
        levels: indices of the FPN levels to distil (default: all); WKD-L uses the cls logits of these levels.
        cost: WKD-L's class cost, (K, K) (``ckakd.cost_from_interrelation(detection_class_interrelation(
            teacher, dataset))``) or (K+1, K+1) with the background bin last; required for wkd_l / wkd_lf.
        temperature, score_thresh, topk, background_cost: WKD-L's knobs (T = 2, WKD's ImageNet value; the
            teacher-confidence threshold and per-image cap of the compared locations; the background bin's cost).
        feature_weight: WKD-F's weight in ``"wkd_lf"`` (as ``"wkd_f"``'s default, 1).
        student_paths, teacher_paths: dotted module paths whose forward-hook outputs are the distilled feature
            maps (default: each detector's ``feature_names``, its FPN levels: ``backbone.fpn_levels.{i}`` for
            ours, ``model.backbone`` for torchvision's, whose hook output is an ``OrderedDict`` of the levels).
            Any module that runs in the detector's features or head forward may be named (e.g.
            ``backbone.layer3``); ``levels`` then indexes the hooked maps. Student and teacher must give the
            same number of maps (``ValueError`` otherwise, at construction).

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
        mode: str = "centered",
        resize: str | None = None,
        inter_weight: float = 0.0,
        mimic_weight: float = 1.0,
        levels: Sequence[int] | None = None,
        cost: Tensor | None = None,
        temperature: float = 2.0,
        score_thresh: float = 0.05,
        topk: int | None = 100,
        background_cost: float = 1.0,
        feature_weight: float = 1.0,
        student_paths: Sequence[str] | None = None,
        teacher_paths: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        if method not in DISTILL_METHODS:
            raise ValueError(f"method must be one of {DISTILL_METHODS}, got {method!r}")
        if reduce not in _REDUCES:
            raise ValueError(f"reduce must be one of {_REDUCES}, got {reduce!r}")
        if mode not in _PCKA_MODES:
            raise ValueError(f"mode must be one of {_PCKA_MODES}, got {mode!r}")
        if resize is not None and resize not in PATCH_RESIZE:
            raise ValueError(f"resize must be one of {PATCH_RESIZE} or None, got {resize!r}")
        inter_weight = float(inter_weight)
        if not math.isfinite(inter_weight) or inter_weight < 0:
            raise ValueError(f"inter_weight must be finite and >= 0, got {inter_weight}")
        if inter_weight > 0 and mode == "debiased":
            raise ValueError("inter_weight > 0 needs mode 'centered' or 'uncentered' (the inter term is not debiased)")
        if not method.startswith("pcka") and (mode != "centered" or resize is not None or inter_weight > 0):
            raise ValueError(f"mode / resize / inter_weight are PCKA options; method={method!r} takes none of them")
        n_s, s_ch, s_default = _protocol(student, "student")
        n_t, t_ch, t_default = _protocol(teacher, "teacher")
        s_paths = list(
            s_default if student_paths is None else [student_paths] if isinstance(student_paths, str) else student_paths
        )
        t_paths = list(
            t_default if teacher_paths is None else [teacher_paths] if isinstance(teacher_paths, str) else teacher_paths
        )
        if not s_paths or not t_paths:
            raise ValueError("student_paths / teacher_paths: no feature paths (the detector has no feature_names)")
        self.student_paths, self.teacher_paths = s_paths, t_paths
        self._s_hooks = FeatureHooks(student, s_paths)  # resolves the paths: errors name a bad one now
        self._t_hooks = FeatureHooks(teacher, t_paths, detach=True)
        if student_paths is None and teacher_paths is None:
            s_shapes = [(s_ch,)] * n_s
            t_shapes = [(t_ch,)] * n_t
            if n_s != n_t:
                raise ValueError(
                    f"student and teacher must have the same number of FPN levels, got {n_s} and {n_t} (distil a "
                    "subset with student_paths / teacher_paths, or build both with the same levels)"
                )
        else:  # custom paths: learn the maps' count and channels from one dry forward
            s_shapes, t_shapes = (
                self._probe(student, self._s_hooks, "student"),
                self._probe(teacher, self._t_hooks, "teacher"),
            )
            if len(s_shapes) != len(t_shapes):
                raise ValueError(
                    f"student_paths {s_paths} give {len(s_shapes)} feature maps, teacher_paths {t_paths} give "
                    f"{len(t_shapes)}: they must pair up one to one"
                )
        n_s = len(s_shapes)
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
        self.mode, self.resize, self.inter_weight = mode, resize, inter_weight
        self.mimic_weight = float(mimic_weight)
        s_chs = [int(s_shapes[i][0]) for i in self.levels]
        t_chs = [int(t_shapes[i][0]) for i in self.levels]
        self.channels_differ = s_chs != t_chs
        if method not in ("none", "wkd_l") and (method == "pcka_mimic" or self.channels_differ):
            self.extra: PatchMimic | None = PatchMimic(s_chs, t_chs)
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

    @staticmethod
    @torch.no_grad()
    def _probe(model: nn.Module, hooks: FeatureHooks, who: str, size: int = 128) -> list[tuple[int, ...]]:
        """(C, H, W) of the maps ``hooks`` capture on blank ``size``² images (features + head forward)."""
        in_ch = int(getattr(getattr(model, "backbone", None), "in_channels", 3))
        p = next(model.parameters(), None)
        # two images: GroupNorm refuses a batch of one 1x1 map (P7 of a 128-px image)
        x = torch.zeros(2, in_ch, size, size, device=p.device if p is not None else None)
        was = model.training
        model.eval()
        try:
            hooks.clear()
            model.head_outputs(model.features(x))
            return [tuple(m.shape[1:]) for m in _hooked_maps(hooks, who)]
        finally:
            hooks.clear()
            model.train(was)

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
        if self.method in ("pcka", "pcka_mimic"):
            # with mimic and equal channels, PCKA compares the raw student maps (the projector serves the MSE)
            src = s if self.method == "pcka_mimic" and not self.channels_differ else projected
            out["distill"] = pcka_loss(
                [src[j] for j in big],
                [t[j] for j in big],
                patch_size=self.patch_size,
                reduce=self.reduce,
                gamma=self.weight,
                mode=self.mode,
                resize=self.resize,
                inter_weight=self.inter_weight,
            )
            if self.method == "pcka_mimic":
                out["mimic"] = self.mimic_weight * sum(
                    torch.nn.functional.mse_loss(p, q) for p, q in zip(projected, t, strict=True)
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
        """Student detection losses + the distillation loss on the hooked maps (teacher under ``no_grad``; its
        head runs only for WKD-L or when a teacher path lies in the head)."""
        self._s_hooks.clear()
        self._t_hooks.clear()
        try:
            feats = self.student.features(images)
            outs = self.student.head_outputs(feats)
            losses = dict(self.student.compute_losses(outs, feats, images, targets))
            if self.method == "none":
                return losses
            f_s = _hooked_maps(self._s_hooks, "student")
            t_cls = None
            with torch.no_grad():
                t_feats = self.teacher.features(images)
                if self.method in _WKD_L or any(p not in self._t_hooks.features for p in self.teacher_paths):
                    t_outs = self.teacher.head_outputs(t_feats)
                    t_cls = t_outs.get("cls_logits") if self.method in _WKD_L else None
            f_t = _hooked_maps(self._t_hooks, "teacher")
            if len(f_s) != len(f_t):
                raise ValueError(f"student hooks gave {len(f_s)} feature maps, teacher hooks {len(f_t)}")
            if self.method in _WKD_L and (t_cls is None or "cls_logits" not in outs):
                raise ValueError(
                    f"method={self.method!r} needs dense 'cls_logits' head outputs from both detectors "
                    "(RetinaNet / FCOS; a Faster R-CNN has none)"
                )
            s_cls = outs["cls_logits"] if t_cls is not None else None
            losses.update(self.distill_loss(f_s, f_t, s_cls, t_cls))
            return losses
        finally:  # do not keep this step's maps (and their graph) alive until the next one
            self._s_hooks.clear()
            self._t_hooks.clear()

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
    task.ground_truth(dataset)  # a clear error before any forward when there is no ground truth
    loader = make_detection_loader(dataset, batch_size=batch_size, shuffle=False, seed=0)
    metrics = task.evaluate(model, loader, torch.device(device))
    return {k: metrics[k] / 100.0 for k in METRIC_NAMES}


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
