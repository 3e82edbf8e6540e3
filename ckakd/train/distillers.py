"""Distillers (mdistiller-style) and pure-torch logit-KD losses.

Every distiller wraps a student and zero or more teachers. Teachers are frozen (``requires_grad=False``)
and stay in eval mode even after ``distiller.train()`` (so their BatchNorm statistics never move).
``forward_train(x, y)`` returns ``(student_logits, {name: weighted_loss})``; the total training loss is
the sum of the dict's values. ``forward(x)`` returns the student's logits. Trainable modules a distiller
adds (projectors) live in ``self.extra`` and are reported by :meth:`Distiller.extra_parameters` /
:meth:`Distiller.num_extra_parameters`; optimize :meth:`Distiller.learnable_parameters`.

Every distiller accepts ``input_shape=(C, H, W)``: one dry forward of a zero batch checks that student and
teacher(s) predict the same number of classes and gives the feature shapes projectors are built from.
The training loop calls :meth:`Distiller.set_epoch` at the start of every epoch (weight schedules, DKD
warmup). Feature-based distillers capture features with :class:`FeatureHooks` on dotted module paths; by
default the last of the model's ``stage_names`` (all of them for :class:`AT`).
:func:`build_distiller` builds any of :data:`DISTILLERS` by name.
"""

from __future__ import annotations

import inspect
import itertools
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

import ckakd
from ckakd._checks import module_names, resolve_module
from ckakd.functional import MIN_PATCHES, PATCH_RESIZE, fit_patch_size, patch_grid, rcka_logit_options

from .distributed import gather_batch
from .hooks import FeatureHooks

__all__ = [
    "Distiller",
    "CEOnly",
    "KD",
    "LSKD",
    "DKD",
    "DIST",
    "FitNet",
    "AT",
    "FCKA",
    "LCKA",
    "RCKA",
    "PatchCKA",
    "MMD",
    "WKDLogit",
    "WKDFeature",
    "WKDLogitFeature",
    "EnsembleKD",
    "DISTILLERS",
    "build_distiller",
    "kd_loss",
    "dkd_loss",
    "dist_loss",
    "at_loss",
    "standardize_logits",
    "cosine_decay_weight",
]

_CKA_MODES = ("centered", "debiased", "uncentered")
# Fewest samples (patches) that make a CKA informative: centered CKA of 2 samples is identically 1, so is
# uncentered CKA of 1; debiased needs 4.


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


def _match_spatial(f_s: Tensor, f_t: Tensor) -> tuple[Tensor, Tensor]:
    """Adaptive-average-pool the larger of two (B, C, H, W) maps down to (min H, min W) of the pair."""
    h, w = min(f_s.shape[-2], f_t.shape[-2]), min(f_s.shape[-1], f_t.shape[-1])
    if tuple(f_s.shape[-2:]) != (h, w):
        f_s = F.adaptive_avg_pool2d(f_s, (h, w))
    if tuple(f_t.shape[-2:]) != (h, w):
        f_t = F.adaptive_avg_pool2d(f_t, (h, w))
    return f_s, f_t


def _attention(f: Tensor, p: float) -> Tensor:
    return F.normalize(f.pow(p).mean(1).reshape(f.shape[0], -1))


def at_loss(f_s: Tensor, f_t: Tensor, p: float = 2.0) -> Tensor:
    """Attention transfer (Zagoruyko & Komodakis 2017), mdistiller's form, for one feature pair.

    f_s: (B, Cs, Hs, Ws), f_t: (B, Ct, Ht, Wt); the larger map is adaptive-average-pooled to the smaller
    size. ``at(f) = normalize(f.pow(p).mean(1).view(B, -1))``; loss = ``(at(f_s) - at(f_t)).pow(2).mean()``.
    """
    for name, f in (("f_s", f_s), ("f_t", f_t)):
        if not isinstance(f, Tensor) or f.dim() != 4:
            raise ValueError(f"{name} must be a (B, C, H, W) feature map, got {getattr(f, 'shape', type(f))}")
    if f_s.shape[0] != f_t.shape[0]:
        raise ValueError(f"f_s and f_t must have the same batch size, got {tuple(f_s.shape)} and {tuple(f_t.shape)}")
    if not p > 0:
        raise ValueError(f"p must be > 0, got {p}")
    f_s, f_t = _match_spatial(f_s, f_t)
    return (_attention(f_s, p) - _attention(f_t, p)).pow(2).mean()


def cosine_decay_weight(weight: float, epoch: int, total_epochs: int, decay_start: int) -> float:
    """A loss weight held constant, then cosine-decayed to 0 at the last epoch (the WKD public code).

    ``epoch`` is 0-based. For ``epoch < decay_start`` the weight is returned unchanged; afterwards it is
    ``0.5 · weight · (1 + cos(π · (epoch + 1 − decay_start) / (total_epochs − decay_start)))``, i.e. the
    public code's formula with its 1-based epoch ``epoch + 1``: exactly 0 at ``epoch = total_epochs − 1``.
    CIFAR-100 WKD-L uses ``decay_start=150`` of 240 epochs.
    """
    if not 0 <= epoch < total_epochs:
        raise ValueError(f"epoch must be in [0, total_epochs={total_epochs}), got {epoch}")
    if decay_start < 0:
        raise ValueError(f"decay_start must be >= 0, got {decay_start}")
    if epoch < decay_start:
        return float(weight)
    progress = (epoch + 1 - decay_start) / (total_epochs - decay_start)
    return 0.5 * float(weight) * (1.0 + math.cos(math.pi * progress))


# --------------------------------------------------------------------------------------------------------------
# Helpers: feature paths, projectors
# --------------------------------------------------------------------------------------------------------------


def _check_path(model: nn.Module, path: object, role: str, argname: str) -> None:
    if not isinstance(path, str) or not path:
        raise ValueError(f"{argname} must hold non-empty dotted module paths (str), got {path!r}")
    resolve_module(model, path, what=f"{argname}: the {role}")


def _feature_paths(
    model: nn.Module, value: object, role: str, argname: str, *, all_stages: bool = False, single: bool = False
) -> list[str]:
    """Resolve a feature-path argument: explicit path(s), or the model's ``stage_names`` default."""
    if value is None:
        stages = getattr(model, "stage_names", None)
        if not stages:
            raise ValueError(
                f"{argname} is required: the {role} ({type(model).__name__}) has no `stage_names` to take a default "
                f"from; pass explicit dotted module paths (e.g. from {module_names(model, 8)})"
            )
        paths = list(stages) if all_stages else [stages[-1]]
    elif isinstance(value, str):
        paths = [value]
    elif single:
        raise ValueError(f"{argname} must be one dotted module path (str) or None, got {value!r}")
    else:
        try:
            paths = list(value)  # type: ignore[call-overload]
        except TypeError:
            raise ValueError(f"{argname} must be a dotted module path or a sequence of them, got {value!r}") from None
        if not paths:
            raise ValueError(f"{argname} must name at least one module, got an empty sequence")
    for path in paths:
        _check_path(model, path, role, argname)
    return paths


