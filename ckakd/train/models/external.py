"""Classifiers of timm and torchvision as zoo models: ``timm.<name>`` and ``torchvision.<name>``.

``create_external_model("timm.resnet18", num_classes=10, in_channels=3, **kwargs)`` calls
``timm.create_model("resnet18", num_classes=10, in_chans=3, pretrained=False, **kwargs)``;
``torchvision.<name>`` calls ``torchvision.models.get_model(name, num_classes=..., **kwargs)`` (no weights unless
``kwargs`` ask for them: ``pretrained=True`` / ``weights="DEFAULT"``, which download). The library is imported by
name when the model is built, never when ckakd is; a missing one is an ``ImportError`` naming it and the pip
command.

The model gets the zoo's ``stage_names`` (the dotted paths of its feature stages, the default hook points of the
feature distillers) where they are known: timm's ``feature_info`` modules (``act1``, ``layer1`` ... ``layer4`` for
a ResNet), torchvision's ``layer1`` ... ``layer4`` (ResNet, ResNeXt, Wide ResNet), ``features`` (VGG,
MobileNet, EfficientNet, ConvNeXt, DenseNet, ...) or ``trunk_output.block1`` ... (RegNet). Others have none: their
hook paths must then be given explicitly (``distiller.kwargs.student_layer`` / ``teacher_layer`` and friends).
"""

from __future__ import annotations

import difflib
from types import ModuleType
from typing import Any

import torch
from torch import nn

__all__ = ["EXTERNAL_PREFIXES", "create_external_model", "external_stage_names", "is_external", "library_of"]

EXTERNAL_PREFIXES = ("timm.", "torchvision.")


def is_external(name: object) -> bool:
    """Whether ``name`` names a timm / torchvision model (``timm.<name>``, ``torchvision.<name>``)."""
    return isinstance(name, str) and name.startswith(EXTERNAL_PREFIXES)


def library_of(name: str) -> tuple[str, str]:
    """``"timm.resnet18"`` -> ``("timm", "resnet18")``; ``ValueError`` for other names or an empty model name."""
    lib, _, arch = name.partition(".")
    if lib not in ("timm", "torchvision") or not arch:
        raise ValueError(f"{name!r} is not 'timm.<model>' or 'torchvision.<model>'")
    return lib, arch


def _import(lib: str, name: str) -> ModuleType:
    try:
        if lib == "timm":
            import timm

            return timm
        import torchvision

        return torchvision
    except Exception as exc:  # a wheel that does not import (a CUDA torchvision on a CPU torch) counts as missing
        how = (
            "pip install timm"
            if lib == "timm"
            else f"pip install torchvision matching your torch ({torch.__version__})"
        )
        raise ImportError(
            f"model {name!r} needs {lib}, which could not be imported ({type(exc).__name__}: {exc}); {how}"
        ) from exc


def _unknown(lib: str, arch: str, known: list[str]) -> ValueError:
    close = difflib.get_close_matches(arch, known, n=3, cutoff=0.6)
    hint = f" (did you mean {' or '.join(repr(f'{lib}.{c}') for c in close)}?)" if close else ""
    listing = "timm.list_models()" if lib == "timm" else "torchvision.models.list_models(torchvision.models)"
    return ValueError(f"{lib} has no model {arch!r}{hint}; {listing} lists them")


def external_stage_names(model: nn.Module) -> list[str] | None:
    """The feature stages of a timm / torchvision classifier (see the module docstring); ``None`` when unknown."""
    info = getattr(model, "feature_info", None)
    if isinstance(info, list | tuple) and info and all(isinstance(d, dict) and d.get("module") for d in info):
        paths = [str(d["module"]) for d in info]
    elif all(isinstance(getattr(model, f"layer{i}", None), nn.Module) for i in range(1, 5)):
        paths = [f"layer{i}" for i in range(1, 5)]
    elif isinstance(getattr(model, "trunk_output", None), nn.Module):
        paths = [f"trunk_output.{n}" for n, _ in model.trunk_output.named_children()]
    elif isinstance(getattr(model, "features", None), nn.Module):
        paths = ["features"]
    else:
        return None
    names = {n for n, _ in model.named_modules()}
    return paths if paths and all(p in names for p in paths) else None


def create_external_model(name: str, *, num_classes: int = 1000, in_channels: int = 3, **kwargs: Any) -> nn.Module:
    """Build ``timm.<arch>`` / ``torchvision.<arch>`` with ``num_classes`` outputs for ``in_channels``-channel
    images (timm: ``in_chans``; torchvision models take 3 channels only); ``kwargs`` go to the library's factory
    and may override the defaults (``pretrained``, ``weights``, ``drop_rate``, ...). Sets ``stage_names`` where
    known (:func:`external_stage_names`). Raises ``ImportError`` (library missing) or ``ValueError`` (unknown
    model, wrong arguments)."""
    lib, arch = library_of(name)
    module = _import(lib, name)
    if lib == "timm":
        is_model = getattr(module, "is_model", None)
        if callable(is_model) and not is_model(arch):
            raise _unknown(lib, arch, list(module.list_models()))
        args = {"num_classes": num_classes, "in_chans": in_channels, "pretrained": False, **kwargs}
        build = module.create_model
    else:
        known = list(module.models.list_models(module=module.models))
        if arch not in known:
            raise _unknown(lib, arch, known)
        if in_channels != 3:
            raise ValueError(
                f"torchvision classifiers take 3-channel images and the data has {in_channels}: use a 3-channel "
                f"dataset, or a timm model (timm.{arch} builds its stem for in_chans={in_channels})"
            )
        args = {"num_classes": num_classes, **kwargs}

        def build(arch: str, **kw: Any) -> nn.Module:
            return module.models.get_model(arch, **kw)

    try:
        model = build(arch, **args)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{lib} could not build {arch!r} with {args}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise ValueError(f"{lib} built a {type(model).__name__} for {arch!r}, not an nn.Module")
    if not getattr(model, "stage_names", None):
        stages = external_stage_names(model)
        if stages:
            model.stage_names = stages
    return model
