"""Diagnostics for knowledge distillation (Guo et al., "Why does Knowledge Distillation Work?").

Measures of *fidelity* (how closely a student mimics its teacher(s)), *attention diversity* (how much the
models' class-activation maps overlap) and *generalization*, usable on their own — any teacher(s), any
student, any loader yielding ``(x, y)`` batches — and as a trainer callback (:class:`DiagnosticsCallback`).

- Fidelity: top-1 agreement and the predictive KL divergence **KL(p_T ‖ p_S)** at temperature 1 (teacher
  distribution first; keys ``"kl(T||S)"``), for every teacher–student and teacher–teacher pair and for the
  ensemble of the teachers against the student. Streamed over the whole loader and weighted by samples.
- Mutual information between two models' top-1 predictions: plug-in MI of the empirical joint
  (confusion matrix) in nats, its Miller–Madow bias correction and the normalized MI
  ``MI / sqrt(H(a) H(b))`` (the "geometric" normalization).
- Attention: class-summed CAM (paper-faithful: ``(Σ_c W_c)·f + Σ_c b_c`` for a linear head after global
  average pooling) or Grad-CAM (predicted class) at the last convolutional block, bilinearly upsampled to
  the input, min-max normalized per image, thresholded at 0.4; IoU pooled over the set (Σ∩ / Σ∪), with ∩
  and ∪ over all k masks for k models.
- Affinity ``Acc(augmented val) / Acc(clean val)``, the train–validation accuracy gap, expected
  calibration error (10 equal-width bins), and a student × teacher layer CKA heatmap.

Conventions: accuracies, agreements and IoUs are fractions in [0, 1]; KL and MI are in nats. Every loader
function puts the models in eval mode (no BatchNorm statistics updates, no dropout) and restores each
submodule's train/eval flag afterwards; none of them moves a model: inputs go to ``device`` (default: each
model's own parameter device). An empty loader is a ``ValueError``.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from itertools import combinations
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ckakd._checks import module_names, resolve_module
from ckakd.functional import cka as _cka

__all__ = [
    "ENSEMBLE_NAME",
    "agreement",
    "predictive_kl",
    "ensemble_logits",
    "FidelityAccumulator",
    "fidelity",
    "confusion_matrix",
    "ConfusionAccumulator",
    "mutual_information",
    "mutual_information_from_confusion",
    "prediction_mi",
    "default_cam_layer",
    "cam",
    "grad_cam",
    "attention_masks",
    "attention_iou",
    "IoUAccumulator",
    "attention_iou_over_loader",
    "affinity",
    "accuracy",
    "train_val_gap",
    "expected_calibration_error",
    "ECEAccumulator",
    "expected_calibration_error_over_loader",
    "layer_cka_heatmap",
    "plot_cka_heatmap",
    "diagnose",
    "DiagnosticsCallback",
]

ENSEMBLE_NAME = "ens"
_ENSEMBLES = ("prob_mean", "logit_mean")
_METHODS = ("cam", "gradcam")
_CORRECTIONS = ("miller_madow",)

ModelsArg = Mapping[str, nn.Module] | Sequence[nn.Module]
LayerArg = str | Mapping[str, str | None] | None


# --------------------------------------------------------------------------------------------------------------
# Shared helpers: batches, devices, modes, model naming, layer lookup
# --------------------------------------------------------------------------------------------------------------


def _split_batch(batch: Any) -> tuple[Tensor, Tensor]:
    """``(x, y, ...)`` tuples/lists or ``{"image"|"x": ..., "label"|"y": ...}`` dicts -> ``(x, y)``."""
    if isinstance(batch, dict):
        x = batch.get("image", batch.get("x"))
        y = batch.get("label", batch.get("y"))
        if x is None or y is None:
            raise ValueError(f"dict batches need 'image'/'x' and 'label'/'y' keys, got {sorted(batch)}")
        return x, y
    if isinstance(batch, list | tuple) and len(batch) >= 2:
        return batch[0], batch[1]
    raise ValueError(f"the loader must yield (x, y) batches, got {type(batch).__name__}")


def _check_max_batches(max_batches: int | None) -> None:
    if max_batches is not None and (isinstance(max_batches, bool) or int(max_batches) < 1):
        raise ValueError(f"max_batches must be None or an int >= 1, got {max_batches!r}")


def _batches(loader: Iterable, max_batches: int | None, what: str) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield ``(x (B, ...), y (B,))`` from ``loader`` (at most ``max_batches``); ``ValueError`` if none had samples."""
    _check_max_batches(max_batches)
    seen = 0
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        x, y = _split_batch(batch)
        if not isinstance(x, Tensor):
            raise ValueError(f"{what}: batch inputs must be tensors, got {type(x).__name__}")
        y = torch.as_tensor(y)
        if y.dim() != 1 or y.shape[0] != x.shape[0]:
            raise ValueError(
                f"{what}: labels must be (B,) class indices matching the inputs' batch size {x.shape[0]}, "
                f"got shape {tuple(y.shape)}"
            )
        if x.shape[0] == 0:
            continue
        seen += x.shape[0]
        yield x, y
    if seen == 0:
        raise ValueError(f"{what}: the loader yielded no samples (empty loader)")


def _model_device(model: nn.Module) -> torch.device:
    t = next(iter(model.parameters()), None)
    if t is None:
        t = next(iter(model.buffers()), None)
    return t.device if t is not None else torch.device("cpu")


def _device_for(model: nn.Module, device: str | torch.device | None) -> torch.device:
    return torch.device(device) if device is not None else _model_device(model)


@contextlib.contextmanager
def _eval_mode(*models: nn.Module) -> Iterator[None]:
    """Put ``models`` in eval mode; restore every submodule's own ``training`` flag on exit."""
    saved = [(m, m.training) for model in models for m in model.modules()]
    try:
        for model in models:
            model.eval()
        yield
    finally:
        for m, mode in saved:
            m.training = mode


def _named_models(models: ModelsArg, what: str, *, min_count: int = 1) -> dict[str, nn.Module]:
    """A Mapping is kept (names as given); a Sequence is named ``"M0", "M1", ...``."""
    if isinstance(models, nn.Module):
        raise ValueError(f"{what}: pass a mapping {{name: model}} or a sequence of models, not a single module")
    if isinstance(models, Mapping):
        named = {str(k): v for k, v in models.items()}
    elif isinstance(models, Sequence) and not isinstance(models, str):
        named = {f"M{i}": m for i, m in enumerate(models)}
    else:
        raise ValueError(f"{what}: models must be a mapping {{name: nn.Module}} or a sequence, got {type(models)}")
    for name, m in named.items():
        if not isinstance(m, nn.Module):
            raise ValueError(f"{what}: model {name!r} must be an nn.Module, got {type(m).__name__}")
        if not name or name == ENSEMBLE_NAME:
            raise ValueError(f"{what}: model name {name!r} is reserved or empty (the ensemble is {ENSEMBLE_NAME!r})")
    if len(named) < min_count:
        raise ValueError(f"{what}: needs at least {min_count} models, got {len(named)}")
    return named