def _conv1x1(c_in: int, c_out: int, *, bn: bool, relu: bool) -> nn.Sequential:
    """1×1 conv projector (B, c_in, H, W) -> (B, c_out, H, W), optionally + BatchNorm + ReLU."""
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, kernel_size=1, bias=not bn)]
    if bn:
        layers.append(nn.BatchNorm2d(c_out))
    if relu:
        layers.append(nn.ReLU(inplace=False))
    return nn.Sequential(*layers)


def _rcka_logit_options(mode: str, with_l2_norm: bool, soften: bool, temperature: float | None) -> dict[str, Any]:
    """The RCKA authors' logit-term options (``ckakd.rcka_loss``: with_l2_norm, soften, temperature), validated."""
    l2, soft, t = rcka_logit_options(mode, with_l2_norm, soften, temperature)
    return {"with_l2_norm": l2, "soften": soft, "temperature": t}


def _check_mode(mode: str) -> str:
    if mode not in _CKA_MODES:
        raise ValueError(f"mode must be one of {', '.join(map(repr, _CKA_MODES))}; got {mode!r}")
    return mode


def _check_feature_map(f: Tensor, role: str, path: str) -> None:
    if f.dim() != 4:
        raise ValueError(f"the {role}'s feature at {path!r} must be a (B, C, H, W) map, got shape {tuple(f.shape)}")


def _module_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter or buffer (CPU for a model with neither)."""
    t = next(itertools.chain(model.parameters(), model.buffers()), None)
    return t.device if t is not None else torch.device("cpu")


def _teacher_list(teacher: nn.Module | Sequence[nn.Module] | None) -> list[nn.Module]:
    if teacher is None:
        return []
    if isinstance(teacher, nn.ModuleList):
        return list(teacher)
    if isinstance(teacher, nn.Module):
        return [teacher]
    return list(teacher)


# --------------------------------------------------------------------------------------------------------------
# Distillers
# --------------------------------------------------------------------------------------------------------------


class Distiller(nn.Module):
    """Base: a trainable student, frozen eval-mode teacher(s), optional trainable extra modules.

    ``teacher`` may be one module, a sequence of modules, or ``None`` (no teacher). Subclasses implement
    :meth:`losses`, returning the named, weighted distillation losses; the base adds ``"ce"``
    (``ce_weight · CE``) when ``ce_weight`` is non-zero.

    ``input_shape=(C, H, W)``: one dry forward of a (2, C, H, W) zero batch (no grad; the student in eval
    mode, its modes restored after) checks that every teacher predicts as many classes as the student
    (``ValueError`` otherwise), sets :attr:`num_classes`, and records every submodule's output shape for
    building projectors. :attr:`epoch` / :attr:`total_epochs` are set by :meth:`set_epoch`.

    Multi-view batches (``x`` a ``{view: Tensor}`` mapping, see :class:`~ckakd.train.data.MultiView`) are
    taken only by distillers with ``accepts_views = True`` (:class:`EnsembleKD`); the others raise a
    ``TypeError`` naming the views.
    """

    accepts_views: bool = False
    # True when a loss weight follows a schedule over ``total_epochs`` (the trainer then refuses to change the
    # number of epochs on resume)
    uses_total_epochs: bool = False

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | Sequence[nn.Module] | None = None,
        *,
        ce_weight: float = 1.0,
        input_shape: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(student, nn.Module):
            raise TypeError(f"student must be an nn.Module, got {type(student).__name__}")
        self.student = student
        teachers = _teacher_list(teacher)
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
        self.epoch: int | None = None
        self.total_epochs: int | None = None
        self.input_shape: tuple[int, ...] | None = None
        self.num_classes: int | None = None
        self._shapes: list[dict[str, tuple[int, ...]]] = []  # [student, *teachers]: path -> dry-run shape
        self._hooks_s: FeatureHooks | None = None
        self._hooks_t: FeatureHooks | None = None
        if input_shape is not None:
            self._probe(input_shape)

    # ---------------------------------------------------------------------------------------- construction

    @staticmethod
    def _check_input_shape(input_shape: object) -> tuple[int, ...]:
        try:
            shape = tuple(input_shape)  # type: ignore[arg-type]
        except TypeError:
            shape = ()
        if len(shape) != 3 or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in shape):
            raise ValueError(f"input_shape must be (C, H, W), three positive ints, got {input_shape!r}")
        return shape

    def _probe(self, input_shape: object) -> None:
        """Dry forward of a (2, *input_shape) zero batch: class-count check and submodule output shapes."""
        shape = self._check_input_shape(input_shape)
        ref = next(iter(self.student.parameters()), None)
        device = _module_device(self.student)
        dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
        x = torch.zeros((2, *shape), device=device, dtype=dtype)
        models = [self.student, *self.teachers]
        shapes: list[dict[str, tuple[int, ...]]] = [{} for _ in models]

        def recorder(store: dict[str, tuple[int, ...]], name: str):
            def hook(module: nn.Module, args: Any, output: Any) -> None:
                if isinstance(output, Tensor):
                    store[name] = tuple(output.shape)

            return hook

        handles = [
            m.register_forward_hook(recorder(store, name))
            for store, model in zip(shapes, models, strict=True)
            for name, m in model.named_modules()
            if name
        ]
        modes = [(m, m.training) for m in self.student.modules()]
        try:
            self.student.eval()  # no BatchNorm statistics updates from the zero batch
            with torch.no_grad():
                outs = [model(x) for model in models]
        finally:
            for h in handles:
                h.remove()
            for m, mode in modes:
                m.training = mode
        n_t = len(self.teachers)
        roles = ["student"] + (["teacher"] if n_t == 1 else [f"teacher {i}" for i in range(n_t)])
        for role, model, out in zip(roles, models, outs, strict=True):
            if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != 2:
                got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
                raise ValueError(
                    f"the {role} ({type(model).__name__}) must return logits (B, num_classes); for a (2, *input_shape) "
                    f"= {(2, *shape)} batch it returned {got}"
                )
        c_s = outs[0].shape[1]
        for role, model, out in zip(roles[1:], models[1:], outs[1:], strict=True):
            if out.shape[1] != c_s:
                raise ValueError(
                    f"class-count mismatch: the {role} ({type(model).__name__}) predicts {out.shape[1]} classes but "
                    f"the student ({type(self.student).__name__}) predicts {c_s}; their logit widths must match"
                )
        self.input_shape, self.num_classes, self._shapes = shape, c_s, shapes

    def _require_one_teacher(self) -> None:
        if len(self.teachers) != 1:
            raise ValueError(f"{type(self).__name__} needs exactly one teacher, got {len(self.teachers)}")

    def _setup_features(
        self, value_s: object, value_t: object, *, all_stages: bool = False, single: bool = False, hook: bool = True
    ) -> tuple[list[str], list[str]]:
        """Resolve the student/teacher feature paths (defaults from ``stage_names``), pair them and (``hook``)
        hook them; distillers with projectors hook with :meth:`_hook_features` once those are built."""
        self._require_one_teacher()
        arg = "feature_path" if single else "feature_paths"
        paths_s = _feature_paths(self.student, value_s, "student", f"{arg}_s", all_stages=all_stages, single=single)
        paths_t = _feature_paths(self.teacher, value_t, "teacher", f"{arg}_t", all_stages=all_stages, single=single)
        if len(paths_s) != len(paths_t):
            raise ValueError(
                f"need the same number of student and teacher feature paths (they are paired in order), got "
                f"{len(paths_s)} ({paths_s}) and {len(paths_t)} ({paths_t})"
            )
        if hook:
            self._hook_features(paths_s, paths_t)
        return paths_s, paths_t

    def _hook_features(self, paths_s: list[str], paths_t: list[str]) -> None:
        self._hooks_s = FeatureHooks(self.student, paths_s)
        self._hooks_t = FeatureHooks(self.teacher, paths_t, detach=True)

    def _map_shapes(self, path_s: str, path_t: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Dry-run (2, C, H, W) shapes of a hooked student/teacher feature pair (for building projectors)."""
        if self.input_shape is None:
            raise ValueError(
                f"{type(self).__name__} needs input_shape=(C, H, W) to build its projector: the feature shapes come "
                "from a dry forward of a (2, C, H, W) batch"
            )
        out = []
        for role, store, path in (("student", self._shapes[0], path_s), ("teacher", self._shapes[1], path_t)):
            shape = store.get(path)
            if shape is None:
                raise ValueError(f"the {role}'s module {path!r} returned no tensor in the dry forward")
            if len(shape) != 4:
                raise ValueError(f"the {role}'s feature at {path!r} must be a (B, C, H, W) map, got shape {shape}")
            out.append(shape)
        return out[0], out[1]

    def _hooked(self, gather: bool = False) -> tuple[list[Tensor], list[Tensor]]:
        """Hooked features of the latest student and teacher forwards, in path order; ``gather=True`` (the CKA
        distillers' ``global_batch``) all-gathers each over DDP ranks (identity on one process)."""
        out: list[list[Tensor]] = []
        for role, hooks in (("student", self._hooks_s), ("teacher", self._hooks_t)):
            if hooks is None:
                raise RuntimeError(f"{type(self).__name__} has no feature hooks (removed with remove_hooks()?)")
            feats = hooks.features
            missing = [p for p in hooks.paths if p not in feats]
            if missing:
                raise RuntimeError(
                    f"the {role}'s modules {missing} did not run in the last forward; hook modules on the forward path"
                )
            for p in hooks.paths:
                if not isinstance(feats[p], Tensor):
                    raise ValueError(f"the {role}'s module {p!r} returned {type(feats[p]).__name__}, expected a Tensor")
            out.append([gather_batch(feats[p]) if gather else feats[p] for p in hooks.paths])
        return out[0], out[1]

    def remove_hooks(self) -> None:
        """Remove the feature hooks this distiller registered on the student and teacher (idempotent)."""
        for hooks in (self._hooks_s, self._hooks_t):
            if hooks is not None:
                hooks.remove()

    # ---------------------------------------------------------------------------------------------- public

    @property
    def teacher(self) -> nn.Module:
        if len(self.teachers) == 0:
            raise AttributeError(f"{type(self).__name__} has no teacher")
        return self.teachers[0]

    def set_epoch(self, epoch: int, total_epochs: int) -> None:
        """Record the 0-based ``epoch`` of ``total_epochs``; the training loop calls it at every epoch start."""
        if not isinstance(total_epochs, int) or isinstance(total_epochs, bool) or total_epochs < 1:
            raise ValueError(f"total_epochs must be a positive int, got {total_epochs!r}")
        if not isinstance(epoch, int) or isinstance(epoch, bool) or not 0 <= epoch < total_epochs:
            raise ValueError(f"epoch must be an int in [0, total_epochs={total_epochs}) (0-based), got {epoch!r}")
        self.epoch, self.total_epochs = epoch, total_epochs

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
        if isinstance(x, Mapping) and not self.accepts_views:
            raise TypeError(
                f"{type(self).__name__} takes plain-tensor batches, got a multi-view batch with views {list(x)}; "
                "only EnsembleKD takes per-model views (build the train loader without a MultiView transform)"
            )
        logits_s = self.student_logits(x)  # the student's view: CE and the KD terms use the same logits
        out: dict[str, Tensor] = {}
        if self.ce_weight != 0.0:
            out["ce"] = self.ce_weight * F.cross_entropy(logits_s, y)
        out.update(self.losses(x, y, logits_s))
        return logits_s, out


