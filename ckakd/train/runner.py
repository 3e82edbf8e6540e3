"""From a resolved :class:`~ckakd.train.config.Config` to a run: data, models, distiller, training loop.

Everything a run needs is built and checked *before* the first step (dataset folders and their format,
checkpoints against their models, hook paths, class counts, the WKD cost), so a bad config fails in
seconds with one message naming what is wrong. The CLI (``ckakd``) and the demo call these functions.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from . import data as D
from .config import Config
from .distillers import build_distiller
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
from .fileio import OutputError, probe_writable
from .hooks import FeatureHooks
from .models import create_model, list_models

__all__ = [
    "DataBundle",
    "build_data",
    "build_model",
    "build_teachers",
    "build_run_distiller",
    "build_train_views",
    "teacher_augments",
    "train_transform",
    "train_settings",
    "run_dir",
    "preflight",
    "check_run_resume",
    "train_teacher",
    "cached_train_teacher",
    "distill",
    "evaluate_checkpoint",
    "compute_interrelation",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ConfigError(ValueError):
    """A config that cannot run (raised before any training starts)."""


# ------------------------------------------------------------------------------------------------ data


@dataclass
class DataBundle:
    train: Dataset
    val: Dataset
    num_classes: int
    input_shape: tuple[int, int, int]  # (C, H, W) of the batches the models see
    train_transform: Any  # the student's (data.augment)
    val_transform: Any
    dataset: str = ""  # data.name
    native_size: int = 0  # the dataset's native image side (before data.image_size resizing)


def _check_root(cfg: Config) -> Path:
    root = cfg.data.root
    if not root:
        raise ConfigError(f"data.root is required for data.name={cfg.data.name!r} (the dataset folder)")
    path = Path(root).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"data.root: {path} is a file, not the dataset folder (data.name={cfg.data.name!r})")
    if not path.is_dir():
        raise ConfigError(f"data.root: folder not found: {path} (data.name={cfg.data.name!r})")
    return path


def build_data(cfg: Config) -> DataBundle:
    """Datasets and transforms for ``cfg.data``; raises :class:`ConfigError` on a missing or malformed folder."""
    d = cfg.data
    if d.name == "digits":
        # the split is fixed (seed 0) so that runs with different seeds see the same images
        train, val = D.load_digits_dataset("train", d.val_fraction, 0), D.load_digits_dataset("val", d.val_fraction, 0)
        native, channels, classes = 8, 1, 10
    elif d.name == "cifar100":
        root = _check_root(cfg)
        try:
            train, val = D.Cifar100Dataset(root, train=True), D.Cifar100Dataset(root, train=False)
        except (FileNotFoundError, ValueError, pickle.UnpicklingError) as exc:
            raise ConfigError(
                f"data.root={str(root)!r} is not a CIFAR-100 python-pickle folder (expected files 'train', 'test' "
                f"and 'meta' as in cifar-100-python/): {exc}"
            ) from exc
        native, channels, classes = 32, 3, 100
    elif d.name == "imagefolder":
        root = _check_root(cfg)
        for split in ("train", "val"):
            if not (root / split).is_dir():
                raise ConfigError(
                    f"data.root={str(root)!r}: expected subfolders 'train' and 'val', each with one folder per "
                    f"class; '{split}' is missing"
                )
        try:
            train, val = D.ImageFolderDataset(root / "train"), D.ImageFolderDataset(root / "val")
        except (FileNotFoundError, ValueError) as exc:
            raise ConfigError(f"data.root={str(root)!r}: {exc}") from exc
        if train.classes != val.classes:
            raise ConfigError(
                f"data.root={str(root)!r}: train has {len(train.classes)} classes and val {len(val.classes)}; "
                "their class folders must match"
            )
        native, channels, classes = 224, 3, len(train.classes)
    else:  # the config schema restricts the names; keep a clear message for hand-built configs
        raise ConfigError(f"data.name must be 'digits', 'cifar100' or 'imagefolder', got {d.name!r}")
    size = d.image_size or native
    train_t, val_t = _transforms(d.name, d.augment, size, native)
    return DataBundle(train, val, classes, (channels, size, size), train_t, val_t, d.name, native)


def _transforms(name: str, augment: str, size: int, native: int):
    """(train transform, val transform) as loader collate transforms (``None`` = identity).

    ``augment``: ``none``; ``weak`` = random crop (zero padding size/8) + horizontal flip; ``strong`` = that
    + RandAugmentLite + Cutout (ImageNet: random-resized crop instead of the padded crop). Digits are never
    flipped (a mirrored 2, 3, 5 or 7 is not that digit): their ``weak`` is a translation by at most one
    pixel (8x8: ``RandomCropFlip(8, padding=1, flip_p=0)``), their ``strong`` adds one RandAugment op at
    magnitude 5 and a 2x2 cutout.
    """
    if name == "imagefolder":  # the ImageNet recipe: random-resized crop + flip / resize + centre crop
        norm = D.Normalize(IMAGENET_MEAN, IMAGENET_STD)
        train = [D.RandomResizedCrop(size)]
        if augment == "strong":
            train += [D.RandAugmentLite(), D.Cutout(size // 2)]
        elif augment == "none":
            train = [D.Resize(round(size * 256 / 224)), D.CenterCrop(size)]
        return D.Compose([*train, norm]), D.Compose([D.Resize(round(size * 256 / 224)), D.CenterCrop(size), norm])
    resize = [D.Resize((size, size))] if size != native else []
    pad = max(size // 8, 1)
    flip_p = 0.0 if name == "digits" else 0.5
    if augment == "weak":
        train = D.Compose([*resize, D.RandomCropFlip(size, padding=pad, flip_p=flip_p)])
    elif augment == "strong" and name == "digits":
        # 8x8 digits: the CIFAR strength (2 ops at magnitude 9, a 4x4 cutout) erases the digit; one op at
        # magnitude 5 and a 2x2 cutout keep it readable
        strong = D.strong_augment(size, padding=pad, num_ops=1, magnitude=5.0, cutout=max(size // 4, 1), flip_p=0.0)
        train = D.Compose([*resize, *strong.transforms])
    elif augment == "strong":
        train = D.Compose([*resize, *D.strong_augment(size, padding=pad, flip_p=flip_p).transforms])
    else:
        train = D.Compose(resize) if resize else None
    return train, (D.Compose(resize) if resize else None)


# ---------------------------------------------------------------------------------------------- models


def _model_error(section: str, name: str | None) -> ConfigError:
    return ConfigError(f"{section}.name: unknown model {name!r}; registered models: {', '.join(list_models())}")


def build_model(name: str | None, kwargs: dict, num_classes: int, in_channels: int, *, section: str) -> nn.Module:
    """A registry model with the dataset's class count and channels (kwargs may override both)."""
    if not name or name not in list_models():
        raise _model_error(section, name)
    kw = {"num_classes": num_classes, "in_channels": in_channels, **dict(kwargs)}
    try:
        return create_model(name, **kw)
    except TypeError as exc:
        raise ConfigError(f"{section}.kwargs: {name} does not accept {sorted(kwargs)}: {exc}") from exc


