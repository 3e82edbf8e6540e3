"""Input validation shared by the public functions: errors name the argument and its shape."""

from __future__ import annotations

import contextlib
import difflib
import functools
import inspect
import math
import numbers
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Literal, TypeVar

import torch
from torch import Tensor, nn


def check_float_tensor(name: str, t: object) -> Tensor:
    if t is None:
        raise TypeError(f"{name} must be a torch.Tensor, got None")
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must have a floating-point dtype, got {t.dtype} (shape {tuple(t.shape)})")
    return t


def check_bool(name: str, value: object) -> bool:
    """``value`` must be a Python (or numpy) bool; returns it as ``bool``."""
    if not isinstance(value, bool) and type(value).__name__ != "bool_":
        raise TypeError(f"{name} must be a bool (True or False), got {type(value).__name__} {value!r}")
    return bool(value)


def check_int(name: str, value: object, *, minimum: int | None = None) -> int:
    """``value`` must be an integer (bools are refused: ``iters=True`` is a mistake, not 1), >= ``minimum``."""
    if isinstance(value, bool) or type(value).__name__ == "bool_" or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value}")
    return value


def check_real(
    name: str, value: object, *, minimum: float | None = None, strict: bool = False, allow_inf: bool = False
) -> float:
    """``value`` must be a real number (bools and complex numbers refused), not NaN, finite unless
    ``allow_inf``, and >= ``minimum`` (> ``minimum`` when ``strict``). Returns it as ``float``.

    0-dim real floating or integer tensors are accepted (their value is read: one host sync) and returned
    as they are, so a weight that requires grad keeps its gradient.
    """
    if isinstance(value, Tensor) and value.dim() == 0 and not value.is_complex() and value.dtype != torch.bool:
        check_real(name, value.item(), minimum=minimum, strict=strict, allow_inf=allow_inf)
        return value  # type: ignore[return-value]
    if isinstance(value, bool) or type(value).__name__ == "bool_" or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if math.isnan(value) or (math.isinf(value) and not allow_inf):
        raise ValueError(f"{name} must be a finite number, got {value}")
    if minimum is not None and (value <= minimum if strict else value < minimum):
        raise ValueError(f"{name} must be {'>' if strict else '>='} {minimum}, got {value}")
    return value


def check_weight(name: str, value: object) -> float:
    """A loss weight: a finite real number >= 0."""
    return check_real(name, value, minimum=0.0)


def check_positive(name: str, value: object) -> float:
    """A finite real number > 0 (temperatures, regularization strengths, tolerances)."""
    return check_real(name, value, minimum=0.0, strict=True)


def check_choice(name: str, value: object, allowed: Sequence[str]) -> str:
    """``value`` must be one of the strings ``allowed``."""
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")
    return value


def check_int_pair(name: str, value: object) -> tuple[int, int]:
    """A positive int or a pair of positive ints (bools and floats refused) -> (a, b)."""
    is_int = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    pair = (value, value) if is_int else tuple(value) if isinstance(value, (tuple, list)) else ()
    if len(pair) != 2 or not all(
        isinstance(p, numbers.Integral) and not isinstance(p, bool) and type(p).__name__ != "bool_" and p >= 1
        for p in pair
    ):
        raise ValueError(f"{name} must be a positive int or a pair of positive ints, got {value!r}")
    return int(pair[0]), int(pair[1])


def check_labels(name: str, t: object, n: int, num_classes: int, device: torch.device, ref: str) -> Tensor:
    """Integer class labels (n,) in [0, num_classes) on ``device`` (bool, float and complex refused).

    ``ref`` names the tensor whose batch size n is matched (for the message).
    """
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be an integer tensor of class labels ({n},), got {type(t).__name__}")
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise TypeError(f"{name} must be an integer tensor of class labels ({n},), got dtype {t.dtype}")
    if t.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},) to match {ref}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"inputs must be on one device, got {ref} on {device}, {name} on {t.device}")
    # the range check is a host sync: done in eager mode, skipped while torch.compile traces
    if n and not torch.compiler.is_compiling() and bool(((t < 0) | (t >= num_classes)).any()):
        raise ValueError(f"{name} labels must be in [0, {num_classes}), got values outside ({name} of shape {(n,)})")
    return t


def check_logit_pair(
    name_s: str, s: object, name_t: str, t: object, *, batch: int | None = None, batch_of: str = "", k: str = "K"
) -> None:
    """Student and teacher logits: float tensors (B, K) of one shape on one device, B >= 1.

    ``batch``: the B they must have (``batch_of`` names where it comes from). A logit tensor of shape (K, B)
    is reported as a probable transpose. ``k``: the letter the messages use for the classes.
    """
    check_float_tensor(name_s, s)
    check_float_tensor(name_t, t)
    check_same_device(**{name_s: s, name_t: t})
    check_rank(name_s, s, (2,), f"(B, {k})")
    check_rank(name_t, t, (2,), f"(B, {k})")
    if batch is not None:
        for name, z in ((name_s, s), (name_t, t)):
            if z.shape[0] != batch:
                hint = ", did you pass the transpose?" if z.shape[1] == batch else ""
                raise ValueError(
                    f"{name} must have shape (B, {k}) with B={batch} (the batch size of {batch_of or 'the features'}), "
                    f"got {tuple(z.shape)}" + (f" = ({k}, B){hint}" if hint else "")
                )
    if s.shape != t.shape:
        hint = ""
        if s.shape == t.shape[::-1] and s.shape[0] != s.shape[1]:
            hint = f"; one of them is ({k}, B), did you pass the transpose of {name_s} or {name_t}?"
        raise ValueError(
            f"{name_s} and {name_t} must have the same shape (B, {k}), got {tuple(s.shape)} and {tuple(t.shape)}{hint}"
        )
    if s.shape[0] == 0:
        raise ValueError(f"{name_s} and {name_t} are an empty batch (shape {tuple(s.shape)}); B must be >= 1")
    if s.shape[1] == 0:
        raise ValueError(f"{name_s} and {name_t} have no classes (shape {tuple(s.shape)}); {k} must be >= 1")


