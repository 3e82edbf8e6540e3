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

import csv
import json
import math
import time
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
    wkd_feature_fpn_loss,
)
from ckakd.detection.evaluation import METRIC_NAMES, CocoEvaluator, rescale_boxes
from ckakd.train.engine import NonFiniteLossError, load_checkpoint, save_checkpoint, seed_everything

__all__ = ["DISTILL_METHODS", "DetectionDistiller", "train_detector", "evaluate_detector", "coco_ground_truth"]

DISTILL_METHODS = ("none", "pcka", "pcka_mimic", "kd_patch", "at_patch", "dist_patch", "mmd_patch", "wkd_f")
_REDUCES = ("channel", "batch", "spatial", "mix")


def _fpn(model: nn.Module) -> Any:
    backbone = getattr(model, "backbone", None)
    if backbone is None or not hasattr(backbone, "levels") or not hasattr(model, "features"):
        raise TypeError(f"expected a DenseDetector (RetinaNet / FCOS), got {type(model).__name__}")
    return backbone


class DetectionDistiller(nn.Module):
    """Student detector + frozen teacher detector + a feature-distillation loss on their FPN levels.

    Args:
        student, teacher: detectors with the ``features`` / ``head_outputs`` / ``compute_losses`` protocol;
            they must have the same number of FPN levels (``ValueError`` otherwise).
        method: ``"none"`` (student losses only), ``"pcka"``, ``"pcka_mimic"`` (PCKA + a 1×1-conv projector
            trained with MSE to the teacher), ``"kd_patch"``, ``"at_patch"``, ``"dist_patch"``, ``"mmd_patch"``
            or ``"wkd_f"`` (WKD-F per FPN level).
        weight: the loss weight (γ for PCKA); default 10 for PCKA, 1 otherwise.
        patch_size, reduce: the patch (P_H, P_W) and PCKA's reduction (channel / batch / spatial / mix).
        mimic_weight: weight of the mimic MSE (``"pcka_mimic"``).
        levels: indices of the FPN levels to distil (default: all).

    The teacher is frozen (``requires_grad=False``) and stays in eval mode under ``.train()``. A projector
    (``self.extra``, a :class:`PatchMimic`) exists for ``"pcka_mimic"`` and whenever the student's and the
    teacher's FPN channels differ; the distillation losses then see the projected student features (PCKA
    with mimic and equal channels is computed on the raw student features).
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
        self.weight = float(weight if weight is not None else (10.0 if method.startswith("pcka") else 1.0))
        self.patch_size = patch_size
        self.reduce = reduce
        self.mimic_weight = float(mimic_weight)
        s_ch, t_ch = int(s_fpn.out_channels), int(t_fpn.out_channels)
        self.channels_differ = s_ch != t_ch
        if method != "none" and (method == "pcka_mimic" or self.channels_differ):
            n = len(self.levels)
            self.extra: PatchMimic | None = PatchMimic([s_ch] * n, [t_ch] * n)
        else:
            self.extra = None

    def train(self, mode: bool = True) -> DetectionDistiller:
        super().train(mode)
        self.teacher.eval()
        return self

    def distill_loss(self, f_s: Sequence[Tensor], f_t: Sequence[Tensor]) -> dict[str, Tensor]:
        """The distillation term(s) on the selected levels: ``{"distill": ...}`` (+ ``"mimic"``)."""
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
        return out

    def forward_train(
        self, images: Tensor, targets: Sequence[dict[str, Tensor]], image_sizes: Sequence[tuple[int, int]] | None = None
    ) -> dict[str, Tensor]:
        """Student detection losses + the distillation loss (teacher features under ``no_grad``)."""
        feats = self.student.features(images)
        outs = self.student.head_outputs(feats)
        losses = dict(self.student.compute_losses(outs, feats, images, targets))
        if self.method != "none":
            with torch.no_grad():
                t_feats = self.teacher.features(images)
            if len(t_feats) != len(feats):
                raise ValueError(f"student gave {len(feats)} FPN levels, teacher {len(t_feats)}")
            losses.update(self.distill_loss(feats, t_feats))
        return losses

    def forward(self, images: Tensor, targets=None, image_sizes=None):
        """Training with ``targets``: :meth:`forward_train`; otherwise the student's detections."""
        if self.training and targets is not None:
            return self.forward_train(images, targets, image_sizes)
        return self.student(images, image_sizes=image_sizes)


