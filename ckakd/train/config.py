"""Typed YAML configs for the reference trainer.

A config is a tree of dataclasses (:class:`Config`); YAML files may inherit from each other with
``base:`` and be patched with dotted ``key=value`` overrides::

    cfg = load_config("digits/rcka", ["optim.lr=0.1", "distiller.kwargs.alpha=3"])
    cfg.save("runs/x/config.yaml")          # the resolved YAML; load_config() reads it back unchanged

Every key is checked: unknown keys (except inside the free-form ``kwargs`` mappings), wrong types and
values outside the allowed set raise :class:`ValueError` naming the dotted key. Paths (``data.root``,
``*.checkpoint``, ``distiller.cost``) are kept as written, relative to the working directory, and are
checked when a run starts, not here.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import importlib.util
import math
import os
import re
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

__all__ = [
    "Config",
    "DataConfig",
    "DetectionConfig",
    "DetectionDataConfig",
    "DistillerConfig",
    "ModelConfig",
    "ModelSpec",
    "OptimConfig",
    "RunConfig",
    "ScheduleConfig",
    "TeacherConfig",
    "TrainConfig",
    "apply_overrides",
    "config_from_dict",
    "config_path",
    "configs_root",
    "list_configs",
    "load_config",
    "parse_override",
]

_YAML_SUFFIXES = (".yaml", ".yml")
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")


# --------------------------------------------------------------------------------------------- checks
# Field-level value checks: ``metadata={"check": fn}``; ``fn(value)`` returns an error text or None.


def _positive(v: Any) -> str | None:
    return None if v is None or v > 0 else "must be > 0"


def _non_negative(v: Any) -> str | None:
    return None if v is None or v >= 0 else "must be >= 0"


def _open_unit(v: Any) -> str | None:
    return None if 0.0 < v < 1.0 else "must be strictly between 0 and 1"


def _momentum(v: Any) -> str | None:
    return None if 0.0 <= v < 1.0 else "must be in [0, 1)"


def _device(v: Any) -> str | None:
    return None if _DEVICE_RE.match(v) else "must be 'auto', 'cpu', 'cuda' or 'cuda:N' (N a device index)"


def _non_empty(v: Any) -> str | None:
    return None if v is None or v.strip() else "must be a non-empty string"


def _run_name(v: Any) -> str | None:
    """A folder inside ``run.out_dir``: relative, no ``..`` component (``digits/kd-seed0`` is fine)."""
    if not v.strip():
        return "must be a non-empty string"
    parts = PurePosixPath(v.replace("\\", "/")).parts
    if v.startswith(("/", "\\", "~")) or (len(v) > 1 and v[1] == ":") or ".." in parts or all(p == "." for p in parts):
        return "must name a folder inside run.out_dir (a relative path without '..', e.g. kd-seed0)"
    return None


def _check(fn: Callable[[Any], str | None]) -> dict[str, Any]:
    return {"check": fn}


# --------------------------------------------------------------------------------------------- schema


@dataclass
class RunConfig:
    """Run identity and execution: output folder ``out_dir/name``, seed, device, AMP, logging frontends."""

    name: str = field(default="run", metadata=_check(_run_name))
    out_dir: str = field(default="runs", metadata=_check(_non_empty))
    seed: int = 0
    deterministic: bool = False
    device: str = field(default="auto", metadata=_check(_device))
    amp: bool = False
    amp_dtype: Literal["float16", "bfloat16"] = "bfloat16"
    progress: bool = True
    tensorboard: bool = False


Augment = Literal["none", "weak", "strong"]


@dataclass
class DataConfig:
    """Dataset and loader. ``image_size=None``: the dataset's native size; ``val_fraction``: digits only.
    ``augment``: the student's training augmentation (teachers of ``ensemble_kd`` may have their own:
    ``teacher.augment`` / ``teachers[i].augment``)."""

    name: Literal["digits", "cifar100", "imagefolder"] = "digits"
    root: str | None = field(default=None, metadata=_check(_non_empty))
    batch_size: int = field(default=64, metadata=_check(_positive))
    num_workers: int = field(default=0, metadata=_check(_non_negative))
    augment: Augment = "weak"
    image_size: int | None = field(default=None, metadata=_check(_positive))
    val_fraction: float = field(default=0.25, metadata=_check(_open_unit))
    max_train_batches: int | None = field(default=None, metadata=_check(_positive))
    drop_last: bool = True


@dataclass
class ModelConfig:
    """The student (in ``train-teacher``: the model being trained); ``kwargs`` go to its factory."""

    name: str = field(default="resnet8", metadata=_check(_non_empty))
    kwargs: dict[str, Any] = field(default_factory=dict)
    checkpoint: str | None = field(default=None, metadata=_check(_non_empty))


@dataclass
class TeacherConfig:
    """The (first) teacher; ``name=None``: no teacher. ``augment``: its ``ensemble_kd`` view (see
    :class:`ModelSpec`)."""

    name: str | None = field(default=None, metadata=_check(_non_empty))
    kwargs: dict[str, Any] = field(default_factory=dict)
    checkpoint: str | None = field(default=None, metadata=_check(_non_empty))
    augment: Augment | None = None


@dataclass
class ModelSpec:
    """One extra teacher of an ensemble (``teachers:`` entries); ``name`` is required.

    ``augment`` (``none|weak|strong``; ``None``: the student's view) is the augmentation of the images this
    teacher sees during ``ensemble_kd`` training, drawn independently of the student's (per-model
    augmentation strength, the T1{w,s} T2{w,s} S{w,s} grid of Guo et al.); ``None`` feeds the teacher the
    student's exact view. Other distillers refuse it.
    """

    name: str = field(metadata=_check(_non_empty))
    kwargs: dict[str, Any] = field(default_factory=dict)
    checkpoint: str | None = field(default=None, metadata=_check(_non_empty))
    augment: Augment | None = None


@dataclass
class DistillerConfig:
    """Distillation method. ``kwargs`` are free-form here and checked by ``build_distiller``.

    ``cost``: path of a saved interrelation file (WKD-L / WKD-LF); ``sharpen``: the κ turning it into a
    cost (``cost_from_interrelation``).
    """

    name: str = field(default="ce", metadata=_check(_non_empty))
    kwargs: dict[str, Any] = field(default_factory=dict)
    cost: str | None = field(default=None, metadata=_check(_non_empty))
    sharpen: float = field(default=1.0, metadata=_check(_positive))


@dataclass
class OptimConfig:
    """Optimizer (SGD or AdamW) and its hyperparameters."""

    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = field(default=0.05, metadata=_check(_positive))
    momentum: float = field(default=0.9, metadata=_check(_momentum))
    weight_decay: float = field(default=5e-4, metadata=_check(_non_negative))
    nesterov: bool = False


@dataclass
class ScheduleConfig:
    """Epoch-wise learning-rate schedule: ``step`` (×gamma at each milestone), ``cosine`` or ``constant``,
    after ``warmup_epochs`` of linear warmup; ``warmup_steps``: a further linear warmup (lr/10 -> lr) over the
    first optimizer steps, as detectors use."""

    epochs: int = field(default=240, metadata=_check(_positive))
    kind: Literal["step", "cosine", "constant"] = "step"
    milestones: list[int] = field(default_factory=lambda: [150, 180, 210])
    gamma: float = field(default=0.1, metadata=_check(_positive))
    warmup_epochs: int = field(default=0, metadata=_check(_non_negative))
    warmup_steps: int = field(default=0, metadata=_check(_non_negative))


@dataclass
class TrainConfig:
    """Loop options. ``cka_pairs``: ``[student_path, teacher_path]`` layers whose CKA is logged per epoch
    (empty: the models' last stages); ``global_gram``: under DDP, CKA over the global batch."""

    grad_clip: float | None = field(default=None, metadata=_check(_positive))
    log_every: int = field(default=50, metadata=_check(_positive))
    eval_every: int = field(default=1, metadata=_check(_positive))
    cka_pairs: list[tuple[str, str]] = field(default_factory=list)
    global_gram: bool = False
    save_every: int = field(default=1, metadata=_check(_positive))


@dataclass
class Config:
    """A whole trainer config; build it with :func:`load_config` or :func:`config_from_dict`. ``task:
    detection`` at the top of a YAML selects :class:`DetectionConfig` instead."""

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
        return _plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        """The resolved config as YAML (sections in schema order)."""
        return yaml.dump(self.to_dict(), Dumper=_Dumper, sort_keys=False, allow_unicode=True)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the resolved YAML to ``path`` atomically (temporary file + rename); returns the path."""
        from .fileio import atomic_write_bytes

        text = "# resolved ckakd trainer config (ckakd.train.config)\n" + self.to_yaml()
        return atomic_write_bytes(path, text.encode("utf-8"))


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
    train_images: str | None = field(default=None, metadata=_check(_non_empty))
    train_annotations: str | None = field(default=None, metadata=_check(_non_empty))
    val_images: str | None = field(default=None, metadata=_check(_non_empty))
    val_annotations: str | None = field(default=None, metadata=_check(_non_empty))
    num_train: int = field(default=512, metadata=_check(_positive))
    num_val: int = field(default=64, metadata=_check(_positive))
    image_size: int = field(default=64, metadata=_check(_positive))
    scales: tuple[int, int] = (16, 32)
    max_objects: int = field(default=3, metadata=_check(_positive))
    occlusion: bool = True
    cache: bool = True
    min_size: int = field(default=512, metadata=_check(_positive))
    max_size: int = field(default=853, metadata=_check(_positive))
    flip: bool = False
    batch_size: int = field(default=16, metadata=_check(_positive))
    eval_batch_size: int = field(default=8, metadata=_check(_positive))
    num_workers: int = field(default=0, metadata=_check(_non_negative))
    max_train_batches: int | None = field(default=None, metadata=_check(_positive))


@dataclass
class DetectionModelConfig(ModelConfig):
    """A detector: ``retinanet`` / ``fcos`` (ours; ``kwargs``: depth, width, out_channels, num_convs, levels,
    ...) or ``torchvision.<builder>`` (e.g. ``torchvision.retinanet_resnet50_fpn``; needs torchvision)."""

    name: str = field(default="retinanet", metadata=_check(_non_empty))


@dataclass
class DetectionTeacherConfig(TeacherConfig):
    """The teacher detector (same names as ``model``); ``checkpoint`` from ``ckakd detect-train``."""


@dataclass
class DetectionDistillerConfig(DistillerConfig):
    """FPN distillation method (``none``, ``pcka``, ``pcka_mimic``, ``kd_patch``, ``at_patch``, ``dist_patch``,
    ``mmd_patch``, ``wkd_f``, ``wkd_l``, ...); ``kwargs`` go to ``DetectionDistiller`` (weight, patch_size,
    reduce, levels, student_paths, teacher_paths, ...). ``cost`` / ``sharpen``: the WKD-L category cost."""

    name: str = field(default="none", metadata=_check(_non_empty))


@dataclass
class DetectionOptimConfig(OptimConfig):
    """SGD for detectors (RetinaNet recipe: momentum 0.9, weight decay 1e-4)."""

    lr: float = field(default=0.01, metadata=_check(_positive))
    weight_decay: float = field(default=1e-4, metadata=_check(_non_negative))


@dataclass
class DetectionScheduleConfig(ScheduleConfig):
    """The 1x-style recipe scaled to ``epochs``: ×0.1 at the milestones, step warmup over ``warmup_steps``."""

    epochs: int = field(default=12, metadata=_check(_positive))
    milestones: list[int] = field(default_factory=lambda: [8, 11])
    warmup_steps: int = field(default=100, metadata=_check(_non_negative))


@dataclass
class DetectionTrainConfig(TrainConfig):
    """Loop options (detectors clip gradients at 10 by default)."""

    grad_clip: float | None = field(default=10.0, metadata=_check(_positive))


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


class _Dumper(yaml.SafeDumper):
    """Block-style mappings; lists of scalars (and of scalar pairs) inline: ``milestones: [150, 180, 210]``."""


def _represent_list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    flat = all(not isinstance(v, dict | list) or (isinstance(v, list) and _scalars(v)) for v in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flat)


def _scalars(data: list) -> bool:
    return all(not isinstance(v, dict | list) for v in data)


_Dumper.add_representer(list, _represent_list)


def _plain(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    return obj


# --------------------------------------------------------------------------------------------- validation


def _show(value: Any) -> str:
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{text} ({type(value).__name__})"


_NAMES: dict[Any, tuple[str, str]] = {
    bool: ("a bool (true/false)", "bools"),
    int: ("an int", "ints"),
    float: ("a number", "numbers"),
    str: ("a string", "strings"),
}


def _describe(tp: Any, plural: bool = False) -> str:
    """Human text for an annotation: ``"an int or null"``, ``"a list of [string, string] pairs"``."""
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return " or ".join(_describe(a, plural) for a in inner) + " or null"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is list:
        return ("lists" if plural else "a list") + f" of {_describe(args[0], plural=True)}"
    if origin is tuple:
        pair = "[" + ", ".join(_NAMES.get(a, (str(a), ""))[1][:-1] for a in args) + "]"
        return f"{pair} pairs" if plural else f"a {pair} pair"
    if origin is dict or tp is dict:
        return "mappings" if plural else "a mapping"
    if dataclasses.is_dataclass(tp):
        return f"{'mappings' if plural else 'a mapping'} ({tp.__name__} fields)"
    singular, many = _NAMES.get(tp, (str(tp), str(tp)))
    return many if plural else singular


def _suggest(word: str, options: Sequence[str]) -> str:
    match = difflib.get_close_matches(str(word), list(options), n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _schema_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key of the dataclass schema ``cls`` (list items as ``teachers.0.name``)."""
    out: list[str] = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        dotted, tp = _join(prefix, f.name), hints[f.name]
        args = get_args(tp)
        if dataclasses.is_dataclass(tp):
            out += _schema_keys(tp, dotted)
        elif get_origin(tp) is list and args and dataclasses.is_dataclass(args[0]):
            out += _schema_keys(args[0], f"{dotted}.0")
        else:
            out.append(dotted)
    return out


def _suggest_key(dotted: str, key: str, keys: Sequence[str]) -> str:
    """``" (did you mean 'schedule.epochs'?)"`` for an unknown ``dotted`` key: schema keys with the same last
    name first, then close last names, then close dotted keys."""
    leaves: dict[str, list[str]] = {}
    for k in keys:
        leaves.setdefault(k.rsplit(".", 1)[-1], []).append(k)
    matches = list(leaves.get(key, []))
    if not matches:
        for leaf in difflib.get_close_matches(key, list(leaves), n=3, cutoff=0.75):
            matches += leaves[leaf]
    if not matches:
        matches = difflib.get_close_matches(dotted, list(keys), n=3, cutoff=0.6)
    matches = [m for m in matches if m != dotted][:3]
    return f" (did you mean {' or '.join(repr(m) for m in matches)}?)" if matches else ""


class _UnknownKeyError(ValueError):
    """An unknown key; :func:`config_from_dict` adds suggestions from the whole schema."""

    def __init__(self, prefix: str, key: str, fields: list[str]) -> None:
        self.prefix, self.key, self.fields = prefix, key, fields
        super().__init__(self.text())

    def text(self, root: type | None = None) -> str:
        dotted = _join(self.prefix, self.key)
        hint = _suggest(self.key, self.fields)
        if not hint and root is not None:
            hint = _suggest_key(dotted, self.key, _schema_keys(root))
        level = f"under '{self.prefix}'" if self.prefix else "at the top level"
        return f"unknown config key '{dotted}'{hint}; valid keys {level}: " + ", ".join(self.fields)


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _coerce(value: Any, tp: Any, key: str, expect: str | None = None) -> Any:
    """Check ``value`` against the type annotation ``tp``; return it (floats converted, containers copied).

    ``expect`` replaces the expected-type text in errors (``"an int or null"`` for ``int | None``).
    """
    origin, args = get_origin(tp), get_args(tp)
    want = expect or _describe(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) != 1:  # pragma: no cover - the schema uses only ``X | None``
            raise TypeError(f"unsupported annotation {tp} for {key}")
        return _coerce(value, inner[0], key, want)
    if value is None:
        raise ValueError(f"{key}: expected {want}, got null (this key is not optional)")
    if origin is Literal:
        if not isinstance(value, str) or value not in args:
            hint = _suggest(value, args) if isinstance(value, str) else ""
            raise ValueError(f"{key}: expected {want}, got {_show(value)}{hint}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{key}: expected {want}, got {_show(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{key}: expected {want}, got {_show(value)}")
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{key}: expected {want} (int or float), got {_show(value)}")
        if not math.isfinite(value):
            raise ValueError(f"{key}: expected a finite number, got {_show(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{key}: expected {want}, got {_show(value)} (quote it in YAML)")
        return value
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ValueError(f"{key}: expected {want}, got {_show(value)}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise ValueError(f"{key}: expected {want}, got {_show(value)}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ValueError(f"{key}: expected {want} (free-form keyword arguments), got {_show(value)}")
        bad = [k for k in value if not isinstance(k, str)]
        if bad:
            raise ValueError(f"{key}: keys must be strings, got {_show(bad[0])}")
        return copy.deepcopy(dict(value))
    raise TypeError(f"unsupported annotation {tp} for {key}")  # pragma: no cover - schema bug


def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def _build(cls: type, data: Any, prefix: str) -> Any:
    """Instantiate dataclass ``cls`` from mapping ``data``; None means all defaults."""
    where = f"'{prefix}'" if prefix else "the config"
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ValueError(f"{prefix or 'config'}: expected {_describe(cls)}, got {_show(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if not isinstance(key, str):
            raise ValueError(f"{where}: keys must be strings, got {_show(key)}")
        if key not in fields:
            raise _UnknownKeyError(prefix, key, list(fields))
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        dotted = _join(prefix, name)
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ValueError(f"{dotted}: required key is missing ({_describe(hints[name])})")
            continue
        value = _coerce(data[name], hints[name], dotted)
        check = f.metadata.get("check")
        if check is not None:
            problem = check(value)
            if problem:
                raise ValueError(f"{dotted}: {problem}, got {_show(value)}")
        kwargs[name] = value
    return cls(**kwargs)


def _cross_check(cfg: Config | DetectionConfig) -> None:
    ms = cfg.schedule.milestones
    if any(m <= 0 for m in ms) or any(b <= a for a, b in zip(ms, ms[1:], strict=False)):
        raise ValueError(f"schedule.milestones: expected strictly increasing positive epochs, got {ms!r}")
    if cfg.teacher.name is None and (
        cfg.teacher.checkpoint is not None or cfg.teacher.kwargs or cfg.teacher.augment is not None
    ):
        raise ValueError(
            "teacher.name is null but teacher.checkpoint/teacher.kwargs/teacher.augment are set: name the teacher "
            "model (e.g. teacher.name=resnet32x4) or drop them"
        )


def config_from_dict(d: Mapping[str, Any] | None) -> Config | DetectionConfig:
    """Validate a plain nested mapping (as in the YAML, without ``base:``) and build a :class:`Config`, or a
    :class:`DetectionConfig` when it says ``task: detection``."""
    task = d.get("task", "classification") if isinstance(d, Mapping) else "classification"
    if not isinstance(task, str) or task not in _TASKS:
        hint = _suggest(task, list(_TASKS)) if isinstance(task, str) else ""
        raise ValueError(f"task: expected one of {', '.join(map(repr, _TASKS))}, got {_show(task)}{hint}")
    try:
        cfg = _build(_TASKS[task], d, "")
    except _UnknownKeyError as exc:
        raise ValueError(exc.text(_TASKS[task])) from None
    _cross_check(cfg)
    if isinstance(cfg, DetectionConfig):
        if cfg.teacher.augment is not None:
            raise ValueError("teacher.augment: detection teachers see the student's images; drop it")
        lo, hi = cfg.data.scales
        if not 0 < lo <= hi:
            raise ValueError(f"data.scales: expected [min, max] object sizes with 0 < min <= max, got {[lo, hi]}")
    return cfg


_TASKS: dict[str, type] = {"classification": Config, "detection": DetectionConfig}


# --------------------------------------------------------------------------------------------- YAML


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-3`` (no dot) as a float, as YAML 1.2 and users expect."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _yaml_load(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)  # a SafeLoader subclass: no arbitrary objects
    except yaml.YAMLError as exc:
        raise ValueError(f"{source}: invalid YAML: {exc}") from exc


def configs_root() -> Path:
    """The folder of the shipped configs: the installed ``ckakd.configs`` package data (regular and
    editable installs), else the source checkout's top-level ``configs/`` (an editable install made
    before the configs were packaged)."""
    candidates: list[Path] = []
    try:
        spec = importlib.util.find_spec("ckakd.configs")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) for p in spec.submodule_search_locations]
    candidates.append(Path(__file__).resolve().parents[2] / "configs")
    for c in candidates:
        if c.is_dir() and any(c.rglob("*.yaml")):
            return c
    raise FileNotFoundError(
        "the shipped configs were not found (looked in: " + ", ".join(str(c) for c in candidates) + "); "
        "reinstall ckakd (`pip install --no-build-isolation -e .`)"
    )


def list_configs() -> list[str]:
    """Sorted names of the shipped configs (``"digits/rcka"``, ...), usable in :func:`load_config`."""
    root = configs_root()
    names = {p.relative_to(root).with_suffix("").as_posix() for s in _YAML_SUFFIXES for p in root.rglob(f"*{s}")}
    return sorted(names)


def config_path(name: str) -> Path:
    """File of the shipped config ``name`` (``"digits/rcka"``; a ``.yaml`` suffix is optional)."""
    stem = name[: -len(Path(name).suffix)] if Path(name).suffix in _YAML_SUFFIXES else name
    stem = stem.replace("\\", "/").strip("/")
    root = configs_root()
    if stem and ".." not in stem.split("/"):
        for s in _YAML_SUFFIXES:
            p = root / f"{stem}{s}"
            if p.is_file():
                return p
    names = list_configs()
    raise ValueError(f"no shipped config named {name!r}{_suggest(stem, names)}; shipped configs: " + ", ".join(names))


def _locate(ref: str, relative_to: Path | None) -> Path:
    """A config reference: an existing file (relative to ``relative_to`` or the cwd), else a shipped name."""
    raw = Path(os.path.expanduser(ref))
    candidates = [raw] if raw.is_absolute() else [(relative_to or Path.cwd()) / raw]
    if raw.suffix not in _YAML_SUFFIXES:
        candidates += [c.with_name(c.name + s) for c in list(candidates) for s in _YAML_SUFFIXES]
    for c in candidates:
        if c.is_file():
            return c
    try:
        return config_path(ref)
    except ValueError as exc:
        if raw.suffix in _YAML_SUFFIXES or raw.is_absolute():
            raise ValueError(f"config file not found: {candidates[0]} (and no shipped config {ref!r})") from None
        raise exc from None


def _deep_merge(base: dict[str, Any], child: Mapping[str, Any]) -> dict[str, Any]:
    """``child`` over ``base``: mappings merged recursively, everything else (lists too) replaced; a null
    where the parent has a mapping (an empty YAML section) keeps the parent's mapping."""
    out = copy.deepcopy(base)
    for k, v in child.items():
        if v is None and isinstance(out.get(k), Mapping):
            continue  # an empty section (all lines commented out) keeps the parent's
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _load_file(path: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    """The mapping in ``path`` with its ``base:`` chain merged underneath."""
    path = path.resolve()
    if path in chain:
        cycle = " -> ".join(str(p) for p in (*chain[chain.index(path) :], path))
        raise ValueError(f"config inheritance cycle: {cycle}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"{path}: not a YAML config (a binary file? byte {exc.object[exc.start]:#04x} at offset {exc.start} is "
            "not UTF-8 text)"
        ) from None
    except OSError as exc:
        raise ValueError(f"{path}: cannot read the config file: {exc.strerror or exc}") from None
    if "\x00" in text:
        raise ValueError(f"{path}: not a YAML config (a binary file: it contains NUL bytes)")
    data = _yaml_load(text, str(path))
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config must be a YAML mapping at the top level, got {_show(data)}")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str) or not base.strip():
        raise ValueError(f"{path}: base: expected a config name or a relative path (a string), got {_show(base)}")
    parent = _load_file(_locate(base, path.parent), (*chain, path))
    return _deep_merge(parent, data)


# --------------------------------------------------------------------------------------------- overrides

_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.([A-Za-z_][A-Za-z0-9_]*|[0-9]+))*$")


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"optim.lr=0.1"`` -> ``(["optim", "lr"], 0.1)``; the value is parsed as YAML (``[[a,b]]``, ``null``)."""
    if not isinstance(text, str) or "=" not in text:
        raise ValueError(
            f"malformed override {text!r}: expected dotted.key=value, e.g. optim.lr=0.1, "
            "train.cka_pairs=[[layer3,layer3]] or distiller.kwargs.alpha=3 (the value is read as YAML)"
        )
    key, _, raw = text.partition("=")
    key = key.strip()
    if not _KEY_RE.match(key):
        raise ValueError(
            f"malformed override {text!r}: the key {key!r} must be dotted names like optim.lr "
            "(list items by index: teachers.0.checkpoint)"
        )
    value = _yaml_load(raw, f"override {text!r}") if raw.strip() else None
    return key.split("."), value


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of the raw config mapping with the dotted ``key=value`` overrides applied in order.

    Missing (or null) intermediate mappings are created; list items are addressed by index
    (``teachers.0.checkpoint=...``). Keys are not checked here but by :func:`config_from_dict`.
    """
    if isinstance(overrides, str):
        overrides = [overrides]
    out = copy.deepcopy(dict(data))
    for text in overrides:
        keys, value = parse_override(text)
        node: dict | list = out
        for i, k in enumerate(keys[:-1]):
            here = ".".join(keys[: i + 1])
            slot: Any = _list_index(node, k, here, text) if isinstance(node, list) else k
            nxt = node[slot] if isinstance(node, list) else node.get(slot)
            if nxt is None:
                nxt = node[slot] = {}
            if not isinstance(nxt, dict | list):
                raise ValueError(f"override {text!r}: '{here}' is {_show(nxt)}, not a mapping; cannot set a key in it")
            node = nxt
        last = keys[-1]
        if isinstance(node, list):
            node[_list_index(node, last, ".".join(keys), text)] = value
        else:
            node[last] = value
    return out


def _list_index(node: list, k: str, here: str, text: str) -> int:
    if not k.isdigit() or int(k) >= len(node):
        raise ValueError(f"override {text!r}: '{here}' needs an index 0..{len(node) - 1} into the list")
    return int(k)


# --------------------------------------------------------------------------------------------- entry point


def load_config(path_or_name: str | os.PathLike, overrides: Sequence[str] = ()) -> Config | DetectionConfig:
    """Load a config: a YAML file path or a shipped name (``"digits/rcka"``), its ``base:`` chain merged
    underneath (child wins; mappings merged, lists replaced), then ``overrides`` (``"optim.lr=0.1"``)."""
    ref = os.fspath(path_or_name)
    path = _locate(ref, None)
    data = _load_file(path, ())
    if not data:
        raise ValueError(
            f"{path}: the config has no keys (empty, or only comments): every setting would be a default "
            f"({ScheduleConfig().epochs} epochs of {DataConfig().name!r} with distiller {DistillerConfig().name!r} and "
            "no teacher); start from a shipped config (a first line `base: digits/kd`; `ckakd configs` lists them)"
        )
    if overrides:
        data = apply_overrides(data, overrides)
    return config_from_dict(data)