def _load_weights(model: nn.Module, path: str, section: str) -> nn.Module:
    p = Path(path).expanduser()
    key = "--checkpoint" if section == "checkpoint" else f"{section}.checkpoint"
    if p.is_dir():
        raise ConfigError(f"{key}: {p} is a folder, not a checkpoint file")
    if not p.is_file():
        raise ConfigError(f"{key}: file not found: {p}")
    try:
        load_checkpoint(p, model)
    except ValueError as exc:
        fit = "model.name" if section == "checkpoint" else f"{section}.name"
        raise ConfigError(f"{key}={str(p)!r} does not fit {fit}: {exc}") from exc
    return model


def build_teachers(cfg: Config, bundle: DataBundle, *, require: bool = True) -> list[nn.Module]:
    """The trained teacher (``teacher``) plus any extra ``teachers``, weights loaded, in eval mode."""
    specs = []
    if cfg.teacher.name:
        specs.append(("teacher", cfg.teacher.name, cfg.teacher.kwargs, cfg.teacher.checkpoint))
    for i, t in enumerate(cfg.teachers):
        specs.append((f"teachers[{i}]", t.name, t.kwargs, t.checkpoint))
    if require and not specs:
        raise ConfigError(f"distiller {cfg.distiller.name!r} needs a teacher: set teacher.name and teacher.checkpoint")
    out = []
    for section, name, kwargs, ckpt in specs:
        if not ckpt:
            raise ConfigError(f"{section}.checkpoint is required (a checkpoint written by `ckakd train-teacher`)")
        model = build_model(name, kwargs, bundle.num_classes, bundle.input_shape[0], section=section)
        out.append(_load_weights(model, ckpt, section).eval())
    return out