def _student(model: nn.Module) -> nn.Module:
    return model.student if isinstance(model, DetectionDistiller) else model


def coco_ground_truth(dataset: Any) -> dict[str, Any] | str | None:
    """COCO ground truth of ``dataset``: ``to_coco()`` when it has one, else its ``annotation_file``."""
    if hasattr(dataset, "to_coco"):
        return dataset.to_coco()
    path = getattr(dataset, "annotation_file", None)
    return str(path) if path is not None else None


@torch.no_grad()
def evaluate_detector(
    model: nn.Module, dataset: Any, batch_size: int = 8, device: str | torch.device = "cpu", coco_gt: Any = None
) -> dict[str, float]:
    """COCO ``{"AP", "AP50", "AP75", "APs", "APm", "APl"}`` (in [0, 1]) of ``model`` (a detector or a
    :class:`DetectionDistiller`, whose student is scored) on ``dataset``. Predicted boxes are rescaled from
    the loaded image size to the target's ``orig_size`` when it has one."""
    det = _student(model)
    gt = coco_gt if coco_gt is not None else coco_ground_truth(dataset)
    if gt is None:
        raise ValueError(f"{type(dataset).__name__} has neither to_coco() nor annotation_file: no COCO ground truth")
    evaluator = CocoEvaluator(gt, label_to_cat_id=getattr(dataset, "label_to_cat_id", None))
    was_training = det.training
    det.eval()
    device = torch.device(device)
    try:
        loader = make_detection_loader(dataset, batch_size=batch_size, shuffle=False, seed=0)
        for images, targets, sizes in loader:
            preds = det(images.to(device), image_sizes=sizes)
            ids, out = [], []
            for i, (p, t) in enumerate(zip(preds, targets, strict=True)):
                p = {k: v.detach().cpu() for k, v in p.items()}
                orig = t.get("orig_size")
                if orig is not None and tuple(int(v) for v in orig) != tuple(sizes[i]):
                    p["boxes"] = rescale_boxes(p["boxes"], sizes[i], orig)
                ids.append(int(t["image_id"]) if "image_id" in t else i)
                out.append(p)
            evaluator.update(out, ids)
    finally:
        det.train(was_training)
    return evaluator.compute()


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    tmp.replace(path)


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)


