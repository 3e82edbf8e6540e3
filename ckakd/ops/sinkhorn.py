"""Batched entropic Sinkhorn with one shared cost: the dispatch point behind ``ckakd.sinkhorn`` and WKD-L.

Two modes, each an op with a C++ implementation (the extension ``ckakd._C``, csrc/) and a torch twin of the same
schema (for machines without the extension, or ``backend="torch"``), fake kernels and an autograd formula:

* fixed iterations (WKD's definition), ``ckakd::sinkhorn_fixed_forward`` / ``_backward``: ``ckakd.ops.sinkhorn_fixed``;
* converged, log domain, ``ckakd::sinkhorn_converged_forward`` and its gradients: ``ckakd.ops.sinkhorn_converged``.

Here: the entry of each mode for a resolved backend ("torch", "cpp" on CPU tensors, "cuda" on CUDA tensors; see
``ckakd.ops._backend.resolve_sinkhorn``), which picks the op and records the dispatch (``track_dispatch``).
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from ckakd.ops._backend import record_dispatch
from ckakd.ops.sinkhorn_converged import sinkhorn_converged_entropic
from ckakd.ops.sinkhorn_fixed import FixedOutputs

VALUES = ("transport", "entropic")  # what the converged mode returns: ⟨P*, C⟩, or with the entropy term


def sinkhorn_fixed(p: Tensor, q: Tensor, K: Tensor, KC: Tensor, u0: Tensor, iters: int, backend: str) -> FixedOutputs:
    """p, q, u0 (B, C); K = exp(-C/ε), KC = K∘C (C, C) -> (cost (B,), u_hist (T+1, B, C), v_hist, a_hist, b_hist
    (T, B, C), w (B, C)) on the resolved ``backend``; differentiable w.r.t. p, q, K and KC."""
    record_dispatch("sinkhorn_fixed_forward", backend)
    ops = torch.ops.ckakd
    forward = ops.sinkhorn_fixed_forward_torch if backend == "torch" else ops.sinkhorn_fixed_forward
    return tuple(forward(p, q, K, KC, u0, iters))


def sinkhorn_converged(
    p: Tensor, q: Tensor, cost: Tensor, eps: float, tol: float, max_iter: int, backend: str
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """p, q (B, C), cost (C, C) -> (transport ⟨P*, C⟩ (B,), entropic value (B,) (p's dtype), potentials f, g
    (B, C) and info [iterations, marginal error] (2,), float64) of the unit-mass problem, on the resolved
    ``backend``; both values differentiable w.r.t. p, q and the cost."""
    record_dispatch("sinkhorn_converged", backend)
    p64, q64, c64 = (t.double().contiguous() for t in (p, q, cost))
    ops = torch.ops.ckakd
    forward = ops.sinkhorn_converged_forward_torch if backend == "torch" else ops.sinkhorn_converged_forward
    transport, f, g, info = forward(p64, q64, c64, eps, tol, max_iter)
    entropic = sinkhorn_converged_entropic(p64, q64, c64, f, g, eps)
    return transport.to(p.dtype), entropic.to(p.dtype), f, g, info


def solve_converged(
    p: Tensor,
    q: Tensor,
    cost: Tensor,
    eps: float,
    tol: float,
    max_iter: int,
    backend: str,
    value: str,
    stacklevel: int = 2,
) -> Tensor:
    """The converged mode behind ``ckakd.sinkhorn(tol=...)``: p, q (B, C), cost (C, C) (may require grad) -> (B,),
    ``value`` "transport" (⟨P*, C⟩) or "entropic". Warns when ``max_iter`` ends before the marginal error is
    below ``tol`` (one host sync, outside ``torch.compile``; ``stacklevel`` as in ``warnings.warn``, 2: this
    function's caller)."""
    transport, entropic, _, _, info = sinkhorn_converged(p, q, cost, eps, tol, max_iter, backend)
    if p.shape[0] > 0 and not torch.compiler.is_compiling():
        iterations, error = info.tolist()
        if not error < tol:
            warnings.warn(
                f"ckakd.sinkhorn: not converged after max_iter={int(iterations)} iterations (column marginal L1 "
                f"error {error:.3g} >= tol={tol:g}, eps={eps:g}); raise max_iter, or tol",
                RuntimeWarning,
                stacklevel=stacklevel,
            )
    return transport if value == "transport" else entropic
