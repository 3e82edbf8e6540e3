"""The reference trainer's loop, independent of any config format.

:class:`Trainer` trains either a :class:`~ckakd.train.distillers.Distiller` (anything with ``forward_train(x, y)
-> (logits, {name: loss})``; the total loss is the sum of the dict, the optimizer gets its
``learnable_parameters()``) or a plain classifier (cross-entropy, loss key ``"ce"``: teacher training).

Per epoch it reseeds the loaders from ``(seed, epoch)``, trains with optional AMP and gradient clipping,
evaluates, logs the teacher–student CKA of ``cka_pairs`` on a fixed validation subset, appends a row to
``metrics.csv`` / ``metrics.jsonl`` (with what the ``callbacks`` return) and writes ``latest.pt`` / ``best.pt``
atomically. Training batches may be multi-view (``({view: Tensor}, y)``, see
:class:`~ckakd.train.data.MultiView`) for distillers that take them. ``resume=True``
continues from ``out_dir/latest.pt`` (in deterministic mode bitwise-identically to an uninterrupted run).
Under ``torchrun`` (``WORLD_SIZE > 1``) it runs DDP; only rank 0 writes files.

What a batch is, how the training forward is called and how validation is scored is a *task*
(:class:`ClassificationTask` by default: ``(x, y)`` batches, top-1; the detection trainer passes
``ckakd.detection.task.DetectionTask``: ``(images, targets, sizes)`` batches, COCO AP). Everything else
(optimizer, schedule and step warmup, AMP, clipping, DDP, checkpoints, resume, logs, plots, callbacks, CKA) is
shared.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import io
import json
import logging
import math
import os
import random
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, RandomSampler
from torch.utils.data.distributed import DistributedSampler

from . import distributed as dist
from .fileio import OutputError, append_text, atomic_write_bytes
from .hooks import FeatureHooks

__all__ = [
    "CHECKPOINT_FORMAT",
    "ClassificationTask",
    "NonFiniteLossError",
    "TrainSettings",
    "TrainerCallback",
    "Trainer",
    "evaluate",
    "seed_everything",
    "lr_at_epoch",
    "epoch_seed",
    "save_checkpoint",
    "load_checkpoint",
    "OutputError",
    "RESUME_MAY_CHANGE",
    "OUTPUT_FILES",
    "check_device",
    "check_output_paths",
    "check_resume",
]

logger = logging.getLogger("ckakd.train")

CHECKPOINT_FORMAT = "ckakd.train.checkpoint/v1"
CKA_MAX_IMAGES = 512
_OPTIMIZERS = ("sgd", "adamw")
_SCHEDULES = ("step", "cosine", "constant")
# TrainSettings fields that may differ between a checkpoint and the run resuming it (where and how the run is
# logged, evaluated and saved, and the device); ``epochs`` too, under the conditions of :func:`check_resume`.
# Every other field (optimizer, schedule, seed, AMP, ...) shaped the epochs already run: a change is refused.
RESUME_MAY_CHANGE = (
    "epochs", "out_dir", "device", "progress", "log_every", "eval_every", "save_every", "tensorboard", "resume",
    "config", "find_unused_parameters",
)  # fmt: skip
# the same for the dotted keys of a ckakd config (``settings.config``); the rest must be as in the checkpoint
CONFIG_MAY_CHANGE = (
    "run.name", "run.out_dir", "run.device", "run.progress", "run.tensorboard", "train.log_every",
    "train.eval_every", "train.save_every", "schedule.epochs",
)  # fmt: skip
OUTPUT_FILES = ("latest.pt", "best.pt", "metrics.csv", "metrics.jsonl", "config.yaml", "curves.png", "cka.png")
_AMP_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


# --------------------------------------------------------------------------------------------------------------
# Settings, seeding, LR schedule
# --------------------------------------------------------------------------------------------------------------


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
        if self.amp_dtype not in _AMP_DTYPES:
            raise bad("amp_dtype", f"must be one of {sorted(_AMP_DTYPES)}")
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
        return _plain(dataclasses.asdict(self))


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed python, numpy and torch (CPU and all CUDA devices).

    ``deterministic=True`` also sets ``CUBLAS_WORKSPACE_CONFIG`` (if unset), enables
    ``torch.use_deterministic_algorithms`` and makes cuDNN deterministic (benchmark off); ``False`` turns
    deterministic algorithms off again.
    """
    seed = int(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if torch.are_deterministic_algorithms_enabled() != bool(deterministic):  # the first call is slow
        torch.use_deterministic_algorithms(bool(deterministic))
    torch.backends.cudnn.deterministic = bool(deterministic)
    if deterministic:
        torch.backends.cudnn.benchmark = False


def epoch_seed(seed: int, epoch: int, stream: int = 0) -> int:
    """A 63-bit seed that depends only on ``(seed, epoch, stream)`` (numpy ``SeedSequence``)."""
    state = np.random.SeedSequence([int(seed), int(epoch), int(stream)]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def lr_at_epoch(settings: TrainSettings, epoch: int) -> float:
    """Learning rate used during (0-based) ``epoch``: linear warmup ``lr·(e+1)/W`` for ``e < W``, then

    - ``"step"``: ``lr · gamma^(number of milestones <= e)``,
    - ``"cosine"``: ``lr · ½(1 + cos(π (e − W) / (epochs − W)))``,
    - ``"constant"``: ``lr``.
    """
    return settings.lr * _lr_factor(settings, epoch)


def _lr_factor(s: TrainSettings, epoch: int) -> float:
    w = int(s.warmup_epochs)
    if epoch < w:
        return (epoch + 1) / w
    if s.schedule == "step":
        return float(s.gamma) ** sum(1 for m in s.milestones if epoch >= m)
    if s.schedule == "cosine":
        span = max(int(s.epochs) - w, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(epoch - w, span) / span))
    return 1.0


# --------------------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------------------


def _plain(obj: Any) -> Any:
    """Recursively convert to types ``torch.load(weights_only=True)`` and JSON accept."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return obj.item()
    return str(obj)


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


def _student_of(model: nn.Module) -> nn.Module:
    student = getattr(model, "student", None)
    return student if isinstance(student, nn.Module) else model


def _extra_of(model: nn.Module) -> nn.Module | None:
    extra = getattr(model, "extra", None)
    return extra if isinstance(extra, nn.Module) and _student_of(model) is not model else None


def _state_dict_mismatch(model: nn.Module, state: dict, what: str) -> str | None:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and isinstance(state[k], Tensor) and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if not (missing or unexpected or shapes):
        return None
    parts = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
        if items:
            more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
            parts.append(f"{len(items)} {label}: {items[:5]}{more}")
    return f"{what} state_dict does not fit {type(model).__name__}: " + "; ".join(parts)


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
        _apply_weights(ckpt, model, path)
    return ckpt


def _apply_weights(ckpt: dict, model: nn.Module, path: Path) -> None:
    """Load a checkpoint dict's ``student`` (and ``extra``) weights into ``model`` (see :func:`load_checkpoint`)."""
    targets = [(_student_of(model), ckpt.get("student"), "student")]
    extra = _extra_of(model)
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


def _model_identity(model: nn.Module) -> dict[str, str]:
    """What a checkpoint records of the model it trained: the class of the trained module (a Distiller or the
    plain classifier) and of its student."""
    return {"model": type(model).__name__, "student": type(_student_of(model)).__name__}


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
        old_flat, new_flat = _flatten(old_cfg), _flatten(_plain(new_cfg))
        for key in sorted(set(old_flat) | set(new_flat)):
            if key in CONFIG_MAY_CHANGE:
                continue
            a, b = old_flat.get(key, _UNSET), new_flat.get(key, _UNSET)
            if a != b:
                conflicts.append(f"{key}: checkpoint {a!r}, this run {b!r}")
    else:
        for key in new_settings:
            if key in RESUME_MAY_CHANGE or key not in old_settings:
                continue
            if old_settings[key] != new_settings[key]:
                conflicts.append(f"{key}: checkpoint {old_settings[key]!r}, this run {new_settings[key]!r}")
        ident = ckpt.get("model_identity")
        if model is not None and isinstance(ident, Mapping) and dict(ident) != _model_identity(model):
            conflicts.append(
                f"model: the checkpoint trained {_describe_identity(ident)}, this run "
                f"{_describe_identity(_model_identity(model))}"
            )
    epochs_key = "schedule.epochs" if by_config else "epochs"
    done, old_epochs, new_epochs = int(ckpt.get("epoch", 0)), old_settings.get("epochs"), int(settings.epochs)
    if new_epochs < done:
        conflicts.append(f"{epochs_key}={new_epochs}: the checkpoint has already completed {done} epochs")
    elif old_epochs is not None and int(old_epochs) != new_epochs:
        change = f"{epochs_key} {old_epochs} -> {new_epochs}"
        if settings.schedule == "cosine":
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


def _rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def _set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])


