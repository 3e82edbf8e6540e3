"""Checkpoints: :func:`save_checkpoint` (atomic) / :func:`load_checkpoint`, the weights a checkpoint holds
(:func:`apply_weights`, :func:`student_of` / :func:`extra_of`, :func:`model_identity`) and the resume checks
(:func:`check_resume` with :data:`RESUME_MAY_CHANGE` / :data:`CONFIG_MAY_CHANGE`)."""

from __future__ import annotations

import copy
import dataclasses
import io
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from ..fileio import atomic_write_bytes
from ..schema import plain
from ..state_dicts import compare_state_dict
from .seeding import set_rng_state
from .settings import KEYWORDS, RECORD_V1, SECTIONS, TrainSettings

__all__ = [
    "CHECKPOINT_FORMAT",
    "CONFIG_MAY_CHANGE",
    "RESUME_MAY_CHANGE",
    "apply_weights",
    "check_resume",
    "clone_cpu",
    "extra_of",
    "load_checkpoint",
    "restore_training",
    "model_identity",
    "save_checkpoint",
    "student_of",
]

CHECKPOINT_FORMAT = "ckakd.train.checkpoint/v1"
# TrainSettings fields that may differ between a checkpoint and the run resuming it (where and how the run is
# logged, evaluated and saved, and the device); ``epochs`` too, under the conditions of :func:`check_resume`.
# Every other field (optimizer, schedule, seed, AMP, ...) shaped the epochs already run: a change is refused.
RESUME_MAY_CHANGE = (
    "epochs", "out_dir", "device", "progress", "log_every", "eval_every", "save_every", "tensorboard", "resume",
    "config", "find_unused_parameters", "channels_last", "compile",
)  # fmt: skip
# the same for the dotted keys of a ckakd config (``settings.config``); the rest must be as in the checkpoint
CONFIG_MAY_CHANGE = (
    "run.name", "run.out_dir", "run.device", "run.progress", "run.tensorboard", "run.wandb.mode", "run.wandb.project",
    "run.wandb.name", "run.wandb.dir", "run.wandb.tags", "run.wandb.entity", "train.log_every",
    "train.eval_every", "train.save_every", "schedule.epochs", "train.channels_last", "train.compile",
)  # fmt: skip


def save_checkpoint(path: str | os.PathLike, payload: dict) -> Path:
    """``torch.save(payload)`` atomically (temp file in the same folder + fsync + ``os.replace``)."""
    if not isinstance(payload, dict):
        raise TypeError(f"payload must be a dict, got {type(payload).__name__}")
    payload = {"format": CHECKPOINT_FORMAT, **payload}
    buf = io.BytesIO()
    torch.save(payload, buf)
    path = Path(path)
    atomic_write_bytes(path, buf.getvalue())
    return path


def student_of(model: nn.Module) -> nn.Module:
    student = getattr(model, "student", None)
    return student if isinstance(student, nn.Module) else model


def extra_of(model: nn.Module) -> nn.Module | None:
    extra = getattr(model, "extra", None)
    return extra if isinstance(extra, nn.Module) and student_of(model) is not model else None


def _state_dict_mismatch(model: nn.Module, state: dict, what: str) -> str | None:
    fit = compare_state_dict(model, state)
    if fit.ok:
        return None
    return f"{what} state_dict does not fit {type(model).__name__}: " + fit.problems()


def load_checkpoint(path: str | os.PathLike, model: nn.Module | None = None, map_location: Any = "cpu") -> dict:
    """Load a checkpoint written by :class:`Trainer` / :func:`save_checkpoint`; returns its dict.

    With ``model``, its weights are loaded: a Distiller (has a ``student``) gets ``"student"`` into
    ``model.student`` and ``"extra"`` into ``model.extra``; a plain module gets ``"student"``. Raises
    ``ValueError`` naming missing/unexpected keys and shape mismatches when they do not fit.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not a checkpoint file")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path} is not a readable ckakd checkpoint: {type(exc).__name__}: {exc}") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        fmt = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{path} is not a ckakd checkpoint (format {fmt!r}, expected {CHECKPOINT_FORMAT!r})")
    if model is not None:
        apply_weights(ckpt, model, path)
    return ckpt


def apply_weights(ckpt: dict, model: nn.Module, path: Path) -> None:
    """Load a checkpoint dict's ``student`` (and ``extra``) weights into ``model`` (see :func:`load_checkpoint`)."""
    targets = [(student_of(model), ckpt.get("student"), "student")]
    extra = extra_of(model)
    if extra is not None:
        targets.append((extra, ckpt.get("extra") or {}, "extra"))
    for module, state, what in targets:
        if not isinstance(state, dict):
            raise ValueError(f"{path} has no {what!r} state_dict")
        problem = _state_dict_mismatch(module, state, f"{path}: {what!r}")
        if problem:
            raise ValueError(problem)
    for module, state, _ in targets:
        module.load_state_dict(state)


