"""Name -> factory registry for the model zoo, open to user code::

    @register_model("my_net")
    def my_net(num_classes: int = 100, in_channels: int = 3, **kw) -> nn.Module: ...

    # then model.name: my_net (or teacher.name) in a config, or create_model("my_net", num_classes=10)

``timm.<name>`` / ``torchvision.<name>`` are not registered but built by those libraries
(:mod:`~ckakd.train.models.external`); :func:`create_model` accepts them too.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn as nn

from .external import EXTERNAL_PREFIXES, create_external_model, is_external

__all__ = ["register_model", "create_model", "list_models", "unregister_model"]

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(
    name: str, *, overwrite: bool = False
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering ``factory`` under ``name``; ``create_model(name, **kw)`` then calls ``factory(**kw)``.

    The trainer calls ``factory(num_classes=<the dataset's>, in_channels=<its channels>, **model.kwargs)``; a model
    exposing ``stage_names`` (dotted paths of its feature stages) gets default hook points for the feature
    distillers. Names starting with ``timm.`` / ``torchvision.`` are reserved for those libraries.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"model name must be a non-empty string, got {name!r}")
    if is_external(name):
        raise ValueError(
            f"model name {name!r}: the prefixes {', '.join(EXTERNAL_PREFIXES)} name timm / torchvision models"
        )

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
    """Build the model registered as ``name`` (e.g. ``create_model("resnet8x4", num_classes=10)``), or a timm /
    torchvision classifier (``create_model("timm.resnet18", num_classes=10, in_channels=3)``, see
    :func:`~ckakd.train.models.external.create_external_model`)."""
    if is_external(name):
        return create_external_model(name, **kwargs)
    try:
        factory = _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}") from None
    return factory(**kwargs)
