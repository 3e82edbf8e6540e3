"""The built-in datasets of ``data.name``, registered like a user's (:func:`register_dataset`): ``digits``
(scikit-learn's 8x8 digits, fixed split), ``cifar100`` (the python-pickle folder) and ``imagefolder``
(``root/train`` and ``root/val``, one folder per class: the ImageNet layout)."""

from __future__ import annotations

import pickle
from typing import Any

from .cifar import Cifar100Dataset
from .digits import load_digits_dataset
from .imagefolder import ImageFolderDataset
from .registry import DatasetError, DatasetSplits, register_dataset, require_root

__all__ = ["cifar100_splits", "digits_splits", "imagefolder_splits"]


def _no_kwargs(data: Any) -> None:
    if data.kwargs:
        raise DatasetError(f"data.kwargs: the built-in dataset {data.name!r} takes none, got {sorted(data.kwargs)}")


@register_dataset("digits")
def digits_splits(data: Any) -> DatasetSplits:
    """1,797 grey 8x8 digits, 10 classes, split by ``data.val_fraction`` (stratified; the split is fixed, seed 0,
    so that runs with different seeds see the same images)."""
    _no_kwargs(data)
    f = data.val_fraction
    train, val = load_digits_dataset("train", f, 0), load_digits_dataset("val", f, 0)
    return DatasetSplits(train, val, num_classes=10, channels=1, native_size=8, recipe="shift")


@register_dataset("cifar100")
def cifar100_splits(data: Any) -> DatasetSplits:
    """CIFAR-100 from ``data.root`` (``cifar-100-python/`` or its parent), 32x32 RGB, 100 classes."""
    _no_kwargs(data)
    root = require_root(data)
    try:
        train, val = Cifar100Dataset(root, train=True), Cifar100Dataset(root, train=False)
    except (FileNotFoundError, ValueError, pickle.UnpicklingError) as exc:
        raise DatasetError(
            f"data.root={str(root)!r} is not a CIFAR-100 python-pickle folder (expected files 'train', 'test' "
            f"and 'meta' as in cifar-100-python/): {exc}"
        ) from exc
    return DatasetSplits(train, val, num_classes=100, channels=3, native_size=32, recipe="crop_flip")


@register_dataset("imagefolder")
def imagefolder_splits(data: Any) -> DatasetSplits:
    """``data.root/train`` and ``data.root/val`` with the same class folders, RGB, the ImageNet recipe at 224."""
    _no_kwargs(data)
    root = require_root(data)
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise DatasetError(
                f"data.root={str(root)!r}: expected subfolders 'train' and 'val', each with one folder per "
                f"class; '{split}' is missing"
            )
    try:
        train, val = ImageFolderDataset(root / "train"), ImageFolderDataset(root / "val")
    except (FileNotFoundError, ValueError) as exc:
        raise DatasetError(f"data.root={str(root)!r}: {exc}") from exc
    if train.classes != val.classes:
        raise DatasetError(
            f"data.root={str(root)!r}: train has {len(train.classes)} classes and val {len(val.classes)}; "
            "their class folders must match"
        )
    return DatasetSplits(train, val, num_classes=len(train.classes), channels=3, native_size=224, recipe="resized_crop")