class CEOnly(Distiller):
    """Plain cross-entropy training of the student (a teacher, if given, is ignored)."""

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None = None,
        *,
        ce_weight: float = 1.0,
        input_shape: Sequence[int] | None = None,
    ) -> None:
        super().__init__(student, teacher, ce_weight=ce_weight, input_shape=input_shape)


class KD(Distiller):
    """Hinton KD; mdistiller defaults CE 0.1, KD 0.9, T 4. ``standardize=True``: logit-standardized KD
    (the paper uses T=2, KD weight 9 with it; see :class:`LSKD`)."""

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        *,
        T: float = 4.0,
        ce_weight: float = 0.1,
        kd_weight: float = 0.9,
        standardize: bool = False,
        input_shape: Sequence[int] | None = None,
    ) -> None:
        super().__init__(student, teacher, ce_weight=ce_weight, input_shape=input_shape)
        self._require_one_teacher()
        self.T, self.kd_weight, self.standardize = float(T), float(kd_weight), bool(standardize)

    def losses(self, x: Tensor, y: Tensor, logits_s: Tensor) -> dict[str, Tensor]:
        (z_t,) = self.teacher_logits(x)
        return {"kd": self.kd_weight * kd_loss(logits_s, z_t, self.T, standardize=self.standardize)}


class LSKD(KD):
    """Logit-standardized KD (Sun et al. 2024) preset: :class:`KD` with ``standardize=True``, T=2, KD weight 9,
    CE weight 0.1."""

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        *,
        T: float = 2.0,
        ce_weight: float = 0.1,
        kd_weight: float = 9.0,
        input_shape: Sequence[int] | None = None,
    ) -> None:
        super().__init__(
            student, teacher, T=T, ce_weight=ce_weight, kd_weight=kd_weight, standardize=True, input_shape=input_shape
        )


