"""Helpers shared by the diagnostics modules: loader batches, devices, eval mode, model naming, layer lookup,
logit checks. Public names so the sibling modules can import them; not re-exported by the package."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from ckakd._checks import resolve_module

ENSEMBLE_NAME = "ens"
ENSEMBLE_REDUCERS = ("prob_mean", "logit_mean")
CAM_METHODS = ("cam", "gradcam")

ModelsArg = Mapping[str, nn.Module] | Sequence[nn.Module]
LayerArg = str | Mapping[str, str | None] | None


def split_batch(batch: Any) -> tuple[Tensor, Tensor]:
    """``(x, y, ...)`` tuples/lists or ``{"image"|"x": ..., "label"|"y": ...}`` dicts -> ``(x, y)``."""
    if isinstance(batch, dict):
        x = batch.get("image", batch.get("x"))
        y = batch.get("label", batch.get("y"))
        if x is None or y is None:
            raise ValueError(f"dict batches need 'image'/'x' and 'label'/'y' keys, got {sorted(batch)}")
        return x, y
    if isinstance(batch, list | tuple) and len(batch) >= 2:
        return batch[0], batch[1]
    raise ValueError(f"the loader must yield (x, y) batches, got {type(batch).__name__}")


def check_max_batches(max_batches: int | None) -> None:
    if max_batches is not None and (isinstance(max_batches, bool) or int(max_batches) < 1):
        raise ValueError(f"max_batches must be None or an int >= 1, got {max_batches!r}")


def iter_batches(loader: Iterable, max_batches: int | None, what: str) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield ``(x (B, ...), y (B,))`` from ``loader`` (at most ``max_batches``); ``ValueError`` if none had samples."""
    check_max_batches(max_batches)
    seen = 0
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        x, y = split_batch(batch)
        if not isinstance(x, Tensor):
            raise ValueError(f"{what}: batch inputs must be tensors, got {type(x).__name__}")
        y = torch.as_tensor(y)
        if y.dim() != 1 or y.shape[0] != x.shape[0]:
            raise ValueError(
                f"{what}: labels must be (B,) class indices matching the inputs' batch size {x.shape[0]}, "
                f"got shape {tuple(y.shape)}"
            )
        if x.shape[0] == 0:
            continue
        seen += x.shape[0]
        yield x, y
    if seen == 0:
        raise ValueError(f"{what}: the loader yielded no samples (empty loader)")


def model_device(model: nn.Module) -> torch.device:
    t = next(iter(model.parameters()), None)
    if t is None:
        t = next(iter(model.buffers()), None)
    return t.device if t is not None else torch.device("cpu")


def device_for(model: nn.Module, device: str | torch.device | None) -> torch.device:
    return torch.device(device) if device is not None else model_device(model)


@contextlib.contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Put ``models`` in eval mode; restore every submodule's own ``training`` flag on exit."""
    saved = [(m, m.training) for model in models for m in model.modules()]
    try:
        for model in models:
            model.eval()
        yield
    finally:
        for m, mode in saved:
            m.training = mode


def named_models(models: ModelsArg, what: str, *, min_count: int = 1) -> dict[str, nn.Module]:
    """A Mapping is kept (names as given); a Sequence is named ``"M0", "M1", ...``."""
    if isinstance(models, nn.Module):
        raise ValueError(f"{what}: pass a mapping {{name: model}} or a sequence of models, not a single module")
    if isinstance(models, Mapping):
        named = {str(k): v for k, v in models.items()}
    elif isinstance(models, Sequence) and not isinstance(models, str):
        named = {f"M{i}": m for i, m in enumerate(models)}
    else:
        raise ValueError(f"{what}: models must be a mapping {{name: nn.Module}} or a sequence, got {type(models)}")
    for name, m in named.items():
        if not isinstance(m, nn.Module):
            raise ValueError(f"{what}: model {name!r} must be an nn.Module, got {type(m).__name__}")
        if not name or name == ENSEMBLE_NAME:
            raise ValueError(f"{what}: model name {name!r} is reserved or empty (the ensemble is {ENSEMBLE_NAME!r})")
    if len(named) < min_count:
        raise ValueError(f"{what}: needs at least {min_count} models, got {len(named)}")
    return named


def get_layer(model: nn.Module, path: str, role: str = "model") -> nn.Module:
    """``model.get_submodule(path)`` with a ``ValueError`` naming the path and listing available modules."""
    if not isinstance(path, str) or not path:
        raise ValueError(f"layer must be a non-empty dotted module path (str), got {path!r}")
    return resolve_module(model, path, what=f"the {role}")


def check_logits(out: Any, model: nn.Module, name: str, batch: int) -> Tensor:
    if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != batch:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(
            f"model {name!r} ({type(model).__name__}) must return logits of shape (B, num_classes) = ({batch}, K), "
            f"got {got}"
        )
    return out


def check_same_classes(logits: Mapping[str, Tensor]) -> int:
    widths = {name: int(z.shape[-1]) for name, z in logits.items()}
    if len(set(widths.values())) > 1:
        raise ValueError(f"class-count mismatch: the models predict different numbers of classes {widths}")
    return next(iter(widths.values()))


def check_logit_pair(a: Tensor, b: Tensor, names: tuple[str, str]) -> None:
    for n, t in zip(names, (a, b), strict=True):
        if not isinstance(t, Tensor) or t.dim() != 2 or not t.is_floating_point():
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{n} must be floating logits of shape (N, num_classes), got {got}")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"class-count mismatch: {names[0]} has {a.shape[1]} classes, {names[1]} has {b.shape[1]}")
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"{names[0]} and {names[1]} must hold the same N samples, got {a.shape[0]} and {b.shape[0]}")


def forward_logits(models: Mapping[str, nn.Module], x: Tensor, device: str | torch.device | None) -> dict[str, Tensor]:
    """``{name: logits (B, K) float64 on the CPU}`` for one batch (no grad)."""
    out = {}
    with torch.no_grad():
        for name, m in models.items():
            z = check_logits(m(x.to(device_for(m, device))), m, name, x.shape[0])
            out[name] = z.detach().double().cpu()
    check_same_classes(out)
    return out