def _get_layer(model: nn.Module, path: str, role: str = "model") -> nn.Module:
    """``model.get_submodule(path)`` with a ``ValueError`` naming the path and listing available modules."""
    if not isinstance(path, str) or not path:
        raise ValueError(f"layer must be a non-empty dotted module path (str), got {path!r}")
    return resolve_module(model, path, what=f"the {role}")


def _check_logits(out: Any, model: nn.Module, name: str, batch: int) -> Tensor:
    if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != batch:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(
            f"model {name!r} ({type(model).__name__}) must return logits of shape (B, num_classes) = ({batch}, K), "
            f"got {got}"
        )
    return out


def _check_same_classes(logits: Mapping[str, Tensor]) -> int:
    widths = {name: int(z.shape[-1]) for name, z in logits.items()}
    if len(set(widths.values())) > 1:
        raise ValueError(f"class-count mismatch: the models predict different numbers of classes {widths}")
    return next(iter(widths.values()))


def _check_logit_pair(a: Tensor, b: Tensor, names: tuple[str, str]) -> None:
    for n, t in zip(names, (a, b), strict=True):
        if not isinstance(t, Tensor) or t.dim() != 2 or not t.is_floating_point():
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{n} must be floating logits of shape (N, num_classes), got {got}")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"class-count mismatch: {names[0]} has {a.shape[1]} classes, {names[1]} has {b.shape[1]}")
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"{names[0]} and {names[1]} must hold the same N samples, got {a.shape[0]} and {b.shape[0]}")


# --------------------------------------------------------------------------------------------------------------
# Fidelity
# --------------------------------------------------------------------------------------------------------------


def agreement(logits_a: Tensor, logits_b: Tensor) -> Tensor:
    """Top-1 agreement: the fraction of the N samples on which ``argmax`` of (N, K) ``logits_a`` and
    ``logits_b`` coincide. Returns a 0-dim float64 tensor in [0, 1]."""
    _check_logit_pair(logits_a, logits_b, ("logits_a", "logits_b"))
    if logits_a.shape[0] == 0:
        raise ValueError("agreement of zero samples is undefined")
    return logits_a.argmax(1).eq(logits_b.argmax(1).to(logits_a.device)).double().mean()


def predictive_kl(logits_p: Tensor, logits_q: Tensor, *, temperature: float = 1.0, reduction: str = "mean") -> Tensor:
    """KL(p ‖ q) = Σ_k p_k (log p_k − log q_k) with p = softmax(logits_p / τ), q = softmax(logits_q / τ).

    The *first* argument is the reference distribution (use the teacher's logits as ``logits_p`` for the
    fidelity KL(p_T ‖ p_S)). Inputs (N, K); computed in float64. ``reduction``: ``"mean"`` (0-dim),
    ``"sum"`` (0-dim) or ``"none"`` ((N,) per-sample values). Always ≥ 0 (rounding below 0 is clamped).
    """
    _check_logit_pair(logits_p, logits_q, ("logits_p", "logits_q"))
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    log_p = F.log_softmax(logits_p.double() / temperature, dim=1)
    log_q = F.log_softmax(logits_q.double().to(log_p.device) / temperature, dim=1)
    p = log_p.exp()
    terms = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))  # 0·log 0 = 0
    kl = terms.sum(1).clamp_min(0.0)
    if reduction == "none":
        return kl
    if kl.numel() == 0:
        raise ValueError("the mean KL of zero samples is undefined")
    return kl.sum() if reduction == "sum" else kl.mean()


def ensemble_logits(logits: Sequence[Tensor], reducer: str = "prob_mean") -> Tensor:
    """Combine k teachers' (N, K) logits into one (N, K) tensor whose softmax is the ensemble prediction.

    ``"prob_mean"``: log of the mean of the softmax probabilities, ``log((1/k) Σ_t softmax(z_t))``;
    ``"logit_mean"``: the mean logits ``(1/k) Σ_t z_t``. Float64.
    """
    if reducer not in _ENSEMBLES:
        raise ValueError(f"ensemble reducer must be one of {_ENSEMBLES}, got {reducer!r}")
    logits = list(logits)
    if not logits:
        raise ValueError("ensemble_logits needs at least one set of logits")
    for i, z in enumerate(logits[1:], start=1):
        _check_logit_pair(logits[0], z, ("logits[0]", f"logits[{i}]"))
    z = torch.stack([t.double() for t in logits])  # (k, N, K)
    if reducer == "logit_mean":
        return z.mean(0)
    return torch.logsumexp(F.log_softmax(z, dim=2), dim=0) - math.log(len(logits))


def _pair_name(a: str, b: str) -> str:
    return f"{a}-{b}"


class FidelityAccumulator:
    """Streaming top-1 agreement and KL(p_a ‖ p_b) (τ = 1) for fixed ``(a, b)`` name pairs.

    :meth:`update` takes ``{name: logits (B, K)}`` for one batch; nothing but float64 sums is kept, so the
    result is independent of how the samples are batched. :meth:`compute` returns
    ``{"agree/a-b": ..., "kl(a||b)": ..., "n": N}`` (KL with ``a``, the first name, as the reference).
    """

    def __init__(self, pairs: Sequence[tuple[str, str]]) -> None:
        self.pairs = [(str(a), str(b)) for a, b in pairs]
        if not self.pairs:
            raise ValueError("FidelityAccumulator needs at least one (a, b) pair")
        self._agree = torch.zeros(len(self.pairs), dtype=torch.float64)
        self._kl = torch.zeros(len(self.pairs), dtype=torch.float64)
        self.n = 0

    def update(self, logits: Mapping[str, Tensor]) -> None:
        """Add one batch: ``logits[name]`` is (B, K) for every name used in the pairs."""
        batch = None
        for i, (a, b) in enumerate(self.pairs):
            for name in (a, b):
                if name not in logits:
                    raise ValueError(f"FidelityAccumulator.update: no logits for {name!r} (got {sorted(logits)})")
            za, zb = logits[a], logits[b]
            _check_logit_pair(za, zb, (f"logits[{a!r}]", f"logits[{b!r}]"))
            if batch is not None and za.shape[0] != batch:
                raise ValueError("FidelityAccumulator.update: all logits of one batch must have the same B")
            batch = za.shape[0]
            self._agree[i] += za.argmax(1).eq(zb.argmax(1).to(za.device)).sum().item()
            if batch:
                self._kl[i] += predictive_kl(za, zb, reduction="sum").item()
        self.n += int(batch or 0)

    def compute(self) -> dict[str, float]:
        if self.n == 0:
            raise ValueError("FidelityAccumulator: no samples were added")
        out: dict[str, float] = {}
        for i, (a, b) in enumerate(self.pairs):
            out[f"agree/{_pair_name(a, b)}"] = self._agree[i].item() / self.n
            out[f"kl({a}||{b})"] = self._kl[i].item() / self.n
        out["n"] = float(self.n)
        return out