class DKD(Distiller):
    """Decoupled KD; mdistiller CIFAR defaults CE 1, alpha 1, beta 8, T 4, and a linear warmup of the DKD
    weight: ``scale = min(E / warmup, 1)`` with mdistiller's 1-based epoch ``E`` (0 disables the warmup).

    ``E = epoch + 1`` for the 0-based epoch of :meth:`set_epoch`; ``forward_train(x, y, epoch=E)`` (the older
    interface, 1-based like mdistiller) overrides it for that call. Without either, no warmup.
    """

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
        input_shape: Sequence[int] | None = None,
    ) -> None:
        super().__init__(student, teacher, ce_weight=ce_weight, input_shape=input_shape)
        self._require_one_teacher()
        if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 0:
            raise ValueError(f"warmup must be an int >= 0 (epochs), got {warmup!r}")
        self.alpha, self.beta, self.T, self.warmup = float(alpha), float(beta), float(T), warmup
        self._call_epoch: int | None = None

    @property
    def warmup_scale(self) -> float:
        """The current DKD weight scale in [0, 1]."""
        if self.warmup == 0:
            return 1.0
        if self._call_epoch is not None:
            e = self._call_epoch
        elif self.epoch is not None:
            e = self.epoch + 1
        else:
            return 1.0
        return min(e / self.warmup, 1.0)

    def forward_train(self, x: Tensor, y: Tensor, epoch: int | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        self._call_epoch = epoch
        return super().forward_train(x, y)

    def losses(self, x: Tensor, y: Tensor, logits_s: Tensor) -> dict[str, Tensor]:
        (z_t,) = self.teacher_logits(x)
        return {"dkd": self.warmup_scale * dkd_loss(logits_s, z_t, y, self.alpha, self.beta, self.T)}


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
        input_shape: Sequence[int] | None = None,
    ) -> None:
        super().__init__(student, teacher, ce_weight=ce_weight, input_shape=input_shape)
        self._require_one_teacher()
        self.beta, self.gamma, self.T = float(beta), float(gamma), float(T)

    def losses(self, x: Tensor, y: Tensor, logits_s: Tensor) -> dict[str, Tensor]:
        (z_t,) = self.teacher_logits(x)
        return {"dist": dist_loss(logits_s, z_t, self.beta, self.gamma, self.T)}


class FitNet(Distiller):
    """FitNets hint loss: ``hint_weight · MSE(proj(F_s), F_t)`` on one feature pair (mdistiller: weight 100).

    ``proj`` is conv1×1 + BN + ReLU (mdistiller's ``ConvReg`` with its defaults) from the student's to the
    teacher's channels, in ``self.extra["proj"]``; if the spatial sizes differ, the larger map is adaptive-
    average-pooled to the smaller. Needs ``input_shape`` (the projector is sized from a dry forward).
    Paths default to the last of each model's ``stage_names``. Loss key ``"fitnet"``.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        feature_path_s: str | None = None,
        feature_path_t: str | None = None,
        *,
        hint_weight: float = 100.0,
        ce_weight: float = 1.0,
        input_shape: Sequence[int] | None = None,
    ) -> None:
        super().__init__(student, teacher, ce_weight=ce_weight, input_shape=input_shape)
        (path_s,), (path_t,) = self._setup_features(feature_path_s, feature_path_t, single=True, hook=False)
        shape_s, shape_t = self._map_shapes(path_s, path_t)
        device = _module_device(student)
        self.extra["proj"] = _conv1x1(shape_s[1], shape_t[1], bn=True, relu=True).to(device)
        self.hint_weight = float(hint_weight)
        self._hook_features([path_s], [path_t])

    def losses(self, x: Tensor, y: Tensor, logits_s: Tensor) -> dict[str, Tensor]:
        self.teacher_logits(x)
        (f_s,), (f_t,) = self._hooked()
        f_s, f_t = _match_spatial(self.extra["proj"](f_s), f_t)
        return {"fitnet": self.hint_weight * F.mse_loss(f_s, f_t)}


class AT(Distiller):
    """Attention transfer: ``at_weight · Σ_pairs at_loss(F_s, F_t, p)`` (mdistiller: weight 1000, p 2).

    Paths default to all of each model's ``stage_names`` (paired in order; the counts must match). No
    projector (attention maps average over channels). Loss key ``"at"``.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        feature_paths_s: Sequence[str] | str | None = None,
        feature_paths_t: Sequence[str] | str | None = None,
        *,
        at_weight: float = 1000.0,
        p: float = 2.0,
        ce_weight: float = 1.0,
        input_shape: Sequence[int] | None = None,
    ) -> None:
        super().__init__(student, teacher, ce_weight=ce_weight, input_shape=input_shape)
        if not p > 0:
            raise ValueError(f"p must be > 0, got {p}")
        self._setup_features(feature_paths_s, feature_paths_t, all_stages=True)
        self.at_weight, self.p = float(at_weight), float(p)

    def losses(self, x: Tensor, y: Tensor, logits_s: Tensor) -> dict[str, Tensor]:
        self.teacher_logits(x)
        feats_s, feats_t = self._hooked()
        loss = None
        for path_s, path_t, f_s, f_t in zip(self._hooks_s.paths, self._hooks_t.paths, feats_s, feats_t, strict=True):
            _check_feature_map(f_s, "student", path_s)
            _check_feature_map(f_t, "teacher", path_t)
            term = at_loss(f_s, f_t, self.p)
            loss = term if loss is None else loss + term
        return {"at": self.at_weight * loss}


class FCKA(Distiller):
    """Feature CKA: ``alpha · Σ_pairs (1 − CKA(F_s, F_t))`` via ``ckakd.cka_loss`` (features flattened to
    (B, −1)). ``global_batch=True`` gathers the features over DDP ranks first. Paths default to the last
    ``stage_names``. Loss key ``"fcka"``.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        feature_paths_s: Sequence[str] | str | None = None,
        feature_paths_t: Sequence[str] | str | None = None,
        *,
        alpha: float = 5.0,
        mode: str = "centered",
        global_batch: bool = False,
        ce_weight: float = 1.0,
        input_shape: Sequence[int] | None = None,
    ) -> None:
        super().__init__(student, teacher, ce_weight=ce_weight, input_shape=input_shape)
        self.mode = _check_mode(mode)
        self._setup_features(feature_paths_s, feature_paths_t)
        self.alpha, self.global_batch = float(alpha), bool(global_batch)

    def losses(self, x: Tensor, y: Tensor, logits_s: Tensor) -> dict[str, Tensor]:
        self.teacher_logits(x)
        feats_s, feats_t = self._hooked(gather=self.global_batch)
        return {"fcka": self.alpha * ckakd.cka_loss(feats_s, feats_t, mode=self.mode)}


class LCKA(Distiller):
    """Logit CKA, the logit part of ``ckakd.rcka_loss``: ``beta · [(1 − CKA(z_s, z_t)) + (1 − CKA(z_sᵀ, z_tᵀ))]``
    (intra-class over the batch, inter-class over the classes). ``with_l2_norm`` / ``soften`` + ``temperature``:
    the RCKA authors' options (see ``ckakd.rcka_loss``). Loss key ``"lcka"``.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        *,
        beta: float = 5.0,
        mode: str = "centered",
        with_l2_norm: bool = False,
        soften: bool = False,
        temperature: float | None = None,
        global_batch: bool = False,
        ce_weight: float = 1.0,
        input_shape: Sequence[int] | None = None,
    ) -> None:
        super().__init__(student, teacher, ce_weight=ce_weight, input_shape=input_shape)
        self._require_one_teacher()
        self.beta, self.mode, self.global_batch = float(beta), _check_mode(mode), bool(global_batch)
        self.logit_options = _rcka_logit_options(self.mode, with_l2_norm, soften, temperature)

    def losses(self, x: Tensor, y: Tensor, logits_s: Tensor) -> dict[str, Tensor]:
        (z_t,) = self.teacher_logits(x)
        z_s = logits_s
        if self.global_batch:
            z_s, z_t = gather_batch(z_s), gather_batch(z_t)
        # rcka_loss needs a feature pair; the logits stand in (alpha=0; that part is not used)
        parts = ckakd.rcka_loss(
            z_s, z_t, z_s, z_t, alpha=0.0, beta=self.beta, mode=self.mode, return_parts=True, **self.logit_options
        )
        return {"lcka": self.beta * (parts["intra_lcka"] + parts["inter_lcka"])}


