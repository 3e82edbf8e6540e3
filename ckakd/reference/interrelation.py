"""Float64 references of :mod:`ckakd.interrelation`: the (C, C) class interrelation with a Python
loop over class pairs and the WKD-L cost built from it element by element."""

from __future__ import annotations

import math
import statistics

import torch
from torch import Tensor

from ckakd.reference._common import as_dtype
from ckakd.reference.functional import centering_matrix, cka


def _pair_alignment(k: Tensor, l: Tensor) -> Tensor:
    """⟨HKH, HLH⟩ / (‖HKH‖ ‖HLH‖) with an explicit centering matrix; 0 when a Gram vanishes."""
    h = centering_matrix(k.shape[0], dtype=k.dtype, device=k.device)
    kc, lc = h @ k @ h, h @ l @ h
    denom = torch.linalg.matrix_norm(kc) * torch.linalg.matrix_norm(lc)
    return (kc * lc).sum() / denom if denom > 0 else torch.zeros((), dtype=k.dtype)


def _rbf_gram(x: Tensor) -> Tensor:
    b = x.shape[0]
    d2 = torch.stack([torch.stack([((x[i] - x[j]) ** 2).sum() for j in range(b)]) for i in range(b)])
    nonzero = sorted(d2[i, j].item() for i in range(b) for j in range(i + 1, b) if d2[i, j] > 0)
    sigma2 = statistics.median(nonzero) if nonzero else 1.0
    return torch.exp(-d2 / (2 * sigma2))


def _cosine(a: Tensor, b: Tensor) -> Tensor:
    denom = torch.linalg.vector_norm(a) * torch.linalg.vector_norm(b)
    return (a * b).sum() / denom if denom > 0 else torch.zeros((), dtype=a.dtype)


def interrelation(
    class_features: Tensor, *, kernel: str = "cka", degree: int = 2, dtype: torch.dtype | None = None
) -> Tensor:
    """IR (C, C) with a Python loop over class pairs; unit diagonal.

    cka: ``cka(X_i, X_j)`` on the (b, d) class matrices. poly: Gram (x·y/d + 1)^degree; rbf: Gram
    exp(-‖x - y‖²/(2σ²)), σ² = median of the class's nonzero pairwise squared distances; both compared by
    the alignment of their H K H Grams. centroid: cosine of class means. cosine: cosine of rows of (C, d).
    """
    x = as_dtype(class_features, dtype)
    c = x.shape[0]
    if kernel in ("poly", "rbf"):
        if kernel == "poly":
            grams = [(xi @ xi.T / xi.shape[1] + 1) ** degree for xi in x]
        else:
            grams = [_rbf_gram(xi) for xi in x]
    out = torch.empty(c, c, dtype=x.dtype)
    for i in range(c):
        for j in range(c):
            if i == j:
                out[i, j] = 1.0
            elif kernel == "cka":
                out[i, j] = cka(x[i], x[j], dtype=x.dtype)
            elif kernel in ("poly", "rbf"):
                out[i, j] = _pair_alignment(grams[i], grams[j])
            elif kernel == "centroid":
                out[i, j] = _cosine(x[i].mean(0), x[j].mean(0))
            elif kernel == "cosine":
                out[i, j] = _cosine(x[i], x[j])
            else:
                raise ValueError(f"unknown kernel {kernel!r}")
    return out


def cost_from_interrelation(ir: Tensor, *, sharpen: float = 1.0, dtype: torch.dtype | None = None) -> Tensor:
    """Element by element: D_ij = 1 - IR_ij (0 on the diagonal), cost = max(1 - exp(-sharpen·D), 0) + 1e-8."""
    ir = as_dtype(ir, dtype)
    c = ir.shape[0]
    out = torch.empty_like(ir)
    for i in range(c):
        for j in range(c):
            d = 0.0 if i == j else 1.0 - ir[i, j].item()
            out[i, j] = max(1.0 - math.exp(-sharpen * d), 0.0) + 1e-8
    return out
