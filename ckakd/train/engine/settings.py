"""The trainer's settings: the sections of a config file the loop reads (:class:`RunConfig`, :class:`OptimConfig`,
:class:`ScheduleConfig`, :class:`TrainConfig`) and :class:`TrainSettings`, which composes them with what a run adds
(its folder, the resume flag, the config it came from).

The sections are the one schema of these settings: a config file's ``run:`` / ``optim:`` / ``schedule:`` / ``train:``
mappings are built into them (:mod:`ckakd.train.config`), and the :class:`~ckakd.train.engine.Trainer` reads them as
they are. In Python, :meth:`TrainSettings.create` builds them from keywords (``epochs=2, lr=0.1, ...``) with the
same checks.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any, Literal, get_type_hints

import numpy as np
import torch

from ..schema import (
    build_dataclass,
    check,
    check_field,
    device_name,
    half_open_unit,
    non_empty,
    non_negative,
    plain,
    positive,
    suggest,
)
from .optim import (
    BUILTIN_OPTIMIZERS,
    OPTIMIZER_FIELDS,
    check_class_kwargs,
    class_parameters,
    optimizer_class,
    scheduler_class,
)

__all__ = [
    "AMP_DTYPES",
    "OptimConfig",
    "ParamGroupConfig",
    "RunConfig",
    "ScheduleConfig",
    "TrainConfig",
    "TrainSettings",
    "WandbConfig",
    "check_milestones",
]

AMP_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
_AMP_ALIASES = {"bf16": "bfloat16", "fp16": "float16"}


def run_name(v: Any) -> str | None:
    """A folder inside ``run.out_dir``: relative, no ``..`` component (``digits/kd-seed0`` is fine)."""
    if not v.strip():
        return "must be a non-empty string"
    parts = PurePosixPath(v.replace("\\", "/")).parts
    if v.startswith(("/", "\\", "~")) or (len(v) > 1 and v[1] == ":") or ".." in parts or all(p == "." for p in parts):
        return "must name a folder inside run.out_dir (a relative path without '..', e.g. kd-seed0)"
    return None


# --------------------------------------------------------------------------------------------- sections


def string_list(v: Any) -> str | None:
    """Every entry a non-empty string."""
    return None if all(isinstance(t, str) and t.strip() for t in v) else "must be a list of non-empty strings"


@dataclass
class WandbConfig:
    """A Weights & Biases run (``pip install "ckakd[wandb]"``): ``mode`` ``disabled`` (the default: no W&B),
    ``offline`` (files under ``dir``, upload later with ``wandb sync``) or ``online``; ``project`` / ``entity``;
    ``name`` (default: the run folder's name); ``dir`` (default: the run folder); ``tags``."""

    mode: Literal["disabled", "offline", "online"] = "disabled"
    project: str | None = field(default=None, metadata=check(non_empty))
    name: str | None = field(default=None, metadata=check(non_empty))
    dir: str | None = field(default=None, metadata=check(non_empty))
    tags: list[str] = field(default_factory=list, metadata=check(string_list))
    entity: str | None = field(default=None, metadata=check(non_empty))


@dataclass
class RunConfig:
    """Run identity and execution: output folder ``out_dir/name``, seed, device, AMP, logging frontends
    (``tensorboard``: ``pip install "ckakd[tensorboard]"``; ``wandb``: :class:`WandbConfig`)."""

    name: str = field(default="run", metadata=check(run_name))
    out_dir: str = field(default="runs", metadata=check(non_empty))
    seed: int = field(default=0, metadata=check(non_negative))
    deterministic: bool = False
    device: str = field(default="auto", metadata=check(device_name))
    amp: bool = False
    amp_dtype: Literal["float16", "bfloat16"] = "bfloat16"
    progress: bool = True
    tensorboard: bool = False
    wandb: WandbConfig = field(default_factory=WandbConfig)


def optimizer_name(v: Any) -> str | None:
    """``sgd``, ``adamw``, a :mod:`torch.optim` class name (any case) or a dotted path to an optimizer class."""
    try:
        optimizer_class(v, "")
    except ValueError as exc:
        return str(exc).removeprefix(": ")
    return None


def schedule_name(v: Any) -> str | None:
    """``None``, ``step``, ``cosine``, ``constant``, a :mod:`torch.optim.lr_scheduler` class name (any case) or a
    dotted path to a scheduler class."""
    if v is None:
        return None
    try:
        scheduler_class(v, "")
    except ValueError as exc:
        return str(exc).removeprefix(": ")
    return None


@dataclass
class ParamGroupConfig:
    """One optimizer parameter group (as torchdistill's ``params`` groups): the trainable parameters whose names
    match ``params`` (comma-separated globs over ``named_parameters()`` names, ``*`` spanning dots: ``extra.*``,
    ``student.fc.*``) get their own ``lr`` / ``weight_decay`` (``None``: optim's) and further optimizer keywords
    ``kwargs``; the schedule scales every group's lr alike."""

    params: str = field(metadata=check(non_empty))
    lr: float | None = field(default=None, metadata=check(positive))
    weight_decay: float | None = field(default=None, metadata=check(non_negative))
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimConfig:
    """Optimizer and its hyperparameters. ``name``: ``sgd`` / ``adamw`` (the built-in recipes), any
    :mod:`torch.optim` class by name (``Adam``, ``RMSprop``; any case) or a dotted path (``my_pkg.MyOpt``);
    ``lr`` / ``momentum`` / ``weight_decay`` / ``nesterov`` go to a class that takes them, ``kwargs`` (checked
    against its signature) too; ``param_groups``: groups with their own lr / weight decay (:class:`ParamGroupConfig`;
    the rest of the parameters form the default group)."""

    name: str = field(default="sgd", metadata=check(optimizer_name))
    lr: float = field(default=0.05, metadata=check(positive))
    momentum: float = field(default=0.9, metadata=check(half_open_unit))
    weight_decay: float = field(default=5e-4, metadata=check(non_negative))
    nesterov: bool = False
    kwargs: dict[str, Any] = field(default_factory=dict)
    # mappings, each built into a ParamGroupConfig (not a list[ParamGroupConfig] annotation: the key suggestions
    # for an unknown key would list optim.param_groups.0.lr beside optim.lr)
    param_groups: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        cls = optimizer_class(self.name)
        reserved = {k: f"optim.{k}" for k in OPTIMIZER_FIELDS}
        check_class_kwargs(cls, self.kwargs, "optim.kwargs", reserved=reserved, given=("lr",))
        takes = class_parameters(cls)[0]
        for i, g in enumerate(self.param_groups):
            if isinstance(g, Mapping):
                g = self.param_groups[i] = build_dataclass(ParamGroupConfig, g, f"optim.param_groups[{i}]")
            elif not isinstance(g, ParamGroupConfig):
                raise ValueError(f"optim.param_groups[{i}]: expected a mapping (ParamGroupConfig fields), got {g!r}")
            key = f"optim.param_groups[{i}]"
            if g.weight_decay is not None and "weight_decay" not in takes and self.name not in BUILTIN_OPTIMIZERS:
                raise ValueError(f"{key}.weight_decay: {cls.__name__} takes no weight_decay")
            check_class_kwargs(cls, g.kwargs, f"{key}.kwargs", reserved={"params": f"{key}.params", **{
                k: f"{key}.{k}" for k in ("lr", "weight_decay")}}, given=tuple(takes))  # fmt: skip


@dataclass
class ScheduleConfig:
    """Learning-rate schedule. ``kind``: the built-in epoch-wise ``step`` (×gamma at each milestone, 0-based
    epochs), ``cosine`` or ``constant``, after ``warmup_epochs`` of linear warmup; or any
    :mod:`torch.optim.lr_scheduler` class by name (``OneCycleLR``, any case) or dotted path, built with ``kwargs``
    (checked against its signature) and stepped per ``interval`` (``epoch`` or optimizer ``step``;
    ``ReduceLROnPlateau`` steps per epoch on the validation metric, ``mode: max`` unless given). ``name``: another
    spelling of ``kind`` (it replaces ``kind`` when given). ``warmup_steps``: a further linear warmup
    (lr/10 -> lr) over the first optimizer steps, as detectors use, on top of either."""

    epochs: int = field(default=240, metadata=check(positive))
    kind: str = field(default="step", metadata=check(schedule_name))
    milestones: list[int] = field(default_factory=lambda: [150, 180, 210])
    gamma: float = field(default=0.1, metadata=check(positive))
    warmup_epochs: int = field(default=0, metadata=check(non_negative))
    warmup_steps: int = field(default=0, metadata=check(non_negative))
    name: str | None = field(default=None, metadata=check(schedule_name))
    kwargs: dict[str, Any] = field(default_factory=dict)
    interval: Literal["epoch", "step"] = "epoch"

    def __post_init__(self) -> None:
        if self.name is not None:
            self.kind, self.name = self.name, None
        cls = scheduler_class(self.kind)
        if cls is None:
            if self.kwargs:
                raise ValueError(
                    f"schedule.kwargs: the built-in {self.kind!r} schedule takes none (its settings are "
                    f"schedule.milestones / gamma / warmup_epochs); got {sorted(self.kwargs)}"
                )
            if self.interval != "epoch":
                raise ValueError(
                    f"schedule.interval={self.interval!r}: the built-in {self.kind!r} schedule is per epoch (use "
                    "schedule.warmup_steps for a per-step warmup, or a torch.optim.lr_scheduler class)"
                )
            return
        if self.warmup_epochs:
            raise ValueError(
                f"schedule.warmup_epochs={self.warmup_epochs}: the epoch warmup belongs to the built-in schedules; "
                f"with {cls.__name__} use schedule.warmup_steps (or a warmup in the scheduler itself)"
            )
        plateau = issubclass(cls, torch.optim.lr_scheduler.ReduceLROnPlateau)
        if plateau and self.interval != "epoch":
            raise ValueError("schedule.interval='step': ReduceLROnPlateau steps on the validation metric, per epoch")
        check_class_kwargs(cls, self.kwargs, "schedule.kwargs")


@dataclass
class TrainConfig:
    """Loop options. ``cka_pairs``: ``[student_path, teacher_path]`` layers whose CKA is logged per epoch
    (in a config file, empty: the models' last stages); ``global_gram``: under DDP, CKA over the global batch.
    ``accumulate``: gradient accumulation, one optimizer step every N batches (gradients averaged over them; the
    epoch's last, partial window is stepped too); ``channels_last``: the model and 4-D training inputs in
    channels-last memory format; ``compile``: ``torch.compile`` the student (an error, not a fallback, when it fails).
    """

    grad_clip: float | None = field(default=None, metadata=check(positive))
    log_every: int = field(default=50, metadata=check(positive))
    eval_every: int = field(default=1, metadata=check(positive))
    cka_pairs: list[tuple[str, str]] = field(default_factory=list)
    global_gram: bool = False
    save_every: int = field(default=1, metadata=check(positive))
    accumulate: int = field(default=1, metadata=check(positive))
    channels_last: bool = False
    compile: bool = False


def check_milestones(milestones: list[int], key: str = "schedule.milestones") -> None:
    """``ValueError`` unless ``milestones`` are strictly increasing positive epochs."""
    ms = milestones
    if any(m <= 0 for m in ms) or any(b <= a for a, b in zip(ms, ms[1:], strict=False)):
        raise ValueError(f"{key}: expected strictly increasing positive epochs, got {ms!r}")


# --------------------------------------------------------------------------------------------- settings

# The keywords of :meth:`TrainSettings.create` and the keys of :meth:`TrainSettings.to_dict` (what a checkpoint
# stores as ``settings``), in that record's order: keyword -> (section, field); section None: a TrainSettings field.
KEYWORDS: dict[str, tuple[str | None, str]] = {
    "epochs": ("schedule", "epochs"),
    "out_dir": (None, "out_dir"),
    "lr": ("optim", "lr"),
    "optimizer": ("optim", "name"),
    "momentum": ("optim", "momentum"),
    "weight_decay": ("optim", "weight_decay"),
    "nesterov": ("optim", "nesterov"),
    "schedule": ("schedule", "kind"),
    "milestones": ("schedule", "milestones"),
    "gamma": ("schedule", "gamma"),
    "warmup_epochs": ("schedule", "warmup_epochs"),
    "warmup_steps": ("schedule", "warmup_steps"),
    "device": ("run", "device"),
    "amp": ("run", "amp"),
    "amp_dtype": ("run", "amp_dtype"),
    "grad_clip": ("train", "grad_clip"),
    "seed": ("run", "seed"),
    "deterministic": ("run", "deterministic"),
    "progress": ("run", "progress"),
    "log_every": ("train", "log_every"),
    "eval_every": ("train", "eval_every"),
    "save_every": ("train", "save_every"),
    "tensorboard": ("run", "tensorboard"),
    "max_train_batches": (None, "max_train_batches"),
    "cka_pairs": ("train", "cka_pairs"),
    "resume": (None, "resume"),
    "config": (None, "config"),
    "find_unused_parameters": (None, "find_unused_parameters"),
    # added later: in the record only when not at their default (a record without one reads as the default)
    "optimizer_kwargs": ("optim", "kwargs"),
    "param_groups": ("optim", "param_groups"),
    "schedule_kwargs": ("schedule", "kwargs"),
    "schedule_interval": ("schedule", "interval"),
    "accumulate": ("train", "accumulate"),
    "channels_last": ("train", "channels_last"),
    "compile": ("train", "compile"),
}
RECORD_V1 = tuple(KEYWORDS)[: list(KEYWORDS).index("find_unused_parameters") + 1]  # always in the record
SECTIONS = ("run", "optim", "schedule", "train")


@dataclass
class TrainSettings:
    """Everything the loop needs besides the model and the loaders.

    ``out_dir``: the run folder (a config's ``run.out_dir/run.name``); ``run`` / ``optim`` / ``schedule`` /
    ``train``: the config sections (``train.cka_pairs``: the pairs logged, as resolved by the runner;
    ``run.name`` / ``run.out_dir`` are not read here); ``max_train_batches``: at most this many training batches
    per epoch (the data section's limit); ``resume``: continue from ``out_dir/latest.pt``; ``config``: the
    resolved config (a plain dict) stored in the checkpoints; ``find_unused_parameters``: DDP only, set when some
    trainable parameter gets no gradient. Build from keywords with :meth:`create`.
    """

    out_dir: str | os.PathLike
    run: RunConfig = field(default_factory=RunConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    max_train_batches: int | None = field(default=None, metadata=check(positive))
    resume: bool = False
    config: dict[str, Any] | None = None
    find_unused_parameters: bool = False

    @classmethod
    def create(
        cls, epochs: int, out_dir: str | os.PathLike, *, schema: type | None = None, **keywords: Any
    ) -> TrainSettings:
        """Settings from flat keywords (``lr=0.1, optimizer="adamw", milestones=(30,), cka_pairs=[("a", "b")],
        device="cpu", resume=True``, ...: the keys of :data:`KEYWORDS`); what is not given keeps the section's
        default. ``schema``: a config class whose ``run`` / ``optim`` / ``schedule`` / ``train`` section types give
        the defaults (e.g. a detection config's recipe); default :class:`RunConfig`, :class:`OptimConfig`, ...
        Every value is checked as in a config file; errors name the keyword (``TrainSettings.lr: must be > 0``)."""
        if not isinstance(out_dir, str | os.PathLike) or not os.fspath(out_dir):
            raise ValueError(f"TrainSettings.out_dir: expected a folder path, got {out_dir!r}")
        types = get_type_hints(schema if schema is not None else cls)
        given: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
        top: dict[str, Any] = {}
        for key, value in {"epochs": epochs, **keywords}.items():
            if key not in KEYWORDS or key == "out_dir":
                raise TypeError(f"TrainSettings.create() got an unexpected keyword {key!r}{suggest(key, KEYWORDS)}")
            section, name = KEYWORDS[key]
            owner = cls if section is None else types[section]
            value = _normalize(key, value)
            f = {f.name: f for f in dataclasses.fields(owner)}[name]
            value = check_field(f, get_type_hints(owner)[name], value, f"TrainSettings.{key}")
            (top if section is None else given[section])[name] = value
        parts = {name: types[name](**given[name]) for name in SECTIONS}
        return cls(out_dir=out_dir, **parts, **top)

    def to_dict(self) -> dict:
        """The flat record a checkpoint stores (the keywords of :meth:`create`; paths as strings, tuples as
        lists), safe for JSON and ``weights_only`` loading. Keywords added after the first record format
        (``accumulate``, ``optimizer_kwargs``, ...) are in it only when they differ from their default."""
        out = {}
        for key, (section, name) in KEYWORDS.items():
            value = plain(getattr(getattr(self, section), name) if section else getattr(self, name))
            if key in RECORD_V1 or value != self.default(key):
                out[key] = value
        return out

    def default(self, key: str) -> Any:
        """The default of the :meth:`create` keyword ``key`` for these settings' section types (plain form)."""
        section, name = KEYWORDS[key]
        owner = type(self) if section is None else type(getattr(self, section))
        f = {f.name: f for f in dataclasses.fields(owner)}[name]
        if f.default_factory is not dataclasses.MISSING:
            return plain(f.default_factory())
        return plain(f.default)


def _normalize(key: str, value: Any) -> Any:
    """Keyword spellings :meth:`TrainSettings.create` accepts beyond a config file's: ``"SGD"``, ``"bf16"`` /
    ``"fp16"``, a :class:`torch.device`, numpy scalars, any iterable of milestones or pairs."""
    if isinstance(value, np.generic):
        return value.item()
    if key in ("optimizer", "schedule") and isinstance(value, str) and "." not in value:
        return value.lower()
    if key == "param_groups" and hasattr(value, "__iter__") and not isinstance(value, str | Mapping):
        return [dataclasses.asdict(g) if dataclasses.is_dataclass(g) else g for g in value]
    if key == "amp_dtype" and isinstance(value, str):
        return _AMP_ALIASES.get(value, value)
    if key == "device" and isinstance(value, torch.device):
        return str(value)
    if key in ("milestones", "cka_pairs") and hasattr(value, "__iter__") and not isinstance(value, str | Mapping):
        return [v.item() if isinstance(v, np.generic) else v for v in value]
    return value