class RCKA(Distiller):
    """RCKA: ``alpha · Σ (1 − CKA(F_s, F_t)) + beta · (intra + inter logit 1 − CKA)`` via ``ckakd.rcka_loss``.

    Features are captured with :class:`FeatureHooks` on the given dotted module paths of each net (paired
    in order; default: the last of each model's ``stage_names``). ``global_batch=True`` gathers features
    and logits over DDP ranks first. ``with_l2_norm`` / ``soften`` + ``temperature``: the RCKA authors' options
    for the logit terms (see ``ckakd.rcka_loss``). Returned losses: ``"fcka"`` (alpha-weighted) and ``"lcka"``
    (beta-weighted). Call :meth:`remove_hooks` when done with the distiller.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        feature_paths_s: Sequence[str] | str | None = None,
        feature_paths_t: Sequence[str] | str | None = None,
        *,
        alpha: float = 5.0,
        beta: float = 5.0,
        mode: str = "centered",
        with_l2_norm: bool = False,
        soften: bool = False,
        temperature: float | None = None,
        global_batch: bool = False,
        ce_weight: float = 1.0,
        input_shape: Sequence[int] | None = None,
    ) -> None:
        super().__init__(student, teacher, ce_weight=ce_weight, input_shape=input_shape)
        self.mode = _check_mode(mode)
        self.logit_options = _rcka_logit_options(self.mode, with_l2_norm, soften, temperature)
        self._setup_features(feature_paths_s, feature_paths_t)
        self.alpha, self.beta, self.global_batch = float(alpha), float(beta), bool(global_batch)

    def losses(self, x: Tensor, y: Tensor, logits_s: Tensor) -> dict[str, Tensor]:
        (z_t,) = self.teacher_logits(x)
        feats_s, feats_t = self._hooked(gather=self.global_batch)
        z_s = logits_s
        if self.global_batch:
            z_s, z_t = gather_batch(z_s), gather_batch(z_t)
        parts = ckakd.rcka_loss(
            feats_s,
            feats_t,
            z_s,
            z_t,
            alpha=self.alpha,
            beta=self.beta,
            mode=self.mode,
            return_parts=True,
            **self.logit_options,
        )
        return {"fcka": self.alpha * parts["fcka"], "lcka": self.beta * (parts["intra_lcka"] + parts["inter_lcka"])}


_PATCH_REDUCTIONS = ("channel", "batch", "spatial", "mix")
_MIX_ORDER = ("batch", "spatial", "channel")


class PatchCKA(Distiller):
    """Patch CKA (PCKA): ``weight · Σ_levels ckakd.patch_cka_loss(F_s, F_t)`` over paired (B, C, H, W) maps.

    ``reduce="mix"``: level 0 averages over the batch, level 1 over space, later levels over channels
    (Zhou et al., IJCAI 2024, Table 5); otherwise "channel" | "batch" | "spatial" for every level. Each
    map is resized by ``resize`` (``ckakd.patch_grid``: "nearest" multiple of the patch, or "ceil", the
    authors' rule, which also upsamples a map smaller than the patch to one patch; default "ceil" for
    ``mode="uncentered"``, the authors' setting, else "nearest"), and the patch is shrunk by
    ``ckakd.functional.fit_patch_size`` until the map holds enough patches for an informative CKA
    (``MIN_PATCHES``: 3 for centered, as centered CKA of 2 samples is identically 1). If a pair's
    channel counts differ, a conv1×1 projector student→teacher channels is built in ``self.extra``
    (needs ``input_shape``); differing spatial sizes are adaptive-average-pooled to the smaller. Paths
    default to the last ``stage_names``. Loss key ``"patch_cka"``.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        feature_paths_s: Sequence[str] | str | None = None,
        feature_paths_t: Sequence[str] | str | None = None,
        *,
        weight: float = 10.0,
        patch_size: int | tuple[int, int] = (4, 4),
        reduce: str = "mix",
        mode: str = "centered",
        resize: str | None = None,
        ce_weight: float = 1.0,
        input_shape: Sequence[int] | None = None,
    ) -> None:
        super().__init__(student, teacher, ce_weight=ce_weight, input_shape=input_shape)
        ps: tuple = ()
        if isinstance(patch_size, int):
            ps = (patch_size, patch_size)
        elif isinstance(patch_size, tuple | list):
            ps = tuple(patch_size)
        if len(ps) != 2 or not all(isinstance(p, int) and not isinstance(p, bool) and p >= 1 for p in ps):
            raise ValueError(f"patch_size must be a positive int or a pair of positive ints, got {patch_size!r}")
        if reduce not in _PATCH_REDUCTIONS:
            raise ValueError(f"reduce must be one of {', '.join(map(repr, _PATCH_REDUCTIONS))}; got {reduce!r}")
        self.mode = _check_mode(mode)
        if resize is None:
            resize = "ceil" if self.mode == "uncentered" else "nearest"
        if resize not in PATCH_RESIZE:
            raise ValueError(f"resize must be one of {', '.join(map(repr, PATCH_RESIZE))}; got {resize!r}")
        self.resize = resize
        paths_s, paths_t = self._setup_features(feature_paths_s, feature_paths_t, hook=False)
        self.weight, self.patch_size, self.reduce = float(weight), ps, reduce
        self._proj_keys: list[str | None] = [None] * len(paths_s)
        if self.input_shape is not None:
            device = _module_device(student)
            for i, (path_s, path_t) in enumerate(zip(paths_s, paths_t, strict=True)):
                shape_s, shape_t = self._map_shapes(path_s, path_t)
                if shape_s[1] != shape_t[1]:
                    self._proj_keys[i] = f"proj{i}"
                    self.extra[f"proj{i}"] = _conv1x1(shape_s[1], shape_t[1], bn=False, relu=False).to(device)
        self._hook_features(paths_s, paths_t)

    def losses(self, x: Tensor, y: Tensor, logits_s: Tensor) -> dict[str, Tensor]:
        self.teacher_logits(x)
        feats_s, feats_t = self._hooked()
        loss = None
        for i, (f_s, f_t) in enumerate(zip(feats_s, feats_t, strict=True)):
            path_s, path_t = self._hooks_s.paths[i], self._hooks_t.paths[i]
            _check_feature_map(f_s, "student", path_s)
            _check_feature_map(f_t, "teacher", path_t)
            key = self._proj_keys[i]
            if key is not None:
                f_s = self.extra[key](f_s)
            elif f_s.shape[1] != f_t.shape[1]:
                raise ValueError(
                    f"PatchCKA: the student feature {path_s!r} has {f_s.shape[1]} channels but the teacher feature "
                    f"{path_t!r} has {f_t.shape[1]}; pass input_shape=(C, H, W) so a conv1x1 projector can be built"
                )
            f_s, f_t = _match_spatial(f_s, f_t)
            h, w = f_s.shape[-2:]
            patch = fit_patch_size((h, w), self.patch_size, mode=self.mode, resize=self.resize)
            gh, gw = patch_grid((h, w), patch, self.resize)
            if (gh // patch[0]) * (gw // patch[1]) < MIN_PATCHES[self.mode]:
                raise ValueError(
                    f"PatchCKA: the feature maps at {path_s!r} / {path_t!r} are {h}x{w}, too small for mode="
                    f"{self.mode!r} (needs at least {MIN_PATCHES[self.mode]} patches); hook larger feature maps"
                )
            reduce = _MIX_ORDER[min(i, 2)] if self.reduce == "mix" else self.reduce
            term = ckakd.patch_cka_loss(f_s, f_t, patch_size=patch, reduce=reduce, mode=self.mode, resize=self.resize)
            loss = term if loss is None else loss + term
        return {"patch_cka": self.weight * loss}


class MMD(Distiller):
    """The MMD baseline of RCKA (Zhou et al., IJCAI 2024, Theorem 2): ``weight · ckakd.mmd_loss(F_s, F_t)``
    summed over the pairs (features flattened to (B, −1)). ``global_batch=True`` gathers over DDP ranks
    first. Paths default to the last ``stage_names``. Loss key ``"mmd"``.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        feature_paths_s: Sequence[str] | str | None = None,
        feature_paths_t: Sequence[str] | str | None = None,
        *,
        weight: float = 1.0,
        global_batch: bool = False,
        ce_weight: float = 1.0,
        input_shape: Sequence[int] | None = None,
    ) -> None:
        super().__init__(student, teacher, ce_weight=ce_weight, input_shape=input_shape)
        self._setup_features(feature_paths_s, feature_paths_t)
        self.weight, self.global_batch = float(weight), bool(global_batch)

    def losses(self, x: Tensor, y: Tensor, logits_s: Tensor) -> dict[str, Tensor]:
        self.teacher_logits(x)
        feats_s, feats_t = self._hooked(gather=self.global_batch)
        return {"mmd": self.weight * ckakd.mmd_loss(feats_s, feats_t)}


def _load_cost(cost: object, sharpen: float) -> Tensor:
    """A WKD-L cost (C, C) from a tensor (used as given) or an interrelation file (``save_interrelation``)."""
    if not sharpen > 0:
        raise ValueError(f"sharpen must be > 0, got {sharpen}")
    if isinstance(cost, str | os.PathLike):
        ir, _ = ckakd.load_interrelation(cost)
        c = ckakd.cost_from_interrelation(ir, sharpen=sharpen)
    else:
        if sharpen != 1.0:
            raise ValueError(
                f"sharpen={sharpen} applies only to a cost built from an interrelation file (cost=path); a cost "
                "tensor is used as given (build it with ckakd.cost_from_interrelation(ir, sharpen=...))"
            )
        try:
            c = torch.as_tensor(cost)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(
                "cost must be a (C, C) tensor or a path to a file written by ckakd.save_interrelation, got "
                f"{type(cost).__name__}"
            ) from None
        c = c.detach().clone()
        if not c.is_floating_point():
            c = c.float()
    if c.dim() != 2 or c.shape[0] != c.shape[1]:
        raise ValueError(f"cost must be a square (C, C) matrix, got shape {tuple(c.shape)}")
    return c


_SCHEDULES = ("constant", "cosine")


class WKDLogit(Distiller):
    """WKD-L via ``ckakd.wkd_logit_loss`` over a fixed (C, C) class cost (stored as the buffer ``cost``).

    ``cost``: a (C, C) tensor (used as given) or a path (str / PathLike) to an interrelation file written by
    ``ckakd.save_interrelation``, turned into ``ckakd.cost_from_interrelation(ir, sharpen=sharpen)``. C must
    equal the logit width (checked at construction with ``input_shape``, else at first use).
    ``use_target=True``: target separation (the labels are passed to the loss; the WD part is weighted by
    gamma, the target term is not). ``gamma_schedule="cosine"``: gamma is constant for 0-based epochs
    ``< decay_start`` and then cosine-decays to 0 at the last epoch (:func:`cosine_decay_weight`, the WKD
    public code; needs :meth:`set_epoch`, before which gamma is constant). Defaults follow the public
    ImageNet setting (T=2, gamma=30); CIFAR-100 uses T=8, gamma=600, cosine from epoch 150 of 240.
    Loss key ``"wkd_l"``.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        cost: Tensor | str | os.PathLike,
        *,
        T: float = 2.0,
        gamma: float = 30.0,
        use_target: bool = True,
        eps: float = 0.05,
        iters: int = 10,
        sharpen: float = 1.0,
        gamma_schedule: str = "constant",
        decay_start: int = 0,
        ce_weight: float = 1.0,
        input_shape: Sequence[int] | None = None,
    ) -> None:
        super().__init__(student, teacher, ce_weight=ce_weight, input_shape=input_shape)
        self._require_one_teacher()
        if gamma_schedule not in _SCHEDULES:
            raise ValueError(
                f"gamma_schedule must be one of {', '.join(map(repr, _SCHEDULES))}; got {gamma_schedule!r}"
            )
        if not isinstance(decay_start, int) or isinstance(decay_start, bool) or decay_start < 0:
            raise ValueError(f"decay_start must be an int >= 0 (0-based epoch), got {decay_start!r}")
        self.register_buffer("cost", _load_cost(cost, sharpen))
        if self.num_classes is not None:
            self._check_cost_width(self.num_classes)
        self.T, self.gamma, self.use_target = float(T), float(gamma), bool(use_target)
        self.eps, self.iters, self.sharpen = float(eps), int(iters), float(sharpen)
        self.gamma_schedule, self.decay_start = gamma_schedule, decay_start

    def _check_cost_width(self, num_classes: int) -> None:
        if tuple(self.cost.shape) != (num_classes, num_classes):
            raise ValueError(
                f"cost is {tuple(self.cost.shape)} but the models predict C={num_classes} classes; the WKD-L cost "
                f"must be (C, C) = ({num_classes}, {num_classes})"
            )

    @property
    def uses_total_epochs(self) -> bool:  # type: ignore[override]
        """``gamma_schedule="cosine"`` decays gamma over the total epochs."""
        return self.gamma_schedule != "constant"

    def _scheduled(self, weight: float) -> float:
        if self.gamma_schedule == "constant" or self.epoch is None or self.total_epochs is None:
            return weight
        return cosine_decay_weight(weight, self.epoch, self.total_epochs, self.decay_start)

    @property
    def current_gamma(self) -> float:
        """gamma at the epoch last given to :meth:`set_epoch` (after the schedule)."""
        return self._scheduled(self.gamma)

    def _wkd_l(self, y: Tensor, logits_s: Tensor, z_t: Tensor) -> Tensor:
        self._check_cost_width(logits_s.shape[1])
        return ckakd.wkd_logit_loss(
            logits_s,
            z_t,
            self.cost.to(device=logits_s.device),
            temperature=self.T,
            eps=self.eps,
            iters=self.iters,
            target=y if self.use_target else None,
            gamma=self.current_gamma,
        )

    def losses(self, x: Tensor, y: Tensor, logits_s: Tensor) -> dict[str, Tensor]:
        (z_t,) = self.teacher_logits(x)
        return {"wkd_l": self._wkd_l(y, logits_s, z_t)}


