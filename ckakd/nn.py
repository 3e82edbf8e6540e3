"""``nn.Module`` wrappers around the functional losses (thin: they hold options and a weight).

Every option is validated in the constructor (with the checks the functional losses use), so a wrong
weight, mode or size fails where the module is built, not at its first call.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ckakd import _checks
from ckakd import functional as F_
from ckakd._checks import Reduction, renamed_arguments
from ckakd.functional import Backend, CKAMode, PatchReduce, PatchResize
from ckakd.ops import _backend
from ckakd.ops.alignment_stats import MODES
from ckakd.ops.patch_alignment_stats import REDUCTIONS
from ckakd.wasserstein import COVARIANCES, Covariance, wkd_feature_loss
from ckakd.wkd import SinkhornBackend, check_cost, check_solver_args, wkd_logit_loss

ArrayLike = Any  # numpy arrays, nested sequences of numbers

__all__ = [
    "KDLoss",
    "LSKDLoss",
    "DKDLoss",
    "DISTLoss",
    "ATLoss",
    "FitNetLoss",
    "CKALoss",
    "PatchCKALoss",
    "RCKALoss",
    "MMDLoss",
    "WKDLogitLoss",
    "WKDFeatureLoss",
]


class KDLoss(nn.Module):
    """Hinton KD: weight · ``KL(p_t ‖ p_s) · T²``, ``p = softmax(z / temperature)``. See ``ckakd.kd_loss``.

    ``forward(z_s, z_t)`` with (B, K) logits -> scalar, or (B,) with ``reduction="none"``. mdistiller's CIFAR
    setting: temperature 4, weight 0.9 (CE 0.1). ``standardize=True``: logit-standardized KD (:class:`LSKDLoss`).
    """

    @renamed_arguments(T="temperature")
    def __init__(
        self,
        weight: float = 1.0,
        *,
        temperature: float = 4.0,
        standardize: bool = False,
        reduction: Reduction = "mean",
    ) -> None:
        super().__init__()
        self.weight = _checks.check_weight("weight", weight)
        self.temperature = _checks.check_positive("temperature", temperature)
        self.standardize = _checks.check_bool("standardize", standardize)
        self.reduction = _checks.check_reduction(reduction)

    def forward(self, z_s: Tensor, z_t: Tensor) -> Tensor:
        loss = F_.kd_loss(z_s, z_t, self.temperature, standardize=self.standardize, reduction=self.reduction)
        return self.weight * loss

    def extra_repr(self) -> str:
        extra = ", standardize=True" if self.standardize else ""
        return f"weight={self.weight}, temperature={self.temperature}{extra}, reduction={self.reduction!r}"


class LSKDLoss(KDLoss):
    """Logit-standardized KD (Sun et al. 2024): :class:`KDLoss` with ``standardize=True``; the paper's setting is
    temperature 2 and weight 9. See ``ckakd.lskd_loss``."""

    @renamed_arguments(T="temperature")
    def __init__(self, weight: float = 1.0, *, temperature: float = 2.0, reduction: Reduction = "mean") -> None:
        super().__init__(weight, temperature=temperature, standardize=True, reduction=reduction)


class DKDLoss(nn.Module):
    """Decoupled KD (Zhao et al. 2022): ``alpha · TCKD + beta · NCKD`` (· T²). See ``ckakd.dkd_loss``.

    ``forward(z_s, z_t, target)``: (B, K) logits and (B,) integer labels -> scalar, or (B,) with
    ``reduction="none"``. mdistiller's CIFAR setting: alpha 1, beta 8, temperature 4 (and a linear warmup of
    the loss over the first 20 epochs, which is the trainer's ``dkd`` distiller's job).
    """

    @renamed_arguments(T="temperature")
    def __init__(
        self,
        alpha: float = 1.0,
        beta: float = 8.0,
        *,
        temperature: float = 4.0,
        reduction: Reduction = "mean",
    ) -> None:
        super().__init__()
        self.alpha = _checks.check_real("alpha", alpha)
        self.beta = _checks.check_real("beta", beta)
        self.temperature = _checks.check_positive("temperature", temperature)
        self.reduction = _checks.check_reduction(reduction)

    def forward(self, z_s: Tensor, z_t: Tensor, target: Tensor) -> Tensor:
        return F_.dkd_loss(z_s, z_t, target, self.alpha, self.beta, self.temperature, reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta}, temperature={self.temperature}, reduction={self.reduction!r}"


class DISTLoss(nn.Module):
    """DIST (Huang et al. 2022): ``T² · [beta · inter + gamma · intra]`` Pearson relations. See ``ckakd.dist_loss``
    (what ``reduction="none"`` means for its batch-level intra-class term).

    ``forward(z_s, z_t)`` with (B, K) logits. The paper's setting: beta = gamma = 1, temperature 4 on CIFAR-100,
    1 on ImageNet.
    """

    @renamed_arguments(T="temperature")
    def __init__(
        self,
        beta: float = 1.0,
        gamma: float = 1.0,
        *,
        temperature: float = 1.0,
        reduction: Reduction = "mean",
    ) -> None:
        super().__init__()
        self.beta = _checks.check_real("beta", beta)
        self.gamma = _checks.check_real("gamma", gamma)
        self.temperature = _checks.check_positive("temperature", temperature)
        self.reduction = _checks.check_reduction(reduction)

    def forward(self, z_s: Tensor, z_t: Tensor) -> Tensor:
        return F_.dist_loss(z_s, z_t, self.beta, self.gamma, self.temperature, reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"beta={self.beta}, gamma={self.gamma}, temperature={self.temperature}, reduction={self.reduction!r}"


class ATLoss(nn.Module):
    """Attention transfer (Zagoruyko & Komodakis 2017): weight · Σ_pairs ``at_loss(f_s, f_t, p)``.

    ``forward(f_s, f_t)``: one (B, C, H, W) pair or equal-length lists of them (summed; maps of different sizes
    are pooled to the smaller). mdistiller's setting: weight 1000, p 2. See ``ckakd.at_loss``.
    """

    def __init__(self, weight: float = 1.0, *, p: float = 2.0, reduction: Reduction = "mean") -> None:
        super().__init__()
        self.weight = _checks.check_weight("weight", weight)
        self.p = _checks.check_positive("p", p)
        self.reduction = _checks.check_reduction(reduction)

    def forward(self, f_s, f_t) -> Tensor:
        total = None
        for s, t in _checks.as_pairs("f_s", f_s, "f_t", f_t):
            term = F_.at_loss(s, t, self.p, reduction=self.reduction)
            total = term if total is None else total + term
        return self.weight * total

    def extra_repr(self) -> str:
        return f"weight={self.weight}, p={self.p}, reduction={self.reduction!r}"


class FitNetLoss(nn.Module):
    """FitNets hint: weight · Σ_pairs MSE(f_s, f_t) of maps with the teacher's channels (project the student
    first; a projector is the user's trainable module). See ``ckakd.fitnet_loss``."""

    def __init__(self, weight: float = 1.0, *, reduction: Reduction = "mean") -> None:
        super().__init__()
        self.weight = _checks.check_weight("weight", weight)
        self.reduction = _checks.check_reduction(reduction)

    def forward(self, f_s, f_t) -> Tensor:
        total = None
        for s, t in _checks.as_pairs("f_s", f_s, "f_t", f_t):
            term = F_.fitnet_loss(s, t, reduction=self.reduction)
            total = term if total is None else total + term
        return self.weight * total

    def extra_repr(self) -> str:
        return f"weight={self.weight}, reduction={self.reduction!r}"


