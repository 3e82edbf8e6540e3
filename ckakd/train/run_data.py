"""The data of a classification run: ``cfg.data`` as datasets and transforms (:func:`build_data`), the training
views of per-teacher augmentation (:func:`build_train_views`) and the seeded loaders (:func:`build_loaders`).

The dataset comes from the registry of ``data.name`` (:mod:`ckakd.train.data.registry`: the built-ins and any
registered with ``@register_dataset``). Folders and their format are checked there, so a bad ``data.root`` fails
in seconds with one message naming it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch.utils.data import Dataset

from . import data as D
from .config import Config, ConfigError

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DataBundle",
    "build_data",
    "build_loaders",
    "build_train_views",
    "teacher_augments",
    "train_transform",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class DataBundle:
    """The datasets of a run, their class count, the batch shape and the transforms (:func:`build_data`)."""

    train: Dataset
    val: Dataset
    num_classes: int
    input_shape: tuple[int, int, int]  # (C, H, W) of the batches the models see
    train_transform: Any  # the student's (data.augment)
    val_transform: Any
    dataset: str = ""  # data.name
    native_size: int = 0  # the dataset's native image side (before data.image_size resizing)
    recipe: str = ""  # the augmentation family (DatasetSplits.recipe)


def build_data(cfg: Config) -> DataBundle:
    """Datasets and transforms for ``cfg.data`` (the builder registered as ``data.name``); raises
    :class:`ConfigError` on an unknown name, a missing or malformed folder or a builder that fails."""
    d = cfg.data
    try:
        splits = D.build_dataset(d)
    except D.DatasetError as exc:
        raise ConfigError(str(exc)) from exc
    except (ValueError, TypeError, OSError, KeyError) as exc:  # a user's builder: name it
        raise ConfigError(f"data.name={d.name!r}: the dataset builder failed: {type(exc).__name__}: {exc}") from exc
    size = d.image_size or splits.native_size
    train_t, val_t = _transforms(splits.recipe, d.augment, size, splits.native_size)
    shape = (splits.channels, size, size)
    return DataBundle(
        splits.train, splits.val, splits.num_classes, shape, train_t, val_t, d.name, splits.native_size, splits.recipe
    )


def _transforms(recipe: str, augment: str, size: int, native: int):
    """(train transform, val transform) as loader collate transforms (``None`` = identity) of the augmentation
    ``recipe`` (:data:`~ckakd.train.data.RECIPES`).

    ``augment``: ``none``; ``weak`` = random crop (zero padding size/8) + horizontal flip; ``strong`` = that
    + RandAugmentLite + Cutout (``resized_crop``, the ImageNet recipe: random-resized crop instead of the padded
    crop). ``shift`` (digits) never flips (a mirrored 2, 3, 5 or 7 is not that digit): its ``weak`` is a
    translation by at most one pixel (8x8: ``RandomCropFlip(8, padding=1, flip_p=0)``), its ``strong`` adds one
    RandAugment op at magnitude 5 and a 2x2 cutout.
    """
    if recipe == "resized_crop":  # the ImageNet recipe: random-resized crop + flip / resize + centre crop
        norm = D.Normalize(IMAGENET_MEAN, IMAGENET_STD)
        train = [D.RandomResizedCrop(size)]
        if augment == "strong":
            train += [D.RandAugmentLite(), D.Cutout(size // 2)]
        elif augment == "none":
            train = [D.Resize(round(size * 256 / 224)), D.CenterCrop(size)]
        return D.Compose([*train, norm]), D.Compose([D.Resize(round(size * 256 / 224)), D.CenterCrop(size), norm])
    resize = [D.Resize((size, size))] if size != native else []
    pad = max(size // 8, 1)
    flip_p = 0.0 if recipe == "shift" else 0.5
    if augment == "weak":
        train = D.Compose([*resize, D.RandomCropFlip(size, padding=pad, flip_p=flip_p)])
    elif augment == "strong" and recipe == "shift":
        # 8x8 digits: the CIFAR strength (2 ops at magnitude 9, a 4x4 cutout) erases the digit; one op at
        # magnitude 5 and a 2x2 cutout keep it readable
        strong = D.strong_augment(size, padding=pad, num_ops=1, magnitude=5.0, cutout=max(size // 4, 1), flip_p=0.0)
        train = D.Compose([*resize, *strong.transforms])
    elif augment == "strong":
        train = D.Compose([*resize, *D.strong_augment(size, padding=pad, flip_p=flip_p).transforms])
    else:
        train = D.Compose(resize) if resize else None
    return train, (D.Compose(resize) if resize else None)


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
    if not bundle.dataset or not bundle.native_size or not bundle.recipe:
        raise ConfigError(
            "the DataBundle does not record its dataset, native size and recipe: build it with build_data()"
        )
    return _transforms(bundle.recipe, augment, bundle.input_shape[1], bundle.native_size)[0]


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


def build_loaders(cfg: Config, bundle: DataBundle, train_transform: Any = None) -> tuple[Any, Any]:
    """Seeded (train, val) loaders; under torchrun the Trainer swaps in distributed samplers itself.
    ``train_transform`` (e.g. a :class:`~ckakd.train.data.MultiView`) replaces the bundle's; validation
    batches are always plain tensors."""
    d = cfg.data
    t = bundle.train_transform if train_transform is None else train_transform
    train = D.make_loader(bundle.train, d.batch_size, True, cfg.run.seed, d.num_workers, d.drop_last, t)
    val_bs = max(d.batch_size, 256)
    val = D.make_loader(bundle.val, val_bs, False, cfg.run.seed, d.num_workers, False, bundle.val_transform)
    return train, val
