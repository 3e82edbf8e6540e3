"""Experiment loggers: TensorBoard (:class:`TensorBoardLogger`) and Weights & Biases (:class:`WandbLogger`), as trainer
callbacks (see :class:`~ckakd.train.engine.callbacks.TrainerCallback`).

Each logs, on rank 0 only: the run's config once (``on_fit_start``); every ``train.log_every`` optimizer steps the
batch's loss terms (``step/train/loss``, ``step/train/<term>``), the lr and the training throughput
(``step/train/images_per_s``) at the global step; after every epoch its metrics row (``lr``, ``train/*`` with every
loss term, ``val/*``: top-1 / top-5 or COCO AP, ``cka/*``, what callbacks returned, ``epoch_time_s``) and
``train/images_per_s``, at the epoch number (TensorBoard) or the global step with an ``epoch`` value (W&B).

The libraries are optional (``pip install "ckakd[tensorboard]"`` / ``"ckakd[wandb]"``): a logger's constructor
imports its library and raises ``ImportError`` (``name`` set to the missing module) before a run creates anything;
:func:`check_logger_packages` does the same for a run's settings, and :func:`loggers_for` builds the loggers that
``run.tensorboard`` / ``run.wandb`` ask for.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..fileio import OutputError, atomic_write_bytes

if TYPE_CHECKING:
    from .settings import RunConfig
    from .trainer import Trainer

__all__ = [
    "TensorBoardLogger",
    "WandbLogger",
    "WANDB_MODES",
    "check_logger_packages",
    "loggers_for",
    "run_hyperparameters",
]

WANDB_MODES = ("online", "offline", "disabled")
WANDB_ID_FILE = "wandb_run_id.txt"  # in the run folder: a resumed run continues the same W&B run


def summary_writer_class() -> type:
    """``torch.utils.tensorboard.SummaryWriter``; ``ImportError`` naming the ``[tensorboard]`` extra without it."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise ImportError(
            f'TensorBoard logging needs the tensorboard package ({exc}): pip install "ckakd[tensorboard]"',
            name="tensorboard",
        ) from exc
    return SummaryWriter


def wandb_module() -> Any:
    """The ``wandb`` module; ``ImportError`` naming the ``[wandb]`` extra without it."""
    try:
        import wandb
    except ImportError as exc:
        raise ImportError(
            f'Weights & Biases logging needs the wandb package ({exc}): pip install "ckakd[wandb]"', name="wandb"
        ) from exc
    return wandb


def check_logger_packages(run: RunConfig) -> None:
    """``ImportError`` (``name``: the missing module; the message names the setting and the extra) when
    ``run.tensorboard`` or a ``run.wandb.mode`` other than ``disabled`` asks for a library that does not import:
    called before a run builds or writes anything."""
    wants = []
    if run.tensorboard:
        wants.append(("run.tensorboard=true", "tensorboard", "run.tensorboard=false", summary_writer_class))
    if run.wandb.mode != "disabled":
        wants.append((f"run.wandb.mode={run.wandb.mode}", "wandb", "run.wandb.mode=disabled", wandb_module))
    for setting, package, off, probe in wants:
        try:
            probe()
        except ImportError as exc:
            cause = exc.__cause__ or exc
            raise ImportError(
                f'{setting} needs the `{package}` package ({cause}): pip install "ckakd[{package}]", or set {off}',
                name=package,
            ) from exc


def run_hyperparameters(trainer: Trainer) -> dict[str, Any]:
    """What a logger records as the run's config: the resolved config file (``settings.config``) when the run came
    from one, else the flat settings record (``TrainSettings.to_dict``)."""
    s = trainer.settings
    return dict(s.config) if s.config is not None else s.to_dict()


def numbers(values: Mapping[str, Any]) -> dict[str, float]:
    """The finite-or-not numeric entries of ``values`` (bools, strings and None dropped), as floats."""
    return {k: float(v) for k, v in values.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def flat(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optim.lr": 0.1, ...}`` from nested mappings; lists as their JSON text."""
    out: dict[str, Any] = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flat(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, list | tuple) else v
    return out


class TensorBoardLogger:
    """Scalars and the config to a TensorBoard event file in ``log_dir`` (default ``<run folder>/tensorboard``).

    Per epoch: ``add_scalar(tag, value, epoch)`` for each number of the metrics row (tags as the row's columns)
    and ``train/images_per_s``; per log step: ``step/<tag>`` at the global step; once: the config as text
    (``config``) and as TensorBoard hyper-parameters. ``log_steps=False``: epochs only."""

    def __init__(self, log_dir: str | os.PathLike | None = None, *, log_steps: bool = True) -> None:
        self._writer_class = summary_writer_class()
        self.log_dir = None if log_dir is None else Path(log_dir)
        self.log_steps = bool(log_steps)
        self.writer: Any = None

    def on_fit_start(self, trainer: Trainer) -> None:
        if not trainer.is_main:
            return
        log_dir = self.log_dir if self.log_dir is not None else trainer.out_dir / "tensorboard"
        self.writer = self._writer_class(log_dir=str(log_dir))
        config = run_hyperparameters(trainer)
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=2, default=str) + "\n```", 0)
        hparams = {k: v for k, v in flat(config).items() if isinstance(v, bool | int | float | str)}
        self.writer.add_hparams(hparams, {}, run_name=".")

    def on_train_step(self, trainer: Trainer, step: int, values: Mapping[str, float]) -> None:
        if self.writer is not None and self.log_steps:
            for k, v in numbers(values).items():
                self.writer.add_scalar(f"step/{k}", v, step)

    def on_epoch_logged(self, trainer: Trainer, epoch: int, values: Mapping[str, Any]) -> None:
        if self.writer is None:
            return
        for k, v in numbers(values).items():
            if k != "epoch":
                self.writer.add_scalar(k, v, epoch + 1)
        self.writer.flush()

    def on_fit_exit(self, trainer: Trainer, error: BaseException | None) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
            self.writer = None


