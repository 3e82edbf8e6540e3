"""Distillers (mdistiller-style) and pure-torch logit-KD losses.

Every distiller wraps a student and zero or more teachers. Teachers are frozen (``requires_grad=False``)
and stay in eval mode even after ``distiller.train()`` (so their BatchNorm statistics never move).
``forward_train(x, y)`` returns ``(student_logits, {name: weighted_loss})``; the total training loss is
the sum of the dict's values. ``forward(x)`` returns the student's logits. Trainable modules a distiller
adds (projectors) live in ``self.extra`` and are reported by :meth:`Distiller.extra_parameters` /
:meth:`Distiller.num_extra_parameters`; optimize :meth:`Distiller.learnable_parameters`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

import ckakd

from .hooks import FeatureHooks

__all__ = [
    "Distiller",
    "CEOnly",
    "KD",
    "DKD",
    "DIST",
    "RCKA",
    "WKDLogit",
    "EnsembleKD",
    "kd_loss",
    "dkd_loss",
    "dist_loss",
    "standardize_logits",
]


# --------------------------------------------------------------------------------------------------------------
# Loss functions
# --------------------------------------------------------------------------------------------------------------


def standardize_logits(z: Tensor, eps: float = 1e-7) -> Tensor:
    """Logit standardization (Sun et al. 2024): ``(z - mean) / (std + eps)`` per sample (row).

    ``std`` is the unbiased standard deviation over the classes, as in the authors' code.
    """
    mean = z.mean(dim=-1, keepdim=True)
    std = z.std(dim=-1, keepdim=True)
    return (z - mean) / (std + eps)


def kd_loss(z_s: Tensor, z_t: Tensor, T: float = 4.0, *, standardize: bool = False) -> Tensor:
    """Hinton KD: ``KL(p_t ‖ p_s) · T²`` with ``p = softmax(z / T)``, averaged over the batch (batchmean).

    ``standardize=True`` standardizes both nets' logits per sample first (logit-standardized KD).
    """
    if T <= 0:
        raise ValueError(f"temperature T must be > 0, got {T}")
    if z_s.shape != z_t.shape:
        raise ValueError(f"z_s and z_t must have the same shape, got {tuple(z_s.shape)} and {tuple(z_t.shape)}")
    if standardize:
        z_s, z_t = standardize_logits(z_s), standardize_logits(z_t)
    log_p_s = F.log_softmax(z_s / T, dim=1)
    log_p_t = F.log_softmax(z_t / T, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * T**2


def _kd_to_probs(z_s: Tensor, p_t: Tensor, T: float) -> Tensor:
    """``KL(p_t ‖ softmax(z_s/T)) · T²`` (batchmean) for given teacher probabilities."""
    log_p_s = F.log_softmax(z_s / T, dim=1)
    return F.kl_div(log_p_s, p_t, reduction="batchmean") * T**2


def dkd_loss(z_s: Tensor, z_t: Tensor, y: Tensor, alpha: float = 1.0, beta: float = 8.0, T: float = 4.0) -> Tensor:
    """Decoupled KD (Zhao et al. 2022): ``alpha · TCKD + beta · NCKD``, both ``· T²`` and batch-averaged.

    TCKD: KL between the binary (target, non-target) distributions of teacher and student.
    NCKD: KL between the distributions over the non-target classes (target class removed).
    Computed in log space (no ``log`` of a probability, no ``-1000`` masking trick).
    """
    if z_s.shape != z_t.shape:
        raise ValueError(f"z_s and z_t must have the same shape, got {tuple(z_s.shape)} and {tuple(z_t.shape)}")
    B = z_s.shape[0]
    y = y.long().view(-1, 1)
    gt = torch.zeros_like(z_s, dtype=torch.bool).scatter_(1, y, True)
    zs, zt = z_s / T, z_t / T
    log_ps, log_pt = F.log_softmax(zs, dim=1), F.log_softmax(zt, dim=1)
    neg_inf = torch.finfo(zs.dtype).min

    def binary(log_p: Tensor) -> Tensor:
        log_gt = log_p.gather(1, y)
        log_other = torch.logsumexp(log_p.masked_fill(gt, neg_inf), dim=1, keepdim=True)
        return torch.cat([log_gt, log_other], dim=1)

    bs, bt = binary(log_ps), binary(log_pt)
    tckd = (bt.exp() * (bt - bs)).sum() / B * T**2
    ls2 = F.log_softmax(zs.masked_fill(gt, neg_inf), dim=1)
    lt2 = F.log_softmax(zt.masked_fill(gt, neg_inf), dim=1)
    pt2 = lt2.exp()  # exactly 0 at the target class
    nckd = (pt2 * (lt2 - ls2)).masked_fill(gt, 0.0).sum() / B * T**2
    return alpha * tckd + beta * nckd


def _pearson_rows(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def dist_loss(z_s: Tensor, z_t: Tensor, beta: float = 1.0, gamma: float = 1.0, T: float = 1.0) -> Tensor:
    """DIST (Huang et al. 2022): ``T² · [beta · inter + gamma · intra]`` on ``p = softmax(z / T)``.

    inter = 1 − mean_b Pearson(p_s[b, :], p_t[b, :]) (per sample, across classes);
    intra = 1 − mean_c Pearson(p_s[:, c], p_t[:, c]) (per class, across the batch).
    """
    if z_s.shape != z_t.shape:
        raise ValueError(f"z_s and z_t must have the same shape, got {tuple(z_s.shape)} and {tuple(z_t.shape)}")
    p_s, p_t = F.softmax(z_s / T, dim=1), F.softmax(z_t / T, dim=1)
    inter = 1.0 - _pearson_rows(p_s, p_t).mean()
    intra = 1.0 - _pearson_rows(p_s.T, p_t.T).mean()
    return T**2 * (beta * inter + gamma * intra)


# --------------------------------------------------------------------------------------------------------------
# Distillers
# --------------------------------------------------------------------------------------------------------------


class Distiller(nn.Module):
    """Base: a trainable student, frozen eval-mode teacher(s), optional trainable extra modules.

    ``teacher`` may be one module, a sequence of modules, or ``None`` (no teacher). Subclasses implement
    :meth:`losses`, returning the named, weighted distillation losses; the base adds ``"ce"``
    (``ce_weight · CE``) when ``ce_weight`` is non-zero.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | Sequence[nn.Module] | None = None,
        *,
        ce_weight: float = 1.0,
    ) -> None:
        super().__init__()
        self.student = student
        if teacher is None:
            teachers: list[nn.Module] = []
        elif isinstance(teacher, nn.Module):
            teachers = [teacher]
        else:
            teachers = list(teacher)
        for t in teachers:
            if not isinstance(t, nn.Module):
                raise TypeError(f"teachers must be nn.Module instances, got {type(t).__name__}")
            if t is student:
                raise ValueError("the student cannot also be a teacher")
            t.requires_grad_(False)
            t.eval()
        self.teachers = nn.ModuleList(teachers)
        self.ce_weight = float(ce_weight)
        self.extra = nn.ModuleDict()  # trainable modules added by the distiller (projectors)

    @property
    def teacher(self) -> nn.Module:
        if len(self.teachers) == 0:
            raise AttributeError(f"{type(self).__name__} has no teacher")
        return self.teachers[0]

    def train(self, mode: bool = True) -> Distiller:
        super().train(mode)
        for t in self.teachers:
            t.eval()
        return self

    def extra_parameters(self) -> list[nn.Module]:
        """Trainable modules added by the distiller (projectors etc.); empty when none."""
        return list(self.extra.values())

    def num_extra_parameters(self) -> int:
        return sum(p.numel() for m in self.extra_parameters() for p in m.parameters())

    def learnable_parameters(self) -> Iterator[nn.Parameter]:
        """Student parameters followed by the extra modules' parameters (what the optimizer should get)."""
        yield from self.student.parameters()
        for m in self.extra_parameters():
            yield from m.parameters()

    def forward(self, x: Tensor) -> Tensor:
        return self.student(x)

    @torch.no_grad()
    def teacher_logits(self, x: Tensor) -> list[Tensor]:
        return [t(x) for t in self.teachers]

    def losses(self, x: Tensor, y: Tensor, logits_s: Tensor) -> dict[str, Tensor]:
        return {}

    def student_logits(self, x: Tensor) -> Tensor:
        return self.student(x)

    def forward_train(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        logits_s = self.student_logits(x)
        out: dict[str, Tensor] = {}
        if self.ce_weight != 0.0:
            out["ce"] = self.ce_weight * F.cross_entropy(logits_s, y)
        out.update(self.losses(x, y, logits_s))
        return logits_s, out


class CEOnly(Distiller):
    """Plain cross-entropy training of the student (a teacher, if given, is ignored)."""

    def __init__(self, student: nn.Module, teacher: nn.Module | None = None, *, ce_weight: float = 1.0) -> None:
        super().__init__(student, teacher, ce_weight=ce_weight)


class KD(Distiller):
    """Hinton KD; mdistiller defaults CE 0.1, KD 0.9, T 4. ``standardize=True``: logit-standardized KD
    (the paper uses T=2, KD weight 9 with it)."""

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        *,
        T: float = 4.0,
        ce_weight: float = 0.1,
        kd_weight: float = 0.9,
        standardize: bool = False,
    ) -> None:
        super().__init__(student, teacher, ce_weight=ce_weight)
        self.T, self.kd_weight, self.standardize = float(T), float(kd_weight), bool(standardize)

    def losses(self, x: Tensor, y: Tensor, logits_s: Tensor) -> dict[str, Tensor]:
        (z_t,) = self.teacher_logits(x)
        return {"kd": self.kd_weight * kd_loss(logits_s, z_t, self.T, standardize=self.standardize)}