class _WKDFeaturePart:
    """WKD-F pieces shared by :class:`WKDFeature` and :class:`WKDLogitFeature` (mixed into a Distiller)."""

    def _init_wkd_feature(
        self, feature_path_s: str | None, feature_path_t: str | None, mean_weight: float, grid: object, cov: str
    ) -> None:
        if cov not in ("diag", "full"):
            raise ValueError(f"cov must be 'diag' or 'full'; got {cov!r}")
        if not mean_weight >= 0:
            raise ValueError(f"mean_weight must be >= 0, got {mean_weight}")
        g = (grid, grid) if isinstance(grid, int) else tuple(grid) if isinstance(grid, tuple | list) else ()
        if len(g) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in g):
            raise ValueError(f"grid must be a positive int or a pair of positive ints, got {grid!r}")
        (path_s,), (path_t,) = self._setup_features(feature_path_s, feature_path_t, single=True, hook=False)
        shape_s, shape_t = self._map_shapes(path_s, path_t)
        device = _module_device(self.student)
        # the public code's conv1x1 ConvReg(use_relu=True, use_bn=True)
        self.extra["proj"] = _conv1x1(shape_s[1], shape_t[1], bn=True, relu=True).to(device)
        self.mean_weight, self.grid, self.cov = float(mean_weight), g, cov
        self._hook_features([path_s], [path_t])

    def _wkd_feature_loss(self) -> Tensor:
        """Unweighted WKD-F loss of the latest forwards (call after the teacher forward)."""
        (f_s,), (f_t,) = self._hooked()
        _check_feature_map(f_s, "student", self._hooks_s.paths[0])
        _check_feature_map(f_t, "teacher", self._hooks_t.paths[0])
        f_s, f_t = _match_spatial(self.extra["proj"](f_s), f_t)
        return ckakd.wkd_feature_loss(f_s, f_t, grid=self.grid, mean_weight=self.mean_weight, cov=self.cov)


