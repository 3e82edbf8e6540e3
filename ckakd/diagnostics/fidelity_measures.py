"""Fidelity (Guo et al., "Why does Knowledge Distillation Work? Rethink its Attention and Fidelity Mechanism"):
top-1 agreement and the predictive KL divergence KL(p_T ‖ p_S) of teacher–student, teacher–teacher and
ensemble–student pairs, streamed over a loader."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from itertools import combinations

import torch
import torch.nn.functional as F
from torch import Tensor

from ckakd.diagnostics._common import (
    ENSEMBLE_NAME,
    ENSEMBLE_REDUCERS,
    ModelsArg,
    check_logit_pair,
    eval_mode,
    forward_logits,
    iter_batches,
    named_models,
)

__all__ = ["agreement", "predictive_kl", "ensemble_logits", "FidelityAccumulator", "fidelity"]


def agreement(logits_a: Tensor, logits_b: Tensor) -> Tensor:
    """Top-1 agreement: the fraction of the N samples on which ``argmax`` of (N, K) ``logits_a`` and
    ``logits_b`` coincide. Returns a 0-dim float64 tensor in [0, 1]."""
    check_logit_pair(logits_a, logits_b, ("logits_a", "logits_b"))
    if logits_a.shape[0] == 0:
        raise ValueError("agreement of zero samples is undefined")
    return logits_a.argmax(1).eq(logits_b.argmax(1).to(logits_a.device)).double().mean()


def predictive_kl(logits_p: Tensor, logits_q: Tensor, *, temperature: float = 1.0, reduction: str = "mean") -> Tensor:
    """KL(p ‖ q) = Σ_k p_k (log p_k − log q_k) with p = softmax(logits_p / τ), q = softmax(logits_q / τ).

    The *first* argument is the reference distribution (use the teacher's logits as ``logits_p`` for the
    fidelity KL(p_T ‖ p_S)). Inputs (N, K); computed in float64. ``reduction``: ``"mean"`` (0-dim),
    ``"sum"`` (0-dim) or ``"none"`` ((N,) per-sample values). Always ≥ 0 (rounding below 0 is clamped).
    """
    check_logit_pair(logits_p, logits_q, ("logits_p", "logits_q"))
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
    if reducer not in ENSEMBLE_REDUCERS:
        raise ValueError(f"ensemble reducer must be one of {ENSEMBLE_REDUCERS}, got {reducer!r}")
    logits = list(logits)
    if not logits:
        raise ValueError("ensemble_logits needs at least one set of logits")
    for i, z in enumerate(logits[1:], start=1):
        check_logit_pair(logits[0], z, ("logits[0]", f"logits[{i}]"))
    z = torch.stack([t.double() for t in logits])  # (k, N, K)
    if reducer == "logit_mean":
        return z.mean(0)
    return torch.logsumexp(F.log_softmax(z, dim=2), dim=0) - math.log(len(logits))


def pair_name(a: str, b: str) -> str:
    """The metric-key name of a model pair, ``"a-b"``."""
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
            check_logit_pair(za, zb, (f"logits[{a!r}]", f"logits[{b!r}]"))
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
            out[f"agree/{pair_name(a, b)}"] = self._agree[i].item() / self.n
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


def fidelity_pairs(teachers: list[str], students: list[str], ensemble: str | None) -> list[tuple[str, str]]:
    """(reference, compared) pairs: each teacher with each student, teacher pairs, then the ensemble with each
    student when ``ensemble`` is set and there are >= 2 teachers."""
    pairs = [(t, s) for t in teachers for s in students] + list(combinations(teachers, 2))
    if ensemble is not None and len(teachers) >= 2:
        pairs += [(ENSEMBLE_NAME, s) for s in students]
    return pairs


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
    named = named_models(models, "fidelity", min_count=2)
    names = list(named)
    t_names, s_names = _roles(names, teachers, students)
    if ensemble is not None and ensemble not in ENSEMBLE_REDUCERS:
        raise ValueError(f"ensemble must be one of {ENSEMBLE_REDUCERS} or None, got {ensemble!r}")
    pairs = fidelity_pairs(t_names, s_names, ensemble)
    if not pairs:
        raise ValueError("fidelity: no pairs to compare (need at least one teacher and one student)")
    use = {n: named[n] for n in names if n in t_names or n in s_names}
    acc = FidelityAccumulator(pairs)
    correct: dict[str, float] = {}
    with eval_mode(*use.values()):
        for x, y in iter_batches(loader, max_batches, "fidelity"):
            logits = forward_logits(use, x, device)
            if any(a == ENSEMBLE_NAME for a, _ in pairs):
                logits[ENSEMBLE_NAME] = ensemble_logits([logits[t] for t in t_names], ensemble or "prob_mean")
            acc.update(logits)
            for name, z in logits.items():
                correct[name] = correct.get(name, 0.0) + z.argmax(1).eq(y.cpu()).sum().item()
    out = acc.compute()
    out.update({f"acc/{name}": c / acc.n for name, c in correct.items()})
    return out
