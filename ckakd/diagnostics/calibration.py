"""Generalization measures (Guo et al., "Why does Knowledge Distillation Work? Rethink its Attention and
Fidelity Mechanism"): top-1 accuracy, augmentation Affinity ``Acc(augmented) / Acc(clean)``, the
train–validation gap and the expected calibration error (equal-width bins)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ckakd._checks import takes_keyword
from ckakd.diagnostics._common import eval_mode, forward_logits, iter_batches

__all__ = [
    "accuracy",
    "affinity",
    "train_val_gap",
    "expected_calibration_error",
    "ECEAccumulator",
    "expected_calibration_error_over_loader",
]


def accuracy(
    model: nn.Module,
    loader: Iterable,
    *,
    device: str | torch.device | None = None,
    max_batches: int | None = None,
) -> float:
    """Top-1 accuracy (fraction in [0, 1]) of ``model`` over ``loader`` (eval mode, modes restored)."""
    correct, n = 0, 0
    with eval_mode(model):
        for x, y in iter_batches(loader, max_batches, "accuracy"):
            z = forward_logits({"model": model}, x, device)["model"]
            correct += int(z.argmax(1).eq(y.cpu()).sum())
            n += x.shape[0]
    return correct / n


def affinity(
    model: nn.Module,
    loader: Iterable,
    augment: Callable[..., Tensor],
    *,
    device: str | torch.device | None = None,
    seed: int = 0,
    max_batches: int | None = None,
) -> float:
    """Affinity = Acc(model on augmented val) / Acc(model on clean val), on the same samples.

    ``augment`` maps one image (C, H, W) to one image; it is applied per sample and, when it accepts a
    ``generator=`` keyword (like the ``ckakd.train.data`` transforms), driven by one ``torch.Generator`` seeded
    with ``seed`` for the whole pass (reproducible). The identity gives exactly 1. ``ValueError`` when the
    clean accuracy is 0 (the ratio is undefined).
    """
    if not callable(augment):
        raise ValueError(f"augment must be a callable on (C, H, W) images, got {type(augment).__name__}")
    gen = torch.Generator().manual_seed(int(seed))
    with_gen = takes_keyword(augment, "generator")
    clean = aug = n = 0
    with eval_mode(model):
        for x, y in iter_batches(loader, max_batches, "affinity"):
            xs = [augment(xi, generator=gen) if with_gen else augment(xi) for xi in x]
            try:
                xa = torch.stack(xs)
            except RuntimeError as exc:
                raise ValueError(f"affinity: augment must return same-shape (C, H, W) images ({exc})") from None
            z = forward_logits({"model": model}, x, device)["model"]
            za = forward_logits({"model": model}, xa, device)["model"]
            yc = y.cpu()
            clean += int(z.argmax(1).eq(yc).sum())
            aug += int(za.argmax(1).eq(yc).sum())
            n += x.shape[0]
    if clean == 0:
        raise ValueError(f"affinity is undefined: the clean accuracy over {n} samples is 0")
    return aug / clean


def train_val_gap(
    model: nn.Module,
    train_loader: Iterable,
    val_loader: Iterable,
    *,
    device: str | torch.device | None = None,
    max_batches: int | None = None,
) -> dict[str, float]:
    """``{"train_acc", "val_acc", "gap" = train_acc − val_acc}`` (fractions). Pass a train loader without
    augmentation for the usual generalization gap."""
    tr = accuracy(model, train_loader, device=device, max_batches=max_batches)
    va = accuracy(model, val_loader, device=device, max_batches=max_batches)
    return {"train_acc": tr, "val_acc": va, "gap": tr - va}


def check_bins(n_bins: int) -> int:
    """``n_bins`` as an int when it is one >= 1 (not a bool), else a ``ValueError``."""
    if isinstance(n_bins, bool) or int(n_bins) < 1:
        raise ValueError(f"n_bins must be an int >= 1, got {n_bins!r}")
    return int(n_bins)


def _ece_stats(logits: Tensor, labels: Tensor, n_bins: int) -> Tensor:
    """(n_bins, 3) float64: per bin [count, Σ confidence, Σ correct]. Bin b holds confidences in (b/n, (b+1)/n]."""
    if not isinstance(logits, Tensor) or logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(f"logits must be floating (N, num_classes), got {getattr(logits, 'shape', type(logits))}")
    labels = torch.as_tensor(labels).to(logits.device)
    if labels.dim() != 1 or labels.shape[0] != logits.shape[0]:
        raise ValueError(f"labels must be (N,) = ({logits.shape[0]},), got shape {tuple(labels.shape)}")
    prob = F.softmax(logits.double(), dim=1)
    conf, pred = prob.max(1)
    correct = pred.eq(labels.long()).double()
    idx = (torch.ceil(conf * n_bins) - 1).long().clamp_(0, n_bins - 1)
    stats = torch.zeros(n_bins, 3, dtype=torch.float64, device=logits.device)
    stats[:, 0].index_add_(0, idx, torch.ones_like(conf))
    stats[:, 1].index_add_(0, idx, conf)
    stats[:, 2].index_add_(0, idx, correct)
    return stats.cpu()


def _ece_from_stats(stats: Tensor) -> float:
    n = float(stats[:, 0].sum())
    if n == 0:
        raise ValueError("the expected calibration error of zero samples is undefined")
    return float((stats[:, 1] - stats[:, 2]).abs().sum() / n)  # Σ_b (n_b/N)|conf_b − acc_b|


def expected_calibration_error(logits: Tensor, labels: Tensor, n_bins: int = 10) -> float:
    """ECE = Σ_b (n_b / N) |acc_b − conf_b| over ``n_bins`` equal-width confidence bins (b/n, (b+1)/n].

    ``logits`` (N, K), ``labels`` (N,); confidence = max softmax probability, accuracy = argmax == label.
    """
    return _ece_from_stats(_ece_stats(logits, labels, check_bins(n_bins)))


class ECEAccumulator:
    """Streaming :func:`expected_calibration_error` (per-bin sums; independent of the batching)."""

    def __init__(self, n_bins: int = 10) -> None:
        self.n_bins = check_bins(n_bins)
        self._stats = torch.zeros(self.n_bins, 3, dtype=torch.float64)

    def update(self, logits: Tensor, labels: Tensor) -> None:
        self._stats += _ece_stats(logits, labels, self.n_bins)

    @property
    def n(self) -> int:
        return int(self._stats[:, 0].sum())

    def compute(self) -> float:
        return _ece_from_stats(self._stats)


def expected_calibration_error_over_loader(
    model: nn.Module,
    loader: Iterable,
    *,
    n_bins: int = 10,
    device: str | torch.device | None = None,
    max_batches: int | None = None,
) -> float:
    """:func:`expected_calibration_error` of ``model`` over the whole ``loader`` (streamed, eval mode)."""
    acc = ECEAccumulator(n_bins)
    with eval_mode(model):
        for x, y in iter_batches(loader, max_batches, "expected_calibration_error_over_loader"):
            acc.update(forward_logits({"model": model}, x, device)["model"], y)
    return acc.compute()
