"""The distiller bases: :class:`Distiller` (mdistiller's shape) and :class:`FeatureDistiller` (hooked features).

Every distiller wraps a student and zero or more teachers. Teachers are frozen (``requires_grad=False``)
and stay in eval mode even after ``distiller.train()`` (so their BatchNorm statistics never move).
``forward_train(x, y)`` returns ``(student_logits, {name: weighted_loss})``; the total training loss is
the sum of the dict's values. ``forward(x)`` returns the student's logits. Trainable modules a distiller
adds (projectors) live in ``self.extra`` and are reported by :meth:`Distiller.extra_parameters` /
:meth:`Distiller.num_extra_parameters`; optimize :meth:`Distiller.learnable_parameters`.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ckakd._checks import module_names, resolve_module

from ..distributed import gather_batch
from ..hooks import FeatureHooks

__all__ = ["Distiller", "FeatureDistiller"]

_CKA_MODES = ("centered", "debiased", "uncentered")


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


def check_mode(mode: str) -> str:
    """``mode`` itself when it is a CKA mode (centered / debiased / uncentered), else a ``ValueError``."""
    if mode not in _CKA_MODES:
        raise ValueError(f"mode must be one of {', '.join(map(repr, _CKA_MODES))}; got {mode!r}")
    return mode


def check_feature_map(f: Tensor, role: str, path: str) -> None:
    """Refuse a hooked feature that is not a (B, C, H, W) map, naming the ``role``'s module ``path``."""
    if f.dim() != 4:
        raise ValueError(f"the {role}'s feature at {path!r} must be a (B, C, H, W) map, got shape {tuple(f.shape)}")


