"""The reference trainer as a Python API: distil your own teacher / student ``nn.Module`` pair on your own
``DataLoader`` (see the README's "Python training API").

``import ckakd.train`` loads the model zoo and the feature hooks only; every other name here is imported from its
home on first access (PEP 562):

* the loop: :class:`Trainer`, :class:`TrainSettings` (``TrainSettings.create(epochs, out_dir, lr=..., ...)``),
  :class:`TrainerCallback`, :class:`NonFiniteLossError`, the loggers :class:`TensorBoardLogger` /
  :class:`WandbLogger` (``ckakd.train.engine``);
* distillers: :class:`Distiller`, :class:`FeatureDistiller`, :func:`register_distiller` (a class decorator),
  :func:`build_distiller`, :func:`registered_distillers`, the shipped methods :class:`KD`, :class:`DKD`,
  :class:`RCKA`, ... (``ckakd.train.distillers``);
* models: :func:`register_model`, :func:`create_model`, :func:`list_models`; :class:`FeatureHooks`;
* data: :func:`make_loader`, :func:`seeded_loader`, :func:`register_dataset`, :func:`build_dataset`,
  :func:`list_datasets` (a builder returns :class:`DatasetSplits`), :func:`load_digits_dataset`,
  :class:`MultiView`, :func:`weak_augment`, :func:`strong_augment` (``ckakd.train.data``);
* config-driven runs: :func:`load_config`, :func:`train_teacher`, :func:`distill` (need pyyaml, the ``[train]``
  extra).
"""

from __future__ import annotations

import importlib as _importlib

from .hooks import FeatureHooks
from .models import create_model, list_models, register_model, unregister_model

# name -> the module that defines (or re-exports) it; imported on first access
_LAZY: dict[str, str] = {
    **dict.fromkeys(
        ("Trainer", "TrainSettings", "TrainerCallback", "NonFiniteLossError", "evaluate", "seed_everything"),
        "ckakd.train.engine",
    ),
    **dict.fromkeys(("TensorBoardLogger", "WandbLogger"), "ckakd.train.engine.loggers"),
    **dict.fromkeys(
        (
            "Distiller",
            "FeatureDistiller",
            "register_distiller",
            "build_distiller",
            "CEOnly",
            "KD",
            "LSKD",
            "DKD",
            "DIST",
            "FitNet",
            "AT",
            "FCKA",
            "LCKA",
            "RCKA",
            "PatchCKA",
            "MMD",
            "WKDLogit",
            "WKDFeature",
            "WKDLogitFeature",
            "EnsembleKD",
        ),
        "ckakd.train.distillers",
    ),  # fmt: skip
    **dict.fromkeys(
        (
            "make_loader",
            "seeded_loader",
            "register_dataset",
            "unregister_dataset",
            "DatasetSplits",
            "build_dataset",
            "list_datasets",
            "load_digits_dataset",
            "MultiView",
            "weak_augment",
            "strong_augment",
        ),
        "ckakd.train.data",
    ),  # fmt: skip
    **dict.fromkeys(("registered_distillers", "get_distiller"), "ckakd.train.distillers.registry"),
    "load_config": "ckakd.train.config",
    **dict.fromkeys(("train_teacher", "distill"), "ckakd.train.runner"),
}

__all__ = ["FeatureHooks", "create_model", "list_models", "register_model", "unregister_model", *_LAZY]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(_importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
