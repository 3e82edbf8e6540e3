"""Triton kernels of ckakd (installed as ``ckakd.kernels``).

One op family per module, each with its ``@triton.jit`` kernels and a Python launcher per op:

* :mod:`.gram` — centered Gram ``K = Xc Xcᵀ`` (split-K, upper-triangle tiles), the primitive of
  ``ckakd::centered_gram`` and ``ckakd::alignment_stats``; :mod:`.column_mean` — its column-mean pass;
  :mod:`.gram_backward` — its backward ``M Xc``.
* :mod:`.frobenius` — ``[Σ K∘L, Σ K∘K, Σ L∘L]`` per batch entry (the HSIC / CKA sums).
* :mod:`.patch_alignment_stats` — batched patch CKA (PCKA, op ``ckakd::patch_alignment_stats``): all
  problems' partial Grams split over features, then one finalizing launch for the Grams and sums;
  :mod:`.patch_alignment_stats_backward` — its backward in one launch, for the needed tensors only.
* :mod:`._launch` — the one launch point: grid limits, device guard, candidate configurations (autotuned per
  shape bucket on a GPU), the SM count and dot precisions shared by the launchers, and recording for the
  offline compile report (``bench/compile_report.py``).

Importing this package needs ``triton`` but no GPU (kernels compile at first launch); without triton
the import raises ``ImportError`` and the callers fall back to PyTorch. On the CPU the kernels run
under the Triton interpreter (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

from .frobenius import frobenius_dots
from .gram import gram_forward
from .gram_backward import gram_backward
from .patch_alignment_stats import MAX_PATCHES, patch_cka_forward
from .patch_alignment_stats_backward import patch_cka_backward

__all__ = [
    "MAX_PATCHES",
    "frobenius_dots",
    "gram_backward",
    "gram_forward",
    "patch_cka_backward",
    "patch_cka_forward",
]