def teacher_augments(cfg: Config) -> list[tuple[str, str | None]]:
    """``(section, augment)`` of every teacher, in :func:`build_teachers` order (``teacher`` first, then
    ``teachers[i]``): teacher ``i`` of the distiller reads the view ``"teacher{i}"``."""
    out: list[tuple[str, str | None]] = []
    if cfg.teacher.name:
        out.append(("teacher", cfg.teacher.augment))
    out += [(f"teachers[{i}]", t.augment) for i, t in enumerate(cfg.teachers)]
    return out


def train_transform(bundle: DataBundle, augment: str) -> Any:
    """The training transform of strength ``augment`` (``none|weak|strong``) for ``bundle``'s dataset and
    image size: the one ``data.augment`` selects for the student (``None`` = identity)."""
    if augment not in ("none", "weak", "strong"):
        raise ConfigError(f"augment must be 'none', 'weak' or 'strong', got {augment!r}")
    if not bundle.dataset or not bundle.native_size:
        raise ConfigError("the DataBundle does not record its dataset and native size: build it with build_data()")
    return _transforms(bundle.dataset, augment, bundle.input_shape[1], bundle.native_size)[0]


def build_train_views(cfg: Config, bundle: DataBundle) -> tuple[D.MultiView | None, list[str] | None]:
    """Per-model augmentation for ``ensemble_kd``: ``(MultiView train transform, EnsembleKD teacher_views)``.

    The views are ``"student"`` (``data.augment``) and ``"teacher{i}"`` for every teacher ``i`` whose
    ``augment`` is set, each drawn independently from the same source image; a teacher with
    ``augment: null`` reads the student's view. ``(None, None)`` when no teacher sets ``augment`` (a plain
    single-view loader). Raises :class:`ConfigError` when a teacher sets ``augment`` for another
    distiller, or ``distiller.kwargs.teacher_views`` is set as well.
    """
    augs = teacher_augments(cfg)
    set_by = [section for section, a in augs if a is not None]
    if not set_by:
        return None, None
    if cfg.distiller.name != "ensemble_kd":
        raise ConfigError(
            f"{', '.join(s + '.augment' for s in set_by)}: per-teacher augmentation is only used by distiller "
            f"'ensemble_kd', not {cfg.distiller.name!r}; drop it (set it to null)"
        )
    if "teacher_views" in cfg.distiller.kwargs:
        raise ConfigError(
            "distiller.kwargs.teacher_views cannot be combined with teacher(s).augment: the views are built from "
            "the augment settings; drop one of them"
        )
    views: dict[str, Any] = {"student": bundle.train_transform}
    teacher_views: list[str] = []
    for i, (_, aug) in enumerate(augs):
        if aug is None:
            teacher_views.append("student")
        else:
            views[f"teacher{i}"] = train_transform(bundle, aug)
            teacher_views.append(f"teacher{i}")
    return D.MultiView(views), teacher_views


def _load_cost(cfg: Config, num_classes: int) -> torch.Tensor | None:
    if cfg.distiller.name not in ("wkd_l", "wkd_lf"):
        return None
    if not cfg.distiller.cost:
        raise ConfigError(
            f"distiller.cost is required for {cfg.distiller.name!r}: the interrelation file of the teacher "
            "(`ckakd interrelation <config>` writes it)"
        )
    from ckakd.interrelation import cost_from_interrelation, load_interrelation

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
):
    """``build_distiller`` with the config's kwargs, the loaded WKD cost and the input shape;
    ``teacher_views`` (from :func:`build_train_views`) goes to ``ensemble_kd``."""
    kwargs = dict(cfg.distiller.kwargs)
    if teacher_views is not None:
        kwargs["teacher_views"] = list(teacher_views)
    cost = _load_cost(cfg, bundle.num_classes)
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


