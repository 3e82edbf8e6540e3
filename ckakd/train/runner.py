"""From a resolved :class:`~ckakd.train.config.Config` to a run: the training jobs (:func:`train_teacher`,
:func:`distill`, :func:`evaluate_checkpoint`, :func:`compute_interrelation`) and what every run shares: its folder
(:func:`run_dir`), the checks before anything is built (:func:`preflight`, :func:`check_run_resume`) and its
trainer settings (:func:`run_settings`).

Everything a run needs is built and checked *before* the first step (dataset folders and their format,
checkpoints against their models, hook paths, class counts, the WKD cost; :mod:`ckakd.train.run_data`,
:mod:`ckakd.train.run_models`), so a bad config fails in seconds with one message naming what is wrong. The CLI
(``ckakd``) and the demo call these functions.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ckakd.interrelation import interrelation, interrelation_from_loader, save_interrelation

from . import data as D
from . import distributed as dist
from .config import Config, ConfigError, load_config
from .engine import (
    Trainer,
    TrainSettings,
    check_device,
    check_output_paths,
    check_resume,
    evaluate,
    load_checkpoint,
    resolve_device,
    seed_everything,
)
from .engine.loggers import check_logger_packages
from .engine.metrics_log import read_metrics
from .fileio import OutputError, probe_writable
from .hooks import FeatureHooks
from .run_data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DataBundle,
    build_data,
    build_loaders,
    build_train_views,
    teacher_augments,
    train_transform,
)
from .run_models import (
    build_model,
    build_run_distiller,
    build_teachers,
    check_cka_pairs,
    load_cost,
    load_weights,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ConfigError",
    "DataBundle",
    "build_data",
    "build_loaders",
    "build_model",
    "build_teachers",
    "build_run_distiller",
    "build_train_views",
    "check_cka_pairs",
    "load_cost",
    "load_weights",
    "teacher_augments",
    "train_transform",
    "run_settings",
    "run_device",
    "run_dir",
    "preflight",
    "check_run_resume",
    "save_run_config",
    "train_teacher",
    "cached_train_teacher",
    "distill",
    "evaluate_checkpoint",
    "compute_interrelation",
]


# ------------------------------------------------------------------------------------------------ runs


def run_dir(cfg: Config) -> Path:
    """``run.out_dir/run.name``: where a run writes (``run.name`` cannot leave ``run.out_dir``)."""
    base = Path(cfg.run.out_dir).expanduser()
    out = base / cfg.run.name
    if os.path.commonpath([os.path.abspath(base), os.path.abspath(out)]) != os.path.abspath(base):
        raise ConfigError(f"run.name={cfg.run.name!r} would write outside run.out_dir={cfg.run.out_dir!r}")
    return out


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def preflight(cfg: Any) -> Path:
    """The checks of a training run that need no data or model, before anything is built: ``run.device`` is
    usable here, ``run.tensorboard`` / ``run.wandb`` have their packages,
    ``run.out_dir/run.name`` can be written (rank 0 probes it; nothing stays) and holds no folder where an output
    file goes. Returns the run folder; raises
    :class:`ConfigError` naming the key."""
    try:
        check_device(cfg.run.device, "run.device")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    try:
        check_logger_packages(cfg.run)
    except ImportError as exc:
        raise ConfigError(str(exc)) from None
    out = run_dir(cfg)
    if _rank() == 0:
        problem = probe_writable(out)
        if problem:
            raise ConfigError(f"run.out_dir={cfg.run.out_dir!r} (run folder {out}): {problem}")
    try:
        check_output_paths(out)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return out


def check_run_resume(cfg: Any, settings: TrainSettings, model: nn.Module | None = None) -> None:
    """With ``settings.resume``: refuse (``ConfigError``) to continue ``run_dir(cfg)/latest.pt`` with a config that
    differs from the checkpoint's outside the keys that may change on resume (see
    :func:`~ckakd.train.engine.check_resume`). Called before the run's ``config.yaml`` is rewritten."""
    if not settings.resume:
        return
    try:
        check_resume(run_dir(cfg) / "latest.pt", settings, world_size=dist.env_world_size(), model=model)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def run_settings(cfg: Any, *, resume: bool, cka_pairs: Sequence[tuple[str, str]] = ()) -> TrainSettings:
    """The :class:`~ckakd.train.engine.TrainSettings` of a run: the config's own ``run`` / ``optim`` / ``schedule``
    sections, its ``train`` section with ``cka_pairs`` resolved (the pairs the run logs), the run folder, the data
    section's ``max_train_batches`` and the resolved config (stored in the checkpoints)."""
    pairs = [tuple(p) for p in cka_pairs]
    train = cfg.train if pairs == [tuple(p) for p in cfg.train.cka_pairs] else replace(cfg.train, cka_pairs=pairs)
    return TrainSettings(
        out_dir=run_dir(cfg),
        run=cfg.run,
        optim=cfg.optim,
        schedule=cfg.schedule,
        train=train,
        max_train_batches=cfg.data.max_train_batches,
        resume=resume,
        config=cfg.to_dict(),
    )