class CKALoss(nn.Module):
    """weight · Σ_pairs (1 - CKA(x, y)) on features flattened to (B, -1). See ``ckakd.cka_loss``."""

    def __init__(self, weight: float = 1.0, *, mode: CKAMode = "centered", backend: Backend = "auto") -> None:
        super().__init__()
        self.weight = _checks.check_weight("weight", weight)
        self.mode = _checks.check_choice("mode", mode, MODES)
        self.backend = _checks.check_choice("backend", backend, _backend.BACKENDS)

    def forward(self, x, y) -> Tensor:
        return self.weight * F_.cka_loss(x, y, mode=self.mode, backend=self.backend)

    def extra_repr(self) -> str:
        return f"weight={self.weight}, mode={self.mode!r}, backend={self.backend!r}"


class PatchCKALoss(nn.Module):
    """PCKA for detection: weight · Σ_levels mean_problems (1 - CKA) over patches (γ = 10: Zhou et al., IJCAI 2024).

    ``resize``: how a map is fitted to the patch (``ckakd.patch_grid``); default "ceil" (the authors' rule) for
    ``mode="uncentered"`` (the authors' CKA), else "nearest".
    """

    def __init__(
        self,
        weight: float = 10.0,
        *,
        patch_size: int | tuple[int, int] = (16, 16),
        reduce: PatchReduce = "channel",
        mode: CKAMode = "centered",
        resize: PatchResize | None = None,
        backend: Backend = "auto",
    ) -> None:
        super().__init__()
        self.weight = _checks.check_weight("weight", weight)
        self.patch_size = _checks.check_int_pair("patch_size", patch_size)
        self.reduce = _checks.check_choice("reduce", reduce, REDUCTIONS + ("mix",))
        self.mode = _checks.check_choice("mode", mode, MODES)
        if resize is None:  # the authors' rule with the authors' (uncentered) CKA, ckakd's default otherwise
            resize = "ceil" if self.mode == "uncentered" else "nearest"
        self.resize = _checks.check_choice("resize", resize, F_.PATCH_RESIZE)
        self.backend = _checks.check_choice("backend", backend, _backend.BACKENDS)

    def forward(self, f_s, f_t) -> Tensor:
        return self.weight * F_.patch_cka_loss(
            f_s,
            f_t,
            patch_size=self.patch_size,
            reduce=self.reduce,
            mode=self.mode,
            backend=self.backend,
            resize=self.resize,
        )

    def extra_repr(self) -> str:
        return (
            f"weight={self.weight}, patch_size={self.patch_size}, reduce={self.reduce!r}, mode={self.mode!r}, "
            f"resize={self.resize!r}"
        )