def _roles(
    names: list[str], teachers: Sequence[str] | None, students: Sequence[str] | None
) -> tuple[list[str], list[str]]:
    teachers = list(names[:-1]) if teachers is None else [str(t) for t in teachers]
    students = [names[-1]] if students is None else [str(s) for s in students]
    for role, lst in (("teachers", teachers), ("students", students)):
        missing = [n for n in lst if n not in names]
        if missing:
            raise ValueError(f"{role} names {missing} are not among the models {names}")
    if set(teachers) & set(students):
        raise ValueError(f"a model cannot be both teacher and student: {sorted(set(teachers) & set(students))}")
    return teachers, students


def _fidelity_pairs(teachers: list[str], students: list[str], ensemble: str | None) -> list[tuple[str, str]]:
    pairs = [(t, s) for t in teachers for s in students] + list(combinations(teachers, 2))
    if ensemble is not None and len(teachers) >= 2:
        pairs += [(ENSEMBLE_NAME, s) for s in students]
    return pairs


def _forward_logits(models: Mapping[str, nn.Module], x: Tensor, device: str | torch.device | None) -> dict[str, Tensor]:
    """``{name: logits (B, K) float64 on the CPU}`` for one batch (no grad)."""
    out = {}
    with torch.no_grad():
        for name, m in models.items():
            z = _check_logits(m(x.to(_device_for(m, device))), m, name, x.shape[0])
            out[name] = z.detach().double().cpu()
    _check_same_classes(out)
    return out


def fidelity(
    models: ModelsArg,
    loader: Iterable,
    *,
    device: str | torch.device | None = None,
    ensemble: str | None = "prob_mean",
    teachers: Sequence[str] | None = None,
    students: Sequence[str] | None = None,
    max_batches: int | None = None,
) -> dict[str, float]:
    """Fidelity of every pair over the whole ``loader`` (streamed; weighted by samples).

    ``models``: ``{name: model}`` or a sequence (named ``"M0", "M1", ...``). By default the last model is the
    student and all others are teachers; ``teachers`` / ``students`` name them explicitly. Pairs: every
    (teacher, student), every (teacher_i, teacher_j) with i < j in the given order, and, with ≥ 2 teachers and
    ``ensemble`` set, (``"ens"``, student) where the ensemble is :func:`ensemble_logits` of the teachers with
    that reducer (``"prob_mean"`` or ``"logit_mean"``; ``None`` skips it).

    Returns floats: ``"agree/A-B"`` (top-1 agreement in [0, 1]), ``"kl(A||B)"`` (mean KL(p_A ‖ p_B) at τ = 1,
    nats: the first name — teacher, or the earlier teacher — is the reference distribution), ``"acc/NAME"``
    (top-1 accuracy of every model and of the ensemble against the labels) and ``"n"`` (samples).
    """
    named = _named_models(models, "fidelity", min_count=2)
    names = list(named)
    t_names, s_names = _roles(names, teachers, students)
    if ensemble is not None and ensemble not in _ENSEMBLES:
        raise ValueError(f"ensemble must be one of {_ENSEMBLES} or None, got {ensemble!r}")
    pairs = _fidelity_pairs(t_names, s_names, ensemble)
    if not pairs:
        raise ValueError("fidelity: no pairs to compare (need at least one teacher and one student)")
    use = {n: named[n] for n in names if n in t_names or n in s_names}
    acc = FidelityAccumulator(pairs)
    correct: dict[str, float] = {}
    with _eval_mode(*use.values()):
        for x, y in _batches(loader, max_batches, "fidelity"):
            logits = _forward_logits(use, x, device)
            if any(a == ENSEMBLE_NAME for a, _ in pairs):
                logits[ENSEMBLE_NAME] = ensemble_logits([logits[t] for t in t_names], ensemble or "prob_mean")
            acc.update(logits)
            for name, z in logits.items():
                correct[name] = correct.get(name, 0.0) + z.argmax(1).eq(y.cpu()).sum().item()
    out = acc.compute()
    out.update({f"acc/{name}": c / acc.n for name, c in correct.items()})
    return out


# --------------------------------------------------------------------------------------------------------------
# Mutual information of top-1 predictions
# --------------------------------------------------------------------------------------------------------------


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
    with _eval_mode(model_a, model_b):
        for x, _ in _batches(loader, max_batches, "prediction_mi"):
            z = _forward_logits(models, x, device)
            if acc is None:
                acc = ConfusionAccumulator(z["a"].shape[1])
            acc.update(z["a"], z["b"])
    assert acc is not None
    return acc.compute(correction=correction)


# --------------------------------------------------------------------------------------------------------------
# Attention maps: CAM and Grad-CAM
# --------------------------------------------------------------------------------------------------------------


def default_cam_layer(model: nn.Module) -> str:
    """Layer used when ``layer=None``: ``model.stage_names[-1]`` when the model has ``stage_names`` (zoo models:
    the last stage, whose map is pooled into ``model.classifier``), otherwise the last ``nn.Conv2d`` in
    ``model.named_modules()`` order. ``ValueError`` if there is no ``nn.Conv2d`` at all."""
    stages = getattr(model, "stage_names", None)
    if stages:
        path = str(list(stages)[-1])
        _get_layer(model, path)
        return path
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and n]
    if not convs:
        raise ValueError(
            f"{type(model).__name__} has no nn.Conv2d layer: CAM / Grad-CAM need a convolutional feature map "
            f"(B, C, H, W); pass layer= naming a module that outputs one (modules: {module_names(model)})"
        )
    return convs[-1]


def _linear_head(model: nn.Module, channels: int, layer: str) -> nn.Linear:
    head = getattr(model, "classifier", None)
    if not isinstance(head, nn.Linear):
        raise ValueError(
            f"CAM needs a linear classifier `model.classifier` (nn.Linear after global average pooling); "
            f"{type(model).__name__} has {type(head).__name__ if head is not None else 'none'}. Use grad_cam instead."
        )
    if head.in_features != channels:
        raise ValueError(
            f"CAM: {type(model).__name__}.classifier takes {head.in_features} features but layer {layer!r} has "
            f"{channels} channels; choose the layer whose map is pooled into the classifier, or use grad_cam"
        )
    return head


