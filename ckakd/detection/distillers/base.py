"""The detection distiller base: :class:`DetectionDistiller`, the shared constructor of every detection method.

A detection distiller wraps a student detector and a frozen teacher detector (RetinaNet / FCOS / a
:class:`~ckakd.detection.adapters.TorchvisionDetector`, anything with the ``features`` / ``head_outputs`` /
``compute_losses`` protocol). The base hooks the distilled feature maps (default: each detector's FPN levels),
probes their channels when custom paths are given, picks the distilled ``levels``, builds the per-level 1×1
projectors (a :class:`~ckakd.detection.distill.PatchMimic` in ``self.extra``) and runs the training forward;
each method (``ckakd.detection.distillers.*``, registered with ``@register_distiller(name, task="detection")``)
implements :meth:`DetectionDistiller.distill_loss`.

Calling the base itself, ``DetectionDistiller(student, teacher, method="pcka", **kwargs)``, builds the method
registered as ``method`` (:func:`detection_distiller`, the one factory; :data:`DISTILL_METHODS` lists the names).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ckakd._checks import renamed_arguments
from ckakd.detection.distill import PatchMimic
from ckakd.train.distillers.base import Distiller
from ckakd.train.distillers.registry import (
    build_distiller,
    distiller_arguments,
    distiller_name,
    registered_distillers,
)
from ckakd.train.hooks import FeatureHooks

__all__ = [
    "DETECTION",
    "DetectionDistiller",
    "detection_distiller",
    "detection_methods",
    "detector_protocol",
    "hooked_maps",
]

DETECTION = "detection"  # the registry task of the detection methods
PROJECTORS = ("never", "mismatched", "always")


def detector_protocol(model: nn.Module, who: str) -> tuple[int, int, list[str]]:
    """(FPN levels, FPN channels, hook paths of the levels) of a detector following the DenseDetector protocol."""
    missing = [
        a for a in ("features", "head_outputs", "compute_losses", "num_levels", "fpn_channels") if not hasattr(model, a)
    ]
    if missing:
        raise TypeError(
            f"{who} must be a detector with the DenseDetector protocol (RetinaNet / FCOS / TorchvisionDetector), "
            f"got {type(model).__name__} lacking {missing}"
        )
    return int(model.num_levels), int(model.fpn_channels), list(getattr(model, "feature_names", []))


def hooked_maps(hooks: FeatureHooks, who: str) -> list[Tensor]:
    """The feature maps (B, C, H, W) the hooks saw, in path order; a path whose output is a mapping or a sequence
    of maps (torchvision's ``backbone`` gives an ``OrderedDict`` of levels) contributes all of them."""
    seen = hooks.features
    out: list[Tensor] = []
    for path in hooks.paths:
        if path not in seen:
            raise ValueError(
                f"{who} hook path {path!r} did not run in the detector's features / head forward; hook a module "
                "of the backbone, the FPN or the head"
            )
        value = seen[path]
        maps = (
            list(value.values())
            if isinstance(value, Mapping)
            else list(value)
            if isinstance(value, list | tuple)
            else [value]
        )
        for m in maps:
            if not isinstance(m, Tensor) or m.dim() != 4:
                what = tuple(m.shape) if isinstance(m, Tensor) else type(m).__name__
                raise ValueError(f"{who} hook path {path!r} gave {what}, expected (B, C, H, W) feature maps")
        out += maps
    return out


def _paths(value: Sequence[str] | str | None, default: list[str]) -> list[str]:
    return list(default if value is None else [value] if isinstance(value, str) else value)


class _ByMethod(type):
    """Metaclass of :class:`DetectionDistiller`: calling the base class builds the registered method."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        if cls is DetectionDistiller:
            return detection_distiller(*args, **kwargs)
        return super().__call__(*args, **kwargs)


class DetectionDistiller(Distiller, metaclass=_ByMethod):
    """Student detector + frozen teacher detector + a distillation loss on their FPN levels or cls logits.

    ``DetectionDistiller(student, teacher, method=..., **kwargs)`` builds the method registered as ``method``
    (``"none"``, ``"pcka"``, ``"pcka_mimic"``, ``"kd_patch"``, ``"at_patch"``, ``"dist_patch"``, ``"mmd_patch"``,
    ``"wkd_f"``, ``"wkd_l"``, ``"wkd_lf"``); every method is an instance of this class.

    Args (shared by every method):
        student, teacher: detectors with the ``features`` / ``head_outputs`` / ``compute_losses`` protocol;
            they must have the same number of FPN levels (``ValueError`` otherwise).
        weight: the loss weight (default: the method's ``default_weight``).
        levels: indices of the FPN levels (of the hooked maps) to distil (default: all).
        feature_paths_s, feature_paths_t: dotted module paths whose forward-hook outputs are the distilled feature
            maps (default: each detector's ``feature_names``, its FPN levels: ``backbone.fpn_levels.{i}`` for
            ours, ``model.backbone`` for torchvision's, whose hook output is an ``OrderedDict`` of the levels).
            Any module that runs in the detector's features or head forward may be named (e.g.
            ``backbone.layer3``); ``levels`` then indexes the hooked maps. Student and teacher must give the
            same number of maps (``ValueError`` otherwise, at construction).

    Class attributes of a method: ``default_weight``; ``projector`` — ``"never"``, ``"always"`` or
    ``"mismatched"`` (a :class:`~ckakd.detection.distill.PatchMimic` in ``self.extra`` when the distilled
    levels' channels differ); ``distills`` (False: the student's losses only); ``reads_logits`` (the teacher's
    head runs and :meth:`distill_loss` gets the cls logits). The teacher is frozen (``requires_grad=False``)
    and stays in eval mode under ``.train()``; the projector is the one trainable extra module
    (:meth:`extra_parameters`), ``None`` when there is none. :attr:`method` is the registry name.
    """

    # the model identity checkpoints record (``ckakd.train.engine.checkpoint.model_identity``): one name for every
    # method, as when one class implemented them all, so that older checkpoints resume
    checkpoint_name: str = "DetectionDistiller"
    family: str = ""  # what the error naming another method's option calls this method's options ("PCKA")
    default_weight: float = 1.0
    projector: str = "mismatched"
    distills: bool = True
    reads_logits: bool = False
    one_teacher = True

    @renamed_arguments(student_paths="feature_paths_s", teacher_paths="feature_paths_t")
    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        *,
        weight: float | None = None,
        levels: Sequence[int] | None = None,
        feature_paths_s: Sequence[str] | str | None = None,
        feature_paths_t: Sequence[str] | str | None = None,
    ) -> None:
        if self.projector not in PROJECTORS:
            raise ValueError(f"{type(self).__name__}.projector must be one of {PROJECTORS}, got {self.projector!r}")
        n_s, s_ch, s_default = detector_protocol(student, "student")
        n_t, t_ch, t_default = detector_protocol(teacher, "teacher")
        super().__init__(student, teacher, ce_weight=0.0)  # freezes the teacher; the detector computes its losses
        s_paths, t_paths = _paths(feature_paths_s, s_default), _paths(feature_paths_t, t_default)
        if not s_paths or not t_paths:
            raise ValueError("feature_paths_s / feature_paths_t: no feature paths (the detector has no feature_names)")
        self.feature_paths_s, self.feature_paths_t = s_paths, t_paths
        self._hooks_s = FeatureHooks(student, s_paths)  # resolves the paths: errors name a bad one now
        self._hooks_t = FeatureHooks(teacher, t_paths, detach=True)
        if feature_paths_s is None and feature_paths_t is None:
            s_shapes = [(s_ch,)] * n_s
            t_shapes = [(t_ch,)] * n_t
            if n_s != n_t:
                raise ValueError(
                    f"student and teacher must have the same number of FPN levels, got {n_s} and {n_t} (distil a "
                    "subset with feature_paths_s / feature_paths_t, or build both with the same levels)"
                )
        else:  # custom paths: learn the maps' count and channels from one dry forward
            s_shapes = self._probe_maps(student, self._hooks_s, "student")
            t_shapes = self._probe_maps(teacher, self._hooks_t, "teacher")
            if len(s_shapes) != len(t_shapes):
                raise ValueError(
                    f"feature_paths_s {s_paths} give {len(s_shapes)} feature maps, feature_paths_t {t_paths} give "
                    f"{len(t_shapes)}: they must pair up one to one"
                )
        n_s = len(s_shapes)
        self.levels = list(range(n_s)) if levels is None else [int(i) for i in levels]
        if not self.levels or any(not 0 <= i < n_s for i in self.levels):
            raise ValueError(f"levels must be non-empty indices in [0, {n_s}), got {levels}")
        self.weight = float(weight if weight is not None else self.default_weight)
        s_chs = [int(s_shapes[i][0]) for i in self.levels]
        t_chs = [int(t_shapes[i][0]) for i in self.levels]
        self.channels_differ = s_chs != t_chs
        wants = self.projector == "always" or (self.projector == "mismatched" and self.channels_differ)
        self.extra: PatchMimic | None = PatchMimic(s_chs, t_chs) if wants else None  # type: ignore[assignment]

    @property
    def method(self) -> str:
        """The name this distiller's class is registered as (``detection.method`` / ``distiller.name``)."""
        return distiller_name(type(self), DETECTION)

    @staticmethod
    @torch.no_grad()
    def _probe_maps(model: nn.Module, hooks: FeatureHooks, who: str, size: int = 128) -> list[tuple[int, ...]]:
        """(C, H, W) of the maps ``hooks`` capture on blank ``size``² images (features + head forward)."""
        in_ch = int(getattr(getattr(model, "backbone", None), "in_channels", 3))
        p = next(model.parameters(), None)
        # two images: GroupNorm refuses a batch of one 1x1 map (P7 of a 128-px image)
        x = torch.zeros(2, in_ch, size, size, device=p.device if p is not None else None)
        was = model.training
        model.eval()
        try:
            hooks.clear()
            model.head_outputs(model.features(x))
            return [tuple(m.shape[1:]) for m in hooked_maps(hooks, who)]
        finally:
            hooks.clear()
            model.train(was)

    def extra_parameters(self) -> list[nn.Module]:
        """The projector (a :class:`~ckakd.detection.distill.PatchMimic`) when there is one, else empty."""
        return [self.extra] if self.extra is not None else []

    def select_levels(
        self, f_s: Sequence[Tensor], f_t: Sequence[Tensor]
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """(student maps, detached teacher maps, projected student maps) of the distilled levels; the projected
        maps are the student's own when there is no projector."""
        s = [f_s[i] for i in self.levels]
        t = [f_t[i].detach() for i in self.levels]
        return s, t, self.extra(s) if self.extra is not None else s

    def distill_loss(
        self,
        f_s: Sequence[Tensor],
        f_t: Sequence[Tensor],
        s_cls: Sequence[Tensor] | None = None,
        t_cls: Sequence[Tensor] | None = None,
    ) -> dict[str, Tensor]:
        """The distillation term(s) on the selected levels of the hooked maps (B, C, H, W), e.g. ``{"distill":
        ...}``; methods with ``reads_logits`` also take the per-level cls logits (B, N_l, K) ``s_cls``, ``t_cls``."""
        return {}

    def forward_train(  # type: ignore[override]
        self, images: Tensor, targets: Sequence[dict[str, Tensor]], image_sizes: Sequence[tuple[int, int]] | None = None
    ) -> dict[str, Tensor]:
        """Student detection losses + the distillation loss on the hooked maps (teacher under ``no_grad``; its
        head runs only for the logit methods or when a teacher path lies in the head)."""
        assert self._hooks_s is not None and self._hooks_t is not None
        self._hooks_s.clear()
        self._hooks_t.clear()
        try:
            feats = self.student.features(images)
            outs = self.student.head_outputs(feats)
            losses = dict(self.student.compute_losses(outs, feats, images, targets))
            if not self.distills:
                return losses
            f_s = hooked_maps(self._hooks_s, "student")
            t_cls = None
            with torch.no_grad():
                t_feats = self.teacher.features(images)
                if self.reads_logits or any(p not in self._hooks_t.features for p in self.feature_paths_t):
                    t_outs = self.teacher.head_outputs(t_feats)
                    t_cls = t_outs.get("cls_logits") if self.reads_logits else None
            f_t = hooked_maps(self._hooks_t, "teacher")
            if len(f_s) != len(f_t):
                raise ValueError(f"student hooks gave {len(f_s)} feature maps, teacher hooks {len(f_t)}")
            if self.reads_logits and (t_cls is None or "cls_logits" not in outs):
                raise ValueError(
                    f"method={self.method!r} needs dense 'cls_logits' head outputs from both detectors "
                    "(RetinaNet / FCOS; a Faster R-CNN has none)"
                )
            s_cls = outs["cls_logits"] if t_cls is not None else None
            losses.update(self.distill_loss(f_s, f_t, s_cls, t_cls))
            return losses
        finally:  # do not keep this step's maps (and their graph) alive until the next one
            self._hooks_s.clear()
            self._hooks_t.clear()

    def forward(self, images: Tensor, targets: Any = None, image_sizes: Any = None) -> Any:  # type: ignore[override]
        """Training with ``targets``: :meth:`forward_train`; otherwise the student's detections."""
        if self.training and targets is not None:
            return self.forward_train(images, targets, image_sizes)
        return self.student(images, image_sizes=image_sizes)


def detection_methods() -> tuple[str, ...]:
    """The registered detection method names, in registration order."""
    return tuple(registered_distillers(DETECTION))


def detection_distiller(
    student: nn.Module, teacher: nn.Module, *, method: str = "pcka", **kwargs: Any
) -> DetectionDistiller:
    """Build the detection method registered as ``method`` with ``kwargs`` (``DetectionDistiller(...)`` calls this).

    ``ValueError`` for an unknown method and for an option of other methods only (e.g. PCKA's ``resize`` with
    ``method="kd_patch"``), ``TypeError`` for an argument no method takes.
    """
    methods = registered_distillers(DETECTION)
    if method not in methods:
        raise ValueError(f"method must be one of {tuple(methods)}, got {method!r}")
    cls = methods[method]
    renamed = getattr(cls.__init__, "renamed_arguments", {})  # old spellings: build_distiller warns
    unknown = sorted(set(kwargs) - set(distiller_arguments(cls)) - set(renamed))
    if unknown:
        owners = {name: c for name, c in methods.items() if set(unknown) & set(distiller_arguments(c))}
        if not owners:
            raise TypeError(f"{cls.__name__} got unexpected keyword argument(s) {unknown} (method={method!r})")
        families = " / ".join(dict.fromkeys(c.family for c in owners.values()))
        raise ValueError(
            f"{', '.join(unknown)}: {families} options ({', '.join(owners)}); method={method!r} takes none of them"
        )
    return build_distiller(method, student, teacher, task=DETECTION, **kwargs)  # type: ignore[return-value]
