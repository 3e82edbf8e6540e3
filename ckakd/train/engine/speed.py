"""Execution options that change speed, not the method: channels-last memory format for the model and the 4-D
training inputs (:func:`channels_last`), ``torch.compile`` of the student (:class:`StudentCompiler`; a failure
is a :class:`CompileError`, never a silent fallback to eager)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

__all__ = ["COMPILE_BACKEND", "CompileError", "StudentCompiler", "channels_last"]


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


COMPILE_BACKEND: Any = "inductor"  # torch.compile's default backend


class StudentCompiler:
    """``torch.compile`` of ``student.forward`` (in place: the module, its state_dict keys and hooks stay; the
    compilation happens at the first forward). Calling it runs a training forward and raises :class:`CompileError`
    naming the setting when compilation fails, or when it compiled no graph at all (everything fell back to eager).
    ``graphs``: the number of graphs compiled so far."""

    def __init__(self, student: nn.Module) -> None:
        if not hasattr(torch, "compile"):
            raise CompileError(f"train.compile=true needs torch.compile (torch {torch.__version__} has none)")
        self.graphs = 0
        backend = torch._dynamo.lookup_backend(COMPILE_BACKEND)

        def counting(gm: Any, example_inputs: Any) -> Any:
            self.graphs += 1
            return backend(gm, example_inputs)

        # the instance's forward, not Module.compile(): that compiles _call_impl, which dynamo may skip silently
        student.forward = torch.compile(student.forward, backend=counting)
        self._name = type(student).__name__

    def __call__(self, fn: Callable[[Any], Any], batch: Any) -> Any:
        """``fn(batch)`` (the training forward that calls the student)."""
        try:
            out = fn(batch)
        except torch._dynamo.exc.TorchDynamoException as exc:
            first = " ".join([ln.strip() for ln in str(exc).splitlines() if ln.strip()][:2]) or repr(exc)
            raise CompileError(
                f"train.compile=true: torch.compile failed on the student's forward ({self._name}; "
                f"{type(exc).__name__}: {first}); set train.compile=false to train eagerly"
            ) from exc
        if self.graphs == 0:
            raise CompileError(
                f"train.compile=true: torch.compile compiled no graph of the student's forward ({self._name}): it "
                "would run eagerly; set train.compile=false"
            )
        return out