def _targets(target: int | Tensor | None, logits: Tensor) -> Tensor:
    b, k = logits.shape
    if target is None:
        t = logits.argmax(1)
    elif isinstance(target, int):
        t = torch.full((b,), int(target), dtype=torch.long, device=logits.device)
    else:
        t = torch.as_tensor(target, device=logits.device).long().reshape(-1)
        if t.numel() == 1:
            t = t.expand(b)
        if t.shape[0] != b:
            raise ValueError(f"target must be an int or (B,) = ({b},) class indices, got shape {tuple(t.shape)}")
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= k):
        raise ValueError(f"target class indices must lie in [0, {k}), got {t.tolist()}")
    return t


def _postprocess(maps: Tensor, size: tuple[int, int], upsample: bool, normalize: bool) -> Tensor:
    """(B, h, w) -> bilinear to ``size`` (optional) -> per-image min-max to [0, 1] (optional; constant -> 0)."""
    if upsample and tuple(maps.shape[-2:]) != tuple(size):
        maps = F.interpolate(maps.unsqueeze(1), size=size, mode="bilinear", align_corners=False).squeeze(1)
    if normalize:
        flat = maps.flatten(1)
        lo, hi = flat.min(1).values, flat.max(1).values
        span = hi - lo
        ok = span > 0
        scale = torch.where(ok, span, torch.ones_like(span))
        flat = torch.where(ok.unsqueeze(1), (flat - lo.unsqueeze(1)) / scale.unsqueeze(1), torch.zeros_like(flat))
        maps = flat.reshape(maps.shape)
    return maps


def _attention_forward(
    model: nn.Module,
    x: Tensor,
    layer: str | None,
    method: str,
    *,
    class_sum: bool = True,
    target: int | Tensor | None = None,
    upsample: bool = True,
    normalize: bool = True,
) -> tuple[Tensor, Tensor]:
    """One forward of ``model`` (mode left as is): ``(logits (B, K) detached, maps (B, H, W))``.

    The feature map is captured by a forward hook on ``layer`` (its last call, if it runs more than once) as a
    private copy, so in-place ops after the layer cannot alter it. For Grad-CAM the copy is a fresh leaf whose
    clone flows downstream, and grad mode is switched on from the layer onwards only: no graph is built for the
    layers before it and no parameter's ``.grad`` is touched.
    """
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise ValueError(f"x must be an image batch (B, C, H, W), got {tuple(x.shape) if isinstance(x, Tensor) else x}")
    path = default_cam_layer(model) if layer is None else layer
    module = _get_layer(model, path)
    store: dict[str, Tensor] = {}
    grad_mode = torch.is_grad_enabled()

    def hook(mod: nn.Module, args: Any, output: Any) -> Tensor | None:
        if not isinstance(output, Tensor) or output.dim() != 4:
            got = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
            raise ValueError(
                f"layer {path!r} of {type(model).__name__} must output a (B, C, H, W) feature map for CAM / "
                f"Grad-CAM, got {got}"
            )
        feat = output.detach().clone()
        store["f"] = feat
        if method == "cam":
            return None  # the model's own output flows on; `feat` is a private copy
        torch.set_grad_enabled(True)  # from here on only: no graph for the layers before
        feat.requires_grad_(True)
        return feat.clone()  # differentiable copy downstream; the leaf itself is never modified in place

    handle = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        handle.remove()
        torch.set_grad_enabled(grad_mode)
    if "f" not in store:
        raise ValueError(f"layer {path!r} of {type(model).__name__} did not run during the forward")
    logits = _check_logits(out, model, type(model).__name__, x.shape[0])
    f = store["f"]
    if method == "cam":
        head = _linear_head(model, f.shape[1], path)
        w, b = head.weight.detach().to(f.dtype), head.bias
        if class_sum:
            maps = torch.einsum("c,bchw->bhw", w.sum(0), f)
            if b is not None:
                maps = maps + b.detach().to(f.dtype).sum()
        else:
            t = _targets(target, logits.detach())
            maps = torch.einsum("bc,bchw->bhw", w[t], f)
            if b is not None:
                maps = maps + b.detach().to(f.dtype)[t].view(-1, 1, 1)
    else:
        if not logits.requires_grad:
            raise ValueError(f"Grad-CAM: the logits of {type(model).__name__} do not depend on layer {path!r}")
        t = _targets(target, logits.detach())
        with torch.enable_grad():  # also under an outer no_grad (the forward above re-enabled it at the layer)
            score = logits.gather(1, t.view(-1, 1)).sum()
            (grad,) = torch.autograd.grad(score, f)
        alpha = grad.mean(dim=(2, 3))  # (B, C): GAP of the gradients
        maps = F.relu(torch.einsum("bc,bchw->bhw", alpha, f.detach()))
    maps = _postprocess(maps.detach(), tuple(x.shape[-2:]), upsample, normalize)
    return logits.detach(), maps


def cam(
    model: nn.Module,
    x: Tensor,
    layer: str | None = None,
    *,
    class_sum: bool = True,
    target: int | Tensor | None = None,
    upsample: bool = True,
    normalize: bool = True,
) -> Tensor:
    """Class activation map (Zhou et al. 2016) of ``x`` (B, C_in, H, W) at ``layer`` -> (B, H, W).

    With f (B, C, h, w) the layer's map and ``model.classifier`` (an ``nn.Linear`` W (K, C), b (K,) applied
    after global average pooling of f):

    - ``class_sum=True`` (paper-faithful, Guo et al.): CAM = Σ_c (W_c · f) + Σ_c b_c = (Σ_c W_c)·f + Σ_c b_c per
      spatial position — whose spatial mean is Σ_c logit_c;
    - ``class_sum=False``: CAM of one class, W_t · f + b_t, for ``target`` (int or (B,); default: predicted).

    ``layer``: dotted module path (default :func:`default_cam_layer`: the last stage / last ``nn.Conv2d``).
    Then bilinearly upsampled to (H, W) (``upsample``) and min-max normalized to [0, 1] per image
    (``normalize``; a constant map becomes all zeros). Runs without grad in eval mode; the model's modes are
    restored. ``ValueError`` if the model has no conv layer, no linear ``classifier``, or ``layer`` is unknown.
    """
    with _eval_mode(model):
        return _attention_forward(
            model, x, layer, "cam", class_sum=class_sum, target=target, upsample=upsample, normalize=normalize
        )[1]


