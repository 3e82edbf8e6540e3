"""The trainer's settings (:class:`TrainSettings`) and their validation, and :func:`plain` (what a checkpoint or a
JSON file may hold)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = ["AMP_DTYPES", "TrainSettings", "plain"]

_OPTIMIZERS = ("sgd", "adamw")
_SCHEDULES = ("step", "cosine", "constant")
AMP_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


@dataclass
class TrainSettings:
    """Everything the loop needs besides the model and the loaders (see the module docstring)."""

    epochs: int
    out_dir: str | os.PathLike
    lr: float = 0.05
    optimizer: str = "sgd"  # "sgd" | "adamw"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    schedule: str = "step"  # "step" | "cosine" | "constant" (per epoch, after a linear warmup)
    milestones: Sequence[int] = (150, 180, 210)  # 0-based epoch indices at which "step" multiplies by gamma
    gamma: float = 0.1
    warmup_epochs: int = 0
    warmup_steps: int = 0  # linear warmup over the first optimizer steps: lr x (0.1 -> 1), on top of the schedule
    device: str = "auto"
    amp: bool = False
    amp_dtype: str = "bfloat16"
    grad_clip: float | None = None
    seed: int = 0
    deterministic: bool = False
    progress: bool = True
    log_every: int = 50
    eval_every: int = 1
    save_every: int = 1
    tensorboard: bool = False
    max_train_batches: int | None = None
    cka_pairs: Sequence[tuple[str, str]] = ()  # (student path, teacher path) whose CKA is logged per epoch
    resume: bool = False
    config: dict | None = None
    find_unused_parameters: bool = False  # DDP only: set when some trainable parameter gets no gradient

    def __post_init__(self) -> None:
        def bad(field: str, why: str) -> ValueError:
            return ValueError(f"TrainSettings.{field}: {why}, got {getattr(self, field)!r}")

        if int(self.epochs) < 1:
            raise bad("epochs", "must be >= 1")
        self.optimizer = str(self.optimizer).lower()
        if self.optimizer not in _OPTIMIZERS:
            raise bad("optimizer", f"must be one of {_OPTIMIZERS}")
        self.schedule = str(self.schedule).lower()
        if self.schedule not in _SCHEDULES:
            raise bad("schedule", f"must be one of {_SCHEDULES}")
        if not self.lr > 0:
            raise bad("lr", "must be > 0")
        if self.warmup_epochs < 0:
            raise bad("warmup_epochs", "must be >= 0")
        if int(self.warmup_steps) < 0:
            raise bad("warmup_steps", "must be >= 0")
        if self.amp_dtype not in AMP_DTYPES:
            raise bad("amp_dtype", f"must be one of {sorted(AMP_DTYPES)}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise bad("grad_clip", "must be > 0 or None")
        if int(self.seed) < 0:
            raise bad("seed", "must be >= 0")
        for name in ("eval_every", "save_every"):
            if int(getattr(self, name)) < 1:
                raise bad(name, "must be >= 1")
        if self.max_train_batches is not None and int(self.max_train_batches) < 1:
            raise bad("max_train_batches", "must be >= 1 or None")
        self.milestones = tuple(int(m) for m in self.milestones)
        pairs = []
        for p in self.cka_pairs:
            if isinstance(p, str) or len(p) != 2:
                raise bad("cka_pairs", "must be (student path, teacher path) pairs")
            pairs.append((str(p[0]), str(p[1])))
        self.cka_pairs = tuple(pairs)

    def to_dict(self) -> dict:
        """Plain-typed copy (paths as strings, tuples as lists), safe for JSON and ``weights_only`` loading."""
        return plain(dataclasses.asdict(self))


def plain(obj: Any) -> Any:
    """Recursively convert to types ``torch.load(weights_only=True)`` and JSON accept."""
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [plain(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return obj.item()
    return str(obj)
