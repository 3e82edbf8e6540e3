"""ckakd: fast, exact knowledge-distillation losses built on centered kernel alignment and optimal transport.

Functional API (see ``ckakd.functional``): ``centered_gram``, ``hsic``, ``cka``, ``cka_loss``,
``patch_cka``, ``patch_cka_loss``, ``rcka_loss``, ``lcka_loss``, ``mmd_loss``; the logit and feature KD
baselines ``kd_loss``, ``lskd_loss``, ``dkd_loss``, ``dist_loss``, ``at_loss``, ``fitnet_loss``
(``ckakd.logit_kd``, ``ckakd.feature_kd``); Wasserstein distillation: ``sinkhorn``,
``wkd_logit_loss`` (``ckakd.wkd``), ``wkd_feature_loss``, ``gaussian_wasserstein`` (``ckakd.wasserstein``),
``interrelation``, ``cost_from_interrelation`` and the streamed builder (``ckakd.interrelation``);
modules in ``ckakd.nn``; naive float64 formulas in ``ckakd.reference``; ``backends()`` tells which
implementations are active.

``import ckakd`` loads the loss core only (the modules above and ``ckakd.ops``). The rest (the trainer
``ckakd.train``, ``ckakd.detection``, ``ckakd.diagnostics``, the applications ``ckakd.apps`` (the ``ckakd`` command),
the Triton ``ckakd.kernels``) is imported on first attribute access (PEP 562), so their optional
dependencies (pyyaml, tqdm, matplotlib, pycocotools, scikit-learn) are never needed to use the losses.
"""

import importlib as _importlib

from ckakd import nn, reference
from ckakd.feature_kd import at_loss, fitnet_loss
from ckakd.functional import (
    centered_gram,
    cka,
    cka_loss,
    hsic,
    lcka_loss,
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
from ckakd.logit_kd import dist_loss, dkd_loss, kd_loss, lskd_loss, standardize_logits
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
    "lcka_loss",
    "kd_loss",
    "lskd_loss",
    "dkd_loss",
    "dist_loss",
    "standardize_logits",
    "at_loss",
    "fitnet_loss",
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

# Subpackages / modules outside the loss core: ``ckakd.<name>`` imports them on first access (PEP 562).
_LAZY_SUBMODULES = frozenset({"apps", "detection", "diagnostics", "kernels", "train"})


def __getattr__(name: str):
    if name in _LAZY_SUBMODULES:
        return _importlib.import_module(f"{__name__}.{name}")  # the import binds it in globals() too
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    # The lazy submodules are listed once imported (as the import system binds them), as before.
    return sorted(globals())