def grad_cam(
    model: nn.Module,
    x: Tensor,
    layer: str | None = None,
    target: int | Tensor | None = None,
    *,
    upsample: bool = True,
    normalize: bool = True,
) -> Tensor:
    """Grad-CAM (Selvaraju et al. 2017) of ``x`` (B, C_in, H, W) at ``layer`` -> (B, H, W).

    α_c = mean over positions of ∂ logit_t / ∂ f_c for the ``target`` class (int or (B,); default: the
    predicted class), map = ReLU(Σ_c α_c f_c); upsampled and min-max normalized as :func:`cam`. For a linear
    head after global average pooling of f this is ReLU(W_t · f) / (h·w): the bias-free target-class CAM
    after a ReLU, identical after the min-max normalization. Eval mode, modes restored; parameter gradients
    are not touched. Works for any differentiable head (no ``classifier`` needed).
    """
    with _eval_mode(model):
        return _attention_forward(model, x, layer, "gradcam", target=target, upsample=upsample, normalize=normalize)[1]


def attention_masks(maps: Tensor, threshold: float = 0.4) -> Tensor:
    """Binary attention masks ``maps >= threshold`` (bool, same shape) of min-max normalized maps in [0, 1]."""
    if not isinstance(maps, Tensor) or not maps.is_floating_point():
        raise ValueError("maps must be a floating tensor of normalized attention maps, e.g. from cam()/grad_cam()")
    if not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"threshold must lie in [0, 1] (maps are min-max normalized), got {threshold!r}")
    return maps >= threshold


def _check_masks(masks: Sequence[Tensor]) -> list[Tensor]:
    if len(masks) == 1 and isinstance(masks[0], list | tuple):
        masks = tuple(masks[0])
    masks = list(masks)
    if len(masks) < 2:
        raise ValueError(f"attention IoU needs at least 2 masks (one per model), got {len(masks)}")
    for i, m in enumerate(masks):
        if not isinstance(m, Tensor) or m.dtype != torch.bool:
            raise ValueError(f"mask {i} must be a bool tensor; turn maps into masks with attention_masks(maps, 0.4)")
        if m.shape != masks[0].shape:
            raise ValueError(f"all masks must have the same shape, got {tuple(masks[0].shape)} and {tuple(m.shape)}")
        if m.dim() < 2:
            raise ValueError(f"masks must be (H, W) or (B, H, W), got shape {tuple(m.shape)}")
    if masks[0].dim() == 2:
        masks = [m.unsqueeze(0) for m in masks]
    return masks