def _clone_cpu(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _clone_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_clone_cpu(v) for v in obj)
    return copy.deepcopy(obj)


# --------------------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------------------


def _resolve_device(name: str | torch.device) -> torch.device:
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", dist.local_rank() if dist.env_world_size() > 1 else 0)
        return torch.device("cpu")
    check_device(name)
    return torch.device(name)


def check_device(name: str | torch.device, key: str = "device") -> None:
    """``ValueError`` naming ``key`` when ``name`` is not a usable device here (``cuda`` without a GPU, a
    ``cuda:N`` beyond the visible GPUs, or not a device string at all); ``"auto"`` always passes."""
    if isinstance(name, torch.device) or name == "auto":
        device = name if isinstance(name, torch.device) else None
    else:
        try:
            device = torch.device(name)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"{key}={name!r} is not a device ('auto', 'cpu', 'cuda' or 'cuda:N'): {exc}") from None
    if device is None or device.type != "cuda":
        return
    if not torch.cuda.is_available():
        why = (
            f"this torch ({torch.__version__}) is built without CUDA"
            if torch.version.cuda is None
            else "no CUDA GPU is visible (driver missing, or CUDA_VISIBLE_DEVICES hides them)"
        )
        raise ValueError(f"{key}={str(name)!r} but {why}; use {key}=auto or {key}=cpu")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise ValueError(f"{key}={str(name)!r} but only {count} CUDA device(s) are visible (cuda:0..cuda:{count - 1})")


