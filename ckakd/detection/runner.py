"""From a resolved :class:`~ckakd.detection.config.DetectionConfig` to a detection run.

The detection counterpart of :mod:`ckakd.train.runner`, on the same config machinery and the same
:class:`~ckakd.train.engine.Trainer` (through :class:`~ckakd.detection.task.DetectionTask`): data, detectors
(ours or torchvision's), the teacher checkpoint, the WKD-L cost and the hook paths are all built and checked
before the first step, so a bad config fails in seconds with one message naming the key.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn
from torch.utils.data import Dataset

from ckakd.detection import data as DD
from ckakd.detection.adapters import build_torchvision_detector
from ckakd.detection.config import DetectionConfig
from ckakd.detection.data import make_detection_loader
from ckakd.detection.distill import detection_class_interrelation
from ckakd.detection.distillers import DISTILL_METHODS, DetectionDistiller
from ckakd.detection.models import FCOS, RetinaNet
from ckakd.detection.task import DetectionTask
from ckakd.detection.visualize import plot_detections
from ckakd.interrelation import save_interrelation
from ckakd.train.engine import Trainer, seed_everything
from ckakd.train.fileio import OutputError
from ckakd.train.hooks import FeatureHooks
from ckakd.train.runner import (
    ConfigError,
    check_run_resume,
    load_cost,
    load_weights,
    preflight,
    run_device,
    run_settings,
    save_run_config,
)

__all__ = [
    "DETECTOR_NAMES",
    "DetectionData",
    "build_detection_data",
    "build_detector",
    "build_detection_distiller",
    "detection_loaders",
    "train_detection",
    "distill_detection",
    "evaluate_detection_checkpoint",
    "compute_detection_interrelation",
]

DETECTOR_NAMES = ("retinanet", "fcos")
TORCHVISION_PREFIX = "torchvision."


def _require_detection(cfg: Any) -> DetectionConfig:
    if not isinstance(cfg, DetectionConfig):
        raise ConfigError(
            "this is a classification config (no `task: detection`); use `ckakd train-teacher` / `ckakd distill`, "
            "or a detection config (`ckakd configs` lists them under detection/)"
        )
    return cfg


# ------------------------------------------------------------------------------------------------ data


@dataclass
class DetectionData:
    train: Any
    val: Any
    num_classes: int
    train_transform: Any  # per-sample box transform of the training loader (None: images as loaded)


def _path(value: str | None, key: str, *, folder: bool) -> Path:
    if not value:
        raise ConfigError(f"{key} is required for data.name='coco'")
    p = Path(value).expanduser()
    if folder and p.is_file():
        raise ConfigError(f"{key}: {p} is a file, not an images folder")
    if not folder and p.is_dir():
        raise ConfigError(f"{key}: {p} is a folder, not an annotations file")
    if folder and not p.is_dir():
        raise ConfigError(f"{key}: folder not found: {p}")
    if not folder and not p.is_file():
        raise ConfigError(f"{key}: file not found: {p}")
    return p


class _Rendered(Dataset):
    """Every item of a dataset computed once and kept (the synthetic set's images are rendered per access)."""

    def __init__(self, dataset: Any) -> None:
        self.items = [dataset[i] for i in range(len(dataset))]
        self.num_classes = dataset.num_classes
        self.to_coco = dataset.to_coco

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Any:
        return self.items[index]


def build_detection_data(cfg: DetectionConfig) -> DetectionData:
    """The training / validation datasets of ``cfg.data`` and the training box transform."""
    d = cfg.data
    if d.name == "synthetic":
        kw = {
            "image_size": d.image_size,
            "max_objects": d.max_objects,
            "scales": tuple(d.scales),
            "occlusion": d.occlusion,
            "seed": cfg.run.seed,
        }
        if max(d.scales) > d.image_size:
            raise ConfigError(f"data.scales {list(d.scales)} exceed data.image_size {d.image_size}")
        synthetic = DD.SyntheticDigitsDetection(d.num_train, split="train", **kw)
        # rendering costs about as much as a small student's training step: do it once when cached
        train = _Rendered(synthetic) if d.cache else synthetic
        val = DD.SyntheticDigitsDetection(d.num_val, split="val", **kw)
        transform = DD.RandomHorizontalFlipBoxes() if d.flip else None
        return DetectionData(train, val, synthetic.num_classes, transform)
    train_images = _path(d.train_images, "data.train_images", folder=True)
    train_ann = _path(d.train_annotations, "data.train_annotations", folder=False)
    val_images = _path(d.val_images, "data.val_images", folder=True) if d.val_images else train_images
    val_ann = _path(d.val_annotations, "data.val_annotations", folder=False) if d.val_annotations else train_ann
    resize = DD.ResizeBoxes(d.min_size, d.max_size)
    train = DD.CocoDetection(train_images, train_ann)
    val = DD.CocoDetection(val_images, val_ann, transform=resize)
    if train.label_to_cat_id != val.label_to_cat_id:
        raise ConfigError(
            f"data.val_annotations has categories {sorted(val.label_to_cat_id.values())}, the training set "
            f"{sorted(train.label_to_cat_id.values())}: both splits need the same category ids"
        )
    transform = DD.ComposeBoxes([resize, DD.RandomHorizontalFlipBoxes()]) if d.flip else resize
    return DetectionData(train, val, len(train.label_to_cat_id), transform)


def detection_loaders(cfg: DetectionConfig, data: DetectionData) -> tuple[Any, Any]:
    """Seeded (train, val) loaders; the trainer swaps in distributed samplers under torchrun."""

    d = cfg.data
    train = make_detection_loader(
        data.train, d.batch_size, True, cfg.run.seed, transform=data.train_transform, num_workers=d.num_workers
    )
    val = make_detection_loader(data.val, d.eval_batch_size, False, cfg.run.seed, num_workers=d.num_workers)
    return train, val


# ------------------------------------------------------------------------------------------------ models


def build_detector(name: str | None, kwargs: dict[str, Any], num_classes: int, *, section: str) -> nn.Module:
    """``retinanet`` / ``fcos`` (ours) or ``torchvision.<builder>`` with ``kwargs``; errors name ``section``."""
    if name is None:
        raise ConfigError(f"{section}.name is required")
    if name.startswith(TORCHVISION_PREFIX):
        try:
            return build_torchvision_detector(name[len(TORCHVISION_PREFIX) :], num_classes, **kwargs)
        except ImportError as exc:
            raise ConfigError(f"{section}.name={name!r}: {exc}") from exc
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{section}: {exc}") from exc
    classes = {"retinanet": RetinaNet, "fcos": FCOS}
    if name not in classes:
        raise ConfigError(
            f"{section}.name={name!r} is not a detector; choose {', '.join(DETECTOR_NAMES)} or "
            f"{TORCHVISION_PREFIX}<builder> (e.g. torchvision.retinanet_resnet50_fpn)"
        )
    if "num_classes" in kwargs:
        raise ConfigError(f"{section}.kwargs.num_classes: the class count comes from the dataset; drop it")
    try:
        return classes[name](num_classes, **kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{section}.kwargs: {exc}") from exc


def build_teacher_detector(cfg: DetectionConfig, num_classes: int) -> nn.Module:
    t = cfg.teacher
    if t.name is None:
        raise ConfigError(f"distiller {cfg.distiller.name!r} needs a teacher: set teacher.name and teacher.checkpoint")
    if not t.checkpoint:
        raise ConfigError("teacher.checkpoint is required (a latest.pt / best.pt written by `ckakd detect-train`)")
    teacher = build_detector(t.name, t.kwargs, num_classes, section="teacher")
    load_weights(teacher, t.checkpoint, "teacher", key_map=t.key_map, strict=t.strict, progress=cfg.run.progress)
    return teacher


def build_detection_distiller(cfg: DetectionConfig, student: nn.Module, teacher: nn.Module, num_classes: int) -> Any:
    """``DetectionDistiller(student, teacher, method=distiller.name, cost=<WKD-L cost>, **distiller.kwargs)``: the
    method registered as ``distiller.name`` in the detection distiller registry (:mod:`ckakd.detection.distillers`)."""
    method = cfg.distiller.name
    if method not in DISTILL_METHODS:
        raise ConfigError(f"distiller.name={method!r}: choose one of {', '.join(DISTILL_METHODS)}")
    kwargs = dict(cfg.distiller.kwargs)
    for key in ("method", "cost", "student", "teacher"):
        if key in kwargs:
            raise ConfigError(f"distiller.kwargs.{key} is set by the config itself (distiller.name / .cost); drop it")
    cost = load_cost(cfg, num_classes)
    if cost is not None:
        kwargs["cost"] = cost
    try:
        return DetectionDistiller(student, teacher, method=method, **kwargs)
    except TypeError as exc:
        raise ConfigError(f"distiller.kwargs: {exc}") from exc
    except ValueError as exc:
        raise ConfigError(f"distiller: {exc}") from exc


def _cka_pairs(cfg: DetectionConfig, student: nn.Module, teacher: nn.Module | None) -> list[tuple[str, str]]:

    pairs = [tuple(p) for p in cfg.train.cka_pairs]
    if pairs and teacher is None:
        raise ConfigError("train.cka_pairs needs a teacher (teacher.name / teacher.checkpoint)")
    for i, (ps, pt) in enumerate(pairs):
        for model, path, who in ((student, ps, "student"), (teacher, pt, "teacher")):
            try:
                FeatureHooks(model, [path]).remove()
            except (ValueError, AttributeError, KeyError) as exc:
                raise ConfigError(f"train.cka_pairs[{i}]: {who} path {path!r}: {exc}") from exc
    return pairs  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------------ runs


def train_detection(cfg: DetectionConfig, *, resume: bool = False, callbacks: Sequence[Any] = ()) -> dict:
    """Train ``cfg.model`` on ``cfg.data`` (no distillation); outputs in ``run_dir(cfg)``."""
    cfg = _require_detection(cfg)
    preflight(cfg)
    data = build_detection_data(cfg)
    seed_everything(cfg.run.seed, cfg.run.deterministic)
    model = build_detector(cfg.model.name, cfg.model.kwargs, data.num_classes, section="model")
    if cfg.model.checkpoint:
        m = cfg.model
        load_weights(model, m.checkpoint, "model", key_map=m.key_map, strict=m.strict, progress=cfg.run.progress)
    train, val = detection_loaders(cfg, data)
    settings = run_settings(cfg, resume=resume)
    check_run_resume(cfg, settings, model)
    out = save_run_config(cfg)
    result = Trainer(model, train, val, settings, task=DetectionTask(), callbacks=callbacks).fit()
    return {**result, "out_dir": str(out)}


def distill_detection(cfg: DetectionConfig, *, resume: bool = False, callbacks: Sequence[Any] = ()) -> dict:
    """Distil ``cfg.teacher`` into ``cfg.model`` with ``cfg.distiller`` on ``cfg.data``. Distiller ``none`` (the
    student alone) is refused: that is ``detect-train``."""
    cfg = _require_detection(cfg)
    if cfg.distiller.name == "none":
        raise ConfigError(
            "distiller.name='none' trains the student alone (the teacher is not used): `detect-distill` needs a "
            "distillation method (e.g. distiller.name=pcka with teacher.name and teacher.checkpoint); to train "
            "without a teacher use `ckakd detect-train`"
        )
    preflight(cfg)
    data = build_detection_data(cfg)
    seed_everything(cfg.run.seed, cfg.run.deterministic)
    teacher = build_teacher_detector(cfg, data.num_classes)
    student = build_detector(cfg.model.name, cfg.model.kwargs, data.num_classes, section="model")
    if cfg.model.checkpoint:
        m = cfg.model
        load_weights(student, m.checkpoint, "model", key_map=m.key_map, strict=m.strict, progress=cfg.run.progress)
    distiller = build_detection_distiller(cfg, student, teacher, data.num_classes)
    pairs = _cka_pairs(cfg, student, teacher)
    train, val = detection_loaders(cfg, data)
    settings = run_settings(cfg, resume=resume, cka_pairs=pairs)
    check_run_resume(cfg, settings, distiller)
    out = save_run_config(cfg)
    trainer = Trainer(
        distiller, train, val, settings, task=DetectionTask(), teacher_for_cka=teacher, callbacks=callbacks
    )
    return {**trainer.fit(), "out_dir": str(out)}


def evaluate_detection_checkpoint(
    cfg: DetectionConfig, checkpoint: str | os.PathLike, *, plot: str | os.PathLike | None = None
) -> dict[str, float]:
    """COCO metrics (percent) of ``cfg.model`` loaded from ``checkpoint`` on the validation split; ``plot``: also
    draw ground truth and detections of the first validation images to this PNG."""
    cfg = _require_detection(cfg)
    data = build_detection_data(cfg)
    model = build_detector(cfg.model.name, cfg.model.kwargs, data.num_classes, section="model")
    load_weights(model, os.fspath(checkpoint), "checkpoint")
    device = run_device(cfg.run.device)
    _, val = detection_loaders(cfg, data)
    metrics = DetectionTask().evaluate(model.to(device), val, device, amp=cfg.run.amp, amp_dtype=cfg.run.amp_dtype)
    if plot is not None:
        plot_detections({Path(checkpoint).name: model}, data.val, plot, device=device)
    return metrics


def compute_detection_interrelation(
    cfg: DetectionConfig,
    *,
    kernel: str = "cka",
    source: str = "cls_tower",
    samples_per_class: int = 32,
    out: str | os.PathLike | None = None,
) -> Path:
    """The WKD-L category interrelation of the trained ``cfg.teacher`` on the training split (RoI-pooled
    features per ground-truth class, see :func:`~ckakd.detection.distill.detection_class_interrelation`), saved
    next to the teacher checkpoint (``interrelation_<kernel>.pt``) for ``distiller.cost``."""
    cfg = _require_detection(cfg)
    data = build_detection_data(cfg)
    teacher = build_teacher_detector(cfg, data.num_classes)
    device = run_device(cfg.run.device)
    try:
        ir = detection_class_interrelation(
            teacher.to(device),
            data.train if kernel != "cosine" else None,
            kernel=kernel,
            source=source,
            samples_per_class=samples_per_class,
            device=device,
            progress=cfg.run.progress,
        )
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"interrelation: {exc}") from exc
    ckpt = Path(cfg.teacher.checkpoint).expanduser()  # type: ignore[arg-type]
    path = Path(out) if out is not None else ckpt.parent / f"interrelation_{kernel}.pt"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_interrelation(
            path,
            ir.detach().float().cpu(),
            kernel=kernel,
            teacher=cfg.teacher.name,
            checkpoint=str(ckpt),
            source=source,
            samples_per_class=samples_per_class,
        )
    except OSError as exc:
        raise OutputError(path, exc) from exc
    return path