class DKD(Distiller):
    """Decoupled KD; mdistiller CIFAR defaults CE 1, alpha 1, beta 8, T 4 and a linear warmup of the DKD
    weight over ``warmup`` epochs (pass ``epoch`` to :meth:`forward_train`; 0 disables the warmup)."""

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        *,
        alpha: float = 1.0,
        beta: float = 8.0,
        T: float = 4.0,
        ce_weight: float = 1.0,
        warmup: int = 0,
    ) -> None:
        super().__init__(student, teacher, ce_weight=ce_weight)
        self.alpha, self.beta, self.T, self.warmup = float(alpha), float(beta), float(T), int(warmup)
        self._epoch: int | None = None

    def forward_train(self, x: Tensor, y: Tensor, epoch: int | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        self._epoch = epoch
        return super().forward_train(x, y)

    def losses(self, x: Tensor, y: Tensor, logits_s: Tensor) -> dict[str, Tensor]:
        (z_t,) = self.teacher_logits(x)
        scale = 1.0
        if self.warmup > 0 and self._epoch is not None:
            scale = min(self._epoch / self.warmup, 1.0)
        return {"dkd": scale * dkd_loss(logits_s, z_t, y, self.alpha, self.beta, self.T)}


class DIST(Distiller):
    """DIST: Pearson-correlation relations between predictions (``dist_loss``)."""

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        *,
        beta: float = 1.0,
        gamma: float = 1.0,
        T: float = 1.0,
        ce_weight: float = 1.0,
    ) -> None:
        super().__init__(student, teacher, ce_weight=ce_weight)
        self.beta, self.gamma, self.T = float(beta), float(gamma), float(T)

    def losses(self, x: Tensor, y: Tensor, logits_s: Tensor) -> dict[str, Tensor]:
        (z_t,) = self.teacher_logits(x)
        return {"dist": dist_loss(logits_s, z_t, self.beta, self.gamma, self.T)}


