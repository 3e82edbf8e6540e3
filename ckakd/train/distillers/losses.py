"""The trainer's loss names: re-exports of the losses (``ckakd.logit_kd``, ``ckakd.feature_kd``) and the WKD
weight schedule ``cosine_decay_weight``."""

from __future__ import annotations

import math

from ckakd.feature_kd import at_loss
from ckakd.logit_kd import dist_loss, dkd_loss, kd_loss, standardize_logits

__all__ = ["standardize_logits", "kd_loss", "dkd_loss", "dist_loss", "at_loss", "cosine_decay_weight"]


def cosine_decay_weight(weight: float, epoch: int, total_epochs: int, decay_start: int) -> float:
    """A loss weight held constant, then cosine-decayed to 0 at the last epoch (the WKD public code).

    ``epoch`` is 0-based. For ``epoch < decay_start`` the weight is returned unchanged; afterwards it is
    ``0.5 · weight · (1 + cos(π · (epoch + 1 − decay_start) / (total_epochs − decay_start)))``, i.e. the
    public code's formula with its 1-based epoch ``epoch + 1``: exactly 0 at ``epoch = total_epochs − 1``.
    CIFAR-100 WKD-L uses ``decay_start=150`` of 240 epochs.
    """
    if not 0 <= epoch < total_epochs:
        raise ValueError(f"epoch must be in [0, total_epochs={total_epochs}), got {epoch}")
    if decay_start < 0:
        raise ValueError(f"decay_start must be >= 0, got {decay_start}")
    if epoch < decay_start:
        return float(weight)
    progress = (epoch + 1 - decay_start) / (total_epochs - decay_start)
    return 0.5 * float(weight) * (1.0 + math.cos(math.pi * progress))
