"""Triton kernels of ckakd (installed as ``ckakd.kernels``).

One op family per module, each with its ``@triton.jit`` kernels and a Python launcher per op:

* :mod:`.gram` — centered Gram ``K = Xc Xcᵀ`` (split-K, upper-triangle tiles) and its backward ``M Xc``.
* :mod:`.frobenius` — ``[Σ K∘L, Σ K∘K, Σ L∘L]`` per batch entry (the HSIC / CKA sums).
* :mod:`.patch_cka` — batched patch CKA (PCKA): all problems' partial Grams split over features, then one
  finalizing launch for the Grams and sums; the backward in one launch, for the needed tensors only.
* :mod:`._launch` — the one launch point: grid limits, device guard, candidate configurations (autotuned per
  shape bucket on a GPU), and recording for the offline compile report (``bench/compile_report.py``).

Importing this package needs ``triton`` but no GPU (kernels compile at first launch); without triton
the import raises ``ImportError`` and the callers fall back to PyTorch. On the CPU the kernels run
under the Triton interpreter (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

from .frobenius import frobenius_dots
from .gram import gram_backward, gram_forward
from .patch_cka import MAX_PATCHES, patch_cka_backward, patch_cka_forward

__all__ = [
    "MAX_PATCHES",
    "frobenius_dots",
    "gram_backward",
    "gram_forward",
    "patch_cka_backward",
    "patch_cka_forward",
]
