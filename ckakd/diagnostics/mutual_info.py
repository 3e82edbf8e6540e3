"""Mutual information between two models' top-1 predictions (Guo et al., "Why does Knowledge Distillation
Work? Rethink its Attention and Fidelity Mechanism"): plug-in MI of the confusion matrix in nats, its
Miller–Madow correction and the normalized MI ``MI / sqrt(H(a) H(b))``."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn as nn
from torch import Tensor

from ckakd.diagnostics._common import eval_mode, forward_logits, iter_batches

__all__ = [
    "confusion_matrix",
    "ConfusionAccumulator",
    "mutual_information",
    "mutual_information_from_confusion",
    "prediction_mi",
]

_CORRECTIONS = ("miller_madow",)


def _as_predictions(pred: Tensor, name: str) -> Tensor:
    """(N,) integer class indices, or (N, K) scores -> their argmax."""
    pred = torch.as_tensor(pred)
    if pred.dim() == 2 and pred.is_floating_point():
        return pred.argmax(1)
    if pred.dim() != 1 or pred.is_floating_point() or pred.dtype == torch.bool:
        raise ValueError(
            f"{name} must be (N,) integer class indices or (N, K) logits, got {pred.dtype} {tuple(pred.shape)}"
        )
    if pred.numel() and int(pred.min()) < 0:
        raise ValueError(f"{name} holds negative class indices (min {int(pred.min())})")
    return pred.long()


def confusion_matrix(pred_a: Tensor, pred_b: Tensor, num_classes: int | None = None) -> Tensor:
    """Joint counts ``C[i, j] = #{n : pred_a[n] = i, pred_b[n] = j}`` as a (K, K) int64 tensor.

    ``pred_a``, ``pred_b``: (N,) class indices or (N, K) logits (argmax taken). ``num_classes`` defaults to
    ``max index + 1`` over both.
    """
    a, b = _as_predictions(pred_a, "pred_a"), _as_predictions(pred_b, "pred_b")
    b = b.to(a.device)
    if a.shape != b.shape:
        raise ValueError(f"pred_a and pred_b must hold the same N samples, got {tuple(a.shape)} and {tuple(b.shape)}")
    top = int(max(a.max().item() if a.numel() else -1, b.max().item() if b.numel() else -1)) + 1
    k = max(top, 1) if num_classes is None else int(num_classes)
    if k < 1 or top > k:
        raise ValueError(f"num_classes={num_classes} is too small for class indices up to {top - 1}")
    return torch.bincount((a * k + b).cpu(), minlength=k * k).reshape(k, k)


def _entropy(counts: Tensor, n: float) -> float:
    p = counts[counts > 0].double() / n
    return float(-(p * p.log()).sum())


def mutual_information_from_confusion(
    confusion: Tensor, *, correction: str | None = "miller_madow"
) -> dict[str, float]:
    """MI of the empirical joint distribution given by a (K_a, K_b) count matrix (see :func:`mutual_information`)."""
    if correction is not None and correction not in _CORRECTIONS:
        raise ValueError(f"correction must be one of {_CORRECTIONS} or None, got {correction!r}")
    c = torch.as_tensor(confusion)
    if c.dim() != 2:
        raise ValueError(f"confusion must be a (K_a, K_b) count matrix, got shape {tuple(c.shape)}")
    if (c.is_floating_point() and not torch.equal(c, c.round())) or bool((c < 0).any()):
        raise ValueError("confusion must hold non-negative integer counts")
    c = c.double()
    n = float(c.sum())
    if n == 0:
        raise ValueError("mutual information of zero samples is undefined")
    row, col = c.sum(1), c.sum(0)
    h_a, h_b, h_ab = _entropy(row, n), _entropy(col, n), _entropy(c.flatten(), n)
    mi = max(h_a + h_b - h_ab, 0.0)  # ≥ 0 exactly; clamp rounding
    if h_a > 0 and h_b > 0:
        nmi = min(mi / math.sqrt(h_a * h_b), 1.0)
    else:  # a constant side: identical (both constant) -> 1, otherwise no shared information -> 0
        nmi = 1.0 if h_a == 0 and h_b == 0 else 0.0
    out = {"mi": mi, "nmi_sqrt": nmi, "h_a": h_a, "h_b": h_b, "h_ab": h_ab, "n": n}
    if correction == "miller_madow":
        k_a, k_b, k_ab = int((row > 0).sum()), int((col > 0).sum()), int((c > 0).sum())
        out["mi_miller_madow"] = mi + (k_a + k_b - k_ab - 1) / (2.0 * n)
    return out


def mutual_information(
    pred_a: Tensor, pred_b: Tensor, num_classes: int | None = None, *, correction: str | None = "miller_madow"
) -> dict[str, float]:
    """Mutual information (nats) between two models' top-1 predictions, from their confusion matrix.

    ``pred_a``, ``pred_b``: (N,) class indices or (N, K) logits. With p̂ the empirical joint (counts / N):

    - ``"mi"``: plug-in MI = H(a) + H(b) − H(a, b) (equal to ``sklearn.metrics.mutual_info_score``);
    - ``"mi_miller_madow"`` (``correction="miller_madow"``): each entropy gets the Miller–Madow term
      (m − 1)/(2N) with m its number of non-empty cells, so MI_MM = MI + (K_a + K_b − K_ab − 1)/(2N) where K_a,
      K_b, K_ab count the non-empty rows, columns and cells. Not clamped: it may be slightly negative;
    - ``"nmi_sqrt"``: MI / sqrt(H(a) H(b)) in [0, 1] (1 if both sides are constant, 0 if only one is);
    - ``"h_a"``, ``"h_b"``, ``"h_ab"``: plug-in entropies; ``"n"``: N.

    Invariant to relabeling the classes of either side. (Not sklearn's ``mutual_info_classif``: a kNN
    estimator that treats class indices as numbers.)
    """
    return mutual_information_from_confusion(confusion_matrix(pred_a, pred_b, num_classes), correction=correction)


class ConfusionAccumulator:
    """Streaming (K, K) confusion matrix of two predictors; :meth:`compute` gives :func:`mutual_information`."""

    def __init__(self, num_classes: int) -> None:
        if int(num_classes) < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.matrix = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)

    def update(self, pred_a: Tensor, pred_b: Tensor) -> None:
        """Add (B,) class indices or (B, K) logits of the two predictors."""
        self.matrix += confusion_matrix(pred_a, pred_b, self.num_classes)

    @property
    def n(self) -> int:
        return int(self.matrix.sum())

    def compute(self, *, correction: str | None = "miller_madow") -> dict[str, float]:
        return mutual_information_from_confusion(self.matrix, correction=correction)


def prediction_mi(
    model_a: nn.Module,
    model_b: nn.Module,
    loader: Iterable,
    *,
    device: str | torch.device | None = None,
    correction: str | None = "miller_madow",
    max_batches: int | None = None,
) -> dict[str, float]:
    """:func:`mutual_information` of the two models' top-1 predictions over the whole ``loader`` (streamed
    through a :class:`ConfusionAccumulator`; same keys)."""
    for n, m in (("model_a", model_a), ("model_b", model_b)):
        if not isinstance(m, nn.Module):
            raise ValueError(f"{n} must be an nn.Module, got {type(m).__name__}")
    models = {"a": model_a, "b": model_b}
    acc: ConfusionAccumulator | None = None
    with eval_mode(model_a, model_b):
        for x, _ in iter_batches(loader, max_batches, "prediction_mi"):
            z = forward_logits(models, x, device)
            if acc is None:
                acc = ConfusionAccumulator(z["a"].shape[1])
            acc.update(z["a"], z["b"])
    assert acc is not None
    return acc.compute(correction=correction)
