"""Public CKA-family functions: validation, flattening, reductions, composition.

Heavy lifting goes through the ops in ``ckakd.ops`` (one dispatch point each); this module only turns
their statistics into HSIC / CKA values and losses.

Shapes: ``centered_gram``, ``hsic`` and ``cka`` take (n, d) or batched (b, n, d) features with the n
samples as rows. The losses (``cka_loss``, ``rcka_loss``, ``mmd_loss``) take features of any rank and
flatten them to (n, -1) as the RCKA authors do (Zhou et al., IJCAI 2024): (B, C, H, W) -> (B, C·H·W);
lists of feature pairs are summed.

The logit and feature KD losses (``kd_loss``, ``lskd_loss``, ``dkd_loss``, ``dist_loss``, ``standardize_logits``;
``at_loss``, ``fitnet_loss``) are defined in ``ckakd.logit_kd`` / ``ckakd.feature_kd`` and exported here too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ckakd import _checks
from ckakd.feature_kd import at_loss, fitnet_loss
from ckakd.logit_kd import dist_loss, dkd_loss, kd_loss, lskd_loss, standardize_logits
from ckakd.ops import _backend, _gram_primitives
from ckakd.ops.alignment_stats import MODES, alignment_stats
from ckakd.ops.centered_gram import centered_gram as _centered_gram_op
from ckakd.ops.patch_alignment_stats import (
    PATCH_MIX_ORDER,
    REDUCTIONS,
    mix_reduction,
    patch_alignment_stats,
    problem_shape,
)

__all__ = [
    "centered_gram",
    "hsic",
    "cka",
    "cka_loss",
    "patch_cka",
    "patch_cka_loss",
    "patch_grid",
    "fit_patch_size",
    "PATCH_RESIZE",
    "PATCH_MIX_ORDER",
    "mix_reduction",
    "rcka_loss",
    "lcka_loss",
    "mmd_loss",
    "kd_loss",
    "lskd_loss",
    "dkd_loss",
    "dist_loss",
    "standardize_logits",
    "at_loss",
    "fitnet_loss",
]

FeaturePairs = Tensor | Sequence[Tensor]
# The choices of the public signatures (the tuples they are checked against: ops.alignment_stats.MODES,
# ops._backend.BACKENDS, ops.patch_alignment_stats.REDUCTIONS + "mix", PATCH_RESIZE below).
CKAMode = Literal["centered", "debiased", "uncentered"]
HSICMode = Literal["biased", "unbiased"]
Backend = Literal["auto", "torch", "triton"]
PatchProblems = Literal["channel", "batch", "spatial"]
PatchReduce = Literal["channel", "batch", "spatial", "mix"]
PatchResize = Literal["nearest", "ceil"]
_BATCHED_SHAPE = "(n, d) or batched (b, n, d)"
_FLATTEN_HINT = "the losses (cka_loss, rcka_loss) flatten feature maps (B, C, H, W) to (B, C·H·W)"
# Largest patch count the fused Triton patch kernel handles; larger problems use the torch path.
MAX_FUSED_PATCHES = 128


def _batched_pair(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, bool]:
    """Validate x, y as (n, d) / (b, n, d) and return them as (b, n, d) plus whether they were batched."""
    _checks.check_float_tensor("x", x)
    _checks.check_float_tensor("y", y)
    _checks.check_same_device(x=x, y=y)
    _checks.check_rank("x", x, (2, 3), _BATCHED_SHAPE, _FLATTEN_HINT)
    _checks.check_rank("y", y, (2, 3), _BATCHED_SHAPE, _FLATTEN_HINT)
    if x.dim() != y.dim():
        raise ValueError(f"x and y must both be (n, d) or both (b, n, d), got {tuple(x.shape)} and {tuple(y.shape)}")
    batched = x.dim() == 3
    if not batched:
        x, y = x.unsqueeze(0), y.unsqueeze(0)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must have the same batch size b, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[1] != y.shape[1]:
        raise ValueError(
            "x and y must have the same number of samples n (rows), "
            f"got {tuple(x.shape if batched else x.shape[1:])} and {tuple(y.shape if batched else y.shape[1:])}"
        )
    return x, y, batched


def _stats(x: Tensor, y: Tensor, mode: str, backend: str) -> tuple[Tensor, Tensor]:
    """(stats (b, 3) fp64, exponents (b, 2)) of x·2^-e_x, y·2^-e_y (see ``ckakd.ops.alignment_stats``)."""
    backend = _backend.resolve(backend, x)
    out = alignment_stats(x, y, mode, backend)
    return out[0], out[5]


def _cka_from_stats(stats: Tensor) -> Tensor:
    """s = [⟨K,L⟩, ⟨K,K⟩, ⟨L,L⟩] (..., 3) -> ⟨K,L⟩ / (‖K‖‖L‖), 0 where a Gram vanishes.

    Computed in float64 (cheap scalars; products of large traces overflow fp32). The guarded branches
    keep the gradient finite (zero) for constant features.
    """
    s = stats.double()
    kl, kk, ll = s[..., 0], s[..., 1], s[..., 2]
    ok = ~((kk <= 0) | (ll <= 0))  # NaN compares False, so NaN inputs propagate
    one = torch.ones_like(kk)
    value = kl / (torch.sqrt(torch.where(ok, kk, one)) * torch.sqrt(torch.where(ok, ll, one)))
    return torch.where(ok, value, torch.zeros_like(value))


def _out_dtype(*tensors: Tensor) -> torch.dtype:
    return _checks.accumulation_dtype(*tensors)


def centered_gram(x: Tensor, *, backend: Backend = "auto") -> Tensor:
    """Centered linear Gram H X Xᵀ H, computed as Xc Xcᵀ with the features centered first.

    x: (n, d) -> (n, n) or (b, n, d) -> (b, n, n); fp32 result for fp16/bf16/fp32 input (fp64 for fp64).
    """
    _checks.check_float_tensor("x", x)
    _checks.check_rank("x", x, (2, 3), _BATCHED_SHAPE, "flatten feature maps to (n, -1) first")
    batched = x.dim() == 3
    xb = x if batched else x.unsqueeze(0)
    k = _centered_gram_op(xb, _backend.resolve(backend, x))[0]
    return k if batched else k[0]


def hsic(x: Tensor, y: Tensor, *, mode: HSICMode = "biased", backend: Backend = "auto") -> Tensor:
    """HSIC with linear kernels between x (n, dx) and y (n, dy); batched inputs (b, n, d) give (b,).

    biased:   tr(K H L H) / (n-1)²                         (n >= 2)
    unbiased: Song et al.'s unbiased estimator, ⟨U(K), U(L)⟩ / (n(n-3))   (n >= 4)
    HSIC scales as |x|²|y|²: it is computed from features rescaled by powers of two and scaled back in
    float64, so the value is right wherever it is representable in the output dtype (fp32 for fp16/bf16/
    fp32 inputs): ±inf (not NaN) where it overflows, 0 where it underflows (|HSIC| < ~1e-45 in fp32).
    """
    _checks.check_mode(mode, ("biased", "unbiased"))
    xb, yb, batched = _batched_pair(x, y)
    n = xb.shape[1]
    _checks.check_min_samples("x", x, n, mode)
    stats, exps = _stats(xb, yb, "centered" if mode == "biased" else "debiased", backend)
    scale = (n - 1) ** 2 if mode == "biased" else n * (n - 3)
    value = (_gram_primitives.mul_pow2(stats[:, 0] / scale, 2 * (exps[:, 0] + exps[:, 1]))).to(_out_dtype(x, y))
    return value if batched else value[0]


def cka(x: Tensor, y: Tensor, *, mode: CKAMode = "centered", backend: Backend = "auto") -> Tensor:
    """Linear CKA similarity in [0, 1] between x (n, dx) and y (n, dy); (b, n, d) inputs give (b,).

    mode: "centered" (the paper's CKA, default), "debiased" (U-centered, Kornblith's unbiased form, may be
    slightly negative, n >= 4) or "uncentered" (plain kernel alignment, the RCKA authors' code).
    Differentiable in both arguments (twice: double backward is supported). Constant features (zero
    variance; in "uncentered" mode all-zero features) and an empty feature set (d = 0) give 0 with a zero
    gradient. Scale-invariant in each argument and computed so: correct at any feature scale the input
    dtype can hold (fp32: ~1e-30 to ~1e30 and beyond).
    backend: "auto" (Triton for CUDA tensors, torch otherwise), "torch" or "triton".
    """
    _checks.check_mode(mode, MODES)
    xb, yb, batched = _batched_pair(x, y)
    _checks.check_min_samples("x", x, xb.shape[1], mode)
    value = _cka_from_stats(_stats(xb, yb, mode, backend)[0]).to(_out_dtype(x, y))
    return value if batched else value[0]


def _flatten_pair(i: int, s: Tensor, t: Tensor, names: tuple[str, str]) -> tuple[Tensor, Tensor]:
    suffix = f"[{i}]" if i >= 0 else ""
    ns, nt = names[0] + suffix, names[1] + suffix
    _checks.check_float_tensor(ns, s)
    _checks.check_float_tensor(nt, t)
    _checks.check_same_device(**{ns: s, nt: t})
    if s.dim() < 2 or t.dim() < 2:
        raise ValueError(
            f"{ns} and {nt} must have a batch dimension and at least one feature dimension, "
            f"got {tuple(s.shape)} and {tuple(t.shape)}"
        )
    if s.shape[0] != t.shape[0]:
        raise ValueError(f"{ns} and {nt} must have the same batch size, got {tuple(s.shape)} and {tuple(t.shape)}")
    if s.shape[0] == 0:
        raise ValueError(
            f"{ns} and {nt} have an empty batch (shapes {tuple(s.shape)} and {tuple(t.shape)}); these losses "
            "need samples (CKA at least 2: it is undefined for fewer)"
        )
    return s.reshape(s.shape[0], -1), t.reshape(t.shape[0], -1)


def _pairs(feats_s: FeaturePairs, feats_t: FeaturePairs, names: tuple[str, str]):
    pairs = _checks.as_pairs(names[0], feats_s, names[1], feats_t)
    single = isinstance(feats_s, Tensor)
    return [_flatten_pair(-1 if single else i, s, t, names) for i, (s, t) in enumerate(pairs)]


def cka_loss(x: FeaturePairs, y: FeaturePairs, *, mode: CKAMode = "centered", backend: Backend = "auto") -> Tensor:
    """1 - CKA between features flattened to (n, -1); a list of (x_i, y_i) pairs gives Σ_i (1 - CKA_i).

    x: student features, y: teacher features (any rank, same batch size n).
    """
    _checks.check_mode(mode, MODES)
    total = None
    for xs, ys in _pairs(x, y, ("x", "y")):
        _checks.check_min_samples("x", xs, xs.shape[0], mode)
        term = 1.0 - cka(xs, ys, mode=mode, backend=backend)
        total = term if total is None else total + term
    return total


# How a map side that is not a multiple of the patch is resized before it is cut into patches:
# "nearest": to the nearest multiple (ckakd's historical rule); "ceil": up to the next multiple, a side smaller
# than the patch up to one patch (the rule of the PCKA authors' code, Zhou et al., IJCAI 2024, mmrazor
# cka_loss.py: ``div_sixteen_mul``).
PATCH_RESIZE = ("nearest", "ceil")
# Fewest patches for which a patch CKA is informative: centered CKA of 2 samples is identically 1, debiased
# HSIC needs 4 samples, uncentered CKA of 1 sample is identically 1.
MIN_PATCHES = {"centered": 3, "debiased": 4, "uncentered": 2}


def _check_resize(resize: str) -> None:
    if resize not in PATCH_RESIZE:
        raise ValueError(f"resize must be one of {', '.join(map(repr, PATCH_RESIZE))}; got {resize!r}")


def patch_grid(hw: Sequence[int], patch_size: int | Sequence[int], resize: PatchResize = "nearest") -> tuple[int, int]:
    """(H', W'): the size an (H, W) map is bilinearly resized to before it is cut into patches.

    ``"nearest"``: each side to the nearest multiple of the patch (at least one patch); ``"ceil"``: up to the
    next multiple (the authors' rule; e.g. 100 x 168 with 16 x 16 patches: 112 x 176, "nearest" 96 x 160)."""
    _check_resize(resize)
    ph, pw = _patch_size(patch_size)
    h, w = int(hw[0]), int(hw[1])
    if resize == "ceil":
        return -(-h // ph) * ph, -(-w // pw) * pw
    return max(ph, round(h / ph) * ph), max(pw, round(w / pw) * pw)


def fit_patch_size(
    hw: Sequence[int], patch_size: int | Sequence[int], *, mode: CKAMode = "centered", resize: PatchResize = "nearest"
) -> tuple[int, int]:
    """The patch used on an (H, W) map: ``patch_size`` itself when the map, resized by ``resize``, holds at
    least ``MIN_PATCHES[mode]`` patches (the authors never change the patch); otherwise the larger side of
    the patch is halved (the height on ties) until it does, or the patch is 1 x 1. With ``"nearest"`` the
    patch is first clipped to the map (that rule cannot upsample a map to one patch)."""
    _check_resize(resize)
    ph, pw = _patch_size(patch_size)
    h, w = int(hw[0]), int(hw[1])
    if resize == "nearest":
        ph, pw = min(ph, h), min(pw, w)
    need = MIN_PATCHES.get(mode, 2)

    def count(a: int, b: int) -> int:
        gh, gw = patch_grid((h, w), (a, b), resize)
        return (gh // a) * (gw // b)

    while count(ph, pw) < need and (ph > 1 or pw > 1):
        if ph >= pw and ph > 1:
            ph = max(1, ph // 2)
        else:
            pw = max(1, pw // 2)
    return ph, pw


def _resize_to_patches(f: Tensor, name: str, ph: int, pw: int, resize: str = "nearest") -> Tensor:
    h, w = f.shape[-2:]
    if resize == "nearest" and (h < ph or w < pw):
        raise ValueError(
            f"patch_size ({ph}, {pw}) is larger than the feature map {name} of shape {tuple(f.shape)} "
            "(resize='ceil' upsamples it to one patch, as the PCKA authors do)"
        )
    th, tw = patch_grid((h, w), (ph, pw), resize)
    if (th, tw) == (h, w):
        return f
    return F.interpolate(f, size=(th, tw), mode="bilinear", align_corners=False)


def _patch_size(patch_size) -> tuple[int, int]:
    return _checks.check_int_pair("patch_size", patch_size)


def patch_cka(
    f_s: Tensor,
    f_t: Tensor,
    *,
    patch_size: int | tuple[int, int] = (16, 16),
    reduce: PatchProblems = "channel",
    mode: CKAMode = "centered",
    backend: Backend = "auto",
    resize: PatchResize = "nearest",
) -> Tensor:
    """Per-problem CKA values (G,) of one level (B, C, H, W) cut into patches (PCKA, Zhou et al., IJCAI 2024).

    The maps are bilinearly resized to a multiple of the patch size (``resize``, see :func:`patch_grid`);
    patches are the samples. reduce: "channel" (G = C, the paper's choice), "batch" (G = B) or "spatial"
    (G = ph·pw).
    """
    ph, pw = _patch_size(patch_size)
    _check_resize(resize)
    _checks.check_mode(mode, MODES)
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {', '.join(map(repr, REDUCTIONS))} here; got {reduce!r}")
    _checks.check_feature_map_pair(f_s, f_t)
    f_s, f_t = _resize_to_patches(f_s, "f_s", ph, pw, resize), _resize_to_patches(f_t, "f_t", ph, pw, resize)
    g, p, _ = problem_shape(tuple(f_s.shape), ph, pw, reduce)
    _checks.check_min_samples("f_s", f_s, p, mode, what=f"patches of size {(ph, pw)}")
    resolved = _backend.resolve(backend, f_s)
    if resolved == "triton" and p > MAX_FUSED_PATCHES:
        resolved = "torch"  # the fused kernel keeps a P×P Gram per problem in registers
    stats = patch_alignment_stats(f_s, f_t, ph, pw, reduce, mode, resolved)[0]
    return _cka_from_stats(stats).to(_out_dtype(f_s, f_t))


def patch_cka_loss(
    f_s: FeaturePairs,
    f_t: FeaturePairs,
    *,
    patch_size: int | tuple[int, int] = (16, 16),
    reduce: PatchReduce = "channel",
    mode: CKAMode = "centered",
    backend: Backend = "auto",
    resize: PatchResize = "nearest",
) -> Tensor:
    """PCKA loss: mean over problems of (1 - CKA), summed over feature levels (lists of (B, C, H, W)).

    reduce="mix" (Zhou et al., IJCAI 2024, Table 5): level 0 averages over the batch, level 1 over space,
    later levels over channels. resize: "nearest" (default) or "ceil" (the PCKA authors' rule, which also
    upsamples a map smaller than the patch to one patch), see :func:`patch_grid`.
    """
    if reduce not in REDUCTIONS + ("mix",):
        raise ValueError(f"reduce must be one of 'channel', 'batch', 'spatial', 'mix'; got {reduce!r}")
    pairs = _checks.as_pairs("f_s", f_s, "f_t", f_t)
    total = None
    for level, (s, t) in enumerate(pairs):
        r = mix_reduction(level) if reduce == "mix" else reduce
        values = patch_cka(s, t, patch_size=patch_size, reduce=r, mode=mode, backend=backend, resize=resize)
        term = 1.0 - values.mean()
        total = term if total is None else total + term
    return total


def _row_normalized_cka(x: Tensor, y: Tensor, mode: str) -> Tensor:
    """CKA of row-normalized Grams (the RCKA authors' ``with_l2_norm``), x (n, dx), y (n, dy) -> scalar.

    K = X Xᵀ (``mode="uncentered"``) or Xc Xcᵀ with the columns centered (``"centered"``); row i of K is
    divided by sqrt(K_ii) (K'_ij = K_ij / sqrt(K_ii), not symmetric), then
    CKA = ⟨K', L'⟩_F / (‖K'‖_F ‖L'‖_F). Rows with K_ii = 0 are zero (zero gradient), constant features give
    0 as in ``cka``. Computed in fp32 (fp64 for fp64 inputs) with autocast off; explicit n×n Grams.
    """
    acc = _checks.accumulation_dtype(x, y)
    with _checks.autocast_off(x, y):
        grams = []
        for f in (x.to(acc), y.to(acc)):
            # exact power-of-two rescaling (the value is scale-invariant): fp32 Grams stay in range at any scale
            f = _gram_primitives.mul_pow2(f[None], -_gram_primitives.pow2_exponent(f[None]))[0]
            if mode == "centered":
                f = f - f.mean(0, keepdim=True)
            k = f @ f.T
            d = k.diagonal()
            pos = d > 0
            scale = torch.where(pos, torch.where(pos, d, torch.ones_like(d)).rsqrt(), torch.zeros_like(d))
            grams.append(k * scale[:, None])
        k, l = grams
        stats = torch.stack([(k * l).sum(), (k * k).sum(), (l * l).sum()])
    return _cka_from_stats(stats).to(_out_dtype(x, y))


def _logit_cka(zs: Tensor, zt: Tensor, mode: str, with_l2_norm: bool, backend: str) -> Tensor:
    if with_l2_norm:
        return _row_normalized_cka(zs, zt, mode)
    return cka(zs, zt, mode=mode, backend=backend)


def _lcka_terms(
    logits_s: Tensor,
    logits_t: Tensor,
    mode: str,
    with_l2_norm: bool,
    soften: bool,
    temperature: float | None,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """The two logit terms of RCKA (validated inputs): intra-class ``1 - CKA(z_s, z_t)`` (the batch as samples;
    ``soften``: of softmax(z / temperature)) and inter-class ``1 - CKA(z_sᵀ, z_tᵀ)`` (the classes as samples)."""
    zs, zt = logits_s, logits_t
    if soften:
        work = _checks.accumulation_dtype(zs, zt)
        zs, zt = (zs.to(work) / temperature).softmax(1), (zt.to(work) / temperature).softmax(1)
    intra = 1.0 - _logit_cka(zs, zt, mode, with_l2_norm, backend)
    inter = 1.0 - _logit_cka(logits_s.T, logits_t.T, mode, with_l2_norm, backend)
    return intra, inter


def rcka_logit_options(
    mode: str, with_l2_norm: bool, soften: bool, temperature: float | None
) -> tuple[bool, bool, float | None]:
    """Validate the logit-term options of :func:`rcka_loss` (also used by ``nn.RCKALoss`` and the trainer's
    RCKA / LCKA distillers); returns (with_l2_norm, soften, temperature as float or None)."""
    _checks.check_mode(mode, MODES)
    with_l2_norm = _checks.check_bool("with_l2_norm", with_l2_norm)
    soften = _checks.check_bool("soften", soften)
    if with_l2_norm and mode == "debiased":
        raise ValueError("with_l2_norm=True is not defined for mode='debiased' (U-centered Grams have a zero diagonal)")
    if soften:
        if temperature is None:
            raise ValueError("soften=True needs a temperature (softmax(z / temperature)), got temperature=None")
        temperature = _checks.check_positive("temperature", temperature)
    elif temperature is not None:
        raise ValueError(f"temperature={temperature!r} is only used with soften=True; pass soften=True or drop it")
    return with_l2_norm, soften, temperature


def rcka_loss(
    feats_s: FeaturePairs,
    feats_t: FeaturePairs,
    logits_s: Tensor,
    logits_t: Tensor,
    *,
    alpha: float = 5.0,
    beta: float = 5.0,
    mode: CKAMode = "centered",
    with_l2_norm: bool = False,
    soften: bool = False,
    temperature: float | None = None,
    backend: Backend = "auto",
    return_parts: bool = False,
) -> Tensor | dict[str, Tensor]:
    """RCKA distillation loss (Zhou et al., IJCAI 2024, Eq. 4-8, without the CE term).

    alpha·Σ_levels (1 - CKA(F_s, F_t)) + beta·[(1 - CKA(z_s, z_t)) + (1 - CKA(z_sᵀ, z_tᵀ))]
    feats_*: (B, ...) tensors or lists of them (flattened to (B, -1)); logits_*: (B, K), the same B.
    The inter-class term treats the K classes as samples (K >= 2 needed; same K for both nets).
    Defaults alpha = beta = 5 (the paper's appendix B).

    Options of the authors' code (``CenterKernelAlignmentRKD``), for the two logit terms only:
    ``with_l2_norm``: each Gram row i is divided by sqrt(K_ii) before the alignment,
    ⟨K', L'⟩ / (‖K'‖‖L'‖) with K'_ij = K_ij / sqrt(K_ii) (the authors' default is True; they apply it to
    uncentered Grams, ``mode="uncentered"``; with ``"centered"`` the Grams of the centered logits are
    normalized; not defined for ``"debiased"``). ``soften``: the intra-class term (over the batch) compares
    softmax(z/temperature) instead of the logits, the inter-class term keeps the raw logits, as in the
    authors' code; needs ``temperature``. Both default off here (the paper's formula).
    ``return_parts`` gives a dict with "fcka", "intra_lcka", "inter_lcka" (unweighted) and "loss".
    """
    alpha = _checks.check_weight("alpha", alpha)
    beta = _checks.check_weight("beta", beta)
    with_l2_norm, soften, temperature = rcka_logit_options(mode, with_l2_norm, soften, temperature)
    return_parts = _checks.check_bool("return_parts", return_parts)
    pairs = _pairs(feats_s, feats_t, ("feats_s", "feats_t"))
    b = pairs[0][0].shape[0]
    _checks.check_logit_pair("logits_s", logits_s, "logits_t", logits_t, batch=b, batch_of="feats_s")
    for i, (xs, _) in enumerate(pairs):
        if xs.shape[0] != b:
            raise ValueError(
                f"feats_s[{i}] must have the batch size B={b} of feats_s[0] and the logits, got {tuple(xs.shape)}"
            )
    k = logits_s.shape[1]
    _checks.check_min_samples("logits_s", logits_s, b, mode, what="samples (rows, the batch)")
    _checks.check_min_samples("logits_s", logits_s, k, mode, what="classes (columns, the inter-class samples)")
    fcka = None
    for xs, ys in pairs:
        term = 1.0 - cka(xs, ys, mode=mode, backend=backend)
        fcka = term if fcka is None else fcka + term
    intra, inter = _lcka_terms(logits_s, logits_t, mode, with_l2_norm, soften, temperature, backend)
    loss = alpha * fcka + beta * (intra + inter)
    if return_parts:
        return {"loss": loss, "fcka": fcka, "intra_lcka": intra, "inter_lcka": inter}
    return loss


def lcka_loss(
    logits_s: Tensor,
    logits_t: Tensor,
    *,
    beta: float = 1.0,
    mode: CKAMode = "centered",
    with_l2_norm: bool = False,
    soften: bool = False,
    temperature: float | None = None,
    backend: Backend = "auto",
    return_parts: bool = False,
) -> Tensor | dict[str, Tensor]:
    """Logit CKA, the logit part of :func:`rcka_loss`: ``beta · [(1 - CKA(z_s, z_t)) + (1 - CKA(z_sᵀ, z_tᵀ))]``.

    logits_*: (B, K) of one shape; the intra-class term takes the B samples (B >= 2 for ``"centered"``), the
    inter-class term the K classes as samples (same minimum). ``mode``, ``with_l2_norm``, ``soften`` and
    ``temperature`` as in :func:`rcka_loss`; the terms are the ones it computes, bit for bit.
    ``return_parts`` gives a dict with "intra_lcka", "inter_lcka" (unweighted) and "loss".
    """
    beta = _checks.check_weight("beta", beta)
    with_l2_norm, soften, temperature = rcka_logit_options(mode, with_l2_norm, soften, temperature)
    return_parts = _checks.check_bool("return_parts", return_parts)
    _checks.check_logit_pair("logits_s", logits_s, "logits_t", logits_t)
    b, k = logits_s.shape
    _checks.check_min_samples("logits_s", logits_s, b, mode, what="samples (rows, the batch)")
    _checks.check_min_samples("logits_s", logits_s, k, mode, what="classes (columns, the inter-class samples)")
    intra, inter = _lcka_terms(logits_s, logits_t, mode, with_l2_norm, soften, temperature, backend)
    loss = beta * (intra + inter)
    if return_parts:
        return {"loss": loss, "intra_lcka": intra, "inter_lcka": inter}
    return loss


def mmd_loss(x: FeaturePairs, y: FeaturePairs, *, backend: Backend = "auto") -> Tensor:
    """The MMD (Jensen-bound) term of RCKA's Theorem 2 (Zhou et al., IJCAI 2024), its "MMD" baseline.

    N²·(E_ij⟨x̂_i, x̂_j⟩ - E_ij⟨ŷ_i, ŷ_j⟩)² with rows scaled as in its Appendix C.2,
    x̂ = x / sqrt(‖XᵀX‖_F); uncentered (for centered features both expectations vanish). It is a lower
    bound of Σ_ij(⟨x̂_i,x̂_j⟩ - ⟨ŷ_i,ŷ_j⟩)² = 2·(1 - uncentered CKA). Features flattened to (N, -1), N >= 1;
    lists of pairs are summed. Invariant to the scale of x and of y (x̂ is), and computed from features
    rescaled by powers of two: correct at any scale the input dtype holds. All-zero features give x̂ = 0.
    """
    total = None
    for xs, ys in _pairs(x, y, ("x", "y")):
        n = xs.shape[0]
        stats, exps = _stats(xs.unsqueeze(0), ys.unsqueeze(0), "uncentered", backend)
        stats, exps = stats[0], exps[0]
        # sums of the rescaled rows x·2^-e_x (the op's stats are those of the rescaled features)
        sum_x = xs.sum(0, dtype=torch.float64) * _gram_primitives.exp2(-exps[0], torch.float64)
        sum_y = ys.sum(0, dtype=torch.float64) * _gram_primitives.exp2(-exps[1], torch.float64)
        # E_ij<x̂_i, x̂_j> = ‖Σ_i x_i‖² / (N² ‖X Xᵀ‖_F)
        mean_kx = sum_x.square().sum() / (n**2 * torch.sqrt(stats[1].clamp_min(torch.finfo(torch.float64).tiny)))
        mean_ky = sum_y.square().sum() / (n**2 * torch.sqrt(stats[2].clamp_min(torch.finfo(torch.float64).tiny)))
        term = (n**2 * (mean_kx - mean_ky).square()).to(_out_dtype(xs, ys))
        total = term if total is None else total + term
    return total
