"""The detection config schema (``task: detection`` configs: ``ckakd detect-*``), registered with the config
loader when this module is imported: :func:`ckakd.train.config.load_config` then builds detection files into
:class:`DetectionConfig`.

The sections the training loop reads are the trainer's (:mod:`ckakd.train.engine.settings`) with the detection
recipe as their defaults (:class:`DetectionOptimConfig`, :class:`DetectionScheduleConfig`,
:class:`DetectionTrainConfig`); data, models and distiller are the detection ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ckakd.train.config import (
    Config,
    DistillerConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    ScheduleConfig,
    TeacherConfig,
    TrainConfig,
    check_config,
    load_config,
)
from ckakd.train.config_files import register_task
from ckakd.train.schema import check, non_empty, non_negative, positive

__all__ = [
    "DetectionConfig",
    "DetectionDataConfig",
    "DetectionDistillerConfig",
    "DetectionModelConfig",
    "DetectionOptimConfig",
    "DetectionScheduleConfig",
    "DetectionTeacherConfig",
    "DetectionTrainConfig",
    "check_detection_config",
    "load_config",
]


@dataclass
class DetectionDataConfig:
    """Detection data (``ckakd detect-*``).

    ``synthetic``: the embedded :class:`~ckakd.detection.data.SyntheticDigitsDetection`: ``num_train`` /
    ``num_val`` images of ``image_size``², 1..``max_objects`` digits of ``scales`` = [min, max] pixels;
    ``occlusion``: later digits may hide earlier ones; ``cache``: render the training images once and keep
    them in memory. ``coco``: an images folder and a COCO instances JSON per split (``val_*`` default to the
    training ones), resized to ``min_size`` (shorter side) / ``max_size`` (longer side limit). ``flip``:
    random horizontal flip of training images and boxes (off by default: mirrored digits are not digits).
    ``eval_batch_size``: validation batches."""

    name: Literal["synthetic", "coco"] = "synthetic"
    train_images: str | None = field(default=None, metadata=check(non_empty))
    train_annotations: str | None = field(default=None, metadata=check(non_empty))
    val_images: str | None = field(default=None, metadata=check(non_empty))
    val_annotations: str | None = field(default=None, metadata=check(non_empty))
    num_train: int = field(default=512, metadata=check(positive))
    num_val: int = field(default=64, metadata=check(positive))
    image_size: int = field(default=64, metadata=check(positive))
    scales: tuple[int, int] = (16, 32)
    max_objects: int = field(default=3, metadata=check(positive))
    occlusion: bool = True
    cache: bool = True
    min_size: int = field(default=512, metadata=check(positive))
    max_size: int = field(default=853, metadata=check(positive))
    flip: bool = False
    batch_size: int = field(default=16, metadata=check(positive))
    eval_batch_size: int = field(default=8, metadata=check(positive))
    num_workers: int = field(default=0, metadata=check(non_negative))
    max_train_batches: int | None = field(default=None, metadata=check(positive))


@dataclass
class DetectionModelConfig(ModelConfig):
    """A detector: ``retinanet`` / ``fcos`` (ours; ``kwargs``: depth, width, out_channels, num_convs, levels,
    ...) or ``torchvision.<builder>`` (e.g. ``torchvision.retinanet_resnet50_fpn``; needs torchvision)."""

    name: str = field(default="retinanet", metadata=check(non_empty))


@dataclass
class DetectionTeacherConfig(TeacherConfig):
    """The teacher detector (same names as ``model``); ``checkpoint`` from ``ckakd detect-train``."""


@dataclass
class DetectionDistillerConfig(DistillerConfig):
    """FPN distillation method (``none``, ``pcka``, ``pcka_mimic``, ``kd_patch``, ``at_patch``, ``dist_patch``,
    ``mmd_patch``, ``wkd_f``, ``wkd_l``, ...); ``kwargs`` go to ``DetectionDistiller`` (weight, patch_size,
    reduce, levels, feature_paths_s, feature_paths_t, ...). ``cost`` / ``sharpen``: the WKD-L category cost."""

    name: str = field(default="none", metadata=check(non_empty))


@dataclass
class DetectionOptimConfig(OptimConfig):
    """SGD for detectors (RetinaNet recipe: momentum 0.9, weight decay 1e-4)."""

    lr: float = field(default=0.01, metadata=check(positive))
    weight_decay: float = field(default=1e-4, metadata=check(non_negative))


@dataclass
class DetectionScheduleConfig(ScheduleConfig):
    """The 1x-style recipe scaled to ``epochs``: ×0.1 at the milestones, step warmup over ``warmup_steps``."""

    epochs: int = field(default=12, metadata=check(positive))
    milestones: list[int] = field(default_factory=lambda: [8, 11])
    warmup_steps: int = field(default=100, metadata=check(non_negative))


@dataclass
class DetectionTrainConfig(TrainConfig):
    """Loop options (detectors clip gradients at 10 by default)."""

    grad_clip: float | None = field(default=10.0, metadata=check(positive))


@dataclass
class DetectionConfig:
    """A detection run (``task: detection``): the same sections as :class:`Config` with detection data and
    detector models; build it with :func:`load_config` or :func:`config_from_dict`."""

    task: Literal["detection"] = "detection"
    run: RunConfig = field(default_factory=RunConfig)
    data: DetectionDataConfig = field(default_factory=DetectionDataConfig)
    model: DetectionModelConfig = field(default_factory=DetectionModelConfig)
    teacher: DetectionTeacherConfig = field(default_factory=DetectionTeacherConfig)
    distiller: DetectionDistillerConfig = field(default_factory=DetectionDistillerConfig)
    optim: DetectionOptimConfig = field(default_factory=DetectionOptimConfig)
    schedule: DetectionScheduleConfig = field(default_factory=DetectionScheduleConfig)
    train: DetectionTrainConfig = field(default_factory=DetectionTrainConfig)

    to_dict = Config.to_dict
    to_yaml = Config.to_yaml
    save = Config.save


def check_detection_config(cfg: DetectionConfig) -> None:
    """:func:`~ckakd.train.config.check_config` plus the detection rules: the teacher sees the student's images,
    ``data.scales`` is an ordered size range."""
    check_config(cfg)
    if cfg.teacher.augment is not None:
        raise ValueError("teacher.augment: detection teachers see the student's images; drop it")
    lo, hi = cfg.data.scales
    if not 0 < lo <= hi:
        raise ValueError(f"data.scales: expected [min, max] object sizes with 0 < min <= max, got {[lo, hi]}")


register_task("detection", DetectionConfig, check_detection_config)
