"""How a result is compared with its float64 reference: per-dtype tolerances, :class:`Comparison` and
:func:`value_and_grad_check` (value and gradients of a weighted sum, the reference memoized per check)."""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "DTYPE_NAMES",
    "TOLERANCES",
    "Comparison",
    "clear_reference_cache",
    "compare",
    "forward_backward",
    "incoming_weights",
    "reference_scope",
    "value_and_grad_check",
]

# (atol, rtol) per dtype, the test-suite's: atol is relative to the largest reference magnitude.
TOLERANCES = {
    torch.float32: (1e-5, 5e-4),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (5e-3, 5e-2),
}
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}


@dataclass
class Comparison:
    """One tensor against its reference: max |a - e| and the allowed atol·scale + rtol·|e|."""

    what: str
    max_abs_err: float
    atol: float
    rtol: float
    scale: float
    ratio: float  # max over elements of |a - e| / (atol·scale + rtol·|e|); passes when <= 1

    @property
    def ok(self) -> bool:
        return self.ratio <= 1.0

    def tolerance(self) -> str:
        return f"atol {self.atol:.0e}x{self.scale:.3g} + rtol {self.rtol:.0e}"


def compare(
    what: str, actual: Tensor, expected: Tensor, dtype: torch.dtype, *, value: bool, rtol_mult: float = 1.0
) -> Comparison:
    """Compare ``actual`` with the float64 ``expected`` at ``dtype``'s tolerance.

    Values: atol relative to max(1, max |expected|); gradients: to max |expected| (as the tests do).
    Non-finite or mis-shaped results get an infinite ratio.
    """
    atol, rtol = TOLERANCES[dtype]
    rtol *= rtol_mult
    e = expected.detach().double().cpu()
    a = actual.detach().double().cpu() if actual is not None else None
    emax = e.abs().max().item() if e.numel() else 0.0
    scale = max(1.0, emax) if value else max(emax, 1e-30)
    if a is None or a.shape != e.shape:
        return Comparison(what, math.inf, atol, rtol, scale, math.inf)
    if a.numel() == 0:
        return Comparison(what, 0.0, atol, rtol, scale, 0.0)
    diff = (a - e).abs()
    if not bool(torch.isfinite(a).all()):
        return Comparison(what, math.inf, atol, rtol, scale, math.inf)
    allowed = atol * scale + rtol * e.abs()
    return Comparison(what, diff.max().item(), atol, rtol, scale, (diff / allowed).max().item())


def incoming_weights(out: Tensor, seed: int = 1234) -> Tensor:
    """Incoming gradient for ``out``: -1.7 for a scalar, fixed pseudo-random values otherwise (never all 1)."""
    if out.dim() == 0:
        return torch.full((), -1.7, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(out.shape, generator=gen, dtype=torch.float64)


def forward_backward(
    fn: Callable[..., Tensor], inputs: Sequence[Tensor], need_grad: Sequence[bool], weight: Tensor | None = None
) -> tuple[Tensor, list[Tensor | None], Tensor]:
    """``fn(*inputs)`` on fresh leaves, then backward of ``(out * weight).sum()`` (``weight``: the
    :func:`incoming_weights` of ``out`` by default); returns (out, the inputs' gradients or None, weight)."""
    leaves = [t.detach().clone().requires_grad_(bool(g)) for t, g in zip(inputs, need_grad, strict=True)]
    out = fn(*leaves)
    w = incoming_weights(out) if weight is None else weight
    if any(need_grad):
        (out * w.to(device=out.device, dtype=out.dtype)).sum().backward()
    return out.detach(), [t.grad if g else None for t, g in zip(leaves, need_grad, strict=True)], w


_REFERENCE_SCOPE: list[str] = []  # the running check's "op|case" (see reference_scope)
_REFERENCE_CACHE: dict[tuple, tuple[Tensor, list[Tensor | None]]] = {}


@contextlib.contextmanager
def reference_scope(key: str) -> Iterator[None]:
    """Within the block, :func:`value_and_grad_check` memoizes reference results under ``key`` (a check's
    ``"op|case"``) and the exact input values."""
    _REFERENCE_SCOPE.append(key)
    try:
        yield
    finally:
        _REFERENCE_SCOPE.pop()


def clear_reference_cache() -> None:
    """Forget the memoized reference results (they are shared within one run of the checks only)."""
    _REFERENCE_CACHE.clear()


def value_and_grad_check(
    fast: Callable[..., Tensor],
    ref: Callable[..., Tensor],
    inputs: Sequence[Tensor],
    need_grad: Sequence[bool],
    dtype: torch.dtype,
    names: Sequence[str],
    grad_rtol_mult: float = 1.0,
) -> list[Comparison]:
    """Value and gradients of ``fast(*inputs)`` against ``ref`` on float64 CPU copies of the same inputs.

    The reference result is memoized for the running check's op and case (:func:`reference_scope`) and the exact
    input values: the torch and Triton checks of one case share one (slow, Python-loop) reference computation.
    """
    out, grads, w = forward_backward(fast, inputs, need_grad)
    ref_inputs = [t.detach().double().cpu() for t in inputs]
    key = None
    if _REFERENCE_SCOPE:
        digest = hashlib.sha1()
        for t in (*ref_inputs, w):
            digest.update(str((tuple(t.shape), t.dtype)).encode())
            digest.update(t.contiguous().numpy().tobytes())
        key = (_REFERENCE_SCOPE[-1], tuple(need_grad), digest.hexdigest())
    if key is not None and key in _REFERENCE_CACHE:
        ref_out, ref_grads = _REFERENCE_CACHE[key]
    else:
        ref_out, ref_grads, _ = forward_backward(ref, ref_inputs, need_grad, weight=w)
        if key is not None:
            if len(_REFERENCE_CACHE) > 256:
                _REFERENCE_CACHE.clear()
            _REFERENCE_CACHE[key] = (ref_out, ref_grads)
    comps = [compare("value", out, ref_out, dtype, value=True)]
    needed = [i for i, need in enumerate(need_grad) if need]
    if len(names) != len(needed):
        raise ValueError(f"names must name the {len(needed)} inputs that need a gradient, got {list(names)}")
    for name, i in zip(names, needed, strict=True):
        comps.append(compare(f"grad {name}", grads[i], ref_grads[i], dtype, value=False, rtol_mult=grad_rtol_mult))
    return comps