class RCKA(Distiller):
    """RCKA: ``alpha · Σ (1 − CKA(F_s, F_t)) + beta · (intra + inter logit 1 − CKA)`` via ``ckakd.rcka_loss``.

    Features are captured with :class:`FeatureHooks` on the given dotted module paths of each net (paired
    in order). Returned losses: ``"fcka"`` (alpha-weighted) and ``"lcka"`` (beta-weighted).
    Call :meth:`remove_hooks` when done with the distiller.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        feature_paths_s: Sequence[str],
        feature_paths_t: Sequence[str],
        *,
        alpha: float = 5.0,
        beta: float = 5.0,
        mode: str = "centered",
        ce_weight: float = 1.0,
    ) -> None:
        super().__init__(student, teacher, ce_weight=ce_weight)
        paths_s = [feature_paths_s] if isinstance(feature_paths_s, str) else list(feature_paths_s)
        paths_t = [feature_paths_t] if isinstance(feature_paths_t, str) else list(feature_paths_t)
        if len(paths_s) != len(paths_t) or not paths_s:
            raise ValueError(
                f"need the same non-zero number of student and teacher feature paths, got {len(paths_s)} and "
                f"{len(paths_t)}"
            )
        self.alpha, self.beta, self.mode = float(alpha), float(beta), mode
        self._hooks_s = FeatureHooks(student, paths_s)
        self._hooks_t = FeatureHooks(teacher, paths_t, detach=True)

    def remove_hooks(self) -> None:
        self._hooks_s.remove()
        self._hooks_t.remove()

    def losses(self, x: Tensor, y: Tensor, logits_s: Tensor) -> dict[str, Tensor]:
        feats_s = [self._hooks_s[p] for p in self._hooks_s.paths]
        (z_t,) = self.teacher_logits(x)
        feats_t = [self._hooks_t[p] for p in self._hooks_t.paths]
        parts = ckakd.rcka_loss(
            feats_s, feats_t, logits_s, z_t, alpha=self.alpha, beta=self.beta, mode=self.mode, return_parts=True
        )
        return {"fcka": self.alpha * parts["fcka"], "lcka": self.beta * (parts["intra_lcka"] + parts["inter_lcka"])}


class WKDLogit(Distiller):
    """WKD-L via ``ckakd.wkd_logit_loss`` over a fixed (C, C) class cost (stored as a buffer).

    ``use_target=True``: target separation (the labels are passed to the loss). Defaults follow the
    public ImageNet setting (T=2, gamma=30); CIFAR-100 uses T=8, gamma=600.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        cost: Tensor,
        *,
        T: float = 2.0,
        gamma: float = 30.0,
        use_target: bool = True,
        eps: float = 0.05,
        iters: int = 10,
        ce_weight: float = 1.0,
    ) -> None:
        super().__init__(student, teacher, ce_weight=ce_weight)
        self.register_buffer("cost", torch.as_tensor(cost).detach().clone())
        self.T, self.gamma, self.use_target = float(T), float(gamma), bool(use_target)
        self.eps, self.iters = float(eps), int(iters)

    def losses(self, x: Tensor, y: Tensor, logits_s: Tensor) -> dict[str, Tensor]:
        (z_t,) = self.teacher_logits(x)
        cost = self.cost.to(device=logits_s.device)
        loss = ckakd.wkd_logit_loss(
            logits_s,
            z_t,
            cost,
            temperature=self.T,
            eps=self.eps,
            iters=self.iters,
            target=y if self.use_target else None,
            gamma=self.gamma,
        )
        return {"wkd_l": loss}


