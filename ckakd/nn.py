"""``nn.Module`` wrappers around the functional losses (thin: they hold options and a weight)."""

from __future__ import annotations

from torch import Tensor, nn

from ckakd import functional as F_

__all__ = ["CKALoss", "PatchCKALoss", "RCKALoss", "MMDLoss"]


class CKALoss(nn.Module):
    """weight · Σ_pairs (1 - CKA(x, y)) on features flattened to (B, -1). See ``ckakd.cka_loss``."""

    def __init__(self, weight: float = 1.0, *, mode: str = "centered", backend: str = "auto") -> None:
        super().__init__()
        self.weight, self.mode, self.backend = weight, mode, backend

    def forward(self, x, y) -> Tensor:
        return self.weight * F_.cka_loss(x, y, mode=self.mode, backend=self.backend)

    def extra_repr(self) -> str:
        return f"weight={self.weight}, mode={self.mode!r}, backend={self.backend!r}"


class PatchCKALoss(nn.Module):
    """PCKA for detection: weight · Σ_levels mean_problems (1 - CKA) over patches (seed γ = 10)."""

    def __init__(
        self,
        weight: float = 10.0,
        *,
        patch_size: int | tuple[int, int] = (16, 16),
        reduce: str = "channel",
        mode: str = "centered",
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.weight, self.patch_size, self.reduce = weight, patch_size, reduce
        self.mode, self.backend = mode, backend

    def forward(self, f_s, f_t) -> Tensor:
        return self.weight * F_.patch_cka_loss(
            f_s, f_t, patch_size=self.patch_size, reduce=self.reduce, mode=self.mode, backend=self.backend
        )

    def extra_repr(self) -> str:
        return f"weight={self.weight}, patch_size={self.patch_size}, reduce={self.reduce!r}, mode={self.mode!r}"


class RCKALoss(nn.Module):
    """RCKA: alpha·FCKA + beta·(intra-LCKA + inter-LCKA); add your CE separately. See ``ckakd.rcka_loss``."""

    def __init__(self, alpha: float = 5.0, beta: float = 5.0, *, mode: str = "centered", backend: str = "auto") -> None:
        super().__init__()
        self.alpha, self.beta, self.mode, self.backend = alpha, beta, mode, backend

    def forward(self, feats_s, feats_t, logits_s: Tensor, logits_t: Tensor) -> Tensor:
        return F_.rcka_loss(
            feats_s,
            feats_t,
            logits_s,
            logits_t,
            alpha=self.alpha,
            beta=self.beta,
            mode=self.mode,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta}, mode={self.mode!r}"


class MMDLoss(nn.Module):
    """weight · the MMD term of Theorem 2 (the seed's MMD baseline). See ``ckakd.mmd_loss``."""

    def __init__(self, weight: float = 1.0, *, backend: str = "auto") -> None:
        super().__init__()
        self.weight, self.backend = weight, backend

    def forward(self, x, y) -> Tensor:
        return self.weight * F_.mmd_loss(x, y, backend=self.backend)
