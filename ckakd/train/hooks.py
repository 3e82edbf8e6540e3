"""Capture intermediate features with forward hooks on dotted module paths (no model rewrites)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from ckakd._checks import resolve_module

__all__ = ["FeatureHooks"]


def _detach(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, tuple | list):
        return type(value)(_detach(v) for v in value)
    if isinstance(value, dict):
        return {k: _detach(v) for k, v in value.items()}
    return value


class FeatureHooks:
    """Record the outputs of ``model``'s submodules named by ``paths`` (as in ``model.get_submodule``).

    After each forward of ``model``, ``.features`` maps every path whose module ran to its output, in the
    order of ``paths``. The store is cleared by a forward pre-hook on ``model``, so it always holds the
    latest forward only. Use as a context manager, or call :meth:`remove` when done.

    >>> hooks = FeatureHooks(model, model.stage_names)          # doctest: +SKIP
    >>> logits = model(x); feats = hooks.features               # doctest: +SKIP
    """

    def __init__(self, model: nn.Module, paths: Sequence[str], *, detach: bool = False) -> None:
        if isinstance(paths, str):
            paths = [paths]
        paths = list(paths)
        if len(set(paths)) != len(paths):
            dup = sorted({p for p in paths if paths.count(p) > 1})
            raise ValueError(f"duplicate feature paths: {dup}")
        modules = {}
        for path in paths:
            modules[path] = self._resolve(model, path)
        self.model = model
        self.paths: list[str] = paths
        self.detach = detach
        self._store: dict[str, Any] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = [model.register_forward_pre_hook(self._clear)]
        for path, module in modules.items():
            self._handles.append(module.register_forward_hook(self._make_hook(path)))

    @staticmethod
    def _resolve(model: nn.Module, path: str) -> nn.Module:
        if not isinstance(path, str):
            raise TypeError(f"feature paths must be strings, got {type(path).__name__}")
        return resolve_module(model, path)

    def _clear(self, module: nn.Module, args: Any) -> None:
        self._store.clear()

    def _make_hook(self, path: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            self._store[path] = _detach(output) if self.detach else output

        return hook

    @property
    def features(self) -> dict[str, Any]:
        """Outputs of the hooked modules from the latest forward, ordered as ``paths``."""
        return {p: self._store[p] for p in self.paths if p in self._store}

    def clear(self) -> None:
        self._store.clear()

    def remove(self) -> None:
        """Remove every hook this object registered (idempotent) and drop the stored features."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._store.clear()

    def __getitem__(self, path: str) -> Any:
        return self.features[path]

    def __enter__(self) -> FeatureHooks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"FeatureHooks({type(self.model).__name__}, paths={self.paths}, detach={self.detach})"