def save_run_config(cfg: Any) -> Path:
    """Write the resolved config to ``run_dir(cfg)/config.yaml`` (rank 0 only); returns the run folder."""
    out = run_dir(cfg)
    if _rank() == 0:  # under torchrun only rank 0 writes (before the group exists)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(out, exc) from exc
        cfg.save(out / "config.yaml")
    return out


def train_teacher(cfg: Config, *, resume: bool = False, callbacks: Sequence[Any] = ()) -> dict:
    """Train ``cfg.model`` with cross-entropy (no distiller); checkpoints in ``run_dir(cfg)``. ``callbacks`` go
    to the :class:`~ckakd.train.engine.Trainer`."""
    preflight(cfg)
    bundle = build_data(cfg)
    seed_everything(cfg.run.seed, cfg.run.deterministic)
    model = build_model(cfg.model.name, cfg.model.kwargs, bundle.num_classes, bundle.input_shape[0], section="model")
    if cfg.model.checkpoint:
        m = cfg.model
        load_weights(model, m.checkpoint, "model", key_map=m.key_map, strict=m.strict, progress=cfg.run.progress)
    train, val = build_loaders(cfg, bundle)
    settings = run_settings(cfg, resume=resume)
    check_run_resume(cfg, settings, model)
    out = save_run_config(cfg)
    result = Trainer(model, train, val, settings, callbacks=callbacks).fit()
    return {**result, "out_dir": str(out)}


def cached_train_teacher(cfg: Config, *, retrain: bool = False) -> tuple[Path, float, bool]:
    """:func:`train_teacher`, unless ``run_dir(cfg)`` already holds ``best.pt`` from the same resolved config.

    Returns (``best.pt`` path, best val top-1 %, whether the cached run was reused).
    """
    tdir = run_dir(cfg)
    ckpt, saved = tdir / "best.pt", tdir / "config.yaml"
    reused = False
    latest = tdir / "latest.pt"
    if not retrain and ckpt.is_file() and saved.is_file() and latest.is_file():
        try:  # the same resolved config, and trained to the end (not an interrupted run)
            reused = load_config(saved).to_dict() == cfg.to_dict()
            reused = reused and int(load_checkpoint(latest).get("epoch", 0)) >= cfg.schedule.epochs
        except ValueError:
            reused = False
    if not reused:
        train_teacher(cfg)
    best = max((float(r["val/top1"]) for r in read_metrics(tdir) if r.get("val/top1")), default=float("nan"))
    return ckpt, best, reused


def distill(cfg: Config, *, resume: bool = False, callbacks: Sequence[Any] = (), baseline: bool = False) -> dict:
    """Distil ``cfg.teacher`` (+ ``cfg.teachers``) into ``cfg.model`` with ``cfg.distiller``.

    ``ensemble_kd`` with per-teacher ``augment`` trains on multi-view batches (:func:`build_train_views`).
    ``callbacks`` go to the :class:`~ckakd.train.engine.Trainer`. Distiller ``ce`` (the student alone, no
    teacher) is refused unless ``baseline=True`` (the CE row of a comparison, as the demo trains it).
    """
    if cfg.distiller.name == "ce" and not baseline:
        raise ConfigError(
            "distiller.name='ce' trains the student alone with cross-entropy (no teacher is used): `distill` needs a "
            "distillation method (e.g. distiller.name=kd with teacher.name and teacher.checkpoint); to train "
            "without a teacher use `ckakd train-teacher`"
        )
    preflight(cfg)
    bundle = build_data(cfg)
    views, teacher_views = build_train_views(cfg, bundle)
    seed_everything(cfg.run.seed, cfg.run.deterministic)
    needs_teacher = cfg.distiller.name != "ce"
    teachers = build_teachers(cfg, bundle, require=needs_teacher)
    student = build_model(cfg.model.name, cfg.model.kwargs, bundle.num_classes, bundle.input_shape[0], section="model")
    if cfg.model.checkpoint:
        m = cfg.model
        load_weights(student, m.checkpoint, "model", key_map=m.key_map, strict=m.strict, progress=cfg.run.progress)
    distiller = build_run_distiller(cfg, student, teachers, bundle, teacher_views=teacher_views)
    pairs = check_cka_pairs(cfg, student, teachers[0] if teachers else None)
    train, val = build_loaders(cfg, bundle, views)
    settings = run_settings(cfg, resume=resume, cka_pairs=pairs if teachers else ())
    check_run_resume(cfg, settings, distiller)
    out = save_run_config(cfg)
    teacher_for_cka = teachers[0] if teachers else None
    result = Trainer(distiller, train, val, settings, teacher_for_cka=teacher_for_cka, callbacks=callbacks).fit()
    return {**result, "out_dir": str(out)}


