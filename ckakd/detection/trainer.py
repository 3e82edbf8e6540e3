"""Detector distillation and training on the shared trainer.

* :class:`~ckakd.detection.distillers.DetectionDistiller` (defined in :mod:`ckakd.detection.distillers`,
  importable here) wraps a student and a frozen teacher detector; the methods are registered there.
* :func:`train_detector` trains a detector or a distiller with :class:`~ckakd.train.engine.Trainer` and
  :class:`~ckakd.detection.task.DetectionTask` (SGD, step warmup, step decay; AMP, DDP, checkpoints, resume,
  COCO AP per epoch, ``best.pt`` by AP) — the function behind ``ckakd detect-demo``; the config-driven
  commands go through :mod:`ckakd.detection.runner`.
* :func:`evaluate_detector` gives the six COCO metrics of a detector on a dataset.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ckakd.detection.config import DetectionConfig
from ckakd.detection.data import make_detection_loader
from ckakd.detection.distillers import DISTILL_METHODS, DetectionDistiller
from ckakd.detection.evaluation import METRIC_NAMES
from ckakd.detection.task import DetectionTask, coco_ground_truth
from ckakd.train.engine import Trainer, TrainSettings

__all__ = [
    "DISTILL_METHODS",
    "DetectionDistiller",
    "train_detector",
    "evaluate_detector",
    "detection_settings",
    "coco_ground_truth",
]


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
    warmup_iters: int | None = None,
    device: str | torch.device = "cpu",
    **keywords: Any,
) -> TrainSettings:
    """The detection recipe as :class:`~ckakd.train.engine.TrainSettings`: the defaults of the detection config's
    sections (:class:`~ckakd.detection.config.DetectionConfig`: SGD with momentum 0.9 and weight decay 1e-4, a step
    warmup over ``warmup_iters`` optimizer steps (lr/10 -> lr; default 100), gradient clipping at 10) with ×0.1 from
    80 % of the epochs on (when epochs >= 3) and ``device="cpu"``. ``keywords``: any other
    :meth:`~ckakd.train.engine.TrainSettings.create` keyword (``seed``, ``grad_clip``, ``cka_pairs``, ...)."""
    keywords.setdefault("milestones", [int(math.ceil(0.8 * epochs))] if epochs >= 3 else [])
    if warmup_iters is not None:
        keywords["warmup_steps"] = warmup_iters
    return TrainSettings.create(epochs, out_dir, schema=DetectionConfig, lr=lr, device=device, **keywords)


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
