"""All diagnostics in one pass (:func:`diagnose`) and the trainer callback running it every few epochs
(:class:`DiagnosticsCallback`), after Guo et al., "Why does Knowledge Distillation Work? Rethink its Attention
and Fidelity Mechanism"."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from ckakd.diagnostics._common import (
    CAM_METHODS,
    ENSEMBLE_NAME,
    ENSEMBLE_REDUCERS,
    LayerArg,
    check_logits,
    check_max_batches,
    check_same_classes,
    device_for,
    eval_mode,
    iter_batches,
    model_device,
    named_models,
)
from ckakd.diagnostics.attention import IoUAccumulator, attention_forward, attention_masks, iou_groups, layers_for
from ckakd.diagnostics.calibration import ECEAccumulator, check_bins
from ckakd.diagnostics.fidelity_measures import FidelityAccumulator, ensemble_logits, fidelity_pairs, pair_name
from ckakd.diagnostics.mutual_info import ConfusionAccumulator

__all__ = ["diagnose", "DiagnosticsCallback"]


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
        t_named = named_models(teachers, "diagnose", min_count=0)
    else:
        t_named = {f"T{i}": m for i, m in enumerate(named_models(list(teachers), "diagnose", min_count=0).values())}
    if not isinstance(student, nn.Module):
        raise ValueError(f"student must be an nn.Module, got {type(student).__name__}")
    if student_name in t_named or student_name == ENSEMBLE_NAME or not student_name:
        raise ValueError(f"student_name {student_name!r} clashes with a teacher name or the ensemble name")
    if any(t is student for t in t_named.values()):
        raise ValueError("the student cannot also be one of the teachers")
    if method not in CAM_METHODS:
        raise ValueError(f"method must be one of {CAM_METHODS}, got {method!r}")
    if ensemble is not None and ensemble not in ENSEMBLE_REDUCERS:
        raise ValueError(f"ensemble must be one of {ENSEMBLE_REDUCERS} or None, got {ensemble!r}")
    attention_masks(torch.zeros(1), threshold)
    check_bins(n_bins)
    named = {**t_named, student_name: student}
    t_names = list(t_named)
    pairs = fidelity_pairs(t_names, [student_name], ensemble)
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
        layers = layers_for(named, layer_arg)
        iou_acc = IoUAccumulator(iou_groups(list(named)))
    fid_acc = FidelityAccumulator(pairs) if fidelity and pairs else None
    conf: dict[tuple[str, str], ConfusionAccumulator] = {}
    eces = {n: ECEAccumulator(n_bins) for n in named} if ece else {}
    correct: dict[str, float] = {}
    n = 0
    with eval_mode(*named.values()):
        for x, y in iter_batches(loader, max_batches, "diagnose"):
            logits: dict[str, Tensor] = {}
            masks: dict[str, Tensor] = {}
            for name, m in named.items():
                xi = x.to(device_for(m, device))
                if iou_acc is not None:
                    z, maps = attention_forward(m, xi, layers[name], method)
                    masks[name] = attention_masks(maps, threshold).cpu()
                else:
                    with torch.no_grad():
                        z = m(xi)
                logits[name] = check_logits(z, m, name, x.shape[0]).detach().double().cpu()
            k = check_same_classes(logits)
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
        key = pair_name(a, b)
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
        if method not in CAM_METHODS:
            raise ValueError(f"method must be one of {CAM_METHODS}, got {method!r}")
        if ensemble is not None and ensemble not in ENSEMBLE_REDUCERS:
            raise ValueError(f"ensemble must be one of {ENSEMBLE_REDUCERS} or None, got {ensemble!r}")
        if loader is None:
            raise ValueError("DiagnosticsCallback needs a loader of (x, y) batches")
        check_max_batches(max_batches)
        attention_masks(torch.zeros(1), threshold)
        check_bins(n_bins)
        self.teachers: dict[str, nn.Module] | None = None
        if teachers is not None:
            if isinstance(teachers, Mapping):
                self.teachers = named_models(teachers, "DiagnosticsCallback", min_count=0)
            else:
                named = named_models(list(teachers), "DiagnosticsCallback", min_count=0)
                self.teachers = {f"T{i}": m for i, m in enumerate(named.values())}
            if iou:  # fail on bad teacher layer names now, not at the end of the first epoch
                layers_for(self.teachers, cam_layer_teacher)
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
        device = torch.device(getattr(trainer, "device", None) or model_device(student))
        teachers = self._teachers_of(model)
        for t in teachers.values():
            if model_device(t) != device:
                t.to(device)
        out = diagnose(teachers, student, self.loader, device=device, **self.kwargs)
        return {f"{self.prefix}{k}": float(v) for k, v in out.items()}