def to_float_tensor(name: str, value: object) -> Tensor:
    """A tensor, or a numpy array / nested sequence converted with ``torch.as_tensor`` (integer and bool
    data become the default float dtype); refuses complex and non-numeric data."""
    if not isinstance(value, Tensor):
        try:
            value = torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError) as e:
            kind = type(value).__name__
            raise TypeError(f"{name} must be a tensor or an array-like of numbers, got {kind}: {e}") from None
    if value.is_complex():
        raise TypeError(f"{name} must be real, got dtype {value.dtype} (shape {tuple(value.shape)})")
    if not value.is_floating_point():
        value = value.to(torch.get_default_dtype())
    return value


@contextlib.contextmanager
def autocast_off(*tensors: Tensor) -> Iterator[None]:
    """Disable autocast for the devices of ``tensors`` (numerically sensitive parts run in the dtype their
    inputs were cast to, not in fp16/bf16)."""
    kinds = [k for k in dict.fromkeys(t.device.type for t in tensors) if k in ("cpu", "cuda", "xpu", "mps")]
    if not any(torch.is_autocast_enabled(k) for k in kinds):  # nothing to turn off (and no ExitStack to trace)
        yield
        return
    with contextlib.ExitStack() as stack:
        for kind in kinds:
            stack.enter_context(torch.autocast(device_type=kind, enabled=False))
        yield


def without_autocast(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator: run ``fn`` with autocast off on the devices of its tensor arguments (see ``autocast_off``)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        tensors = [t for t in (*args, *kwargs.values()) if isinstance(t, Tensor)]
        with autocast_off(*tensors):
            return fn(*args, **kwargs)

    return wrapper


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
    check_choice("mode", mode, allowed)


def check_min_samples(name: str, t: Tensor, n: int, mode: str, what: str = "samples (rows)") -> None:
    need = MIN_SAMPLES[mode]
    if n < need:
        raise ValueError(f"mode={mode!r} needs at least {need} {what}; {name} has shape {tuple(t.shape)} ({n} {what})")


def as_pairs(name_s: str, feats_s, name_t: str, feats_t) -> list[tuple[Tensor, Tensor]]:
    """Accept a tensor pair or two equal-length sequences of tensors; return a list of pairs."""
    for name, f in ((name_s, feats_s), (name_t, feats_t)):
        if not isinstance(f, (Tensor, Iterable)) or isinstance(f, (str, bytes)):
            raise TypeError(f"{name} must be a tensor or a sequence of tensors, got {type(f).__name__}")
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


def takes_keyword(fn: Callable, name: str) -> bool:
    """Whether calling ``fn(..., name=...)`` is accepted: ``fn``'s signature names ``name`` or takes ``**kwargs``
    (False when the signature cannot be read)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


Reduction = Literal["mean", "sum", "none"]
REDUCTIONS: tuple[str, ...] = ("mean", "sum", "none")


def check_reduction(reduction: object) -> str:
    """``reduction`` of a per-sample loss: "mean" (over the batch), "sum" or "none" (the (B,) values)."""
    return check_choice("reduction", reduction, REDUCTIONS)


def reduce_samples(per_sample: Tensor, reduction: str) -> Tensor:
    """(B,) per-sample losses -> their mean, their sum, or themselves (``reduction="none"``)."""
    if reduction == "none":
        return per_sample
    return per_sample.sum() if reduction == "sum" else per_sample.mean()


_Fn = TypeVar("_Fn", bound=Callable[..., Any])


def renamed_arguments(**old_to_new: str) -> Callable[[_Fn], _Fn]:
    """Decorator: keyword arguments renamed in the public API (``T=`` -> ``temperature=``) keep working, with a
    DeprecationWarning naming the new spelling; passing both is a ``TypeError``. The signature seen by
    ``inspect.signature`` is the new one; ``wrapper.renamed_arguments`` holds ``{old: new}``."""

    def decorate(fn: _Fn) -> _Fn:
        where = fn.__qualname__.removesuffix(".__init__")

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            for old, new in old_to_new.items():
                if old in kwargs:
                    if new in kwargs:
                        raise TypeError(f"{where}() got both {new!r} and its deprecated spelling {old!r}; pass {new!r}")
                    warnings.warn(
                        f"{where}: the argument {old!r} is deprecated, use {new!r}", DeprecationWarning, stacklevel=2
                    )
                    kwargs[new] = kwargs.pop(old)
            return fn(*args, **kwargs)

        wrapper.renamed_arguments = dict(old_to_new)  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]

    return decorate
