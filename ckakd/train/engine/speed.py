"""Execution options that change speed, not the method: channels-last memory format for the model and the 4-D
training inputs (:func:`channels_last`), ``torch.compile`` of the student (:func:`compile_student`, failures
raised as :class:`CompileError` by :func:`compiled_call`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

__all__ = ["CompileError", "channels_last", "compile_student", "compiled_call"]


class CompileError(RuntimeError):
    """``train.compile=true`` and ``torch.compile`` failed on the student: no silent fallback to eager."""


def channels_last(batch: Any) -> Any:
    """``batch`` with every 4-D floating tensor in channels-last memory format (inside tuples, lists and mappings;
    everything else as it is)."""
    if isinstance(batch, Tensor):
        if batch.dim() == 4 and batch.is_floating_point():
            return batch.contiguous(memory_format=torch.channels_last)
        return batch
    if isinstance(batch, Mapping):
        return {k: channels_last(v) for k, v in batch.items()}
    if isinstance(batch, tuple | list):
        return type(batch)(channels_last(v) for v in batch)
    return batch


def compile_student(student: nn.Module) -> None:
    """``torch.compile`` ``student`` in place (:meth:`torch.nn.Module.compile`: its state_dict keys, hooks and
    identity are kept); the compilation itself happens at the first forward."""
    if not hasattr(torch, "compile"):
        raise CompileError(f"train.compile=true needs torch.compile (torch {torch.__version__} has none)")
    student.compile()


def compiled_call(fn: Callable[..., Any], batch: Any, compiled: bool) -> Any:
    """``fn(batch)``; when ``compiled`` (``train.compile``), a ``torch.compile`` failure is raised as
    :class:`CompileError` naming the setting."""
    if not compiled:
        return fn(batch)
    try:
        return fn(batch)
    except torch._dynamo.exc.TorchDynamoException as exc:
        raise CompileError(
            f"train.compile=true: torch.compile failed on the student's forward ({type(exc).__name__}: "
            f"{str(exc).strip().splitlines()[0] if str(exc).strip() else exc!r}); set train.compile=false to train "
            "eagerly"
        ) from exc
