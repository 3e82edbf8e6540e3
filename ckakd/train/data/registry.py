"""Name -> builder registry of the datasets a config's ``data.name`` selects, open to user code::

    @register_dataset("my_data")
    def my_data(data) -> DatasetSplits:          # data: the config's `data` section (root, kwargs, ...)
        return DatasetSplits(train=MyDataset(data.root, "train"), val=MyDataset(data.root, "val"),
                             num_classes=37, channels=3, native_size=64)

    # then data.name: my_data (data.kwargs: {...} reach the builder as data.kwargs)

Items of both splits are ``(image (C, H, W) float tensor, class index)``, images ``native_size`` square (or
resized to ``data.image_size`` by the transforms). ``recipe`` picks the training augmentation family that
``data.augment`` (none / weak / strong) scales: ``crop_flip`` (the CIFAR recipe: padded random crop + horizontal
flip), ``resized_crop`` (the ImageNet recipe: random-resized crop + flip, resize + centre crop and ImageNet
normalization for validation) or ``shift`` (crop without flips, for images a mirror changes: digits).
The built-in ``digits``, ``cifar100`` and ``imagefolder`` are registered through the same decorator
(:mod:`ckakd.train.data.builtin`).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

__all__ = [
    "RECIPES",
    "DatasetError",
    "DatasetSplits",
    "build_dataset",
    "dataset_name_check",
    "list_datasets",
    "register_dataset",
    "require_root",
    "unregister_dataset",
]

RECIPES = ("crop_flip", "resized_crop", "shift")

DatasetBuilder = Callable[[Any], "DatasetSplits"]
_REGISTRY: dict[str, DatasetBuilder] = {}


class DatasetError(ValueError):
    """A dataset that cannot be built from the ``data`` section (a missing folder, a wrong format); the message
    names the key."""


@dataclass
class DatasetSplits:
    """What a dataset builder returns: the two splits, the class count, the image channels and native side
    (``native_size`` pixels square), and the augmentation ``recipe`` (one of :data:`RECIPES`)."""

    train: Dataset
    val: Dataset
    num_classes: int
    channels: int
    native_size: int
    recipe: str = "crop_flip"


def register_dataset(name: str, *, overwrite: bool = False) -> Callable[[DatasetBuilder], DatasetBuilder]:
    """Decorator registering ``builder(data) -> DatasetSplits`` as ``data.name: <name>``."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"dataset name must be a non-empty string, got {name!r}")

    def deco(builder: DatasetBuilder) -> DatasetBuilder:
        if not callable(builder):
            raise TypeError(f"register_dataset({name!r}) expects a callable, got {type(builder).__name__}")
        if name in _REGISTRY and not overwrite:
            raise ValueError(f"dataset {name!r} is already registered (pass overwrite=True to replace it)")
        _REGISTRY[name] = builder
        return builder

    return deco


def unregister_dataset(name: str) -> None:
    """Remove ``name`` from the registry (``ValueError`` for an unknown name)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown dataset {name!r}; registered datasets: {', '.join(list_datasets())}")
    del _REGISTRY[name]


def list_datasets() -> list[str]:
    """Names of the registered datasets, in registration order (the built-ins first)."""
    return list(_REGISTRY)


def dataset_name_check(value: Any) -> str | None:
    """The schema check of ``data.name``: ``None`` for a registered dataset, else the error text."""
    if value in _REGISTRY:
        return None
    known = list_datasets()
    close = difflib.get_close_matches(str(value), known, n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return (
        f"expected one of {', '.join(repr(k) for k in known)}{hint} (the registered datasets; add yours with "
        "@ckakd.train.data.register_dataset)"
    )


def require_root(data: Any) -> Path:
    """``data.root`` as an existing folder; :class:`DatasetError` naming it otherwise."""
    root = data.root
    if not root:
        raise DatasetError(f"data.root is required for data.name={data.name!r} (the dataset folder)")
    path = Path(root).expanduser()
    if path.exists() and not path.is_dir():
        raise DatasetError(f"data.root: {path} is a file, not the dataset folder (data.name={data.name!r})")
    if not path.is_dir():
        raise DatasetError(f"data.root: folder not found: {path} (data.name={data.name!r})")
    return path


def _check_splits(name: str, splits: Any) -> DatasetSplits:
    where = f"the builder of data.name={name!r}"
    if not isinstance(splits, DatasetSplits):
        raise DatasetError(f"{where} returned {type(splits).__name__}, not a DatasetSplits")
    for attr in ("num_classes", "channels", "native_size"):
        v = getattr(splits, attr)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise DatasetError(f"{where}: DatasetSplits.{attr} must be a positive int, got {v!r}")
    if splits.num_classes < 2:
        raise DatasetError(
            f"{where}: DatasetSplits.num_classes must be >= 2 for classification, got {splits.num_classes}"
        )
    if splits.recipe not in RECIPES:
        raise DatasetError(f"{where}: DatasetSplits.recipe must be one of {', '.join(RECIPES)}, got {splits.recipe!r}")
    for split in ("train", "val"):
        ds = getattr(splits, split)
        if not hasattr(ds, "__getitem__") or not hasattr(ds, "__len__"):
            raise DatasetError(f"{where}: DatasetSplits.{split} must be a map-style Dataset (__getitem__, __len__)")
        if len(ds) == 0:
            raise DatasetError(f"{where}: the {split} split is empty")
    return splits


def build_dataset(data: Any) -> DatasetSplits:
    """The splits of the dataset ``data.name`` (``data``: the config's ``data`` section), checked.

    Raises :class:`DatasetError` naming the key for an unknown name, a bad folder or a builder returning
    something else than a usable :class:`DatasetSplits`.
    """
    problem = dataset_name_check(data.name)
    if problem:
        raise DatasetError(f"data.name: {problem}, got {data.name!r}")
    return _check_splits(data.name, _REGISTRY[data.name](data))
