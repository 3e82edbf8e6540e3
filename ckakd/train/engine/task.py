"""What the trainer trains on: the :class:`Task` protocol (batches, training forward, validation), the default
:class:`ClassificationTask` with :func:`evaluate` (top-1/top-5), and :class:`TrainStep` (the module DDP wraps)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .. import distributed as dist
from .device import all_reduce_max, autocast, collective_device, resolve_device

__all__ = ["ClassificationTask", "Task", "TrainStep", "evaluate", "missing_task_members", "split_batch"]


@runtime_checkable
class Task(Protocol):
    """What :class:`~ckakd.train.engine.Trainer` needs of a task (see :class:`ClassificationTask`); ``name`` and
    ``metric_label`` (plot axis, default ``metric``) are optional."""

    metric: str

    def move(self, batch: Any, device: torch.device) -> Any: ...

    def forward(self, model: nn.Module, batch: Any) -> tuple[dict[str, Tensor], dict[str, Any]]: ...

    def evaluate(
        self, model: nn.Module, loader: Iterable, device: torch.device, *, amp: bool, amp_dtype: str
    ) -> dict[str, Any]: ...

    def images(self, batch: Any) -> Tensor: ...


# Task's members in declaration order: metric, move, forward, evaluate, images
_TASK_MEMBERS = tuple(dict.fromkeys(n for n in (*Task.__annotations__, *vars(Task)) if not n.startswith("_")))


def missing_task_members(task: Any) -> list[str]:
    """The members of :class:`Task` that ``task`` lacks (``[]`` when it is one)."""
    if isinstance(task, Task):
        return []
    return [a for a in _TASK_MEMBERS if not hasattr(task, a)]


def split_batch(batch: Any) -> tuple[Any, Tensor]:
    if isinstance(batch, dict):
        return batch["image"] if "image" in batch else batch["x"], batch["label"] if "label" in batch else batch["y"]
    if isinstance(batch, list | tuple) and len(batch) >= 2:
        return batch[0], batch[1]
    raise TypeError(f"expected batches (x, y), got {type(batch).__name__}")


def to_device(x: Any, device: torch.device) -> Any:
    """Move a tensor, or every tensor of a ``{view: tensor}`` mapping (multi-view batches), to ``device``."""
    if isinstance(x, Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, Mapping):
        return {k: to_device(v, device) for k, v in x.items()}
    raise TypeError(f"expected batch inputs to be a Tensor or a {{view: Tensor}} mapping, got {type(x).__name__}")


def plain_input(x: Any, where: str) -> Tensor:
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
    device = resolve_device(device)
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64)  # loss, correct@1, correct@5, n
    num_classes = 0
    try:
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            x, y = split_batch(batch)
            x = plain_input(x, "evaluate").to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            with autocast(device, amp, amp_dtype):
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
        sums = dist.all_reduce_sum(sums.to(collective_device(device))).cpu()
        nc = all_reduce_max(nc.to(collective_device(device))).cpu()
    n = int(sums[3].item())
    if n == 0:
        raise ValueError("evaluate: the loader yielded no samples")
    out = {"top1": 100.0 * sums[1].item() / n, "loss": sums[0].item() / n, "n": n}
    if int(nc.item()) >= 5:
        out["top5"] = 100.0 * sums[2].item() / n
    return out


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
        x, y = split_batch(batch)
        return to_device(x, device), y.to(device, non_blocking=True)

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
        x, _ = split_batch(batch)
        return plain_input(x, "the CKA log (validation loader)")


class TrainStep(nn.Module):
    """``batch -> ({name: loss}, counts)`` through the task. DDP wraps this, so gradient synchronization covers
    exactly what the training forward uses."""

    def __init__(self, model: nn.Module, task: Task) -> None:
        super().__init__()
        self.model = model
        self.task = task

    def forward(self, batch: Any) -> tuple[dict[str, Tensor], dict[str, Any]]:
        return self.task.forward(self.model, batch)