def model_identity(model: nn.Module) -> dict[str, str]:
    """What a checkpoint records of the model it trained: the class of the trained module (a Distiller or the
    plain classifier) and of its student; a class may name itself with a ``checkpoint_name`` attribute (every
    detection distiller is ``"DetectionDistiller"``, as checkpoints have recorded it)."""
    model_name = getattr(type(model), "checkpoint_name", type(model).__name__)
    return {"model": model_name, "student": type(student_of(model)).__name__}


def _describe_identity(ident: Mapping[str, Any]) -> str:
    model, student = ident.get("model"), ident.get("student")
    return f"{model} (student {student})" if model != student else f"{model} (no distiller)"


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, Mapping) and v:
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out


_UNSET = "<unset>"


def _with_new_defaults(old_flat: dict[str, Any], settings: TrainSettings) -> dict[str, Any]:
    """A checkpoint's flattened config with the run / optim / schedule / train keys added since it was written
    (absent from it, nothing under them either) at their defaults: such a checkpoint ran with those."""
    defaults = _flatten({name: plain(dataclasses.asdict(type(getattr(settings, name))())) for name in SECTIONS})
    out = dict(old_flat)
    for key, value in defaults.items():
        if key not in out and not any(k.startswith(key + ".") for k in old_flat):
            out[key] = value
    return out


def check_resume(
    path: str | os.PathLike,
    settings: TrainSettings,
    *,
    world_size: int = 1,
    model: nn.Module | None = None,
    ckpt: dict | None = None,
) -> dict | None:
    """Check that the run described by ``settings`` (and ``model``) may continue from the checkpoint ``path``;
    returns the loaded checkpoint (``None`` when ``path`` does not exist: a fresh start).

    Raises ``ValueError`` listing every difference that would make the continuation something else than the run
    the checkpoint belongs to: any setting outside :data:`RESUME_MAY_CHANGE` (with ``settings.config``, any
    config key outside :data:`CONFIG_MAY_CHANGE`: the model, the distiller, the optimizer, the learning rate,
    ...), the trained model's class, and the number of processes. ``epochs`` may grow or shrink (not below the
    epochs completed) when the schedule does not depend on it: ``step`` / ``constant``, and a model without
    ``uses_total_epochs`` (a loss weight scheduled over the total epochs).
    """
    path = Path(path)
    if ckpt is None:
        if not path.exists():
            return None
        if not path.is_file():
            raise ValueError(f"{path} is a folder, not a checkpoint: move it away or choose another run.name")
        ckpt = load_checkpoint(path, map_location="cpu")
    new_settings = settings.to_dict()
    old_settings = ckpt.get("settings") or {}
    old_cfg, new_cfg = ckpt.get("config"), settings.config
    by_config = isinstance(old_cfg, Mapping) and isinstance(new_cfg, Mapping)
    conflicts: list[str] = []
    if by_config:
        old_flat, new_flat = _with_new_defaults(_flatten(old_cfg), settings), _flatten(plain(new_cfg))
        for key in sorted(set(old_flat) | set(new_flat)):
            if key in CONFIG_MAY_CHANGE:
                continue
            a, b = old_flat.get(key, _UNSET), new_flat.get(key, _UNSET)
            if a != b:
                conflicts.append(f"{key}: checkpoint {a!r}, this run {b!r}")
    else:
        for key in dict.fromkeys([*new_settings, *old_settings]):
            if key in RESUME_MAY_CHANGE or key not in KEYWORDS or (key in RECORD_V1 and key not in old_settings):
                continue
            a, b = old_settings.get(key, settings.default(key)), new_settings.get(key, settings.default(key))
            if a != b:  # a newer keyword is in a record only away from its default
                conflicts.append(f"{key}: checkpoint {a!r}, this run {b!r}")
        ident = ckpt.get("model_identity")
        if model is not None and isinstance(ident, Mapping) and dict(ident) != model_identity(model):
            conflicts.append(
                f"model: the checkpoint trained {_describe_identity(ident)}, this run "
                f"{_describe_identity(model_identity(model))}"
            )
    epochs_key = "schedule.epochs" if by_config else "epochs"
    done, old_epochs, new_epochs = int(ckpt.get("epoch", 0)), old_settings.get("epochs"), int(settings.schedule.epochs)
    if new_epochs < done:
        conflicts.append(f"{epochs_key}={new_epochs}: the checkpoint has already completed {done} epochs")
    elif old_epochs is not None and int(old_epochs) != new_epochs:
        change = f"{epochs_key} {old_epochs} -> {new_epochs}"
        if settings.schedule.kind == "cosine":
            conflicts.append(
                f"{change}: the cosine schedule spreads over all epochs, so the {done} epochs already run followed "
                "another curve (the epochs may change with the step or constant schedule)"
            )
        elif model is not None and getattr(model, "uses_total_epochs", False):
            conflicts.append(
                f"{change}: {type(model).__name__} schedules its loss weights over the total epochs, so the {done} "
                "epochs already run followed another schedule"
            )
    old_world = int(ckpt.get("world_size") or 1)
    if old_world != int(world_size):
        how = f"torchrun --nproc_per_node {old_world}" if old_world > 1 else "one process (no torchrun)"
        conflicts.append(
            f"world size: the checkpoint was written by {old_world} process(es), this run has {world_size} (the data "
            f"shards, the global batch and the per-rank RNG states depend on it); resume with {how}"
        )
    if conflicts:
        allowed = CONFIG_MAY_CHANGE if by_config else [k for k in RESUME_MAY_CHANGE if k not in ("resume", "config")]
        elsewhere = "another run.name" if by_config else "another out_dir"
        raise ValueError(
            f"cannot resume from {path}: {'; '.join(conflicts)}. On resume only these may change: {', '.join(allowed)} "
            f"({epochs_key} only with a step or constant schedule); start a new run ({elsewhere}) to change anything "
            "else"
        )
    return ckpt


