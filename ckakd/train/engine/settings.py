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

__all__ = [
    "AMP_DTYPES",
    "OptimConfig",
    "RunConfig",
    "ScheduleConfig",
    "TrainConfig",
    "TrainSettings",
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


@dataclass
class RunConfig:
    """Run identity and execution: output folder ``out_dir/name``, seed, device, AMP, logging frontends."""

    name: str = field(default="run", metadata=check(run_name))
    out_dir: str = field(default="runs", metadata=check(non_empty))
    seed: int = field(default=0, metadata=check(non_negative))
    deterministic: bool = False
    device: str = field(default="auto", metadata=check(device_name))
    amp: bool = False
    amp_dtype: Literal["float16", "bfloat16"] = "bfloat16"
    progress: bool = True
    tensorboard: bool = False


@dataclass
class OptimConfig:
    """Optimizer (SGD or AdamW) and its hyperparameters."""

    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = field(default=0.05, metadata=check(positive))
    momentum: float = field(default=0.9, metadata=check(half_open_unit))
    weight_decay: float = field(default=5e-4, metadata=check(non_negative))
    nesterov: bool = False


@dataclass
class ScheduleConfig:
    """Epoch-wise learning-rate schedule: ``step`` (×gamma at each milestone, 0-based epochs), ``cosine`` or
    ``constant``, after ``warmup_epochs`` of linear warmup; ``warmup_steps``: a further linear warmup (lr/10 -> lr)
    over the first optimizer steps, as detectors use."""

    epochs: int = field(default=240, metadata=check(positive))
    kind: Literal["step", "cosine", "constant"] = "step"
    milestones: list[int] = field(default_factory=lambda: [150, 180, 210])
    gamma: float = field(default=0.1, metadata=check(positive))
    warmup_epochs: int = field(default=0, metadata=check(non_negative))
    warmup_steps: int = field(default=0, metadata=check(non_negative))


@dataclass
class TrainConfig:
    """Loop options. ``cka_pairs``: ``[student_path, teacher_path]`` layers whose CKA is logged per epoch
    (in a config file, empty: the models' last stages); ``global_gram``: under DDP, CKA over the global batch."""

    grad_clip: float | None = field(default=None, metadata=check(positive))
    log_every: int = field(default=50, metadata=check(positive))
    eval_every: int = field(default=1, metadata=check(positive))
    cka_pairs: list[tuple[str, str]] = field(default_factory=list)
    global_gram: bool = False
    save_every: int = field(default=1, metadata=check(positive))


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
}
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
        lists), safe for JSON and ``weights_only`` loading."""
        return plain(
            {
                key: getattr(getattr(self, section), name) if section else getattr(self, name)
                for key, (section, name) in KEYWORDS.items()
            }
        )


def _normalize(key: str, value: Any) -> Any:
    """Keyword spellings :meth:`TrainSettings.create` accepts beyond a config file's: ``"SGD"``, ``"bf16"`` /
    ``"fp16"``, a :class:`torch.device`, numpy scalars, any iterable of milestones or pairs."""
    if isinstance(value, np.generic):
        return value.item()
    if key in ("optimizer", "schedule") and isinstance(value, str):
        return value.lower()
    if key == "amp_dtype" and isinstance(value, str):
        return _AMP_ALIASES.get(value, value)
    if key == "device" and isinstance(value, torch.device):
        return str(value)
    if key in ("milestones", "cka_pairs") and hasattr(value, "__iter__") and not isinstance(value, str | Mapping):
        return [v.item() if isinstance(v, np.generic) else v for v in value]
    return value