def _reseed_loader(loader: Any, seed: int, epoch: int) -> None:
    g = getattr(loader, "generator", None)
    if isinstance(g, torch.Generator):
        g.manual_seed(seed * 1000 + epoch)
    cg = getattr(getattr(loader, "collate_fn", None), "generator", None)
    if isinstance(cg, torch.Generator):
        cg.manual_seed(seed * 1000 + epoch + 1)


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
) -> dict[str, Any]:
    """Train a detector or a :class:`DetectionDistiller` and return ``{"history", "final", "epochs_run",
    "train_time_s", "out_dir"}``.

    SGD (momentum 0.9, weight decay 1e-4) with a linear warmup from lr/10 over ``warmup_iters`` steps (default:
    a third of the first epoch, at most 100) and ×0.1 from 80 % of the epochs on (when epochs >= 3). After each
    epoch: mean losses and, every ``eval_every`` epochs and at the last one, COCO AP on ``val_dataset`` (when it
    has COCO ground truth) appended to ``out_dir/metrics.jsonl`` and ``metrics.csv``; ``latest.pt`` written
    atomically. ``resume=True`` continues from ``latest.pt`` (weights, optimizer, epoch, history). A NaN/inf
    loss raises :class:`ckakd.train.engine.NonFiniteLossError` (a ``RuntimeError``); ``latest.pt`` keeps the
    last good epoch.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(seed)
    device = torch.device(device)
    model.to(device)
    student = _student(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    steps_per_epoch = max(1, len(train_loader))
    if warmup_iters is None:
        warmup_iters = min(100, max(1, steps_per_epoch // 3))
    history: list[dict[str, Any]] = []
    start = 0
    latest = out / "latest.pt"
    if resume and latest.is_file():
        ckpt = load_checkpoint(latest, model)
        opt.load_state_dict(ckpt["optimizer"])
        start = int(ckpt["epoch"])
        history = list(ckpt.get("history", []))
    _write_jsonl(out / "metrics.jsonl", history)
    if history:
        _write_csv(out / "metrics.csv", history)
    has_gt = val_dataset is not None and len(val_dataset) > 0 and coco_ground_truth(val_dataset) is not None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    decay_at = int(math.ceil(0.8 * epochs)) if epochs >= 3 else epochs + 1
    t0 = time.perf_counter()
    prior_time = float(history[-1].get("train_time_s", 0.0)) if history else 0.0
    for epoch in range(start, epochs):
        model.train()
        _reseed_loader(train_loader, seed, epoch)
        base = lr * (0.1 if epoch >= decay_at else 1.0)
        sums: dict[str, float] = {}
        n = 0
        it = train_loader
        if progress and tqdm is not None:
            it = tqdm(train_loader, desc=f"epoch {epoch + 1}/{epochs}", leave=False, dynamic_ncols=True)
        for step, (images, targets, sizes) in enumerate(it):
            global_step = epoch * steps_per_epoch + step
            factor = 1.0 if global_step >= warmup_iters else 0.1 + 0.9 * global_step / warmup_iters
            for group in opt.param_groups:
                group["lr"] = base * factor
            images = images.to(device)
            targets = [{k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in t.items()} for t in targets]
            if isinstance(model, DetectionDistiller):
                losses = model.forward_train(images, targets, sizes)
            else:
                losses = model(images, targets, sizes)
            total = sum(losses.values())
            if not torch.isfinite(total):
                bad = {k: float(v.detach()) for k, v in losses.items()}
                raise NonFiniteLossError(
                    f"non-finite loss at epoch {epoch + 1}, step {step + 1}: {bad}; latest.pt holds the last good epoch"
                )
            opt.zero_grad(set_to_none=True)
            total.backward()
            if grad_clip is not None and grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            opt.step()
            n += 1
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            sums["loss"] = sums.get("loss", 0.0) + float(total.detach())
            if progress and tqdm is not None:
                it.set_postfix(loss=f"{float(total.detach()):.3f}")
        row: dict[str, Any] = {"epoch": epoch + 1, "lr": base}
        row.update({k: v / max(1, n) for k, v in sums.items()})
        if has_gt and ((epoch + 1) % max(1, eval_every) == 0 or epoch + 1 == epochs):
            row.update(evaluate_detector(student, val_dataset, eval_batch_size, device))
        row["train_time_s"] = prior_time + time.perf_counter() - t0
        history.append(row)
        _write_jsonl(out / "metrics.jsonl", history)
        _write_csv(out / "metrics.csv", history)
        extra = getattr(model, "extra", None) if isinstance(model, DetectionDistiller) else None
        save_checkpoint(
            latest,
            {
                "student": student.state_dict(),
                "extra": extra.state_dict() if isinstance(extra, nn.Module) else {},
                "optimizer": opt.state_dict(),
                "epoch": epoch + 1,
                "history": history,
                "seed": int(seed),
            },
        )
        if progress:
            ap = f" AP {row['AP']:.4f}" if "AP" in row else ""
            print(f"epoch {epoch + 1}/{epochs}: loss {row.get('loss', float('nan')):.4f}{ap}", flush=True)
    final = {k: history[-1][k] for k in METRIC_NAMES if history and k in history[-1]}
    return {
        "history": history,
        "final": final,
        "epochs_run": len(history),
        "train_time_s": float(history[-1]["train_time_s"]) if history else 0.0,
        "out_dir": str(out),
    }