class WKDFeature(_WKDFeaturePart, Distiller):
    """WKD-F: ``weight · ckakd.wkd_feature_loss(proj(F_s), F_t)``, Wasserstein distance between per-cell
    channel Gaussians of one feature pair.

    ``proj``: conv1×1 + BN + ReLU student→teacher channels (the public CIFAR projector) in
    ``self.extra["proj"]``; needs ``input_shape``. Defaults are the public CIFAR-100 setting
    (γ_F = 0.08, mean weight r = 4, grid 1; ImageNet: 0.02, 2, 4). Paths default to the last
    ``stage_names``. Loss key ``"wkd_f"``.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        feature_path_s: str | None = None,
        feature_path_t: str | None = None,
        *,
        weight: float = 0.08,
        mean_weight: float = 4.0,
        grid: int | tuple[int, int] = 1,
        cov: str = "diag",
        ce_weight: float = 1.0,
        input_shape: Sequence[int] | None = None,
    ) -> None:
        super().__init__(student, teacher, ce_weight=ce_weight, input_shape=input_shape)
        self._init_wkd_feature(feature_path_s, feature_path_t, mean_weight, grid, cov)
        self.weight = float(weight)

    def losses(self, x: Tensor, y: Tensor, logits_s: Tensor) -> dict[str, Tensor]:
        self.teacher_logits(x)
        return {"wkd_f": self.weight * self._wkd_feature_loss()}


class WKDLogitFeature(_WKDFeaturePart, WKDLogit):
    """WKD-L+F: :class:`WKDLogit` (key ``"wkd_l"``) plus :class:`WKDFeature` (key ``"wkd_f"``, weight
    ``feature_weight``). ``gamma_schedule`` / ``decay_start`` scale both weights, as the public code does.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        cost: Tensor | str | os.PathLike,
        feature_path_s: str | None = None,
        feature_path_t: str | None = None,
        *,
        T: float = 2.0,
        gamma: float = 30.0,
        use_target: bool = True,
        eps: float = 0.05,
        iters: int = 10,
        sharpen: float = 1.0,
        gamma_schedule: str = "constant",
        decay_start: int = 0,
        feature_weight: float = 0.08,
        mean_weight: float = 4.0,
        grid: int | tuple[int, int] = 1,
        cov: str = "diag",
        ce_weight: float = 1.0,
        input_shape: Sequence[int] | None = None,
    ) -> None:
        super().__init__(
            student,
            teacher,
            cost,
            T=T,
            gamma=gamma,
            use_target=use_target,
            eps=eps,
            iters=iters,
            sharpen=sharpen,
            gamma_schedule=gamma_schedule,
            decay_start=decay_start,
            ce_weight=ce_weight,
            input_shape=input_shape,
        )
        self._init_wkd_feature(feature_path_s, feature_path_t, mean_weight, grid, cov)
        self.feature_weight = float(feature_weight)

    @property
    def current_feature_weight(self) -> float:
        """feature_weight at the epoch last given to :meth:`set_epoch` (after the schedule)."""
        return self._scheduled(self.feature_weight)

    def losses(self, x: Tensor, y: Tensor, logits_s: Tensor) -> dict[str, Tensor]:
        (z_t,) = self.teacher_logits(x)
        return {
            "wkd_l": self._wkd_l(y, logits_s, z_t),
            "wkd_f": self.current_feature_weight * self._wkd_feature_loss(),
        }


STUDENT_VIEW = "student"