def _module_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter or buffer (CPU for a model with neither)."""
    t = next(itertools.chain(model.parameters(), model.buffers()), None)
    return t.device if t is not None else torch.device("cpu")


def teacher_list(teacher: nn.Module | Sequence[nn.Module] | None) -> list[nn.Module]:
    """One teacher, a sequence or ``nn.ModuleList`` of them, or None -> a plain list (empty for None)."""
    if teacher is None:
        return []
    if isinstance(teacher, nn.ModuleList):
        return list(teacher)
    if isinstance(teacher, nn.Module):
        return [teacher]
    return list(teacher)


# --------------------------------------------------------------------------------------------------------------
# Bases
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
    ``TypeError`` naming the views. ``one_teacher = True`` (a class attribute): the constructor refuses anything
    but exactly one teacher (after the dry forward).
    """

    accepts_views: bool = False
    one_teacher: bool = False
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
        teachers = teacher_list(teacher)
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
        if self.one_teacher:
            self._require_one_teacher()

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

    def remove_hooks(self) -> None:
        """Remove the feature hooks this distiller registered on the student and teacher (idempotent)."""
        for hooks in (self._hooks_s, self._hooks_t):
            if hooks is not None:
                hooks.remove()

    # ---------------------------------------------------------------------------------------------- public

    @property
    def teacher(self) -> nn.Module:
        """The first teacher (``AttributeError`` when there is none)."""
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
        """Set the student and extra modules to train / eval mode; the teachers always stay in eval mode."""
        super().train(mode)
        for t in self.teachers:
            t.eval()
        return self

    def extra_parameters(self) -> list[nn.Module]:
        """Trainable modules added by the distiller (projectors etc.); empty when none."""
        return list(self.extra.values())

    def num_extra_parameters(self) -> int:
        """The number of trainable scalars in :meth:`extra_parameters`."""
        return sum(p.numel() for m in self.extra_parameters() for p in m.parameters())

    def learnable_parameters(self) -> Iterator[nn.Parameter]:
        """Student parameters followed by the extra modules' parameters (what the optimizer should get)."""
        yield from self.student.parameters()
        for m in self.extra_parameters():
            yield from m.parameters()

    def forward(self, x: Tensor) -> Tensor:
        """The student's logits (B, K) for images x (B, C, H, W): what evaluation and inference use."""
        return self.student(x)

    @torch.no_grad()
    def teacher_logits(self, x: Tensor) -> list[Tensor]:
        """Each teacher's logits (B, K) for x (B, C, H, W), without gradients."""
        return [t(x) for t in self.teachers]

    def losses(self, x: Tensor, y: Tensor, logits_s: Tensor) -> dict[str, Tensor]:
        """The distillation terms ``{name: scalar}`` for a batch x, labels y (B,) and the student's logits
        (B, K); the base class adds none (subclasses override it)."""
        return {}

    def student_logits(self, x: Tensor) -> Tensor:
        """The student's logits (B, K) for the training batch x (its own view of a multi-view batch)."""
        return self.student(x)

    def forward_train(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """``(student logits (B, K), {loss name: scalar})`` for a batch x and labels y (B,): the weighted CE
        (when ``ce_weight`` != 0) and :meth:`losses`."""
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


class FeatureDistiller(Distiller):
    """Base of the distillers that compare hooked intermediate features of the student and its one teacher.

    The shared constructor (after :class:`Distiller`'s) resolves the feature paths, dotted module paths of
    each net (``None``: the last of the model's ``stage_names``, all of them with ``all_stages = True``),
    pairs them in order, builds the projectors ``projector`` declares and hooks the paths with
    :class:`FeatureHooks` (the teacher's detached). Class attributes:

    * ``single_feature``: one path per net (messages name ``feature_path_s`` / ``feature_path_t``), else one
      or more (``feature_paths_s`` / ``feature_paths_t``);
    * ``projector``: ``None``; ``"proj"``: conv1×1 + BN + ReLU student→teacher channels for the one pair in
      ``self.extra["proj"]`` (needs ``input_shape``); ``"mismatched"``: a plain conv1×1 ``self.extra[f"proj{i}"]``
      for each pair ``i`` whose channel counts differ, built only with ``input_shape``. ``self._proj_keys[i]``
      names pair ``i``'s projector (``None``: none).

    Projectors are trainable extra modules (:meth:`extra_parameters`). Subclasses check their own options
    before calling ``super().__init__``; :meth:`_hooked` gives the latest forwards' features.
    """

    one_teacher = True
    single_feature: bool = False
    all_stages: bool = False
    projector: str | None = None

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        paths_s: Sequence[str] | str | None = None,
        paths_t: Sequence[str] | str | None = None,
        *,
        ce_weight: float = 1.0,
        input_shape: Sequence[int] | None = None,
    ) -> None:
        super().__init__(student, teacher, ce_weight=ce_weight, input_shape=input_shape)
        self._init_features(paths_s, paths_t)

    def _init_features(self, value_s: object, value_t: object) -> None:
        """Resolve and pair the feature paths, build the projectors, hook the paths."""
        paths_s, paths_t = self._resolve_features(value_s, value_t)
        self._build_projectors(paths_s, paths_t)
        self._hook_features(paths_s, paths_t)

    def _resolve_features(self, value_s: object, value_t: object) -> tuple[list[str], list[str]]:
        """Resolve the student/teacher feature paths (defaults from ``stage_names``) and pair them."""
        arg = "feature_path" if self.single_feature else "feature_paths"
        kw = {"all_stages": self.all_stages, "single": self.single_feature}
        paths_s = _feature_paths(self.student, value_s, "student", f"{arg}_s", **kw)
        paths_t = _feature_paths(self.teacher, value_t, "teacher", f"{arg}_t", **kw)
        if len(paths_s) != len(paths_t):
            raise ValueError(
                f"need the same number of student and teacher feature paths (they are paired in order), got "
                f"{len(paths_s)} ({paths_s}) and {len(paths_t)} ({paths_t})"
            )
        return paths_s, paths_t

    def _build_projectors(self, paths_s: list[str], paths_t: list[str]) -> None:
        """The projectors ``projector`` declares, student→teacher channels, in ``self.extra``."""
        self._proj_keys: list[str | None] = [None] * len(paths_s)
        if self.projector is None:
            return
        if self.projector == "proj":  # one pair; conv1x1 + BN + ReLU (mdistiller's ConvReg defaults)
            shape_s, shape_t = self._map_shapes(paths_s[0], paths_t[0])
            self._proj_keys[0] = "proj"
            self.extra["proj"] = _conv1x1(shape_s[1], shape_t[1], bn=True, relu=True).to(_module_device(self.student))
        elif self.projector == "mismatched":  # a plain conv1x1 per pair whose channel counts differ
            if self.input_shape is None:
                return
            device = _module_device(self.student)
            for i, (path_s, path_t) in enumerate(zip(paths_s, paths_t, strict=True)):
                shape_s, shape_t = self._map_shapes(path_s, path_t)
                if shape_s[1] != shape_t[1]:
                    self._proj_keys[i] = f"proj{i}"
                    self.extra[f"proj{i}"] = _conv1x1(shape_s[1], shape_t[1], bn=False, relu=False).to(device)
        else:
            raise ValueError(f"{type(self).__name__}.projector must be None, 'proj' or 'mismatched'")

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