def _inter_union(masks: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Per-image |∩_k M_k| and |∪_k M_k| (B,) int64."""
    inter, union = masks[0].clone(), masks[0].clone()
    for m in masks[1:]:
        m = m.to(inter.device)
        inter &= m
        union |= m
    return inter.flatten(1).sum(1), union.flatten(1).sum(1)


def attention_iou(*masks: Tensor) -> dict[str, Any]:
    """IoU of k ≥ 2 attention masks (each (B, H, W) or (H, W) bool), ∩ and ∪ taken over all k masks.

    Returns ``{"iou": Σ_b|∩| / Σ_b|∪| (pooled over the set, float), "per_image": (B,) float64 per-image IoU,
    "intersection": Σ|∩|, "union": Σ|∪|}``. An empty union (all masks empty) counts as identical masks: IoU 1.
    """
    ms = _check_masks(masks)
    inter, union = _inter_union(ms)
    per_image = torch.where(union > 0, inter.double() / union.clamp_min(1).double(), torch.ones_like(inter.double()))
    i_sum, u_sum = int(inter.sum()), int(union.sum())
    return {
        "iou": i_sum / u_sum if u_sum > 0 else 1.0,
        "per_image": per_image,
        "intersection": i_sum,
        "union": u_sum,
    }


class IoUAccumulator:
    """Streaming attention IoU for fixed groups of model names (each group: ∩ / ∪ over all its masks).

    :meth:`compute` returns ``"iou/A-B[-C...]"`` (pooled Σ∩/Σ∪ over all images) and ``"iou_img/A-B[-C...]"``
    (mean of the per-image IoUs) per group, and ``"n"`` (images).
    """

    def __init__(self, groups: Sequence[Sequence[str]]) -> None:
        self.groups = [tuple(str(n) for n in g) for g in groups]
        if not self.groups or any(len(g) < 2 for g in self.groups):
            raise ValueError(f"IoUAccumulator needs groups of at least 2 names, got {self.groups}")
        self._sums = torch.zeros(len(self.groups), 3, dtype=torch.float64)  # Σ∩, Σ∪, Σ per-image IoU
        self.n = 0

    def update(self, masks: Mapping[str, Tensor]) -> None:
        """Add one batch of ``{name: (B, H, W) bool masks}``."""
        batch = None
        for i, g in enumerate(self.groups):
            missing = [n for n in g if n not in masks]
            if missing:
                raise ValueError(f"IoUAccumulator.update: no masks for {missing} (got {sorted(masks)})")
            r = attention_iou(*[masks[n] for n in g])
            self._sums[i, 0] += r["intersection"]
            self._sums[i, 1] += r["union"]
            self._sums[i, 2] += r["per_image"].sum().item()
            batch = r["per_image"].shape[0]
        self.n += int(batch or 0)

    def compute(self) -> dict[str, float]:
        if self.n == 0:
            raise ValueError("IoUAccumulator: no images were added")
        out: dict[str, float] = {}
        for (i_sum, u_sum, img_sum), g in zip(self._sums.tolist(), self.groups, strict=True):
            key = "-".join(g)
            out[f"iou/{key}"] = i_sum / u_sum if u_sum > 0 else 1.0
            out[f"iou_img/{key}"] = img_sum / self.n
        out["n"] = float(self.n)
        return out


def _layers_for(named: Mapping[str, nn.Module], layer: LayerArg) -> dict[str, str]:
    if layer is None or isinstance(layer, str):
        layers = {n: layer for n in named}
    elif isinstance(layer, Mapping):
        unknown = [k for k in layer if k not in named]
        if unknown:
            raise ValueError(f"layer mapping names unknown models {unknown}; models are {list(named)}")
        layers = {n: layer.get(n) for n in named}
    else:
        raise ValueError(f"layer must be None, a dotted path, or {{model name: path}}, got {type(layer).__name__}")
    out = {}
    for n, m in named.items():
        path = layers[n]
        out[n] = default_cam_layer(m) if path is None else path
        _get_layer(m, out[n], role=f"model {n!r}")
    return out


def _iou_groups(names: Sequence[str]) -> list[tuple[str, ...]]:
    groups = list(combinations(names, 2))
    if len(names) >= 3:
        groups.append(tuple(names))
    return groups


def attention_iou_over_loader(
    models: ModelsArg,
    loader: Iterable,
    *,
    method: str = "cam",
    layer: LayerArg = None,
    threshold: float = 0.4,
    device: str | torch.device | None = None,
    max_batches: int | None = None,
) -> dict[str, float]:
    """Attention IoU of k ≥ 2 models over the whole ``loader``: every pair, plus the whole set when k ≥ 3.

    Maps: :func:`cam` (class-summed) or :func:`grad_cam` (predicted class) per ``method`` (``"cam"`` |
    ``"gradcam"``) at ``layer`` (one path for all, ``{name: path}``, or ``None``: :func:`default_cam_layer`),
    masks at ``threshold``. Keys as :class:`IoUAccumulator` (``"iou/A-B"``, ``"iou_img/A-B"``, ``"iou/A-B-C"``,
    ``"n"``); sequences of models are named ``"M0", "M1", ...``.
    """
    named = _named_models(models, "attention_iou_over_loader", min_count=2)
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    attention_masks(torch.zeros(1), threshold)  # validates threshold
    layers = _layers_for(named, layer)
    acc = IoUAccumulator(_iou_groups(list(named)))
    with _eval_mode(*named.values()):
        for x, _ in _batches(loader, max_batches, "attention_iou_over_loader"):
            masks = {}
            for name, m in named.items():
                _, maps = _attention_forward(m, x.to(_device_for(m, device)), layers[name], method)
                masks[name] = attention_masks(maps, threshold).cpu()
            acc.update(masks)
    return acc.compute()


# --------------------------------------------------------------------------------------------------------------
# Affinity, accuracy, train–val gap, calibration
# --------------------------------------------------------------------------------------------------------------


def _accepts_generator(fn: Callable) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return "generator" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def accuracy(
    model: nn.Module,
    loader: Iterable,
    *,
    device: str | torch.device | None = None,
    max_batches: int | None = None,
) -> float:
    """Top-1 accuracy (fraction in [0, 1]) of ``model`` over ``loader`` (eval mode, modes restored)."""
    correct, n = 0, 0
    with _eval_mode(model):
        for x, y in _batches(loader, max_batches, "accuracy"):
            z = _forward_logits({"model": model}, x, device)["model"]
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
    with_gen = _accepts_generator(augment)
    clean = aug = n = 0
    with _eval_mode(model):
        for x, y in _batches(loader, max_batches, "affinity"):
            xs = [augment(xi, generator=gen) if with_gen else augment(xi) for xi in x]
            try:
                xa = torch.stack(xs)
            except RuntimeError as exc:
                raise ValueError(f"affinity: augment must return same-shape (C, H, W) images ({exc})") from None
            z = _forward_logits({"model": model}, x, device)["model"]
            za = _forward_logits({"model": model}, xa, device)["model"]
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


def _check_bins(n_bins: int) -> int:
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
    return _ece_from_stats(_ece_stats(logits, labels, _check_bins(n_bins)))


class ECEAccumulator:
    """Streaming :func:`expected_calibration_error` (per-bin sums; independent of the batching)."""

    def __init__(self, n_bins: int = 10) -> None:
        self.n_bins = _check_bins(n_bins)
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
    with _eval_mode(model):
        for x, y in _batches(loader, max_batches, "expected_calibration_error_over_loader"):
            acc.update(_forward_logits({"model": model}, x, device)["model"], y)
    return acc.compute()


# --------------------------------------------------------------------------------------------------------------
# Layer CKA heatmap
# --------------------------------------------------------------------------------------------------------------


def _collect_features(
    jobs: Sequence[tuple[nn.Module, list[str], str]], loader: Iterable, max_samples: int, device: Any
) -> list[dict[str, Tensor]]:
    """One pass over ``loader``: for each ``(model, paths, role)`` job, ``{path: (n, D) float64 CPU}`` features
    of the same first ``n <= max_samples`` samples (eval mode, no grad)."""
    stores: list[dict[str, list[Tensor]]] = []
    current: list[dict[str, Tensor]] = []
    handles = []

    def make_hook(cur: dict[str, Tensor], path: str, role: str):
        def hook(mod: nn.Module, args: Any, output: Any) -> None:
            if not isinstance(output, Tensor):
                raise ValueError(f"the {role}'s layer {path!r} must output a tensor, got {type(output).__name__}")
            cur[path] = output.detach()

        return hook

    try:
        for model, paths, role in jobs:
            modules = {p: _get_layer(model, p, role) for p in paths}
            stores.append({p: [] for p in paths})
            current.append({})
            handles += [m.register_forward_hook(make_hook(current[-1], p, role)) for p, m in modules.items()]
        n = 0
        with _eval_mode(*[job[0] for job in jobs]), torch.no_grad():
            for x, _ in _batches(loader, None, "layer_cka_heatmap"):
                x = x[: max_samples - n]
                for (model, paths, role), cur, store in zip(jobs, current, stores, strict=True):
                    cur.clear()
                    model(x.to(_device_for(model, device)))
                    for p in paths:
                        if p not in cur:
                            raise ValueError(f"the {role}'s layer {p!r} did not run during the forward")
                        store[p].append(cur[p].reshape(x.shape[0], -1).double().cpu())
                n += x.shape[0]
                if n >= max_samples:
                    break
    finally:
        for h in handles:
            h.remove()
    return [{p: torch.cat(v) for p, v in store.items()} for store in stores]


def layer_cka_heatmap(
    student: nn.Module,
    teacher: nn.Module,
    loader: Iterable,
    student_layers: Sequence[str],
    teacher_layers: Sequence[str],
    *,
    max_samples: int = 512,
    device: str | torch.device | None = None,
    mode: str = "centered",
) -> Tensor:
    """(S, T) float64 matrix ``M[i, j] = ckakd.cka(student layer i, teacher layer j)``.

    Features of the first ``max_samples`` samples of ``loader`` — both models see the same batches in one
    pass, in eval mode — each flattened per sample to (n, C·H·W) in float64; linear CKA with ``mode`` (see
    :func:`ckakd.cka`). ``student is teacher`` with the same layers gives a unit diagonal.
    """
    if isinstance(student_layers, str) or isinstance(teacher_layers, str):
        raise ValueError("student_layers and teacher_layers must be sequences of dotted paths, not one string")
    s_layers, t_layers = [str(p) for p in student_layers], [str(p) for p in teacher_layers]
    if not s_layers or not t_layers:
        raise ValueError("student_layers and teacher_layers must each name at least one module")
    if isinstance(max_samples, bool) or int(max_samples) < 2:
        raise ValueError(f"max_samples must be >= 2 (CKA needs at least 2 samples), got {max_samples!r}")
    max_samples = int(max_samples)
    if teacher is student:
        both = list(dict.fromkeys(s_layers + t_layers))
        (fs,) = _collect_features([(student, both, "student")], loader, max_samples, device)
        ft = fs
    else:
        fs, ft = _collect_features(
            [(student, list(dict.fromkeys(s_layers)), "student"), (teacher, list(dict.fromkeys(t_layers)), "teacher")],
            loader,
            max_samples,
            device,
        )
    n = next(iter(fs.values())).shape[0]
    if n < 2:
        raise ValueError(f"layer_cka_heatmap: CKA needs at least 2 samples, the loader gave {n}")
    out = torch.empty(len(s_layers), len(t_layers), dtype=torch.float64)
    for i, ps in enumerate(s_layers):
        for j, pt in enumerate(t_layers):
            out[i, j] = _cka(fs[ps], ft[pt], mode=mode, backend="torch")
    return out


def plot_cka_heatmap(
    matrix: Tensor,
    s_names: Sequence[str],
    t_names: Sequence[str],
    path: str | os.PathLike,
    *,
    title: str | None = "student × teacher layer CKA",
) -> Path:
    """Save the (S, T) ``matrix`` as an annotated heatmap (rows: student layers, columns: teacher layers) to
    ``path`` with matplotlib's Agg canvas (no pyplot state, no display). Returns the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    m = torch.as_tensor(matrix).detach().double().cpu()
    if m.dim() != 2:
        raise ValueError(f"matrix must be (S, T), got shape {tuple(m.shape)}")
    if m.shape != (len(s_names), len(t_names)):
        raise ValueError(
            f"matrix shape {tuple(m.shape)} does not match {len(s_names)} student and {len(t_names)} teacher names"
        )
    s, t = m.shape
    fig = Figure(figsize=(1.2 + 0.9 * t, 1.0 + 0.6 * s))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(m.numpy(), vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    ax.set_xticks(range(t), [str(n) for n in t_names], rotation=45, ha="right")
    ax.set_yticks(range(s), [str(n) for n in s_names])
    ax.set_xlabel("teacher layer")
    ax.set_ylabel("student layer")
    for i in range(s):
        for j in range(t):
            v = float(m[i, j])
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="black" if v > 0.6 else "white", fontsize=8)
    fig.colorbar(im, ax=ax)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    return out


# --------------------------------------------------------------------------------------------------------------
# Everything in one pass; the trainer callback
# --------------------------------------------------------------------------------------------------------------


def diagnose(
    teachers: Mapping[str, nn.Module] | Sequence[nn.Module],
    student: nn.Module,
    loader: Iterable,
    *,
    device: str | torch.device | None = None,
    fidelity: bool = True,
    mi: bool = True,
    iou: bool = True,
    ece: bool = True,
    method: str = "cam",
    cam_layer_student: str | None = None,
    cam_layer_teacher: LayerArg = None,
    threshold: float = 0.4,
    ensemble: str | None = "prob_mean",
    n_bins: int = 10,
    max_batches: int | None = None,
    student_name: str = "S",
) -> dict[str, float]:
    """Fidelity, MI, attention IoU and ECE of ``student`` and ``teachers`` in one pass over ``loader``.

    ``teachers``: ``{name: model}`` or a sequence (named ``"T0", "T1", ...``); the student is ``student_name``.
    All models run in eval mode (modes restored; no BatchNorm statistics change). Keys (no prefix):

    - ``fidelity``: ``"agree/T-S"``, ``"kl(T||S)"`` (KL(p_T ‖ p_S), τ = 1) for each teacher, each teacher pair
      (``"agree/T0-T1"``, ``"kl(T0||T1)"``) and, with ≥ 2 teachers, the ensemble ``"ens"``; ``"acc/NAME"``;
    - ``mi``: ``"mi/A-B"`` (plug-in, nats), ``"mi_mm/A-B"`` (Miller–Madow), ``"nmi/A-B"`` (MI / sqrt(H_A H_B))
      for the same pairs as fidelity;
    - ``iou``: ``"iou/A-B"`` for every pair of models and ``"iou/T0-T1-...-S"`` for the whole set (k ≥ 3)
      (pooled Σ∩/Σ∪ of :func:`attention_masks` at ``threshold`` of ``method`` maps at the CAM layers);
    - ``ece``: ``"ece/NAME"`` for every model.
    """
    if isinstance(teachers, Mapping):
        t_named = _named_models(teachers, "diagnose", min_count=0)
    else:
        t_named = {f"T{i}": m for i, m in enumerate(_named_models(list(teachers), "diagnose", min_count=0).values())}
    if not isinstance(student, nn.Module):
        raise ValueError(f"student must be an nn.Module, got {type(student).__name__}")
    if student_name in t_named or student_name == ENSEMBLE_NAME or not student_name:
        raise ValueError(f"student_name {student_name!r} clashes with a teacher name or the ensemble name")
    if any(t is student for t in t_named.values()):
        raise ValueError("the student cannot also be one of the teachers")
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    if ensemble is not None and ensemble not in _ENSEMBLES:
        raise ValueError(f"ensemble must be one of {_ENSEMBLES} or None, got {ensemble!r}")
    attention_masks(torch.zeros(1), threshold)
    _check_bins(n_bins)
    named = {**t_named, student_name: student}
    t_names = list(t_named)
    pairs = _fidelity_pairs(t_names, [student_name], ensemble)
    layers: dict[str, str] = {}
    iou_acc = None
    if iou and len(named) >= 2:
        layer_arg: dict[str, str | None] = {student_name: cam_layer_student}
        if isinstance(cam_layer_teacher, Mapping):
            unknown = [k for k in cam_layer_teacher if k not in t_named]
            if unknown:
                raise ValueError(f"cam_layer_teacher names unknown teachers {unknown}; teachers are {t_names}")
            layer_arg.update({n: cam_layer_teacher.get(n) for n in t_names})
        else:
            layer_arg.update({n: cam_layer_teacher for n in t_names})
        layers = _layers_for(named, layer_arg)
        iou_acc = IoUAccumulator(_iou_groups(list(named)))
    fid_acc = FidelityAccumulator(pairs) if fidelity and pairs else None
    conf: dict[tuple[str, str], ConfusionAccumulator] = {}
    eces = {n: ECEAccumulator(n_bins) for n in named} if ece else {}
    correct: dict[str, float] = {}
    n = 0
    with _eval_mode(*named.values()):
        for x, y in _batches(loader, max_batches, "diagnose"):
            logits: dict[str, Tensor] = {}
            masks: dict[str, Tensor] = {}
            for name, m in named.items():
                xi = x.to(_device_for(m, device))
                if iou_acc is not None:
                    z, maps = _attention_forward(m, xi, layers[name], method)
                    masks[name] = attention_masks(maps, threshold).cpu()
                else:
                    with torch.no_grad():
                        z = m(xi)
                logits[name] = _check_logits(z, m, name, x.shape[0]).detach().double().cpu()
            k = _check_same_classes(logits)
            if len(t_names) >= 2 and ensemble is not None:
                logits[ENSEMBLE_NAME] = ensemble_logits([logits[t] for t in t_names], ensemble)
            yc = y.cpu()
            n += x.shape[0]
            for name, z in logits.items():
                correct[name] = correct.get(name, 0.0) + z.argmax(1).eq(yc).sum().item()
            if fid_acc is not None:
                fid_acc.update(logits)
            if mi:
                for a, b in pairs:
                    conf.setdefault((a, b), ConfusionAccumulator(k)).update(logits[a], logits[b])
            if iou_acc is not None:
                iou_acc.update(masks)
            for name, acc in eces.items():
                acc.update(logits[name], yc)
    out: dict[str, float] = {}
    if fid_acc is not None:
        out.update({key: v for key, v in fid_acc.compute().items() if key != "n"})
    if fidelity:
        out.update({f"acc/{name}": c / n for name, c in correct.items()})
    for (a, b), acc in conf.items():
        r = acc.compute(correction="miller_madow")
        key = _pair_name(a, b)
        out[f"mi/{key}"], out[f"mi_mm/{key}"], out[f"nmi/{key}"] = r["mi"], r["mi_miller_madow"], r["nmi_sqrt"]
    if iou_acc is not None:
        out.update({key: v for key, v in iou_acc.compute().items() if key.startswith("iou/")})
    for name, acc in eces.items():
        out[f"ece/{name}"] = acc.compute()
    return out


class DiagnosticsCallback:
    """Trainer callback: :func:`diagnose` of the student against ``teachers`` every ``every`` epochs.

    ``on_epoch_end(trainer, epoch)`` (0-based ``epoch``; runs when ``(epoch + 1) % every == 0``, on the main
    process only) measures ``trainer.model.student`` when the model has one (a Distiller), else
    ``trainer.model``, on ``loader`` (at most ``max_batches`` batches), on ``trainer.device``, and returns
    ``{"diag/<key>": value}`` with the keys of :func:`diagnose`, e.g. ``"diag/agree/T0-S"``, ``"diag/kl(T0||S)"``,
    ``"diag/mi/T0-S"``, ``"diag/nmi/T0-S"``, ``"diag/iou/T0-T1"``, ``"diag/iou/T0-S"``, ``"diag/ece/S"``.

    ``teachers``: ``{name: model}``, a sequence (named ``"T0", ...``), or ``None`` to use the Distiller's
    ``trainer.model.teachers`` (named ``"T0", ...``). Teachers are moved to ``trainer.device`` if needed. All
    models run in eval mode and every submodule's mode is restored afterwards (the training student goes back
    to train mode); BatchNorm statistics and parameter gradients are left untouched.
    """

    def __init__(
        self,
        teachers: Mapping[str, nn.Module] | Sequence[nn.Module] | None,
        loader: Iterable,
        *,
        every: int = 1,
        iou: bool = True,
        fidelity: bool = True,
        mi: bool = True,
        ece: bool = True,
        cam_layer_student: str | None = None,
        cam_layer_teacher: LayerArg = None,
        max_batches: int | None = None,
        method: str = "cam",
        threshold: float = 0.4,
        ensemble: str | None = "prob_mean",
        n_bins: int = 10,
        prefix: str = "diag/",
    ) -> None:
        if isinstance(every, bool) or int(every) < 1:
            raise ValueError(f"every must be an int >= 1, got {every!r}")
        if not (iou or fidelity or mi or ece):
            raise ValueError("DiagnosticsCallback: every metric is disabled (iou, fidelity, mi, ece are all False)")
        if method not in _METHODS:
            raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
        if ensemble is not None and ensemble not in _ENSEMBLES:
            raise ValueError(f"ensemble must be one of {_ENSEMBLES} or None, got {ensemble!r}")
        if loader is None:
            raise ValueError("DiagnosticsCallback needs a loader of (x, y) batches")
        _check_max_batches(max_batches)
        attention_masks(torch.zeros(1), threshold)
        _check_bins(n_bins)
        self.teachers: dict[str, nn.Module] | None = None
        if teachers is not None:
            if isinstance(teachers, Mapping):
                self.teachers = _named_models(teachers, "DiagnosticsCallback", min_count=0)
            else:
                named = _named_models(list(teachers), "DiagnosticsCallback", min_count=0)
                self.teachers = {f"T{i}": m for i, m in enumerate(named.values())}
            if iou:  # fail on bad teacher layer names now, not at the end of the first epoch
                _layers_for(self.teachers, cam_layer_teacher)
        self.loader = loader
        self.every = int(every)
        self.kwargs = dict(
            fidelity=fidelity,
            mi=mi,
            iou=iou,
            ece=ece,
            method=method,
            cam_layer_student=cam_layer_student,
            cam_layer_teacher=cam_layer_teacher,
            threshold=threshold,
            ensemble=ensemble,
            n_bins=n_bins,
            max_batches=max_batches,
        )
        self.prefix = str(prefix)

    def _teachers_of(self, model: nn.Module) -> dict[str, nn.Module]:
        if self.teachers is not None:
            return self.teachers
        found = getattr(model, "teachers", None)
        return {f"T{i}": t for i, t in enumerate(found)} if found is not None else {}

    def on_epoch_end(self, trainer: Any, epoch: int) -> dict[str, float]:
        """Metrics for this epoch (``{}`` on skipped epochs and non-main processes)."""
        if (int(epoch) + 1) % self.every != 0 or not getattr(trainer, "is_main", True):
            return {}
        model = trainer.model
        student = getattr(model, "student", None)
        if not isinstance(student, nn.Module):
            student = model
        device = torch.device(getattr(trainer, "device", None) or _model_device(student))
        teachers = self._teachers_of(model)
        for t in teachers.values():
            if _model_device(t) != device:
                t.to(device)
        out = diagnose(teachers, student, self.loader, device=device, **self.kwargs)
        return {f"{self.prefix}{k}": float(v) for k, v in out.items()}
