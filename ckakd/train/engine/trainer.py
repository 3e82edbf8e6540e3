"""The reference trainer's loop, independent of any config format.

:class:`Trainer` trains either a :class:`~ckakd.train.distillers.Distiller` (anything with ``forward_train(x, y)
-> (logits, {name: loss})``; the total loss is the sum of the dict, the optimizer gets its
``learnable_parameters()``) or a plain classifier (cross-entropy, loss key ``"ce"``: teacher training).

Per epoch it reseeds the loaders from ``(seed, epoch)``, trains (AMP, gradient clipping and accumulation,
channels-last, ``torch.compile``, as set), evaluates, logs the teacher–student CKA of ``cka_pairs`` on a fixed
validation subset, appends a row to ``metrics.csv`` / ``metrics.jsonl`` (with what the ``callbacks`` return) and
writes ``latest.pt`` / ``best.pt`` atomically. Training batches may be multi-view (``({view: Tensor}, y)``, see
:class:`~ckakd.train.data.MultiView`). ``resume=True`` continues from ``out_dir/latest.pt`` (in deterministic mode
bitwise-identically to an uninterrupted run). Under ``torchrun`` (``WORLD_SIZE > 1``) it runs DDP; rank 0 writes.

What a batch is, how the training forward is called and how validation is scored is a *task*
(:class:`ClassificationTask` by default: ``(x, y)`` batches, top-1; the detection trainer passes
``ckakd.detection.task.DetectionTask``: ``(images, targets, sizes)`` batches, COCO AP). Everything else
(optimizer, schedule, warmup, AMP, clipping, DDP, checkpoints, resume, logs, plots, callbacks, CKA) is shared.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor
from torch.utils.data import DataLoader

from .. import distributed as dist
from ..fileio import OutputError
from ..schema import plain
from .callbacks import StepMeter, TrainerCallback, call_hook, check_callbacks, run_epoch_callbacks
from .checkpoint import check_resume, clone_cpu, extra_of, model_identity, restore_training, save_checkpoint, student_of
from .cka_probe import CKA_MAX_IMAGES, check_cka_paths, collect_images, measure_cka
from .curves import plot_curves
from .device import autocast, collective_device, resolve_device
from .loaders import distributed_loader, pin_for, reseed_loader, wrap_ddp
from .loggers import loggers_for
from .metrics_log import check_output_paths, fit_summary, log_message, logger, write_metrics_files
from .optim import accumulated_step, trainable_names, trainable_parameters
from .schedule import apply_step_warmup, build_optimizer, build_scheduler, step_scheduler
from .seeding import rng_state, seed_everything
from .settings import AMP_DTYPES, TrainSettings
from .speed import StudentCompiler, channels_last
from .task import ClassificationTask, Task, TrainStep, missing_task_members

__all__ = ["NonFiniteLossError", "Trainer", "TrainerCallback"]


def _call(fn: Any, batch: Any) -> Any:
    return fn(batch)


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN/inf: :meth:`Trainer.fit` stops; ``latest.pt`` holds the last good epoch."""


