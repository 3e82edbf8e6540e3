"""ckakd: fast, exact knowledge-distillation losses built on centered kernel alignment and optimal transport.

Functional API (see ``ckakd.functional``): ``centered_gram``, ``hsic``, ``cka``, ``cka_loss``,
``patch_cka``, ``patch_cka_loss``, ``rcka_loss``, ``mmd_loss``; Wasserstein distillation: ``sinkhorn``,
``wkd_logit_loss`` (``ckakd.wkd``), ``wkd_feature_loss``, ``gaussian_wasserstein`` (``ckakd.wasserstein``),
``interrelation``, ``cost_from_interrelation`` and the streamed builder (``ckakd.interrelation``);
modules in ``ckakd.nn``; naive float64 formulas in ``ckakd.reference``; ``backends()`` tells which
implementations are active.
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
from ckakd.interrelation import (
    InterrelationBuilder,
    cost_from_interrelation,
    interrelation,
    interrelation_from_loader,
    load_interrelation,
    save_interrelation,
)
from ckakd.ops import backends
from ckakd.wasserstein import gaussian_wasserstein, wkd_feature_loss
from ckakd.wkd import sinkhorn, wkd_logit_loss

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
    "sinkhorn",
    "wkd_logit_loss",
    "wkd_feature_loss",
    "gaussian_wasserstein",
    "interrelation",
    "cost_from_interrelation",
    "InterrelationBuilder",
    "interrelation_from_loader",
    "save_interrelation",
    "load_interrelation",
]
