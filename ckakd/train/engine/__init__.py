"""The reference trainer's loop, independent of any config format (see :mod:`ckakd.train.engine.trainer`).

One job per module: :mod:`.settings` (the run / optim / schedule / train sections and :class:`TrainSettings`),
:mod:`.seeding`, :mod:`.schedule` (optimizer, lr schedule, warmup), :mod:`.device`, :mod:`.checkpoint` (save/load,
resume checks), :mod:`.metrics_log` (metrics files, plots, progress), :mod:`.cka_probe`, :mod:`.task` (the
:class:`Task` protocol, :class:`ClassificationTask`, :func:`evaluate`), :mod:`.loaders` (DDP glue), :mod:`.callbacks`
and :mod:`.trainer` (:class:`Trainer`). Every name ``ckakd.train.engine`` had as a single module is still importable
from here (``__all__`` unchanged); so are :func:`autocast` (formerly the private ``_autocast``),
:func:`resolve_device` and :class:`Task`.
"""

from __future__ import annotations

# the single module's incidental imports, kept as attributes so that no name of ckakd.train.engine disappears
import copy  # noqa: F401
import csv  # noqa: F401
import dataclasses  # noqa: F401
import io  # noqa: F401
import json  # noqa: F401
import logging  # noqa: F401
import math  # noqa: F401
import os  # noqa: F401
import random  # noqa: F401
import time  # noqa: F401
from collections.abc import Iterable, Mapping, Sequence  # noqa: F401
from dataclasses import dataclass  # noqa: F401
from pathlib import Path  # noqa: F401
from typing import Any  # noqa: F401

import numpy as np  # noqa: F401
import torch  # noqa: F401
import torch.nn as nn  # noqa: F401
import torch.nn.functional as F  # noqa: F401
from torch import Tensor  # noqa: F401
from torch.utils.data import DataLoader, RandomSampler  # noqa: F401
from torch.utils.data.distributed import DistributedSampler  # noqa: F401

from .. import distributed as dist  # noqa: F401
from ..fileio import OutputError
from ..fileio import append_text as append_text
from ..fileio import atomic_write_bytes as atomic_write_bytes
from ..hooks import FeatureHooks as FeatureHooks
from .callbacks import TrainerCallback
from .checkpoint import CHECKPOINT_FORMAT, RESUME_MAY_CHANGE, check_resume, load_checkpoint, save_checkpoint
from .checkpoint import CONFIG_MAY_CHANGE as CONFIG_MAY_CHANGE
from .cka_probe import CKA_MAX_IMAGES as CKA_MAX_IMAGES
from .device import autocast as autocast
from .device import check_device
from .device import resolve_device as resolve_device
from .metrics_log import OUTPUT_FILES, check_output_paths
from .metrics_log import logger as logger
from .schedule import lr_at_epoch
from .seeding import epoch_seed, seed_everything
from .settings import TrainSettings
from .task import ClassificationTask, evaluate
from .task import Task as Task
from .trainer import NonFiniteLossError, Trainer

__all__ = [
    "CHECKPOINT_FORMAT",
    "ClassificationTask",
    "NonFiniteLossError",
    "TrainSettings",
    "TrainerCallback",
    "Trainer",
    "evaluate",
    "seed_everything",
    "lr_at_epoch",
    "epoch_seed",
    "save_checkpoint",
    "load_checkpoint",
    "OutputError",
    "RESUME_MAY_CHANGE",
    "OUTPUT_FILES",
    "check_device",
    "check_output_paths",
    "check_resume",
]
