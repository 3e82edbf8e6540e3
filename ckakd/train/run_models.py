"""The models of a classification run: the student and the teachers from the model zoo (or timm / torchvision)
with their checkpoints (:func:`build_model`, :func:`build_teachers`, :func:`load_weights`), the distiller with its
WKD cost (:func:`build_run_distiller`, :func:`load_cost`) and the CKA pairs a run logs (:func:`check_cka_pairs`).

Checkpoints are checked against their models and hook paths against the networks before anything trains. A
checkpoint is a ckakd one (loaded as it was written) or another codebase's state dict (:mod:`ckakd.train.state_dicts`:
wrappers, ``module.`` prefixes, ``key_map`` renames, a report of what loaded).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ckakd.interrelation import cost_from_interrelation, load_interrelation

from .config import Config, ConfigError, list_configs, load_config
from .distillers import build_distiller
from .engine import CHECKPOINT_FORMAT
from .engine.checkpoint import apply_weights
from .engine.metrics_log import log_message
from .hooks import FeatureHooks
from .models import create_model, list_models
from .models.external import is_external
from .run_data import DataBundle
from .state_dicts import LoadReport, load_external_state_dict

__all__ = [
    "build_model",
    "build_run_distiller",
    "build_teachers",
    "check_cka_pairs",
    "load_cost",
    "load_weights",
    "read_weights",
]


def _model_error(section: str, name: str | None) -> ConfigError:
    return ConfigError(
        f"{section}.name: unknown model {name!r}; registered models: {', '.join(list_models())} (or "
        "timm.<name> / torchvision.<name>, or one of yours registered with @ckakd.train.register_model)"
    )


def build_model(name: str | None, kwargs: dict, num_classes: int, in_channels: int, *, section: str) -> nn.Module:
    """A registry model, or ``timm.<name>`` / ``torchvision.<name>``, with the dataset's class count and channels
    (kwargs may override both)."""
    if is_external(name):
        kw = {"num_classes": num_classes, "in_channels": in_channels, **dict(kwargs)}
        try:
            return create_model(name, **kw)  # type: ignore[arg-type]
        except (ImportError, ValueError) as exc:
            raise ConfigError(f"{section}.name={name!r}: {exc}") from exc
    if not name or name not in list_models():
        raise _model_error(section, name)
    kw = {"num_classes": num_classes, "in_channels": in_channels, **dict(kwargs)}
    try:
        return create_model(name, **kw)
    except TypeError as exc:
        raise ConfigError(f"{section}.kwargs: {name} does not accept {sorted(kwargs)}: {exc}") from exc


def missing_teacher_hint(path: Path) -> str:
    """For a teacher checkpoint that does not exist: the command that writes it (the shipped teacher config whose
    ``run.out_dir/run.name/best.pt`` it is) and, when ``ckakd demo`` left its teacher next to it
    (``<runs>/demo/teacher/best.pt``), that one. ``""`` when neither is known."""
    hints: list[str] = []
    target = os.path.abspath(path)
    for name in list_configs():
        if "teacher" not in name.rsplit("/", 1)[-1]:
            continue
        try:
            run = load_config(name).run
        except Exception:  # a config of another task whose package is absent: no hint from it
            continue
        if os.path.abspath(Path(run.out_dir).expanduser() / run.name / "best.pt") == target:
            hints.append(f"train it with `ckakd train-teacher {name}`")
            break
    demo = path.parent.parent / "demo" / "teacher" / "best.pt"
    if demo.is_file():
        hints.append(f"or reuse the teacher `ckakd demo` trained: teacher.checkpoint={demo}")
    return "; " + " ".join(hints) if hints else ""


def read_weights(
    model: nn.Module, path: str | os.PathLike, section: str, *, key_map: Any = None, strict: bool = True
) -> LoadReport | None:
    """Load the weights in the file ``path`` into ``model``: a ckakd checkpoint (``key_map`` empty and ``strict``:
    exactly as written, ``None`` returned), or another codebase's state dict (plain, or in ``{"model": ...}`` /
    ``{"state_dict": ...}``; a ckakd checkpoint's student weights too when ``key_map`` / ``strict=False`` are
    given; a ``.safetensors`` file, with the safetensors package), renamed by ``key_map`` and checked key by key
    (:func:`~ckakd.train.state_dicts.load_external_state_dict`;
    its :class:`~ckakd.train.state_dicts.LoadReport` returned). :class:`ConfigError` naming ``section.checkpoint``
    (or ``section.key_map``) when the file is missing, unreadable or does not fit ``section.name``."""
    p = Path(path).expanduser()
    key = "--checkpoint" if section == "checkpoint" else f"{section}.checkpoint"
    fit = "model.name" if section == "checkpoint" else f"{section}.name"
    if p.is_dir():
        raise ConfigError(f"{key}: {p} is a folder, not a checkpoint file")
    if not p.is_file():
        hint = missing_teacher_hint(p) if section == "teacher" else ""
        raise ConfigError(f"{key}: file not found: {p}{hint}")
    if p.suffix == ".safetensors":  # what timm / Hugging Face hub models ship
        return _read_safetensors(model, p, key, fit, key_map=key_map, strict=strict)
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(
            f"{key}={str(p)!r} cannot be read as weights ({type(exc).__name__}: {exc}). Files that pickle other "
            "objects (an argparse.Namespace, numpy values) do not load with torch.load(weights_only=True); if you "
            "trust the file, save its state dict alone: python -c \"import torch; c = torch.load('in.pth', "
            "weights_only=False); torch.save(c['model'], 'out.pth')\""
        ) from exc
    ours = isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT
    try:
        if ours and not key_map and strict:
            apply_weights(obj, model, p)
            return None
        source = obj.get("student") if ours else obj
        return load_external_state_dict(model, source, key_map=key_map, strict=strict)
    except ValueError as exc:
        raise ConfigError(f"{key}={str(p)!r} does not fit {fit}: {exc}") from exc


def _read_safetensors(model: nn.Module, p: Path, key: str, fit: str, *, key_map: Any, strict: bool) -> LoadReport:
    try:
        from safetensors.torch import load_file
    except ImportError as exc:
        raise ConfigError(
            f"{key}={str(p)!r} is a .safetensors file, which needs safetensors: pip install safetensors"
        ) from exc
    try:
        state = load_file(str(p), device="cpu")
    except Exception as exc:
        raise ConfigError(f"{key}={str(p)!r} cannot be read as safetensors ({type(exc).__name__}: {exc})") from exc
    try:
        return load_external_state_dict(model, state, key_map=key_map, strict=strict)
    except ValueError as exc:
        raise ConfigError(f"{key}={str(p)!r} does not fit {fit}: {exc}") from exc


def load_weights(
    model: nn.Module,
    path: str | os.PathLike,
    section: str,
    *,
    key_map: Any = None,
    strict: bool = True,
    progress: bool = False,
) -> nn.Module:
    """:func:`read_weights`, its report logged (rank 0; ``progress``: through the progress bar); returns
    ``model``."""
    report = read_weights(model, path, section, key_map=key_map, strict=strict)
    if report is not None and int(os.environ.get("RANK", "0")) == 0:
        level = logging.INFO if report.fit.ok else logging.WARNING
        log_message(f"{section}.checkpoint: {report.text()}", level, progress=progress)
    return model


def build_teachers(cfg: Config, bundle: DataBundle, *, require: bool = True) -> list[nn.Module]:
    """The trained teacher (``teacher``) plus any extra ``teachers``, weights loaded, in eval mode."""
    specs: list[tuple[str, Any]] = [("teacher", cfg.teacher)] if cfg.teacher.name else []
    specs += [(f"teachers[{i}]", t) for i, t in enumerate(cfg.teachers)]
    if require and not specs:
        raise ConfigError(f"distiller {cfg.distiller.name!r} needs a teacher: set teacher.name and teacher.checkpoint")
    out = []
    for section, t in specs:
        if not t.checkpoint:
            raise ConfigError(
                f"{section}.checkpoint is required (a checkpoint written by `ckakd train-teacher`, or a state dict "
                f"of another codebase with {section}.key_map)"
            )
        model = build_model(t.name, t.kwargs, bundle.num_classes, bundle.input_shape[0], section=section)
        weights = {"key_map": t.key_map, "strict": t.strict, "progress": cfg.run.progress}
        out.append(load_weights(model, t.checkpoint, section, **weights).eval())
    return out


def load_cost(cfg: Any, num_classes: int) -> torch.Tensor | None:
    """The WKD category cost of ``wkd_l`` / ``wkd_lf`` from ``distiller.cost`` (``None`` for other distillers)."""
    if cfg.distiller.name not in ("wkd_l", "wkd_lf"):
        return None
    if not cfg.distiller.cost:
        raise ConfigError(
            f"distiller.cost is required for {cfg.distiller.name!r}: the interrelation file of the teacher "
            "(`ckakd interrelation <config>` writes it)"
        )
    path = Path(cfg.distiller.cost).expanduser()
    if path.is_dir():
        raise ConfigError(f"distiller.cost: {path} is a folder, not an interrelation file")
    if not path.is_file():
        raise ConfigError(f"distiller.cost: file not found: {path}")
    try:
        ir, _ = load_interrelation(path)
    except Exception as exc:  # a file of the wrong kind
        raise ConfigError(f"distiller.cost={str(path)!r} is not an interrelation file: {exc}") from exc
    if ir.shape[0] != num_classes:
        raise ConfigError(f"distiller.cost={str(path)!r} is for {ir.shape[0]} classes, the dataset has {num_classes}")
    return cost_from_interrelation(ir, sharpen=cfg.distiller.sharpen)


def build_run_distiller(
    cfg: Config,
    student: nn.Module,
    teachers: list[nn.Module],
    bundle: DataBundle,
    *,
    teacher_views: Sequence[str] | None = None,
) -> nn.Module:
    """``build_distiller`` with the config's kwargs, the loaded WKD cost and the input shape;
    ``teacher_views`` (from :func:`build_train_views`) goes to ``ensemble_kd``."""
    kwargs = dict(cfg.distiller.kwargs)
    if teacher_views is not None:
        kwargs["teacher_views"] = list(teacher_views)
    cost = load_cost(cfg, bundle.num_classes)
    if cost is not None:
        kwargs["cost"] = cost
    if cfg.train.global_gram and "global_batch" not in kwargs and cfg.distiller.name in ("fcka", "lcka", "rcka", "mmd"):
        kwargs["global_batch"] = True
    name = cfg.distiller.name
    teacher_arg: Any = teachers if name == "ensemble_kd" else (teachers[0] if teachers else None)
    try:
        return build_distiller(name, student, teacher_arg, input_shape=bundle.input_shape, **kwargs)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ConfigError(f"distiller ({name}): {exc}") from exc


def check_cka_pairs(cfg: Config, student: nn.Module, teacher: nn.Module | None) -> list[tuple[str, str]]:
    """``train.cka_pairs`` (empty: the last stages of student and teacher), every path checked on its model."""
    pairs = [tuple(p) for p in cfg.train.cka_pairs]
    if not pairs and teacher is not None:
        s_stages, t_stages = getattr(student, "stage_names", None), getattr(teacher, "stage_names", None)
        if s_stages and t_stages:
            pairs = [(s_stages[-1], t_stages[-1])]
    for s_path, t_path in pairs:
        for model, path, side in ((student, s_path, "student"), (teacher, t_path, "teacher")):
            if model is None:
                continue
            try:
                FeatureHooks(model, [path]).remove()
            except (KeyError, ValueError, AttributeError) as exc:
                raise ConfigError(f"train.cka_pairs: {side} path {path!r}: {exc}") from exc
    return pairs  # type: ignore[return-value]