def _check_cka_pairs(cfg: Config, student: nn.Module, teacher: nn.Module | None) -> list[tuple[str, str]]:
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
    usable here, ``run.tensorboard`` has its package, ``run.out_dir/run.name`` can be written (rank 0 probes it;
    nothing stays) and holds no folder where an output file goes. Returns the run folder; raises
    :class:`ConfigError` naming the key."""
    try:
        check_device(cfg.run.device, "run.device")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if cfg.run.tensorboard:
        try:
            import tensorboard  # noqa: F401
        except ImportError as exc:
            raise ConfigError(
                f"run.tensorboard=true needs the `tensorboard` package ({exc}): pip install tensorboard, or set "
                "run.tensorboard=false"
            ) from None
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
    from . import distributed as dist

    try:
        check_resume(run_dir(cfg) / "latest.pt", settings, world_size=dist.env_world_size(), model=model)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def train_settings(cfg: Config, *, resume: bool, cka_pairs: Sequence[tuple[str, str]] = ()) -> TrainSettings:
    s, o, r, t = cfg.schedule, cfg.optim, cfg.run, cfg.train
    return TrainSettings(
        epochs=s.epochs,
        out_dir=run_dir(cfg),
        lr=o.lr,
        optimizer=o.name,
        momentum=o.momentum,
        weight_decay=o.weight_decay,
        nesterov=o.nesterov,
        schedule=s.kind,
        milestones=tuple(s.milestones),
        gamma=s.gamma,
        warmup_epochs=s.warmup_epochs,
        warmup_steps=s.warmup_steps,
        device=r.device,
        amp=r.amp,
        amp_dtype=r.amp_dtype,
        grad_clip=t.grad_clip,
        seed=r.seed,
        deterministic=r.deterministic,
        progress=r.progress,
        log_every=t.log_every,
        eval_every=t.eval_every,
        save_every=t.save_every,
        tensorboard=r.tensorboard,
        max_train_batches=cfg.data.max_train_batches,
        cka_pairs=tuple(cka_pairs),
        resume=resume,
        config=cfg.to_dict(),
    )


def _loaders(cfg: Config, bundle: DataBundle, train_transform: Any = None):
    """Seeded (train, val) loaders; under torchrun the Trainer swaps in distributed samplers itself.
    ``train_transform`` (e.g. a :class:`~ckakd.train.data.MultiView`) replaces the bundle's; validation
    batches are always plain tensors."""
    d = cfg.data
    t = bundle.train_transform if train_transform is None else train_transform
    train = D.make_loader(bundle.train, d.batch_size, True, cfg.run.seed, d.num_workers, d.drop_last, t)
    val_bs = max(d.batch_size, 256)
    val = D.make_loader(bundle.val, val_bs, False, cfg.run.seed, d.num_workers, False, bundle.val_transform)
    return train, val


def _save_config(cfg: Any) -> Path:
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
        _load_weights(model, cfg.model.checkpoint, "model")
    train, val = _loaders(cfg, bundle)
    settings = train_settings(cfg, resume=resume)
    check_run_resume(cfg, settings, model)
    out = _save_config(cfg)
    result = Trainer(model, train, val, settings, callbacks=callbacks).fit()
    return {**result, "out_dir": str(out)}


def cached_train_teacher(cfg: Config, *, retrain: bool = False) -> tuple[Path, float, bool]:
    """:func:`train_teacher`, unless ``run_dir(cfg)`` already holds ``best.pt`` from the same resolved config.

    Returns (``best.pt`` path, best val top-1 %, whether the cached run was reused).
    """
    import csv

    from .config import load_config

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
    with (tdir / "metrics.csv").open() as f:
        best = max((float(r["val/top1"]) for r in csv.DictReader(f) if r.get("val/top1")), default=float("nan"))
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
        _load_weights(student, cfg.model.checkpoint, "model")
    distiller = build_run_distiller(cfg, student, teachers, bundle, teacher_views=teacher_views)
    pairs = _check_cka_pairs(cfg, student, teachers[0] if teachers else None)
    train, val = _loaders(cfg, bundle, views)
    settings = train_settings(cfg, resume=resume, cka_pairs=pairs if teachers else ())
    check_run_resume(cfg, settings, distiller)
    out = _save_config(cfg)
    teacher_for_cka = teachers[0] if teachers else None
    result = Trainer(distiller, train, val, settings, teacher_for_cka=teacher_for_cka, callbacks=callbacks).fit()
    return {**result, "out_dir": str(out)}


def evaluate_checkpoint(cfg: Config, checkpoint: str | os.PathLike) -> dict:
    """Top-1/top-5/loss of ``cfg.model`` with the weights in ``checkpoint`` on the validation split."""
    bundle = build_data(cfg)
    model = build_model(cfg.model.name, cfg.model.kwargs, bundle.num_classes, bundle.input_shape[0], section="model")
    _load_weights(model, os.fspath(checkpoint), "checkpoint")
    _, val = _loaders(cfg, bundle)
    device = _device(cfg.run.device)
    return evaluate(model.to(device), val, device)


def _device(name: str) -> torch.device:
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
    from ckakd.interrelation import interrelation, interrelation_from_loader, save_interrelation

    bundle = build_data(cfg)
    (teacher,) = build_teachers(cfg, bundle)[:1]
    device = _device(cfg.run.device)
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