class RCKALoss(nn.Module):
    """RCKA: alpha·FCKA + beta·(intra-LCKA + inter-LCKA); add your CE separately. See ``ckakd.rcka_loss``.

    ``with_l2_norm`` / ``soften`` + ``temperature``: the options of the authors' code (Zhou et al., IJCAI
    2024) for the logit terms, off by default (the paper's formula); see ``ckakd.rcka_loss``.
    """

    def __init__(
        self,
        alpha: float = 5.0,
        beta: float = 5.0,
        *,
        mode: CKAMode = "centered",
        with_l2_norm: bool = False,
        soften: bool = False,
        temperature: float | None = None,
        backend: Backend = "auto",
    ) -> None:
        super().__init__()
        self.alpha = _checks.check_weight("alpha", alpha)
        self.beta = _checks.check_weight("beta", beta)
        self.mode = mode
        options = F_.rcka_logit_options(mode, with_l2_norm, soften, temperature)
        self.with_l2_norm, self.soften, self.temperature = options
        self.backend = _checks.check_choice("backend", backend, _backend.BACKENDS)

    def forward(self, feats_s, feats_t, logits_s: Tensor, logits_t: Tensor) -> Tensor:
        return F_.rcka_loss(
            feats_s,
            feats_t,
            logits_s,
            logits_t,
            alpha=self.alpha,
            beta=self.beta,
            mode=self.mode,
            with_l2_norm=self.with_l2_norm,
            soften=self.soften,
            temperature=self.temperature,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        extra = f", with_l2_norm={self.with_l2_norm}" if self.with_l2_norm else ""
        extra += f", soften=True, temperature={self.temperature}" if self.soften else ""
        return f"alpha={self.alpha}, beta={self.beta}, mode={self.mode!r}{extra}"


class MMDLoss(nn.Module):
    """weight · the MMD term of Theorem 2 of Zhou et al. (IJCAI 2024), their MMD baseline. See ``ckakd.mmd_loss``."""

    def __init__(self, weight: float = 1.0, *, backend: Backend = "auto") -> None:
        super().__init__()
        self.weight = _checks.check_weight("weight", weight)
        self.backend = _checks.check_choice("backend", backend, _backend.BACKENDS)

    def forward(self, x, y) -> Tensor:
        return self.weight * F_.mmd_loss(x, y, backend=self.backend)


class WKDLogitLoss(nn.Module):
    """WKD-L: loss_t + gamma · WD over the class cost (a buffer, so it follows ``.to(device)``).

    The cost's values are checked here, once: ``forward`` has no host sync and compiles with
    ``torch.compile(fullgraph=True)``.

    ``forward(logits_s, logits_t, target=None)``; with ``target`` the target class is separated (WKD's
    default). See ``ckakd.wkd_logit_loss``. Public-code settings: CIFAR-100 T=8, gamma=600; ImageNet T=2,
    gamma=30; eps=0.05, 10 iterations. ``cost``: a (C, C) finite nonnegative tensor, numpy array or nested
    sequence (array-likes are converted; integer data to the default float dtype).
    """

    cost: Tensor

    def __init__(
        self,
        cost: Tensor | ArrayLike,
        *,
        temperature: float = 2.0,
        gamma: float = 1.0,
        eps: float = 0.05,
        iters: int = 10,
        tol: float | None = None,
        backend: SinkhornBackend = "auto",
        reduction: Reduction = "mean",
    ) -> None:
        super().__init__()
        cost = _checks.to_float_tensor("cost", cost)
        check_cost(cost, cost.shape[0] if cost.dim() == 2 else -1, cost.device)
        self.register_buffer("cost", cost.detach().clone())
        self.temperature = _checks.check_positive("temperature", temperature)
        self.gamma = _checks.check_weight("gamma", gamma)
        check_solver_args(eps, iters, tol, 1000)
        self.eps, self.iters, self.tol = float(eps), int(iters), None if tol is None else float(tol)
        self.backend = _checks.check_choice("backend", backend, _backend.SINKHORN_BACKENDS)
        self.reduction = _checks.check_reduction(reduction)

    def forward(self, logits_s: Tensor, logits_t: Tensor, target: Tensor | None = None) -> Tensor:
        return wkd_logit_loss(
            logits_s,
            logits_t,
            self.cost,
            temperature=self.temperature,
            eps=self.eps,
            iters=self.iters,
            target=target,
            gamma=self.gamma,
            tol=self.tol,
            backend=self.backend,
            reduction=self.reduction,
        )

    def extra_repr(self) -> str:
        return (
            f"classes={self.cost.shape[0]}, temperature={self.temperature}, gamma={self.gamma}, eps={self.eps}, "
            f"iters={self.iters}"
        )


class WKDFeatureLoss(nn.Module):
    """WKD-F: weight · WD between per-channel Gaussians of student and teacher feature cells.

    See ``ckakd.wkd_feature_loss``. Public-code settings: CIFAR weight 0.08, mean_weight 4, grid 1;
    ImageNet weight 0.02, mean_weight 2, grid 4 (student projected to the teacher's channels first).
    """

    def __init__(
        self,
        weight: float = 1.0,
        *,
        grid: int | tuple[int, int] = 1,
        mean_weight: float = 2.0,
        cov: Covariance = "diag",
        eps: float = 1e-5,
        reduction: Reduction = "mean",
    ) -> None:
        super().__init__()
        self.weight = _checks.check_weight("weight", weight)
        self.grid = _checks.check_int_pair("grid", grid)
        self.mean_weight = _checks.check_weight("mean_weight", mean_weight)
        self.cov = _checks.check_choice("cov", cov, COVARIANCES)
        self.eps = _checks.check_real("eps", eps, minimum=0.0)
        self.reduction = _checks.check_reduction(reduction)

    def forward(self, f_s: Tensor, f_t: Tensor) -> Tensor:
        return self.weight * wkd_feature_loss(
            f_s, f_t, grid=self.grid, mean_weight=self.mean_weight, cov=self.cov, eps=self.eps, reduction=self.reduction
        )

    def extra_repr(self) -> str:
        return f"weight={self.weight}, grid={self.grid}, mean_weight={self.mean_weight}, cov={self.cov!r}"