def check_output_paths(out_dir: str | os.PathLike) -> None:
    """``ValueError`` when one of the run's output files (:data:`OUTPUT_FILES`) exists in ``out_dir`` but is not a
    regular file (a folder in its place would otherwise fail the first save, after an epoch of training)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"the run folder {out_dir} is a file, not a folder")
    for name in OUTPUT_FILES:
        p = out_dir / name
        if p.exists() and not p.is_file():
            kind = "a folder" if p.is_dir() else "not a regular file"
            raise ValueError(f"{p} is {kind}; the run writes its {name} there: move it away or choose another run.name")


def _autocast(device: torch.device, amp: bool, amp_dtype: str):
    return torch.autocast(device_type=device.type, dtype=_AMP_DTYPES[amp_dtype], enabled=bool(amp))


def _split_batch(batch: Any) -> tuple[Any, Tensor]:
    if isinstance(batch, dict):
        return batch["image"] if "image" in batch else batch["x"], batch["label"] if "label" in batch else batch["y"]
    if isinstance(batch, list | tuple) and len(batch) >= 2:
        return batch[0], batch[1]
    raise TypeError(f"expected batches (x, y), got {type(batch).__name__}")


def _to_device(x: Any, device: torch.device) -> Any:
    """Move a tensor, or every tensor of a ``{view: tensor}`` mapping (multi-view batches), to ``device``."""
    if isinstance(x, Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, Mapping):
        return {k: _to_device(v, device) for k, v in x.items()}
    raise TypeError(f"expected batch inputs to be a Tensor or a {{view: Tensor}} mapping, got {type(x).__name__}")


def _plain_input(x: Any, where: str) -> Tensor:
    if isinstance(x, Mapping):
        raise TypeError(
            f"{where} needs plain-tensor batches (x, y), got a multi-view batch with views {list(x)}: build this "
            "loader without a MultiView transform"
        )
    if not isinstance(x, Tensor):
        raise TypeError(f"{where}: expected batch inputs to be a Tensor, got {type(x).__name__}")
    return x


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    device: str | torch.device | None = None,
    *,
    amp: bool = False,
    amp_dtype: str = "bfloat16",
    max_batches: int | None = None,
) -> dict:
    """Top-1, top-5 (when there are >= 5 classes), mean cross-entropy and sample count of ``model(x)``.

    Streamed over ``loader`` and weighted by samples; under DDP the sums are all-reduced (give each rank a
    disjoint shard, e.g. :class:`~ckakd.train.distributed.ShardSampler`). Returns floats in [0, 100] for
    the accuracies. The model's train/eval mode is restored afterwards.
    """
    if device is None:
        p = next(model.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
    device = _resolve_device(device)
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64)  # loss, correct@1, correct@5, n
    num_classes = 0
    try:
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            x, y = _split_batch(batch)
            x = _plain_input(x, "evaluate").to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            with _autocast(device, amp, amp_dtype):
                logits = model(x)
            logits = logits.float()
            num_classes = max(num_classes, logits.shape[1])
            k = min(5, logits.shape[1])
            topk = logits.topk(k, dim=1).indices
            hit = topk.eq(y.view(-1, 1))
            sums += torch.tensor(
                [
                    F.cross_entropy(logits, y, reduction="sum").item(),
                    hit[:, 0].sum().item(),
                    hit.any(dim=1).sum().item(),
                    y.shape[0],
                ],
                dtype=torch.float64,
            )
    finally:
        model.train(was_training)
    nc = torch.tensor([num_classes], dtype=torch.float64)
    if dist.is_distributed() and dist.world_size() > 1:
        sums = dist.all_reduce_sum(sums.to(_collective_device(device))).cpu()
        nc = _all_reduce_max(nc.to(_collective_device(device))).cpu()
    n = int(sums[3].item())
    if n == 0:
        raise ValueError("evaluate: the loader yielded no samples")
    out = {"top1": 100.0 * sums[1].item() / n, "loss": sums[0].item() / n, "n": n}
    if int(nc.item()) >= 5:
        out["top5"] = 100.0 * sums[2].item() / n
    return out


def _collective_device(device: torch.device) -> torch.device:
    """Where tensors for collectives live: the CUDA device with NCCL, the CPU otherwise."""
    import torch.distributed as tdist

    if tdist.is_initialized() and tdist.get_backend() == "nccl":
        return device if device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce_max(t: Tensor) -> Tensor:
    import torch.distributed as tdist

    out = t.clone()
    tdist.all_reduce(out, op=tdist.ReduceOp.MAX)
    return out


# --------------------------------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------------------------------


class ClassificationTask:
    """The trainer's default task: ``(x, y)`` batches, a Distiller's ``forward_train(x, y) -> (logits, losses)``
    or cross-entropy for a plain classifier, validation by :func:`evaluate` (top-1 selects ``best.pt``).

    A task has: ``metric`` (the validation key that selects ``best.pt``, higher is better), ``metric_label``
    (plot axis), ``move(batch, device)``, ``forward(model, batch) -> ({name: loss}, {"n": samples[, "correct":
    top-1 hits]})`` (runs inside DDP), ``evaluate(model, loader, device, amp=, amp_dtype=) -> {key: value}`` (the
    row gets ``val/<key>``; collective under DDP) and ``images(batch) -> Tensor`` (inputs for the CKA log).
    """

    name = "classification"
    metric = "top1"
    metric_label = "top-1 (%)"

    def move(self, batch: Any, device: torch.device) -> tuple[Any, Tensor]:
        x, y = _split_batch(batch)
        return _to_device(x, device), y.to(device, non_blocking=True)

    def forward(self, model: nn.Module, batch: tuple[Any, Tensor]) -> tuple[dict[str, Tensor], dict[str, Any]]:
        x, y = batch
        if callable(getattr(model, "forward_train", None)):
            out = model.forward_train(x, y)
            if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], dict)):
                raise TypeError(
                    f"{type(model).__name__}.forward_train must return (logits, {{name: loss}}), "
                    f"got {type(out).__name__}"
                )
            logits, losses = out
        else:
            if isinstance(x, Mapping):
                raise TypeError(
                    f"a plain classifier ({type(model).__name__}) cannot train on multi-view batches (views "
                    f"{list(x)}): build the train loader without a MultiView transform, or train a distiller that "
                    "takes views (EnsembleKD)"
                )
            logits = model(x)
            losses = {"ce": F.cross_entropy(logits.float(), y)}
        bs = int(y.shape[0])
        if logits.shape[0] != bs:
            raise ValueError(
                f"the training forward returned logits for {logits.shape[0]} samples but the batch has {bs} "
                "labels (multi-view batches: the logits must be the student view's)"
            )
        counts: dict[str, Any] = {"n": bs}
        if y.ndim == 1:  # hard labels: running top-1
            counts["correct"] = (logits.detach().argmax(1) == y).sum()
        return losses, counts

    def evaluate(
        self, model: nn.Module, loader: Iterable, device: torch.device, *, amp: bool, amp_dtype: str
    ) -> dict[str, Any]:
        val = evaluate(model, loader, device, amp=amp, amp_dtype=amp_dtype)
        return {"top1": val["top1"], "top5": val.get("top5"), "loss": val["loss"], "n": val["n"]}

    def images(self, batch: Any) -> Tensor:
        x, _ = _split_batch(batch)
        return _plain_input(x, "the CKA log (validation loader)")


class _TrainStep(nn.Module):
    """``batch -> ({name: loss}, counts)`` through the task. DDP wraps this, so gradient synchronization covers
    exactly what the training forward uses."""

    def __init__(self, model: nn.Module, task: Any) -> None:
        super().__init__()
        self.model = model
        self.task = task

    def forward(self, batch: Any) -> tuple[dict[str, Tensor], dict[str, Any]]:
        return self.task.forward(self.model, batch)


class TrainerCallback:
    """Optional base class documenting the callback protocol of :class:`Trainer` (any object with one or
    both of these methods is a callback; subclassing is not required).

    - ``on_epoch_end(trainer, epoch) -> dict[str, float] | None``: called after every epoch's validation
      (``epoch`` 0-based; ``trainer.epoch`` is the same) on every rank, before the metrics row is written.
      The returned ``{name: number}`` (``None`` or ``{}``: nothing this epoch) is merged into that epoch's
      row: ``metrics.csv`` / ``metrics.jsonl``, TensorBoard and the checkpoints' ``history``, so it
      survives resume. Names must not clash with the trainer's own columns (``epoch``, ``lr``,
      ``train/*``, ``val/*``, ``cka/*``, ``epoch_time_s``) or another callback's. Only rank 0's values are
      written; callbacks doing collectives must make them on every rank.
    - ``on_fit_end(trainer) -> None``: called once when :meth:`Trainer.fit` completes normally (after
      the last checkpoint and the plots; not when training raises).

    Useful attributes: ``trainer.model`` (the Distiller or classifier), ``trainer.student``,
    ``trainer.device``, ``trainer.out_dir``, ``trainer.epoch``, ``trainer.history``, ``trainer.is_main``,
    ``trainer.val_loader``, ``trainer.settings``.
    """

    def on_epoch_end(self, trainer: Trainer, epoch: int) -> dict[str, float] | None:
        return None

    def on_fit_end(self, trainer: Trainer) -> None:
        return None


_CALLBACK_HOOKS = ("on_epoch_end", "on_fit_end")


class Trainer:
    """Train ``model`` on ``train_loader``, evaluating on ``val_loader`` (see the module docstring).

    ``teacher_for_cka``: the network whose features the ``cka_pairs`` teacher paths refer to (default: the
    Distiller's first teacher, if any). Batches are ``(x, y)``, where the training ``x`` may also be a
    ``{view: Tensor}`` mapping (multi-view batches; the model must be a distiller that takes them); under DDP
    the loaders' per-rank batch size is kept and their samplers are replaced by distributed ones.
    ``callbacks``: objects with ``on_epoch_end(trainer, epoch)`` and/or ``on_fit_end(trainer)`` (see
    :class:`TrainerCallback`), called in order. ``task``: batches, training forward and validation (default
    :class:`ClassificationTask`; see there for the protocol).
    """

    def __init__(
        self,
        model: nn.Module,
        train_loader: DataLoader,
        val_loader: Iterable | None,
        settings: TrainSettings,
        *,
        teacher_for_cka: nn.Module | None = None,
        callbacks: Sequence[Any] = (),
        task: Any = None,
    ) -> None:
        self.task = ClassificationTask() if task is None else task
        missing = [a for a in ("metric", "move", "forward", "evaluate", "images") if not hasattr(self.task, a)]
        if missing:
            raise TypeError(f"task {type(self.task).__name__} lacks {missing} (see ClassificationTask)")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not isinstance(settings, TrainSettings):
            raise TypeError(f"settings must be a TrainSettings, got {type(settings).__name__}")
        self.callbacks: list[Any] = _check_callbacks(callbacks)
        self.settings = s = settings
        self.out_dir = Path(s.out_dir)
        self.epoch: int | None = None  # the 0-based epoch running (or last run); None before fit()

        # --- processes, device, seeds
        device_hint = "cpu" if str(s.device) == "cpu" or not torch.cuda.is_available() else "cuda"
        self._owns_group = False
        if dist.env_world_size() > 1 and not dist.is_distributed():
            self._owns_group = dist.init_from_env("nccl" if device_hint == "cuda" else "gloo")
        self.distributed = dist.is_distributed() and dist.world_size() > 1
        self.rank, self.world_size = dist.rank(), dist.world_size()
        self.is_main = self.rank == 0
        self.device = _resolve_device(s.device)
        if self.device.type == "cuda" and self.device.index is not None:
            torch.cuda.set_device(self.device)
        seed_everything(s.seed + self.rank, s.deterministic)

        # --- model, optimizer, schedule, AMP
        self.model = model.to(self.device)
        self.student = _student_of(model)
        self.is_distiller = callable(getattr(model, "forward_train", None))
        learnable = model.learnable_parameters() if hasattr(model, "learnable_parameters") else model.parameters()
        seen: set[int] = set()
        self.params: list[nn.Parameter] = []
        for p in learnable:
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                self.params.append(p)
        if not self.params:
            raise ValueError(f"{type(model).__name__} has no trainable parameters")
        if s.optimizer == "sgd":
            self.optimizer: torch.optim.Optimizer = torch.optim.SGD(
                self.params, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay, nesterov=s.nesterov
            )
        else:
            self.optimizer = torch.optim.AdamW(self.params, lr=s.lr, weight_decay=s.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda e: _lr_factor(s, e))
        use_scaler = bool(s.amp) and _AMP_DTYPES[s.amp_dtype] == torch.float16
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=use_scaler)

        # --- loaders
        self.train_loader = self._distributed_loader(train_loader, train=True) if self.distributed else train_loader
        self.val_loader = (
            self._distributed_loader(val_loader, train=False)
            if self.distributed and val_loader is not None
            else val_loader
        )

        # --- the training forward (DDP-wrapped under torchrun)
        self._step_module: nn.Module = _TrainStep(model, self.task)
        if self.distributed:
            import inspect

            from torch.nn.parallel import DistributedDataParallel as DDP

            # buffers (BatchNorm statistics) are synced once at construction and broadcast from rank 0 once per
            # epoch, not at every forward
            sync = (
                {"forward_sync_buffers": False}
                if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
                else {"broadcast_buffers": False}
            )
            self._step_module = DDP(
                self._step_module,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=s.find_unused_parameters,
                **sync,
            )

        # --- CKA logging
        self.teacher_for_cka = teacher_for_cka
        if self.teacher_for_cka is None and s.cka_pairs and len(getattr(model, "teachers", ())) > 0:
            self.teacher_for_cka = model.teachers[0]
        self._cka_images: Tensor | None = None
        if s.cka_pairs:
            if self.teacher_for_cka is None:
                logger.warning("cka_pairs given but there is no teacher: teacher-student CKA is not logged")
            else:
                FeatureHooks(self.student, [p for p, _ in s.cka_pairs]).remove()  # path errors now, not later
                FeatureHooks(self.teacher_for_cka, [p for _, p in s.cka_pairs]).remove()
                self.teacher_for_cka.to(self.device).requires_grad_(False).eval()
                if val_loader is None:
                    raise ValueError("cka_pairs need a val_loader (CKA is measured on validation images)")
                if self.is_main:
                    self._cka_images = self._collect_images(val_loader, CKA_MAX_IMAGES, self.task)

        # --- logging outputs
        self._tb = None
        if s.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise ImportError(
                    f"tensorboard=True needs the `tensorboard` package ({exc}); install it or set tensorboard=False"
                ) from exc
            if self.is_main:
                self._tb = SummaryWriter(log_dir=str(self.out_dir / "tensorboard"))

        self.history: list[dict] = []
        self.best_value: float | None = None  # best validation ``task.metric`` so far
        self.best_epoch: int | None = None
        self.start_epoch = 0
        self._pending: dict | None = None  # last good epoch's state when it was not written to latest.pt
        self._global_step = 0  # optimizer steps taken over the whole run (resumed ones included)

    # ------------------------------------------------------------------ loaders

    def _distributed_loader(self, loader: Any, *, train: bool) -> Any:
        if not isinstance(loader, DataLoader):
            raise TypeError(f"under DDP the loaders must be torch DataLoaders, got {type(loader).__name__}")
        if train and isinstance(loader.sampler, DistributedSampler):
            return loader
        if loader.batch_size is None:
            raise ValueError("under DDP the loaders must use batch_size (not a custom batch_sampler)")
        ds = loader.dataset
        if train:
            sampler: Any = DistributedSampler(
                ds,
                num_replicas=self.world_size,
                rank=self.rank,
                shuffle=isinstance(loader.sampler, RandomSampler),
                seed=self.settings.seed,
            )
        else:
            sampler = dist.ShardSampler(len(ds), self.world_size, self.rank)
        kwargs: dict[str, Any] = {}
        if loader.num_workers > 0:
            kwargs = {"prefetch_factor": loader.prefetch_factor, "persistent_workers": loader.persistent_workers}
        return DataLoader(
            ds,
            batch_size=loader.batch_size,
            sampler=sampler,
            num_workers=loader.num_workers,
            collate_fn=loader.collate_fn,
            pin_memory=loader.pin_memory,
            drop_last=loader.drop_last if train else False,
            timeout=loader.timeout,
            worker_init_fn=loader.worker_init_fn,
            generator=loader.generator,
            **kwargs,
        )

    def _reseed_loader(self, loader: Any, epoch: int) -> None:
        """Make epoch ``epoch``'s order and augmentations depend only on (seed, epoch[, rank])."""
        seed = self.settings.seed
        gen = getattr(loader, "generator", None)
        if isinstance(gen, torch.Generator):
            gen.manual_seed(epoch_seed(seed, epoch, 0))
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        collate = getattr(loader, "collate_fn", None)
        cgen = getattr(collate, "generator", None)
        if isinstance(cgen, torch.Generator):
            cseed = epoch_seed(seed, epoch, 1 + self.rank)
            cgen.manual_seed(cseed)
            if isinstance(getattr(collate, "seed", None), int):
                collate.seed = cseed % 2**62  # worker processes re-seed their copy from this

    @property
    def best_top1(self) -> float | None:
        """Best validation top-1 (classification; ``best_value`` of the task's metric in general)."""
        return self.best_value

    @staticmethod
    def _collect_images(loader: Iterable, limit: int, task: Any) -> Tensor:
        xs, n = [], 0
        for batch in loader:
            x = task.images(batch)
            xs.append(x[: limit - n].detach().cpu())
            n += xs[-1].shape[0]
            if n >= limit:
                break
        if n == 0:
            raise ValueError("the validation loader yielded no images (needed for the CKA log)")
        return torch.cat(xs)

    # ------------------------------------------------------------------ logging

    def _log(self, msg: str, level: int = logging.INFO) -> None:
        if not self.is_main:
            return
        if self.settings.progress:
            from tqdm.auto import tqdm

            tqdm.write(msg)
        else:
            logger.log(level, msg)

    # ------------------------------------------------------------------ CKA

    @torch.no_grad()
    def measure_cka(self) -> dict[str, float]:
        """``{"cka/<student path>~<teacher path>": CKA}`` on the fixed validation subset (rank 0 only)."""
        if self._cka_images is None or self.teacher_for_cka is None:
            return {}
        import ckakd

        pairs = self.settings.cka_pairs
        was_training = self.student.training
        self.student.eval()
        hs = FeatureHooks(self.student, [p for p, _ in pairs], detach=True)
        ht = FeatureHooks(self.teacher_for_cka, [p for _, p in pairs], detach=True)
        feats_s: dict[str, list[Tensor]] = {p: [] for p, _ in pairs}
        feats_t: dict[str, list[Tensor]] = {p: [] for _, p in pairs}
        try:
            for chunk in self._cka_images.split(128):
                chunk = chunk.to(self.device)
                self.student(chunk)
                self.teacher_for_cka(chunk)
                for store, hooks in ((feats_s, hs), (feats_t, ht)):
                    for p in hooks.paths:
                        f = hooks.features.get(p)
                        if not isinstance(f, Tensor):
                            raise TypeError(f"CKA path {p!r} did not produce a tensor output")
                        store[p].append(f.reshape(f.shape[0], -1).double().cpu())
        finally:
            hs.remove()
            ht.remove()
            self.student.train(was_training)
        out = {}
        for ps, pt in pairs:
            out[f"cka/{ps}~{pt}"] = float(ckakd.cka(torch.cat(feats_s[ps]), torch.cat(feats_t[pt]), backend="torch"))
        return out

    # ------------------------------------------------------------------ checkpoints

    def _payload(self) -> dict:
        """The full training state (collective under DDP: every rank's RNG state is gathered)."""
        rng = dist.all_gather_object(_rng_state()) if self.distributed else [_rng_state()]
        extra = _extra_of(self.model)
        return {
            "epoch": len(self.history),
            "global_step": self._global_step,
            "student": self.student.state_dict(),
            "extra": extra.state_dict() if extra is not None else {},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "metric": self.task.metric,
            "best_value": self.best_value,
            "best_top1": self.best_value if self.task.metric == "top1" else None,
            "best_epoch": self.best_epoch,
            "history": _plain(self.history),
            "rng": rng,
            "world_size": self.world_size,
            "model_identity": _model_identity(self.model),
            "settings": self.settings.to_dict(),
            "config": _plain(self.settings.config) if self.settings.config is not None else None,
            "torch_version": str(torch.__version__),
        }

    def _write(self, name: str, payload: dict) -> None:
        if self.is_main:
            save_checkpoint(self.out_dir / name, payload)

    def _resume(self) -> None:
        path = self.out_dir / "latest.pt"
        if not path.exists():
            self._log(f"resume: no checkpoint at {path}; starting from scratch", logging.WARNING)
            return
        ckpt = check_resume(path, self.settings, world_size=self.world_size, model=self.model)
        assert ckpt is not None
        _apply_weights(ckpt, self.model, path)
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
        except (KeyError, ValueError, TypeError, RuntimeError) as exc:
            raise ValueError(
                f"cannot resume from {path}: its optimizer/scheduler state does not fit this run's "
                f"{self.settings.optimizer} optimizer over {len(self.params)} parameters ({type(exc).__name__}: {exc})"
            ) from exc
        if ckpt.get("scaler") is not None and self.scaler.is_enabled():
            self.scaler.load_state_dict(ckpt["scaler"])
        self.history = list(ckpt.get("history") or [])
        best = ckpt.get("best_value", ckpt.get("best_top1"))
        if ckpt.get("metric", "top1") != self.task.metric:
            self._log(
                f"resume: {path} tracked best {ckpt.get('metric')!r}, this run tracks {self.task.metric!r}: "
                "best.pt restarts",
                logging.WARNING,
            )
            best = None
        self.best_value, self.best_epoch = best, (ckpt.get("best_epoch") if best is not None else None)
        self.start_epoch = int(ckpt["epoch"])
        self._global_step = int(ckpt.get("global_step") or 0)
        if len(self.history) != self.start_epoch:
            self.history = [r for r in self.history if int(r["epoch"]) <= self.start_epoch]
        rngs = ckpt.get("rng") or []
        if rngs:
            _set_rng_state(rngs[self.rank] if self.rank < len(rngs) else rngs[0])
        for g, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr(), strict=True):
            g["lr"] = lr
        self._log(f"resumed from {path} after epoch {self.start_epoch}")

    # ------------------------------------------------------------------ metrics files

    def _write_metrics_files(self, *, rewrite: bool) -> None:
        if not self.is_main:
            return
        jsonl = self.out_dir / "metrics.jsonl"
        if rewrite:
            text = "".join(json.dumps(r) + "\n" for r in self.history)
            atomic_write_bytes(jsonl, text.encode())
        elif self.history:
            append_text(jsonl, json.dumps(self.history[-1]) + "\n")
        columns: list[str] = []
        for row in self.history:
            columns += [k for k in row if k not in columns]
        if "epoch_time_s" in columns:  # keys first seen in a later epoch (callbacks) go before the time column
            columns = [c for c in columns if c != "epoch_time_s"] + ["epoch_time_s"]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns, restval="", lineterminator="\n")
        if columns:
            writer.writeheader()
            writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in self.history)
        atomic_write_bytes(self.out_dir / "metrics.csv", buf.getvalue().encode())

    def _plot(self) -> None:
        if not self.is_main or not self.history:
            return
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        epochs = [r["epoch"] for r in self.history]
        fig = Figure(figsize=(10, 4))
        FigureCanvasAgg(fig)
        ax1, ax2 = fig.subplots(1, 2)
        ax1.plot(epochs, [r["train/loss"] for r in self.history], marker=".", label="train loss")
        ax1.set_xlabel("epoch")
        ax1.set_ylabel("loss")
        ax1.set_title("train loss")
        metric = self.task.metric
        label = getattr(self.task, "metric_label", metric)
        val = [(r["epoch"], r[f"val/{metric}"]) for r in self.history if r.get(f"val/{metric}") is not None]
        if val:
            ax2.plot(*zip(*val, strict=True), marker=".", label=f"val {metric}")
        train_acc = [(r["epoch"], r[f"train/{metric}"]) for r in self.history if r.get(f"train/{metric}") is not None]
        if train_acc:
            ax2.plot(*zip(*train_acc, strict=True), marker=".", alpha=0.6, label=f"train {metric}")
        ax2.set_xlabel("epoch")
        ax2.set_ylabel(label)
        if val or train_acc:
            ax2.legend()
        fig.tight_layout()
        _savefig(fig, self.out_dir / "curves.png")
        keys = [f"cka/{s}~{t}" for s, t in self.settings.cka_pairs]
        if keys and self.teacher_for_cka is not None:
            fig = Figure(figsize=(6, 4))
            FigureCanvasAgg(fig)
            ax = fig.subplots()
            for k in keys:
                pts = [(r["epoch"], r[k]) for r in self.history if r.get(k) is not None]
                if pts:
                    ax.plot(*zip(*pts, strict=True), marker=".", label=k[4:])
            ax.set_xlabel("epoch")
            ax.set_ylabel("linear CKA (teacher vs student)")
            ax.set_title("teacher-student CKA")
            ax.legend(fontsize="small")
            fig.tight_layout()
            _savefig(fig, self.out_dir / "cka.png")

    # ------------------------------------------------------------------ training

    def _train_epoch(self, epoch: int) -> dict:
        s = self.settings
        self._step_module.train()  # Distiller.train keeps the teachers in eval mode
        if callable(getattr(self.model, "set_epoch", None)):
            self.model.set_epoch(epoch, s.epochs)
        self._reseed_loader(self.train_loader, epoch)
        try:
            n_batches = len(self.train_loader)
        except TypeError:
            n_batches = None
        if s.max_train_batches is not None:
            n_batches = s.max_train_batches if n_batches is None else min(n_batches, s.max_train_batches)
        from tqdm.auto import tqdm

        bar = tqdm(
            total=n_batches,
            desc=f"epoch {epoch + 1}/{s.epochs}",
            leave=False,
            dynamic_ncols=True,
            disable=not (s.progress and self.is_main),
        )
        term_sums: dict[str, list[float]] = {}  # name -> [sum of loss * batch size, samples where present]
        totals = [0.0, 0.0, 0.0]  # sum of total loss * batch size, correct top-1, samples
        hard_labels = True
        norms: list[float] = []
        try:
            for step, batch in enumerate(self.train_loader):
                if s.max_train_batches is not None and step >= s.max_train_batches:
                    break
                batch = self.task.move(batch, self.device)
                with _autocast(self.device, s.amp, s.amp_dtype):
                    losses, counts = self._step_module(batch)
                if not losses:
                    raise ValueError(f"{type(self.model).__name__}.forward_train returned no losses")
                names = list(losses)
                total = sum(v.float() for v in losses.values())
                vals = torch.stack([total.detach()] + [v.detach().float().reshape(()) for v in losses.values()])
                vals_cpu = vals.cpu().double()
                self._check_finite(vals_cpu, ["total", *names], epoch, step)
                self.optimizer.zero_grad(set_to_none=True)
                self._apply_step_warmup()
                self.scaler.scale(total).backward()
                if s.grad_clip is not None:
                    self.scaler.unscale_(self.optimizer)
                    norm = torch.nn.utils.clip_grad_norm_(self.params, s.grad_clip)
                    norms.append(float(norm))
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self._global_step += 1
                bs = int(counts["n"])
                hard_labels = hard_labels and "correct" in counts
                correct = float(counts["correct"]) if "correct" in counts else 0.0
                v = vals_cpu.tolist()
                totals[0] += v[0] * bs
                totals[1] += correct
                totals[2] += bs
                for name, val in zip(names, v[1:], strict=True):
                    acc = term_sums.setdefault(name, [0.0, 0.0])
                    acc[0] += val * bs
                    acc[1] += bs
                bar.update(1)
                running = {"loss": f"{totals[0] / totals[2]:.4f}"}
                if hard_labels:
                    running["acc"] = f"{100.0 * totals[1] / totals[2]:.1f}"
                if not bar.disable and (s.log_every <= 1 or step % s.log_every == 0):
                    bar.set_postfix(running)
                elif not s.progress and s.log_every > 0 and (step + 1) % s.log_every == 0 and self.is_main:
                    text = " ".join(f"{k} {v}" for k, v in running.items())
                    logger.info("epoch %d step %d: %s", epoch + 1, step + 1, text)
        finally:
            bar.close()
        names = list(term_sums)
        if self.distributed:  # the union of the ranks' loss names, in a common order
            names = []
            for rank_names in dist.all_gather_object(list(term_sums)):
                names += [n for n in rank_names if n not in names]
        vec = torch.tensor(totals + [x for n in names for x in term_sums.get(n, [0.0, 0.0])], dtype=torch.float64)
        if self.distributed:
            vec = dist.all_reduce_sum(vec.to(_collective_device(self.device))).cpu()
        n = float(vec[2])
        if n == 0:
            raise ValueError(f"epoch {epoch + 1}: the training loader yielded no batches")
        out = {"train/loss": float(vec[0]) / n}
        for i, name in enumerate(names):
            term, count = float(vec[3 + 2 * i]), float(vec[4 + 2 * i])
            out[f"train/{name}"] = term / count if count > 0 else float("nan")
        if hard_labels:  # only when every batch reported top-1 hits (hard labels, classification)
            out["train/top1"] = 100.0 * float(vec[1]) / n
        if norms:
            out["train/grad_norm"] = float(np.mean(norms))
        return out

    def _apply_step_warmup(self) -> None:
        """``warmup_steps``: scale the scheduled lr by 0.1 -> 1 linearly over the first optimizer steps (detectors
        diverge without it); the epoch schedule's own lr is restored after the warmup."""
        w = int(self.settings.warmup_steps)
        if w <= 0 or self._global_step > w:
            return
        factor = 1.0 if self._global_step == w else 0.1 + 0.9 * self._global_step / w
        for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr(), strict=True):
            group["lr"] = lr * factor

    def _check_finite(self, vals: Tensor, names: list[str], epoch: int, step: int) -> None:
        bad_local = [n for n, v in zip(names, vals.tolist(), strict=True) if not math.isfinite(v)]
        n_bad = len(bad_local)
        if self.distributed:
            flag = torch.tensor([float(n_bad)], dtype=torch.float64, device=_collective_device(self.device))
            n_bad = int(dist.all_reduce_sum(flag).item())
        if n_bad == 0:
            return
        terms = ", ".join(f"{n}={v}" for n, v in zip(names, vals.tolist(), strict=True) if not math.isfinite(v))
        where = f" on rank {self.rank}" if self.distributed else ""
        detail = f"non-finite terms{where}: {terms}" if bad_local else f"non-finite loss on another rank ({n_bad})"
        done = len(self.history)
        kept = f"{self.out_dir / 'latest.pt'} holds the last good epoch ({done})" if done else "no epoch completed"
        raise NonFiniteLossError(
            f"non-finite loss at epoch {epoch + 1}, step {step + 1} (global step {self._global_step + 1}): {detail}; "
            f"training stopped, {kept}"
        )

    def fit(self) -> dict:
        """Run the remaining epochs; returns ``metric`` (the task's), ``best_value``, ``best_epoch``, ``final_val``
        (the last epoch's ``val/*`` values, keys without the prefix), ``final_train_loss``, ``epochs_run``,
        ``epochs_completed``, ``train_time_s`` (over all epochs, resumed ones included), ``cka`` (last values),
        ``out_dir``; classification also ``best_top1``, ``final_top1``, ``final_top5``, ``final_val_loss``."""
        s = self.settings
        check_output_paths(self.out_dir)  # on every rank: all of them stop, before any training
        if self.is_main:
            try:
                self.out_dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise OutputError(self.out_dir, exc) from exc
        if s.resume:
            self._resume()
        elif self.is_main and (self.out_dir / "latest.pt").exists():
            self._log(f"{self.out_dir / 'latest.pt'} exists and resume=False: starting over", logging.WARNING)
        self._write_metrics_files(rewrite=True)
        epochs_run = 0
        try:
            for epoch in range(self.start_epoch, s.epochs):
                self._run_epoch(epoch)
                epochs_run += 1
        except BaseException:
            if self._pending is not None:  # the last good epoch was not in latest.pt yet
                self._write("latest.pt", self._pending)
                self._pending = None
            raise
        finally:
            if self._tb is not None:
                self._tb.flush()
        if self._pending is not None:
            self._write("latest.pt", self._pending)
            self._pending = None
        self._plot()
        if self._tb is not None:
            self._tb.close()
        for cb in self.callbacks:
            hook = getattr(cb, "on_fit_end", None)
            if callable(hook):
                hook(self)
        last = self.history[-1] if self.history else {}
        result: dict[str, Any] = {
            "metric": self.task.metric,
            "best_value": self.best_value,
            "best_epoch": self.best_epoch,
            "final_val": {k[4:]: v for k, v in last.items() if k.startswith("val/")},
            "final_train_loss": last.get("train/loss"),
            "epochs_run": epochs_run,
            "epochs_completed": len(self.history),
            "train_time_s": float(sum(r.get("epoch_time_s", 0.0) for r in self.history)),
            "cka": {k: v for k, v in last.items() if k.startswith("cka/")},
            "out_dir": str(self.out_dir),
        }
        if self.task.metric == "top1":
            result.update(
                best_top1=self.best_value,
                final_top1=last.get("val/top1"),
                final_top5=last.get("val/top5"),
                final_val_loss=last.get("val/loss"),
            )
        if self._owns_group:
            dist.barrier()
            dist.cleanup()
        return result

    def _run_epoch(self, epoch: int) -> None:
        s = self.settings
        t0 = time.perf_counter()
        self.epoch = epoch
        lr = float(self.optimizer.param_groups[0]["lr"])
        train = self._train_epoch(epoch)
        if self.distributed:
            dist.broadcast_buffers(self.model)  # rank 0's BatchNorm statistics everywhere
        last_epoch = epoch + 1 == s.epochs
        val: dict | None = None
        if self.val_loader is not None and ((epoch + 1) % s.eval_every == 0 or last_epoch):
            val = self.task.evaluate(self.model, self.val_loader, self.device, amp=s.amp, amp_dtype=s.amp_dtype)
        cka = self.measure_cka()
        self.scheduler.step()
        row: dict[str, Any] = {"epoch": epoch + 1, "lr": lr, **train}
        if val is not None:
            row.update({f"val/{k}": v for k, v in val.items()})
        row.update(cka)
        extra = self._run_epoch_callbacks(epoch, row)
        row.update(extra)
        row["epoch_time_s"] = time.perf_counter() - t0
        self.history.append(row)
        score = None if val is None else val.get(self.task.metric)
        improved = score is not None and (self.best_value is None or score > self.best_value)
        if improved:
            self.best_value, self.best_epoch = float(score), epoch + 1
        save_now = (epoch + 1) % s.save_every == 0 or last_epoch
        if improved or save_now or s.save_every > 1:
            payload = self._payload()
            if improved:
                self._write("best.pt", payload)
            if save_now:
                self._write("latest.pt", payload)
                self._pending = None
            elif self.is_main:
                self._pending = _clone_cpu(payload)
        self._write_metrics_files(rewrite=False)
        if self._tb is not None:
            for k, v in row.items():
                if k != "epoch" and isinstance(v, int | float):
                    self._tb.add_scalar(k, v, epoch + 1)
        msg = f"epoch {epoch + 1}/{s.epochs}  lr {lr:.4g}  loss {train['train/loss']:.4f}"
        if score is not None:
            msg += f"  val {self.task.metric} {score:.2f}"
        msg += "".join(f"  {k} {v:.3f}" for k, v in cka.items())
        msg += "".join(f"  {k} {v:.4g}" for k, v in extra.items() if v is not None)
        msg += f"  ({row['epoch_time_s']:.1f}s)"
        self._log(msg)

    def _run_epoch_callbacks(self, epoch: int, row: dict[str, Any]) -> dict[str, float | None]:
        """Call every callback's ``on_epoch_end``; their merged, checked values (see :class:`TrainerCallback`)."""
        out: dict[str, float | None] = {}
        for cb in self.callbacks:
            hook = getattr(cb, "on_epoch_end", None)
            if not callable(hook):
                continue
            values = hook(self, epoch)
            if values is None:
                continue
            name = type(cb).__name__
            if not isinstance(values, Mapping):
                raise TypeError(
                    f"callback {name}.on_epoch_end must return a {{name: number}} mapping or None, "
                    f"got {type(values).__name__}"
                )
            for k, v in values.items():
                if not isinstance(k, str) or not k:
                    raise TypeError(f"callback {name}.on_epoch_end returned a non-string key {k!r}")
                if k in row or k in out or k == "epoch_time_s":
                    raise ValueError(
                        f"callback {name}.on_epoch_end returned {k!r}, which is already a column of this epoch's "
                        "metrics row (trainer or another callback): use a distinct name, e.g. a 'diag/' prefix"
                    )
                out[k] = _metric_value(v, f"callback {name}.on_epoch_end value {k!r}")
        return out


def _savefig(fig: Any, path: Path) -> None:
    try:
        fig.savefig(path, dpi=100)
    except OSError as exc:
        raise OutputError(path, exc) from exc


def _check_callbacks(callbacks: Sequence[Any]) -> list[Any]:
    if callbacks is None:
        return []
    if isinstance(callbacks, str | bytes) or not isinstance(callbacks, Iterable):
        raise TypeError(f"callbacks must be a sequence of callback objects, got {type(callbacks).__name__}")
    out = list(callbacks)
    for cb in out:
        if not any(callable(getattr(cb, h, None)) for h in _CALLBACK_HOOKS):
            raise TypeError(
                f"callback {cb!r} ({type(cb).__name__}) has neither on_epoch_end(trainer, epoch) nor "
                "on_fit_end(trainer)"
            )
    return out


def _metric_value(v: Any, what: str) -> float | None:
    """A callback's value as a float (0-dim tensors, numpy scalars, ints and bools accepted); None stays None."""
    if v is None:
        return None
    if isinstance(v, Tensor):
        if v.numel() != 1:
            raise TypeError(f"{what} must be a number, got a tensor of shape {tuple(v.shape)}")
        return float(v.detach().cpu().item())
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, bool | int | float):
        return float(v)
    raise TypeError(f"{what} must be a number (or None), got {type(v).__name__}")


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN/inf: :meth:`Trainer.fit` stops; ``latest.pt`` holds the last good epoch."""
