"""The classification trainer's config schema (:class:`Config`) and the loader entry points.

A config is a tree of dataclasses: the sections the training loop reads (``run``, ``optim``, ``schedule``, ``train``;
defined with the loop, in :mod:`ckakd.train.engine.settings`) and the classification ones defined here (``data``,
``model``, ``teacher`` / ``teachers``, ``distiller``). YAML files may inherit from each other with ``base:`` and be
patched with dotted ``key=value`` overrides (:mod:`ckakd.train.config_files`)::

    cfg = load_config("digits/rcka", ["optim.lr=0.1", "distiller.kwargs.alpha=3"])
    cfg.save("runs/x/config.yaml")          # the resolved YAML; load_config() reads it back unchanged

Every key is checked: unknown keys (except inside the free-form ``kwargs`` mappings), wrong types and
values outside the allowed set raise :class:`ValueError` naming the dotted key. Paths (``data.root``,
``*.checkpoint``, ``distiller.cost``) are kept as written, relative to the working directory, and are
checked when a run starts, not here.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .config_files import (
    apply_overrides,
    config_from_dict,
    config_path,
    configs_root,
    dump_yaml,
    list_configs,
    load_config,
    parse_override,
    register_task,
)
from .data.registry import dataset_name_check
from .engine.settings import OptimConfig, RunConfig, ScheduleConfig, TrainConfig, check_milestones
from .fileio import atomic_write_bytes
from .schema import check, non_empty, non_negative, open_unit, plain, positive
from .state_dicts import parse_key_map

__all__ = [
    "Augment",
    "Config",
    "ConfigError",
    "DataConfig",
    "DistillerConfig",
    "ModelConfig",
    "ModelSpec",
    "OptimConfig",
    "RunConfig",
    "ScheduleConfig",
    "TeacherConfig",
    "TrainConfig",
    "apply_overrides",
    "check_config",
    "config_from_dict",
    "config_path",
    "configs_root",
    "list_configs",
    "load_config",
    "parse_override",
]


class ConfigError(ValueError):
    """A config that cannot run (raised before any training starts): a missing folder or checkpoint, a model or
    distiller that does not fit, an unusable device, ..."""


# --------------------------------------------------------------------------------------------- schema


Augment = Literal["none", "weak", "strong"]


@dataclass
class DataConfig:
    """Dataset and loader. ``name``: ``digits``, ``cifar100``, ``imagefolder`` or a dataset registered with
    :func:`~ckakd.train.data.register_dataset` (``kwargs`` go to its builder; the built-ins take none).
    ``image_size=None``: the dataset's native size; ``val_fraction``: digits only. ``augment``: the student's
    training augmentation (teachers of ``ensemble_kd`` may have their own: ``teacher.augment`` /
    ``teachers[i].augment``)."""

    name: str = field(default="digits", metadata=check(dataset_name_check))
    kwargs: dict[str, Any] = field(default_factory=dict)
    root: str | None = field(default=None, metadata=check(non_empty))
    batch_size: int = field(default=64, metadata=check(positive))
    num_workers: int = field(default=0, metadata=check(non_negative))
    augment: Augment = "weak"
    image_size: int | None = field(default=None, metadata=check(positive))
    val_fraction: float = field(default=0.25, metadata=check(open_unit))
    max_train_batches: int | None = field(default=None, metadata=check(positive))
    drop_last: bool = True


@dataclass
class ModelConfig:
    """The student (in ``train-teacher``: the model being trained); ``kwargs`` go to its factory.

    ``name``: a registered model (``ckakd.train.list_models()``, or one of yours: ``@register_model``),
    ``timm.<name>`` or ``torchvision.<name>`` (those libraries' classifiers, built with the dataset's class count
    and without pretrained weights unless ``kwargs`` ask for them). ``checkpoint``: initial weights, a ckakd
    checkpoint or another codebase's state dict (see :class:`TeacherConfig` for ``key_map`` / ``strict``).
    """

    name: str = field(default="resnet8", metadata=check(non_empty))
    kwargs: dict[str, Any] = field(default_factory=dict)
    checkpoint: str | None = field(default=None, metadata=check(non_empty))
    key_map: list[tuple[str, str]] = field(default_factory=list, metadata={"convert": parse_key_map})
    strict: bool = True


@dataclass
class TeacherConfig:
    """The (first) teacher; ``name=None``: no teacher. ``name`` as for :class:`ModelConfig` (``timm.<name>``,
    ``torchvision.<name>`` too). ``augment``: its ``ensemble_kd`` view (see :class:`ModelSpec`).

    ``checkpoint``: a ckakd checkpoint (``ckakd train-teacher``), or a plain ``state_dict`` as torchvision, timm
    and most repositories ship it, also inside ``{"model": ...}`` / ``{"state_dict": ...}``. ``module.`` /
    ``_orig_mod.`` prefixes (DDP, ``torch.compile``) are stripped, then ``key_map`` rewrites key prefixes in
    order (a mapping ``{"fc.": "classifier."}`` or a list of ``[old, new]`` pairs). ``strict`` (default): every key
    must fit, else the error names the missing / unexpected keys and shape mismatches; ``strict: false`` loads
    the tensors that fit and reports the rest.
    """

    name: str | None = field(default=None, metadata=check(non_empty))
    kwargs: dict[str, Any] = field(default_factory=dict)
    checkpoint: str | None = field(default=None, metadata=check(non_empty))
    augment: Augment | None = None
    key_map: list[tuple[str, str]] = field(default_factory=list, metadata={"convert": parse_key_map})
    strict: bool = True


@dataclass
class ModelSpec:
    """One extra teacher of an ensemble (``teachers:`` entries); ``name`` is required.

    ``augment`` (``none|weak|strong``; ``None``: the student's view) is the augmentation of the images this
    teacher sees during ``ensemble_kd`` training, drawn independently of the student's (per-model
    augmentation strength, the T1{w,s} T2{w,s} S{w,s} grid of Guo et al.); ``None`` feeds the teacher the
    student's exact view. Other distillers refuse it. ``checkpoint`` / ``key_map`` / ``strict``: as for
    :class:`TeacherConfig`.
    """

    name: str = field(metadata=check(non_empty))
    kwargs: dict[str, Any] = field(default_factory=dict)
    checkpoint: str | None = field(default=None, metadata=check(non_empty))
    augment: Augment | None = None
    key_map: list[tuple[str, str]] = field(default_factory=list, metadata={"convert": parse_key_map})
    strict: bool = True


@dataclass
class DistillerConfig:
    """Distillation method. ``kwargs`` are free-form here and checked by ``build_distiller``.

    ``cost``: path of a saved interrelation file (WKD-L / WKD-LF); ``sharpen``: the κ turning it into a
    cost (``cost_from_interrelation``).
    """

    name: str = field(default="ce", metadata=check(non_empty))
    kwargs: dict[str, Any] = field(default_factory=dict)
    cost: str | None = field(default=None, metadata=check(non_empty))
    sharpen: float = field(default=1.0, metadata=check(positive))


@dataclass
class Config:
    """A whole classification trainer config; build it with :func:`load_config` or :func:`config_from_dict`.
    (``task: detection`` at the top of a YAML selects :class:`ckakd.detection.config.DetectionConfig` instead.)"""

    task: Literal["classification"] = "classification"
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    teachers: list[ModelSpec] = field(default_factory=list)
    distiller: DistillerConfig = field(default_factory=DistillerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (lists, not tuples) that :func:`config_from_dict` turns back into this config."""
        return plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        """The resolved config as YAML (sections in schema order)."""
        return dump_yaml(self.to_dict())

    def save(self, path: str | os.PathLike) -> Path:
        """Write the resolved YAML to ``path`` atomically (temporary file + rename); returns the path."""
        text = "# resolved ckakd trainer config (ckakd.train.config)\n" + self.to_yaml()
        return atomic_write_bytes(path, text.encode("utf-8"))


def check_config(cfg: Any) -> None:
    """The checks across keys of a config (classification or detection): increasing milestones, and no teacher
    settings without a teacher."""
    check_milestones(cfg.schedule.milestones)
    t = cfg.teacher
    if t.name is None and (t.checkpoint is not None or t.kwargs or t.augment is not None or t.key_map or not t.strict):
        raise ValueError(
            "teacher.name is null but teacher.checkpoint/teacher.kwargs/teacher.augment/teacher.key_map/"
            "teacher.strict are set: name the teacher model (e.g. teacher.name=resnet32x4) or drop them"
        )


register_task(
    "classification",
    Config,
    check_config,
    empty_hint=(
        f" ({ScheduleConfig().epochs} epochs of {DataConfig().name!r} with distiller {DistillerConfig().name!r} and "
        "no teacher)"
    ),
)
