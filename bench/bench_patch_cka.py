"""Benchmark of ``ckakd.patch_cka_loss(f_s, f_t, patch_size=(16, 16))`` (PCKA, channel average).

f_s (B, C, H, W) requires grad, f_t does not. Providers: ``ckakd`` (backend "auto": the fused batched
Triton kernel on CUDA, batched torch products on CPU), ``ckakd-torch`` (CUDA only) and ``loop`` — the
authors' formulation: a Python loop over channels, each cutting its (B, H, W) map into a
(P, B·16·16) patch matrix with ``unfold`` and computing centered linear CKA with plain torch ops.
(``torch.compile`` of the loop is left out: dynamo unrolls all C iterations and compiles for minutes.)

Cost model for the floor, with N = B·C·H'·W' elements after the resize to multiples of 16 and
P = (H'/16)·(W'/16) patches: forward 4·P·N flops (a P×P Gram per channel, student and teacher),
reads f_s and f_t once; backward 2·P·N flops, reads f_s and writes grad_f_s; full = forward + backward.
"""

from __future__ import annotations

import sys

import common
import torch
import torch.nn.functional as F
from common import Dims, OpBench, Provider, Target
from torch import Tensor

import ckakd
from ckakd import reference

PATCH = (16, 16)
SHAPES: dict[str, Dims] = {
    "b2-c256-64x64": (2, 256, 64, 64),
    "b2-c64-32x32": (2, 64, 32, 32),
    "fpn-b2-c256-100x168": (2, 256, 100, 168),  # an FPN level; resized to (96, 160)
}
PRESETS: dict[str, tuple[str, ...]] = {
    "cpu": ("b2-c256-64x64", "b2-c64-32x32"),
    "gpu": ("fpn-b2-c256-100x168", "b2-c256-64x64"),
    "quick-cpu": ("b2-c64-32x32",),
    "quick-gpu": ("fpn-b2-c256-100x168",),
}
TARGETS = (
    Target("cpu", "b2-c256-64x64", "full", 10.0, "loop"),
    Target("cuda", "fpn-b2-c256-100x168", "full", 20.0, "loop"),
)


def resized_hw(h: int, w: int) -> tuple[int, int]:
    """Nearest multiple of the patch size (at least one patch), as ckakd resizes."""
    ph, pw = PATCH
    return max(ph, round(h / ph) * ph), max(pw, round(w / pw) * pw)


def make_inputs(dims: Dims, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Teacher = per-patch latent (constant over each 16×16 cell) + noise; student shares half of it.

    Without the patch-level latent, random (P, B·256) patch matrices have Grams dominated by their
    diagonal and every CKA is ≈ 1, which would make the value check meaningless.
    """
    b, c, h, w = dims
    gen = torch.Generator(device=device).manual_seed(0)

    def patch_latent() -> Tensor:
        cells = torch.randn(b, c, -(-h // PATCH[0]), -(-w // PATCH[1]), generator=gen, device=device)
        return F.interpolate(cells, size=(h, w), mode="nearest")

    def noise() -> Tensor:
        return torch.randn(dims, generator=gen, device=device)

    shared = patch_latent()
    f_t = shared + noise()
    f_s = 0.5 * shared + patch_latent() + noise()
    return f_s.to(dtype).requires_grad_(), f_t.to(dtype)


def cost(dims: Dims, mode: str, esize: int) -> tuple[float, float]:
    b, c, h, w = dims
    th, tw = resized_hw(h, w)
    n = b * c * th * tw
    p = (th // PATCH[0]) * (tw // PATCH[1])
    size = b * c * h * w * esize
    fwd = (4 * p * n, 2 * size)
    bwd = (2 * p * n, 2 * size)
    if mode == "forward":
        return fwd
    if mode == "backward":
        return bwd
    return fwd[0] + bwd[0], fwd[1] + bwd[1]


def _patch_matrix(fmap: Tensor) -> Tensor:
    """One channel's (B, H, W) map -> (P, B·ph·pw): the patches are the rows (samples)."""
    cols = F.unfold(fmap.unsqueeze(1), kernel_size=PATCH, stride=PATCH)  # (B, ph·pw, P)
    return cols.permute(2, 0, 1).reshape(cols.shape[2], -1)


def _linear_cka(x: Tensor, y: Tensor) -> Tensor:
    """Centered linear CKA of (P, D) matrices with plain torch ops."""
    x = x - x.mean(dim=0, keepdim=True)
    y = y - y.mean(dim=0, keepdim=True)
    k, l = x @ x.T, y @ y.T
    return (k * l).sum() / ((k * k).sum().sqrt() * (l * l).sum().sqrt())


def loop_loss(f_s: Tensor, f_t: Tensor) -> Tensor:
    """The authors' per-channel loop: mean over channels of 1 - CKA(patches of f_s[:, c], of f_t[:, c])."""
    size = resized_hw(*f_s.shape[-2:])
    if size != tuple(f_s.shape[-2:]):
        f_s = F.interpolate(f_s, size=size, mode="bilinear", align_corners=False)
        f_t = F.interpolate(f_t, size=size, mode="bilinear", align_corners=False)
    losses = [1.0 - _linear_cka(_patch_matrix(f_s[:, c]), _patch_matrix(f_t[:, c])) for c in range(f_s.shape[1])]
    return torch.stack(losses).mean()


def ckakd_loss(f_s: Tensor, f_t: Tensor) -> Tensor:
    return ckakd.patch_cka_loss(f_s, f_t, patch_size=PATCH)


def ckakd_torch_loss(f_s: Tensor, f_t: Tensor) -> Tensor:
    return ckakd.patch_cka_loss(f_s, f_t, patch_size=PATCH, backend="torch")


def providers(device: torch.device) -> list[Provider]:
    out = [Provider("ckakd", ckakd_loss)]
    if device.type == "cuda":
        out.append(Provider("ckakd-torch", ckakd_torch_loss))
    return out + [Provider("loop", loop_loss)]


def self_test() -> None:
    """The loop baseline must agree with ``ckakd.reference.patch_cka_loss`` (float64, with a resize)."""
    gen = torch.Generator().manual_seed(0)
    f_t = torch.randn(2, 3, 40, 56, generator=gen, dtype=torch.float64)
    f_s = 0.5 * f_t + torch.randn(2, 3, 40, 56, generator=gen, dtype=torch.float64)
    got = loop_loss(f_s, f_t)
    want = reference.patch_cka_loss(f_s, f_t, patch_size=PATCH)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


BENCH = OpBench(
    op="patch_cka",
    shapes=SHAPES,
    presets=PRESETS,
    make_inputs=make_inputs,
    cost=cost,
    providers=providers,
    baseline="loop",
    targets=TARGETS,
    self_test=self_test,
)

if __name__ == "__main__":
    sys.exit(common.main([BENCH], description=__doc__.splitlines()[0]))
