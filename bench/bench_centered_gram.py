"""Benchmark of ``(ckakd.centered_gram(x) * w).sum()``: x (n, d) requires grad, w (n, n) is fixed.

Providers: ``ckakd`` (backend "auto"), ``ckakd-torch`` (CUDA only), ``reference``
(``ckakd.reference.centered_gram`` in the input dtype: H·(X Xᵀ)·H) and ``reference-compile``.

Cost model for the floor (dense GEMM flops):
forward  2·n²·d flops, reads x once and writes the fp32 (n, n) Gram;
backward 2·n²·d flops, reads x and the (n, n) upstream gradient, writes grad_x; full = forward + backward.
"""

from __future__ import annotations

import sys

import torch
from harness import cli
from harness.providers import latent_features, mode_cost, reference_providers
from harness.spec import Dims, OpBench, Provider
from torch import Tensor

import ckakd
from ckakd import reference

SHAPES: dict[str, Dims] = {
    "n256-d16k": (256, 16384),
    "n128-d4k": (128, 4096),
    "n64-d64k": (64, 65536),
    "n64-d802k": (64, 256 * 56 * 56),
    "n4096-d512": (4096, 512),
}
PRESETS: dict[str, tuple[str, ...]] = {
    "cpu": ("n256-d16k", "n128-d4k", "n64-d64k"),
    "gpu": ("n256-d16k", "n64-d802k", "n4096-d512"),
    "quick-cpu": ("n128-d4k",),
    "quick-gpu": ("n256-d16k",),
}


def make_inputs(dims: Dims, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    n, d = dims
    (x,) = latent_features(n, (d,), device, dtype)
    w = torch.randn(n, n, generator=torch.Generator(device=device).manual_seed(1), device=device)
    return x.requires_grad_(), w


def cost(dims: Dims, mode: str, esize: int) -> tuple[float, float]:
    n, d = dims
    gram = 4 * n * n  # the fp32 (n, n) output, or its gradient
    fwd = (2 * n * n * d, n * d * esize + gram)
    bwd = (2 * n * n * d, 2 * n * d * esize + gram)
    return mode_cost(mode, fwd, bwd)


def ckakd_loss(x: Tensor, w: Tensor, backend: str = "auto") -> Tensor:
    return (ckakd.centered_gram(x, backend=backend) * w).sum()


def reference_loss(x: Tensor, w: Tensor) -> Tensor:
    return (reference.centered_gram(x, dtype=x.dtype) * w).sum()


def providers(device: torch.device) -> list[Provider]:
    return reference_providers(device, ckakd_loss, reference_loss)


BENCH = OpBench(
    op="centered_gram",
    shapes=SHAPES,
    presets=PRESETS,
    make_inputs=make_inputs,
    cost=cost,
    providers=providers,
    baseline="reference",
)

if __name__ == "__main__":
    sys.exit(cli.main([BENCH], description=__doc__.splitlines()[0]))