class WandbLogger:
    """A Weights & Biases run: ``wandb.init(project, name, mode, dir, tags, entity, config=<the run's config>)``.

    ``mode``: ``"online"``, ``"offline"`` (written under ``dir``, upload later with ``wandb sync``) or
    ``"disabled"``; ``name``: default the run folder's name; ``dir``: default the run folder. The W&B run id is kept
    in ``<run folder>/wandb_run_id.txt``, so that a resumed training run continues the same W&B run. Per log step
    ``wandb.log({"step/<tag>": ...}, step=global_step)``; per epoch the metrics row, ``train/images_per_s`` and
    ``epoch`` at the global step. ``finish(exit_code=1)`` when training raised."""

    def __init__(
        self,
        project: str | None = None,
        name: str | None = None,
        *,
        mode: str = "online",
        dir: str | os.PathLike | None = None,
        tags: Sequence[str] = (),
        entity: str | None = None,
        log_steps: bool = True,
    ) -> None:
        if mode not in WANDB_MODES:
            raise ValueError(f"WandbLogger.mode: expected one of {', '.join(WANDB_MODES)}, got {mode!r}")
        if isinstance(tags, str) or not all(isinstance(t, str) for t in tags):
            raise ValueError(f"WandbLogger.tags: expected a list of strings, got {tags!r}")
        self._wandb = wandb_module()
        self.project, self.name, self.mode, self.entity = project, name, mode, entity
        self.dir = None if dir is None else Path(dir)
        self.tags, self.log_steps = list(tags), bool(log_steps)
        self.run: Any = None

    @classmethod
    def from_config(cls, wandb: Any) -> WandbLogger:
        """From a config's ``run.wandb`` section (project, name, mode, dir, tags, entity)."""
        return cls(
            wandb.project, wandb.name, mode=wandb.mode, dir=wandb.dir, tags=wandb.tags, entity=wandb.entity
        )  # fmt: skip

    def on_fit_start(self, trainer: Trainer) -> None:
        if not trainer.is_main:
            return
        out = trainer.out_dir
        run_dir = self.dir if self.dir is not None else out
        id_file = out / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if trainer.settings.resume and id_file.is_file() else None
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(run_dir, exc) from exc
        self.run = self._wandb.init(
            project=self.project,
            name=self.name or out.name,
            mode=self.mode,
            dir=str(run_dir),
            tags=self.tags,
            entity=self.entity,
            config=run_hyperparameters(trainer),
            id=run_id,
            resume="allow" if run_id else None,
        )
        new_id = getattr(self.run, "id", None)
        if isinstance(new_id, str) and new_id and new_id != run_id:
            atomic_write_bytes(id_file, new_id.encode())

    def on_train_step(self, trainer: Trainer, step: int, values: Mapping[str, float]) -> None:
        if self.run is not None and self.log_steps:
            self.run.log({f"step/{k}": v for k, v in numbers(values).items()}, step=step)

    def on_epoch_logged(self, trainer: Trainer, epoch: int, values: Mapping[str, Any]) -> None:
        if self.run is not None:
            self.run.log({**numbers(values), "epoch": epoch + 1}, step=trainer.global_step)

    def on_fit_exit(self, trainer: Trainer, error: BaseException | None) -> None:
        if self.run is not None:
            self.run.finish(exit_code=0 if error is None else 1)
            self.run = None


def loggers_for(run: RunConfig) -> list[Any]:
    """The loggers a run's settings ask for: a :class:`TensorBoardLogger` with ``run.tensorboard``, a
    :class:`WandbLogger` unless ``run.wandb.mode`` is ``disabled``."""
    out: list[Any] = []
    if run.tensorboard:
        out.append(TensorBoardLogger())
    if run.wandb.mode != "disabled":
        out.append(WandbLogger.from_config(run.wandb))
    return out
