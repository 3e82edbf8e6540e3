"""Datasets, tensor augmentations and loaders for the reference trainer.

Everything works on float image tensors of shape (C, H, W) with values in [0, 1]; nothing here
downloads anything or depends on torchvision.

Modules, one job each: :mod:`~ckakd.train.data.digits` (scikit-learn's digits, fixed stratified split),
:mod:`~ckakd.train.data.cifar` (CIFAR-100 from the python-pickle folder), :mod:`~ckakd.train.data.imagefolder`
(class-per-subfolder images, the ImageNet layout), :mod:`~ckakd.train.data.transforms` (seeded tensor
augmentations, :class:`Compose`, :class:`MultiView`), :mod:`~ckakd.train.data.loaders` (seeded loaders) and
:mod:`~ckakd.train.data.registry` (the datasets ``data.name`` selects: :func:`register_dataset` for yours;
:mod:`~ckakd.train.data.builtin` registers the three above).
"""

from __future__ import annotations

from ckakd.train.data import builtin as builtin  # registers digits, cifar100, imagefolder
from ckakd.train.data.cifar import Cifar100Dataset
from ckakd.train.data.digits import load_digits_dataset
from ckakd.train.data.imagefolder import ImageFolderDataset
from ckakd.train.data.loaders import make_loader, seeded_loader
from ckakd.train.data.registry import (
    RECIPES,
    DatasetError,
    DatasetSplits,
    build_dataset,
    list_datasets,
    register_dataset,
    require_root,
    unregister_dataset,
)
from ckakd.train.data.transforms import (
    CenterCrop,
    Compose,
    Cutout,
    MultiView,
    Normalize,
    RandAugmentLite,
    RandomCropFlip,
    RandomResizedCrop,
    Resize,
    Transform,
    accepts_generator,
    call_transform,
    strong_augment,
    weak_augment,
)

__all__ = [
    "RECIPES",
    "Cifar100Dataset",
    "DatasetError",
    "DatasetSplits",
    "build_dataset",
    "list_datasets",
    "register_dataset",
    "require_root",
    "unregister_dataset",
    "CenterCrop",
    "Compose",
    "Cutout",
    "ImageFolderDataset",
    "MultiView",
    "RandAugmentLite",
    "RandomCropFlip",
    "RandomResizedCrop",
    "Resize",
    "Normalize",
    "load_digits_dataset",
    "make_loader",
    "strong_augment",
    "weak_augment",
    "seeded_loader",
    "Transform",
    "accepts_generator",
    "call_transform",
]