class Trainer:
    """Train ``model`` on ``train_loader``, evaluating on ``val_loader`` (see the module docstring).

    ``teacher_for_cka``: the network whose features the ``cka_pairs`` teacher paths refer to (default: the
    Distiller's first teacher, if any). Batches are ``(x, y)``, where the training ``x`` may also be a
    ``{view: Tensor}`` mapping (multi-view batches; the model must be a distiller that takes them); under DDP
    the loaders' per-rank batch size is kept and their samplers are replaced by distributed ones.
    ``callbacks``: objects with ``on_epoch_end(trainer, epoch)`` and/or ``on_fit_end(trainer)`` (see
    :class:`TrainerCallback`), called in order. ``task``: batches, training forward and validation (default
    :class:`ClassificationTask`; see there for the protocol).
    """

    def __init__(
        self,
        model: nn.Module,
        train_loader: DataLoader,
        val_loader: Iterable | None,
        settings: TrainSettings,
        *,
        teacher_for_cka: nn.Module | None = None,
        callbacks: Sequence[Any] = (),
        task: Task | None = None,
    ) -> None:
        self.task: Task = ClassificationTask() if task is None else task
        missing = missing_task_members(self.task)
        if missing:
            raise TypeError(f"task {type(self.task).__name__} lacks {missing} (see ClassificationTask)")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not isinstance(settings, TrainSettings):
            raise TypeError(f"settings must be a TrainSettings, got {type(settings).__name__}")
        self.callbacks: list[Any] = check_callbacks(callbacks)
        self.settings = s = settings
        self.out_dir = Path(s.out_dir)
        self.epoch: int | None = None  # the 0-based epoch running (or last run); None before fit()

        # --- processes, device, seeds
        device_hint = "cpu" if str(s.run.device) == "cpu" or not torch.cuda.is_available() else "cuda"
        self._owns_group = False
        if dist.env_world_size() > 1 and not dist.is_distributed():
            self._owns_group = dist.init_from_env("nccl" if device_hint == "cuda" else "gloo")
        self.distributed = dist.is_distributed() and dist.world_size() > 1
        self.rank, self.world_size = dist.rank(), dist.world_size()
        self.is_main = self.rank == 0
        self.device = resolve_device(s.run.device)
        if self.device.type == "cuda" and self.device.index is not None:
            torch.cuda.set_device(self.device)
        seed_everything(s.run.seed + self.rank, s.run.deterministic)

        # --- model, optimizer, schedule, AMP
        self.model = model.to(self.device)
        if s.train.channels_last:
            self.model = model.to(memory_format=torch.channels_last)
        self.student = student_of(model)
        self.compiler = StudentCompiler(self.student) if s.train.compile else None  # train.compile
        self.is_distiller = callable(getattr(model, "forward_train", None))
        self.params: list[nn.Parameter] = trainable_parameters(model)
        names = trainable_names(model, self.params) if s.optim.param_groups else None
        self.optimizer: torch.optim.Optimizer = build_optimizer(self.params, s, names)
        self.scheduler = build_scheduler(self.optimizer, s)
        use_scaler = bool(s.run.amp) and AMP_DTYPES[s.run.amp_dtype] == torch.float16
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=use_scaler)

        # --- loaders (pinned memory on a GPU)
        train_loader, val_loader = pin_for(train_loader, self.device), pin_for(val_loader, self.device)
        self.train_loader = self._distributed_loader(train_loader, train=True) if self.distributed else train_loader
        self.val_loader = (
            self._distributed_loader(val_loader, train=False)
            if self.distributed and val_loader is not None
            else val_loader
        )

        # --- the training forward (DDP-wrapped under torchrun)
        self._step_module: nn.Module = TrainStep(model, self.task)
        if self.distributed:
            self._step_module = wrap_ddp(self._step_module, self.device, s.find_unused_parameters)

        # --- CKA logging
        self.teacher_for_cka = teacher_for_cka
        if self.teacher_for_cka is None and s.train.cka_pairs and len(getattr(model, "teachers", ())) > 0:
            self.teacher_for_cka = model.teachers[0]
        self._cka_images: Tensor | None = None
        if s.train.cka_pairs:
            if self.teacher_for_cka is None:
                logger.warning("cka_pairs given but there is no teacher: teacher-student CKA is not logged")
            else:
                check_cka_paths(self.student, self.teacher_for_cka, s.train.cka_pairs)  # path errors now, not later
                self.teacher_for_cka.to(self.device).requires_grad_(False).eval()
                if val_loader is None:
                    raise ValueError("cka_pairs need a val_loader (CKA is measured on validation images)")
                if self.is_main:
                    self._cka_images = collect_images(val_loader, CKA_MAX_IMAGES, self.task)

        # --- loggers of run.tensorboard / run.wandb (their libraries import now: a missing one stops here)
        self.callbacks += loggers_for(s.run)

        self.history: list[dict] = []
        self.best_value: float | None = None  # best validation ``task.metric`` so far
        self.best_epoch: int | None = None
        self.start_epoch = 0
        self._pending: dict | None = None  # last good epoch's state when it was not written to latest.pt
        self._global_step = 0  # optimizer steps taken over the whole run (resumed ones included)
        self.images_per_s: float | None = None  # the last epoch's training throughput (all ranks)

    # ------------------------------------------------------------------ loaders

    def _distributed_loader(self, loader: Any, *, train: bool) -> Any:
        s = self.settings
        return distributed_loader(loader, train=train, world_size=self.world_size, rank=self.rank, seed=s.run.seed)

    def _reseed_loader(self, loader: Any, epoch: int) -> None:
        """Make epoch ``epoch``'s order and augmentations depend only on (seed, epoch[, rank])."""
        reseed_loader(loader, epoch, seed=self.settings.run.seed, rank=self.rank)

    @property
    def global_step(self) -> int:
        """Optimizer steps taken over the whole run (resumed ones included)."""
        return self._global_step

    @property
    def best_top1(self) -> float | None:
        """Best validation top-1 (classification; ``best_value`` of the task's metric in general)."""
        return self.best_value

    # ------------------------------------------------------------------ logging

    def _log(self, msg: str, level: int = logging.INFO) -> None:
        if self.is_main:
            log_message(msg, level, progress=self.settings.run.progress)

    # ------------------------------------------------------------------ CKA

    @torch.no_grad()
    def measure_cka(self) -> dict[str, float]:
        """``{"cka/<student path>~<teacher path>": CKA}`` on the fixed validation subset (rank 0 only)."""
        if self._cka_images is None or self.teacher_for_cka is None:
            return {}
        pairs = self.settings.train.cka_pairs
        return measure_cka(self.student, self.teacher_for_cka, self._cka_images, pairs, self.device)

    # ------------------------------------------------------------------ checkpoints

    def _payload(self) -> dict:
        """The full training state (collective under DDP: every rank's RNG state is gathered)."""
        rng = dist.all_gather_object(rng_state()) if self.distributed else [rng_state()]
        extra = extra_of(self.model)
        return {
            "epoch": len(self.history),
            "global_step": self._global_step,
            "student": self.student.state_dict(),
            "extra": extra.state_dict() if extra is not None else {},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "metric": self.task.metric,
            "best_value": self.best_value,
            "best_top1": self.best_value if self.task.metric == "top1" else None,
            "best_epoch": self.best_epoch,
            "history": plain(self.history),
            "rng": rng,
            "world_size": self.world_size,
            "model_identity": model_identity(self.model),
            "settings": self.settings.to_dict(),
            "config": plain(self.settings.config) if self.settings.config is not None else None,
            "torch_version": str(torch.__version__),
        }

    def _write(self, name: str, payload: dict) -> None:
        if self.is_main:
            save_checkpoint(self.out_dir / name, payload)

    def _resume(self) -> None:
        path = self.out_dir / "latest.pt"
        if not path.exists():
            self._log(f"resume: no checkpoint at {path}; starting from scratch", logging.WARNING)
            return
        ckpt = check_resume(path, self.settings, world_size=self.world_size, model=self.model)
        assert ckpt is not None
        metric, name = self.task.metric, self.settings.optim.name
        r = restore_training(
            ckpt, path, self.model, self.optimizer, self.scheduler, self.scaler, metric=metric, rank=self.rank,
            optimizer_name=name,
        )  # fmt: skip
        if r.metric_changed:
            msg = f"resume: {path} tracked best {ckpt.get('metric')!r}, this run tracks {metric!r}: best.pt restarts"
            self._log(msg, logging.WARNING)
        self.history, self.best_value, self.best_epoch = r.history, r.best_value, r.best_epoch
        self.start_epoch, self._global_step = r.start_epoch, r.global_step
        self._log(f"resumed from {path} after epoch {self.start_epoch}")

    # ------------------------------------------------------------------ metrics files

    def _write_metrics_files(self, *, rewrite: bool) -> None:
        if self.is_main:
            write_metrics_files(self.out_dir, self.history, rewrite=rewrite)

    def _plot(self) -> None:
        if not self.is_main or not self.history:
            return
        metric = self.task.metric
        pairs = self.settings.train.cka_pairs if self.teacher_for_cka is not None else []
        cka_keys = [f"cka/{s}~{t}" for s, t in pairs]
        title = f"{self.out_dir.name}: {type(self.model).__name__}, seed {self.settings.run.seed}"
        plot_curves(self.out_dir, self.history, metric, getattr(self.task, "metric_label", metric), cka_keys, title)

    # ------------------------------------------------------------------ training

    def _train_epoch(self, epoch: int) -> dict:
        s = self.settings
        every = s.train.log_every
        self._step_module.train()  # Distiller.train keeps the teachers in eval mode
        if callable(getattr(self.model, "set_epoch", None)):
            self.model.set_epoch(epoch, s.schedule.epochs)
        self._reseed_loader(self.train_loader, epoch)
        try:
            n_batches = len(self.train_loader)
        except TypeError:
            n_batches = None
        if s.max_train_batches is not None:
            n_batches = s.max_train_batches if n_batches is None else min(n_batches, s.max_train_batches)
        from tqdm.auto import tqdm

        bar = tqdm(
            total=n_batches,
            desc=f"epoch {epoch + 1}/{s.schedule.epochs}",
            leave=False,
            dynamic_ncols=True,
            disable=not (s.run.progress and self.is_main and sys.stderr.isatty()),  # else one line per epoch
        )
        term_sums: dict[str, list[float]] = {}  # name -> [sum of loss * batch size, samples where present]
        totals = [0.0, 0.0, 0.0]  # sum of total loss * batch size, correct top-1, samples
        hard_labels = True
        norms: list[float] = []
        meter = StepMeter(self)
        window = 0  # micro-batches whose gradients wait for the next optimizer step (train.accumulate)
        try:
            for step, batch in enumerate(self.train_loader):
                if s.max_train_batches is not None and step >= s.max_train_batches:
                    break
                batch = self.task.move(batch, self.device)
                if s.train.channels_last:
                    batch = channels_last(batch)
                boundary = window + 1 == s.train.accumulate or (n_batches is not None and step + 1 == n_batches)
                no_sync = self.distributed and not boundary  # DDP reduces the gradients at the window's end only
                with self._step_module.no_sync() if no_sync else contextlib.nullcontext():  # type: ignore[operator]
                    with autocast(self.device, s.run.amp, s.run.amp_dtype):
                        losses, counts = (self.compiler or _call)(self._step_module, batch)
                    if not losses:
                        raise ValueError(f"{type(self.model).__name__}.forward_train returned no losses")
                    names = list(losses)
                    total = sum(v.float() for v in losses.values())
                    vals = torch.stack([total.detach()] + [v.detach().float().reshape(()) for v in losses.values()])
                    vals_cpu = vals.cpu().double()
                    self._check_finite(vals_cpu, ["total", *names], epoch, step)
                    if window == 0:
                        self.optimizer.zero_grad(set_to_none=True)
                        self._apply_step_warmup()
                    self.scaler.scale(total).backward()
                window += 1
                if boundary:
                    self._optimizer_step(window, norms)
                    window = 0
                bs = int(counts["n"])
                hard_labels = hard_labels and "correct" in counts
                correct = float(counts["correct"]) if "correct" in counts else 0.0
                v = vals_cpu.tolist()
                totals[0] += v[0] * bs
                totals[1] += correct
                totals[2] += bs
                for name, val in zip(names, v[1:], strict=True):
                    acc = term_sums.setdefault(name, [0.0, 0.0])
                    acc[0] += val * bs
                    acc[1] += bs
                bar.update(1)
                meter.update(step, bs, names, v)
                running = {"loss": f"{totals[0] / totals[2]:.4f}"}
                if hard_labels:
                    running["acc"] = f"{100.0 * totals[1] / totals[2]:.1f}"
                if not bar.disable and (every <= 1 or step % every == 0):
                    bar.set_postfix(running)
                elif not s.run.progress and every > 0 and (step + 1) % every == 0 and self.is_main:
                    text = " ".join(f"{k} {v}" for k, v in running.items())
                    logger.info("epoch %d step %d: %s", epoch + 1, step + 1, text)
            if window:  # a loader shorter than its len(): the last window is stepped too
                self._optimizer_step(window, norms)
        finally:
            bar.close()
        names = list(term_sums)
        if self.distributed:  # the union of the ranks' loss names, in a common order
            names = []
            for rank_names in dist.all_gather_object(list(term_sums)):
                names += [n for n in rank_names if n not in names]
        vec = torch.tensor(totals + [x for n in names for x in term_sums.get(n, [0.0, 0.0])], dtype=torch.float64)
        if self.distributed:
            vec = dist.all_reduce_sum(vec.to(collective_device(self.device))).cpu()
        n = float(vec[2])
        if n == 0:
            raise ValueError(f"epoch {epoch + 1}: the training loader yielded no batches")
        self.images_per_s = meter.epoch_rate(n)
        out = {"train/loss": float(vec[0]) / n}
        for i, name in enumerate(names):
            term, count = float(vec[3 + 2 * i]), float(vec[4 + 2 * i])
            out[f"train/{name}"] = term / count if count > 0 else float("nan")
        if hard_labels:  # only when every batch reported top-1 hits (hard labels, classification)
            out["train/top1"] = 100.0 * float(vec[1]) / n
        if norms:
            out["train/grad_norm"] = float(np.mean(norms))
        return out

    def _optimizer_step(self, window: int, norms: list[float]) -> None:
        """One optimizer step on ``window`` micro-batches' gradients (see :func:`~.optim.accumulated_step`)."""
        s = self.settings
        norm = accumulated_step(self.optimizer, self.scaler, self.params, window, s.train.grad_clip)
        norms += [] if norm is None else [norm]
        self._global_step += 1
        if s.schedule.interval == "step":
            step_scheduler(self.scheduler, self.optimizer)

    def _apply_step_warmup(self) -> None:
        """``warmup_steps``: scale the scheduled lr by 0.1 -> 1 linearly over the first optimizer steps (see
        :func:`~ckakd.train.engine.schedule.apply_step_warmup`)."""
        apply_step_warmup(self.optimizer, self.scheduler, self._global_step, self.settings.schedule.warmup_steps)

    def _check_finite(self, vals: Tensor, names: list[str], epoch: int, step: int) -> None:
        bad_local = [n for n, v in zip(names, vals.tolist(), strict=True) if not math.isfinite(v)]
        n_bad = len(bad_local)
        if self.distributed:
            flag = torch.tensor([float(n_bad)], dtype=torch.float64, device=collective_device(self.device))
            n_bad = int(dist.all_reduce_sum(flag).item())
        if n_bad == 0:
            return
        terms = ", ".join(f"{n}={v}" for n, v in zip(names, vals.tolist(), strict=True) if not math.isfinite(v))
        where = f" on rank {self.rank}" if self.distributed else ""
        detail = f"non-finite terms{where}: {terms}" if bad_local else f"non-finite loss on another rank ({n_bad})"
        done = len(self.history)
        kept = f"{self.out_dir / 'latest.pt'} holds the last good epoch ({done})" if done else "no epoch completed"
        raise NonFiniteLossError(
            f"non-finite loss at epoch {epoch + 1}, step {step + 1} (global step {self._global_step + 1}): {detail}; "
            f"training stopped, {kept}"
        )

    def fit(self) -> dict:
        """Run the remaining epochs; returns ``metric`` (the task's), ``best_value``, ``best_epoch``, ``final_val``
        (the last epoch's ``val/*`` values, keys without the prefix), ``final_train_loss``, ``epochs_run``,
        ``epochs_completed``, ``train_time_s`` (over all epochs, resumed ones included), ``cka`` (last values),
        ``out_dir``; classification also ``best_top1``, ``final_top1``, ``final_top5``, ``final_val_loss``."""
        s = self.settings
        check_output_paths(self.out_dir)  # on every rank: all of them stop, before any training
        if self.is_main:
            try:
                self.out_dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise OutputError(self.out_dir, exc) from exc
        if s.resume:
            self._resume()
        elif self.is_main and (self.out_dir / "latest.pt").exists():
            self._log(f"{self.out_dir / 'latest.pt'} exists and resume=False: starting over", logging.WARNING)
        self._write_metrics_files(rewrite=True)
        epochs_run = 0
        try:
            call_hook(self.callbacks, "on_fit_start", self)
            for epoch in range(self.start_epoch, s.schedule.epochs):
                self._run_epoch(epoch)
                epochs_run += 1
        except BaseException as exc:
            if self._pending is not None:  # the last good epoch was not in latest.pt yet
                self._write("latest.pt", self._pending)
                self._pending = None
            call_hook(self.callbacks, "on_fit_exit", self, exc)
            raise
        if self._pending is not None:
            self._write("latest.pt", self._pending)
            self._pending = None
        self._plot()
        call_hook(self.callbacks, "on_fit_end", self)
        call_hook(self.callbacks, "on_fit_exit", self, None)
        result = fit_summary(self.history, self.task.metric, self.best_value, self.best_epoch, epochs_run, self.out_dir)
        if self._owns_group:
            dist.barrier()
            dist.cleanup()
        return result

    def _run_epoch(self, epoch: int) -> None:
        s = self.settings
        t0 = time.perf_counter()
        self.epoch = epoch
        lr = float(self.optimizer.param_groups[0]["lr"])
        train = self._train_epoch(epoch)
        if self.distributed:
            dist.broadcast_buffers(self.model)  # rank 0's BatchNorm statistics everywhere
        last_epoch = epoch + 1 == s.schedule.epochs
        val: dict | None = None
        if self.val_loader is not None and ((epoch + 1) % s.train.eval_every == 0 or last_epoch):
            val = self.task.evaluate(self.model, self.val_loader, self.device, amp=s.run.amp, amp_dtype=s.run.amp_dtype)
        cka = self.measure_cka()
        if s.schedule.interval == "epoch":
            step_scheduler(self.scheduler, self.optimizer, None if val is None else val.get(self.task.metric))
        row: dict[str, Any] = {"epoch": epoch + 1, "lr": lr, **train}
        if val is not None:
            row.update({f"val/{k}": v for k, v in val.items()})
        row.update(cka)
        extra = self._run_epoch_callbacks(epoch, row)
        row.update(extra)
        row["images_per_s"] = self.images_per_s  # training throughput (all ranks); a timing, like epoch_time_s
        row["epoch_time_s"] = time.perf_counter() - t0
        self.history.append(row)
        score = None if val is None else val.get(self.task.metric)
        improved = score is not None and (self.best_value is None or score > self.best_value)
        if improved:
            self.best_value, self.best_epoch = float(score), epoch + 1
        save_now = (epoch + 1) % s.train.save_every == 0 or last_epoch
        if improved or save_now or s.train.save_every > 1:
            payload = self._payload()
            if improved:
                self._write("best.pt", payload)
            if save_now:
                self._write("latest.pt", payload)
                self._pending = None
            elif self.is_main:
                self._pending = clone_cpu(payload)
        self._write_metrics_files(rewrite=False)
        if self.is_main:
            call_hook(self.callbacks, "on_epoch_logged", self, epoch, {**row, "train/images_per_s": self.images_per_s})
        msg = f"epoch {epoch + 1}/{s.schedule.epochs}  lr {lr:.4g}  loss {train['train/loss']:.4f}"
        if score is not None:
            msg += f"  val {self.task.metric} {score:.2f}"
        msg += "".join(f"  {k} {v:.3f}" for k, v in cka.items())
        msg += "".join(f"  {k} {v:.4g}" for k, v in extra.items() if v is not None)
        msg += f"  ({row['epoch_time_s']:.1f}s)"
        self._log(msg)

    def _run_epoch_callbacks(self, epoch: int, row: dict[str, Any]) -> dict[str, float | None]:
        """Call every callback's ``on_epoch_end``; their merged, checked values (see :class:`TrainerCallback`)."""
        return run_epoch_callbacks(self.callbacks, self, epoch, row)
