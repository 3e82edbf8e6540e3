"""ckakd: fast, exact knowledge-distillation losses built on centered kernel alignment and optimal transport.

Functional API (see ``ckakd.functional``): ``centered_gram``, ``hsic``, ``cka``, ``cka_loss``,
``patch_cka``, ``patch_cka_loss``, ``rcka_loss``, ``mmd_loss``; modules in ``ckakd.nn``; naive float64
formulas in ``ckakd.reference``; ``backends()`` tells which implementations are active.
"""

from ckakd import nn, reference
from ckakd.functional import (
    centered_gram,
    cka,
    cka_loss,
    hsic,
    mmd_loss,
    patch_cka,
    patch_cka_loss,
    rcka_loss,
)
from ckakd.ops import backends

__version__ = "0.1.0"

__all__ = [
    "backends",
    "centered_gram",
    "cka",
    "cka_loss",
    "hsic",
    "mmd_loss",
    "nn",
    "patch_cka",
    "patch_cka_loss",
    "rcka_loss",
    "reference",
]