class EnsembleKD(Distiller):
    """KD from several teachers.

    ``reduce="mean_loss"``: mean over teachers of ``kd_loss(z_s, z_t_i)`` (the paper's code);
    ``reduce="mean_target"``: KD to the average of the teachers' ``softmax(z_t_i / T)``.
    ``standardize=True`` standardizes every net's logits first. With one teacher both equal :class:`KD`.
    """

    def __init__(
        self,
        student: nn.Module,
        teachers: nn.Module | Sequence[nn.Module],
        *,
        T: float = 4.0,
        reduce: str = "mean_loss",
        standardize: bool = False,
        ce_weight: float = 0.1,
        kd_weight: float = 0.9,
    ) -> None:
        super().__init__(student, teachers, ce_weight=ce_weight)
        if len(self.teachers) == 0:
            raise ValueError("EnsembleKD needs at least one teacher")
        if reduce not in ("mean_loss", "mean_target"):
            raise ValueError(f"reduce must be 'mean_loss' or 'mean_target', got {reduce!r}")
        self.T, self.reduce, self.standardize, self.kd_weight = float(T), reduce, bool(standardize), float(kd_weight)

    def losses(self, x: Tensor, y: Tensor, logits_s: Tensor) -> dict[str, Tensor]:
        zts = self.teacher_logits(x)
        if self.reduce == "mean_loss":
            loss = torch.stack([kd_loss(logits_s, z_t, self.T, standardize=self.standardize) for z_t in zts]).mean()
        else:
            z_s = standardize_logits(logits_s) if self.standardize else logits_s
            p_t = torch.stack(
                [F.softmax((standardize_logits(z) if self.standardize else z) / self.T, dim=1) for z in zts]
            ).mean(0)
            loss = _kd_to_probs(z_s, p_t, self.T)
        return {"kd": self.kd_weight * loss}