@dataclass
class Restored:
    """Where a resumed run continues (see :func:`restore_training`)."""

    history: list[dict]
    best_value: float | None
    best_epoch: int | None
    start_epoch: int
    global_step: int
    metric_changed: bool  # the checkpoint tracked another metric: best.pt restarts


def restore_training(
    ckpt: dict,
    path: Path,
    model: nn.Module,
    optimizer: Any,
    scheduler: Any,
    scaler: Any,
    *,
    metric: str,
    rank: int,
    optimizer_name: str,
) -> Restored:
    """Continue from the checkpoint dict ``ckpt`` (read from ``path``, already checked by :func:`check_resume`):
    load its weights into ``model``, the optimizer / scheduler / AMP scaler states, this ``rank``'s RNG state and the
    scheduled learning rates; returns the history and counters to continue with (``metric``: the one this run
    tracks; a checkpoint that tracked another starts best.pt over; ``optimizer_name`` names it in errors)."""
    apply_weights(ckpt, model, path)
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
    except (KeyError, ValueError, TypeError, RuntimeError) as exc:
        n_params = sum(len(g["params"]) for g in optimizer.param_groups)
        raise ValueError(
            f"cannot resume from {path}: its optimizer/scheduler state does not fit this run's "
            f"{optimizer_name} optimizer over {n_params} parameters ({type(exc).__name__}: {exc})"
        ) from exc
    if ckpt.get("scaler") is not None and scaler.is_enabled():
        scaler.load_state_dict(ckpt["scaler"])
    history = list(ckpt.get("history") or [])
    best = ckpt.get("best_value", ckpt.get("best_top1"))
    metric_changed = ckpt.get("metric", "top1") != metric
    if metric_changed:
        best = None
    start_epoch = int(ckpt["epoch"])
    if len(history) != start_epoch:
        history = [r for r in history if int(r["epoch"]) <= start_epoch]
    rngs = ckpt.get("rng") or []
    if rngs:
        set_rng_state(rngs[rank] if rank < len(rngs) else rngs[0])
    for g, lr in zip(optimizer.param_groups, scheduler.get_last_lr(), strict=True):
        g["lr"] = lr
    best_epoch = ckpt.get("best_epoch") if best is not None else None
    return Restored(history, best, best_epoch, start_epoch, int(ckpt.get("global_step") or 0), metric_changed)


def clone_cpu(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: clone_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(clone_cpu(v) for v in obj)
    return copy.deepcopy(obj)
