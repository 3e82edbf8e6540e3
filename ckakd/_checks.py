"""Input validation shared by the public functions: errors name the argument and its shape."""

from __future__ import annotations

import difflib
from collections.abc import Sequence

import torch
from torch import Tensor, nn


def check_float_tensor(name: str, t: object) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must have a floating-point dtype, got {t.dtype} (shape {tuple(t.shape)})")
    return t


def check_rank(name: str, t: Tensor, ranks: Sequence[int], expected: str, hint: str = "") -> None:
    if t.dim() not in ranks:
        msg = f"{name} must have shape {expected}, got {tuple(t.shape)}"
        raise ValueError(msg + (f"; {hint}" if hint else ""))


def check_same_device(**tensors: Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"inputs must be on one device, got {listing}")


def check_same_size(name_a: str, a: Tensor, name_b: str, b: Tensor, dims: Sequence[int], what: str) -> None:
    if any(a.shape[d] != b.shape[d] for d in dims):
        raise ValueError(f"{name_a} and {name_b} must have the same {what}, got {tuple(a.shape)} and {tuple(b.shape)}")


def check_feature_map_pair(f_s: object, f_t: object) -> None:
    """Student and teacher feature maps: float tensors of one shape (B, C, H, W) on one device."""
    check_float_tensor("f_s", f_s)
    check_float_tensor("f_t", f_t)
    check_same_device(f_s=f_s, f_t=f_t)
    check_rank("f_s", f_s, (4,), "(B, C, H, W)")
    check_rank("f_t", f_t, (4,), "(B, C, H, W)")
    if f_s.shape != f_t.shape:
        raise ValueError(
            f"f_s and f_t must have the same shape (B, C, H, W) (project the student first), "
            f"got {tuple(f_s.shape)} and {tuple(f_t.shape)}"
        )


MIN_SAMPLES = {"centered": 2, "debiased": 4, "uncentered": 1, "biased": 2, "unbiased": 4}


def check_mode(mode: str, allowed: Sequence[str]) -> None:
    if mode not in allowed:
        raise ValueError(f"mode must be one of {', '.join(map(repr, allowed))}; got {mode!r}")


def check_min_samples(name: str, t: Tensor, n: int, mode: str, what: str = "samples (rows)") -> None:
    need = MIN_SAMPLES[mode]
    if n < need:
        raise ValueError(f"mode={mode!r} needs at least {need} {what}; {name} has shape {tuple(t.shape)} ({n} {what})")


def as_pairs(name_s: str, feats_s, name_t: str, feats_t) -> list[tuple[Tensor, Tensor]]:
    """Accept a tensor pair or two equal-length sequences of tensors; return a list of pairs."""
    if isinstance(feats_s, Tensor) != isinstance(feats_t, Tensor):
        raise TypeError(f"{name_s} and {name_t} must both be tensors or both be sequences of tensors")
    if isinstance(feats_s, Tensor):
        return [(feats_s, feats_t)]
    feats_s, feats_t = list(feats_s), list(feats_t)
    if len(feats_s) != len(feats_t):
        raise ValueError(f"{name_s} has {len(feats_s)} tensors but {name_t} has {len(feats_t)}")
    if not feats_s:
        raise ValueError(f"{name_s} and {name_t} are empty")
    return list(zip(feats_s, feats_t, strict=True))


def accumulation_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (fp16/bf16 accumulate in fp32)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def module_names(model: nn.Module, limit: int = 15) -> list[str]:
    """Up to ``limit`` dotted submodule names of ``model``, shallowest first (for error messages)."""
    names = [n for n, _ in model.named_modules() if n]
    names.sort(key=lambda n: n.count("."))
    return names[:limit]


def resolve_module(model: nn.Module, path: str, *, what: str = "") -> nn.Module:
    """``model.get_submodule(path)``, or a ``ValueError`` naming the path, close matches and available modules.

    ``what`` prefixes the message (e.g. ``"feature_path_s: the student"``).
    """
    try:
        return model.get_submodule(path)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n]
        close = difflib.get_close_matches(path, names, n=3, cutoff=0.5)
        hint = f" (did you mean {close}?)" if close else ""
        prefix = f"{what} " if what else ""
        raise ValueError(
            f"{prefix}({type(model).__name__}) has no submodule {path!r}{hint}; available modules include "
            f"{module_names(model)}"
        ) from None