class EnsembleKD(Distiller):
    """KD from any number of teachers, optionally each on its own augmented view of the batch.

    ``reduce="mean_loss"``: mean over teachers of ``kd_loss(z_s, z_t_i)`` (the paper's code);
    ``reduce="mean_target"``: KD to the average of the teachers' ``softmax(z_t_i / T)``.
    ``standardize=True``: logit-standardized KD, every net's logits z-scored per sample first
    (:func:`standardize_logits`; the paper uses T=2, KD weight 9 with it). With one teacher both reductions
    equal :class:`KD` (value and gradient).

    Views (per-model augmentation, the T1{w,s} T2{w,s} S{w,s} grid): when ``x`` is a ``{view: Tensor}``
    mapping (a :class:`~ckakd.train.data.MultiView` loader), the student sees ``x["student"]`` (its CE and
    KD terms both use those logits) and teacher ``i`` sees ``x[teacher_views[i]]`` (default
    ``"teacher{i}"``; name ``"student"`` to give a teacher the student's exact view). A missing view raises
    ``KeyError`` naming it. When ``x`` is a Tensor every model sees it. :meth:`forward` (evaluation) takes a
    plain tensor (a mapping: its ``"student"`` view).
    """

    accepts_views = True

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
        teacher_views: Sequence[str] | None = None,
        input_shape: Sequence[int] | None = None,
    ) -> None:
        teachers = _teacher_list(teachers)
        if len(teachers) == 0:
            raise ValueError("EnsembleKD needs at least one teacher")
        if reduce not in ("mean_loss", "mean_target"):
            raise ValueError(f"reduce must be 'mean_loss' or 'mean_target', got {reduce!r}")
        if not T > 0:
            raise ValueError(f"temperature T must be > 0, got {T}")
        if teacher_views is None:
            views = [f"teacher{i}" for i in range(len(teachers))]
        else:
            if isinstance(teacher_views, str):
                raise ValueError(f"teacher_views must be a list of view names (one per teacher), got {teacher_views!r}")
            views = list(teacher_views)
            if len(views) != len(teachers) or not all(isinstance(v, str) and v for v in views):
                raise ValueError(
                    f"teacher_views must name one view (a non-empty string) per teacher ({len(teachers)}), "
                    f"got {teacher_views!r}"
                )
        super().__init__(student, teachers, ce_weight=ce_weight, input_shape=input_shape)
        self.T, self.reduce, self.standardize, self.kd_weight = float(T), reduce, bool(standardize), float(kd_weight)
        self.teacher_views: tuple[str, ...] = tuple(views)

    @property
    def view_names(self) -> list[str]:
        """The views a multi-view batch must hold: ``"student"`` then the teachers' (without repeats)."""
        return list(dict.fromkeys([STUDENT_VIEW, *self.teacher_views]))

    @staticmethod
    def _view(x: Tensor | Mapping[str, Tensor], name: str, role: str) -> Tensor:
        if isinstance(x, Tensor):
            return x
        if isinstance(x, Mapping):
            if name not in x:
                raise KeyError(
                    f"EnsembleKD: the multi-view batch has no view {name!r} for {role}; it has {list(x)} (build the "
                    f"loader with a MultiView holding {name!r}, or pass teacher_views naming existing views)"
                )
            return x[name]
        raise TypeError(f"EnsembleKD: expected a Tensor or a {{view: Tensor}} mapping, got {type(x).__name__}")

    def _check_views(self, x: Tensor | Mapping[str, Tensor]) -> None:
        if isinstance(x, Mapping):
            roles = [("the student", STUDENT_VIEW)] + [(f"teacher {i}", v) for i, v in enumerate(self.teacher_views)]
            for role, name in roles:
                self._view(x, name, role)

    def forward(self, x: Tensor | Mapping[str, Tensor]) -> Tensor:
        return self.student(self._view(x, STUDENT_VIEW, "the student"))

    def student_logits(self, x: Tensor | Mapping[str, Tensor]) -> Tensor:
        return self.student(self._view(x, STUDENT_VIEW, "the student"))

    @torch.no_grad()
    def teacher_logits(self, x: Tensor | Mapping[str, Tensor]) -> list[Tensor]:
        return [
            t(self._view(x, name, f"teacher {i}"))
            for i, (t, name) in enumerate(zip(self.teachers, self.teacher_views, strict=True))
        ]

    def forward_train(self, x: Tensor | Mapping[str, Tensor], y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        self._check_views(x)  # a missing view fails before any forward
        return super().forward_train(x, y)  # type: ignore[arg-type]

    def losses(self, x: Tensor | Mapping[str, Tensor], y: Tensor, logits_s: Tensor) -> dict[str, Tensor]:
        zts = self.teacher_logits(x)
        for i, z in enumerate(zts):
            if z.shape != logits_s.shape:
                raise ValueError(
                    f"teacher {i} returned logits of shape {tuple(z.shape)} but the student {tuple(logits_s.shape)} "
                    "(multi-view batches: every view must hold the same samples, and the nets as many classes)"
                )
        if self.reduce == "mean_loss":
            loss = torch.stack([kd_loss(logits_s, z_t, self.T, standardize=self.standardize) for z_t in zts]).mean()
        else:
            z_s = standardize_logits(logits_s) if self.standardize else logits_s
            p_t = torch.stack(
                [F.softmax((standardize_logits(z) if self.standardize else z) / self.T, dim=1) for z in zts]
            ).mean(0)
            loss = _kd_to_probs(z_s, p_t, self.T)
        return {"kd": self.kd_weight * loss}


# --------------------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------------------

DISTILLERS: dict[str, type[Distiller]] = {
    "ce": CEOnly,
    "kd": KD,
    "lskd": LSKD,
    "dkd": DKD,
    "dist": DIST,
    "fitnet": FitNet,
    "at": AT,
    "fcka": FCKA,
    "lcka": LCKA,
    "rcka": RCKA,
    "patch_cka": PatchCKA,
    "mmd": MMD,
    "wkd_l": WKDLogit,
    "wkd_f": WKDFeature,
    "wkd_lf": WKDLogitFeature,
    "ensemble_kd": EnsembleKD,
}

_OPTIONAL_TEACHER = frozenset({"ce"})
_MULTI_TEACHER = frozenset({"ensemble_kd"})


def build_distiller(
    name: str,
    student: nn.Module,
    teachers: nn.Module | Sequence[nn.Module] | None,
    **kwargs: Any,
) -> Distiller:
    """Build ``DISTILLERS[name](student, teacher(s), **kwargs)``.

    ``teachers``: one module, a sequence of modules or ``None``; a list goes only to ``"ensemble_kd"``, every
    other method takes exactly one teacher (``"ce"``: optional). ``ValueError`` for an unknown name, unknown
    or missing keyword arguments, and a missing or extra teacher.
    """
    if name not in DISTILLERS:
        raise ValueError(f"unknown distiller {name!r}; valid names: {', '.join(DISTILLERS)}")
    cls = DISTILLERS[name]
    params = list(inspect.signature(cls.__init__).parameters.values())[3:]  # self, student, teacher(s)
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    accepted = [p.name for p in params if p.kind in kinds]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(f"unknown argument(s) {unknown} for distiller {name!r} ({cls.__name__}); accepted: {accepted}")
    required = [p.name for p in params if p.kind in kinds and p.default is inspect.Parameter.empty]
    missing = [n for n in required if n not in kwargs]
    if missing:
        raise ValueError(f"distiller {name!r} ({cls.__name__}) requires the argument(s) {missing}")
    tlist = _teacher_list(teachers)
    if not tlist and name not in _OPTIONAL_TEACHER:
        raise ValueError(f"distiller {name!r} needs a teacher, got none")
    if name in _MULTI_TEACHER:
        return cls(student, tlist, **kwargs)
    if len(tlist) > 1:
        raise ValueError(f"distiller {name!r} takes one teacher, got {len(tlist)}; use 'ensemble_kd' for several")
    return cls(student, tlist[0] if tlist else None, **kwargs)