def evaluate_checkpoint(cfg: Config, checkpoint: str | os.PathLike) -> dict:
    """Top-1/top-5/loss of ``cfg.model`` with the weights in ``checkpoint`` (a ckakd checkpoint or another
    codebase's state dict, renamed by ``model.key_map``) on the validation split."""
    bundle = build_data(cfg)
    model = build_model(cfg.model.name, cfg.model.kwargs, bundle.num_classes, bundle.input_shape[0], section="model")
    load_weights(model, os.fspath(checkpoint), "checkpoint", key_map=cfg.model.key_map, strict=cfg.model.strict)
    _, val = build_loaders(cfg, bundle)
    device = run_device(cfg.run.device)
    return evaluate(model.to(device), val, device)


def run_device(name: str) -> torch.device:
    """``run.device`` as a torch device (:func:`~ckakd.train.engine.resolve_device`; ``auto``: CUDA when available);
    :class:`ConfigError` when unusable here."""
    try:
        return resolve_device(name, "run.device")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def compute_interrelation(
    cfg: Config,
    *,
    kernel: str = "cka",
    samples_per_class: int = 64,
    layer: str | None = None,
    sharpen: float | None = None,
    out: str | os.PathLike | None = None,
) -> Path:
    """The WKD interrelation of the trained teacher in ``cfg.teacher``, saved next to its checkpoint.

    Features: the teacher's last stage (``layer``, a dotted path, overrides), every spatial position a row
    (the public CIFAR code); ``kernel="cosine"`` uses the classifier weights instead. Returns the file path.
    """
    bundle = build_data(cfg)
    (teacher,) = build_teachers(cfg, bundle)[:1]
    device = run_device(cfg.run.device)
    teacher = teacher.to(device).eval()
    ckpt = Path(cfg.teacher.checkpoint).expanduser()  # type: ignore[arg-type]
    path = Path(out) if out is not None else ckpt.parent / f"interrelation_{kernel}.pt"
    if kernel == "cosine":
        head = getattr(teacher, "classifier", None)
        if not isinstance(head, nn.Linear):
            raise ConfigError("kernel='cosine' needs a teacher whose `classifier` attribute is an nn.Linear")
        ir = interrelation(head.weight.detach().float().cpu(), kernel="cosine")
    else:
        path_name = layer or (getattr(teacher, "stage_names", None) or [None])[-1]
        if path_name is None:
            raise ConfigError("the teacher has no `stage_names`: pass the feature layer as a dotted module path")
        val_loader = D.make_loader(bundle.train, 256, False, cfg.run.seed, 0, False, bundle.val_transform)
        with FeatureHooks(teacher, [path_name], detach=True) as hooks:

            def features(x: torch.Tensor) -> torch.Tensor:
                teacher(x)
                return hooks[path_name]

            ir = interrelation_from_loader(
                features,
                val_loader,
                bundle.num_classes,
                kernel=kernel,
                samples_per_class=samples_per_class,
                feature_layout="spatial",
                progress=cfg.run.progress,
                device=device,
            )
    meta: dict[str, Any] = {
        "teacher": cfg.teacher.name,
        "checkpoint": str(ckpt),
        "samples_per_class": samples_per_class,
    }
    if sharpen is not None:
        meta["sharpen"] = float(sharpen)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_interrelation(path, ir.cpu(), kernel=kernel, **meta)
    except OSError as exc:
        raise OutputError(path, exc) from exc
    return path
