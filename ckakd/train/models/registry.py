"""Name -> factory registry for the model zoo."""

from __future__ import annotations

from collections.abc import Callable

import torch.nn as nn

__all__ = ["register_model", "create_model", "list_models", "unregister_model"]

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(
    name: str, *, overwrite: bool = False
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering ``factory`` under ``name``; ``create_model(name, **kw)`` then calls ``factory(**kw)``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"model name must be a non-empty string, got {name!r}")

    def deco(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if not callable(factory):
            raise TypeError(f"register_model({name!r}) expects a callable, got {type(factory).__name__}")
        if name in _REGISTRY and not overwrite:
            raise ValueError(f"model {name!r} is already registered (pass overwrite=True to replace it)")
        _REGISTRY[name] = factory
        return factory

    return deco


def unregister_model(name: str) -> None:
    """Remove ``name`` from the registry (KeyError-free: unknown names raise ValueError)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    del _REGISTRY[name]


def list_models() -> list[str]:
    """Sorted names of all registered models."""
    return sorted(_REGISTRY)


def create_model(name: str, **kwargs) -> nn.Module:
    """Build the model registered as ``name`` (e.g. ``create_model("resnet8x4", num_classes=10)``)."""
    try:
        factory = _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}") from None
    return factory(**kwargs)
