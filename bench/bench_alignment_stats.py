"""Benchmark of the ``ckakd::alignment_stats`` op through ``1 - ckakd.cka(x, y)``: student x (n, dx) requires
grad, teacher y (n, dy) does not.

Providers: ``ckakd`` (backend "auto": Triton on CUDA, torch on CPU), ``ckakd-torch`` (CUDA only: the
pure-torch path), ``reference`` (``ckakd.reference.cka`` in the input dtype: explicit H·K·H products)
and ``reference-compile`` (``torch.compile`` of that same function).

Cost model for the floor (dense GEMM flops; when d < n the feature-space form is cheaper and used):
forward  2·n²·(dx + dy) flops, reads x and y once;
backward 2·n²·dx flops, reads x and writes grad_x; full = forward + backward.
"""

from __future__ import annotations

import sys

import torch
from harness import cli
from harness.providers import latent_features, mode_cost, reference_providers
from harness.spec import Dims, OpBench, Provider, Target
from torch import Tensor

import ckakd
from ckakd import reference

SHAPES: dict[str, Dims] = {
    "n256-d16k": (256, 16384, 16384),  # 256·8·8: a ResNet stage-4 map (256, 8, 8) per sample (CIFAR)
    "n128-d4k": (128, 4096, 4096),
    "n64-d64k": (64, 65536, 65536),
    "n64-d802k": (64, 256 * 56 * 56, 256 * 56 * 56),  # a ResNet-50 stage-1 map (256, 56, 56) per sample
    "n4096-d512": (4096, 512, 512),
}
PRESETS: dict[str, tuple[str, ...]] = {
    "cpu": ("n256-d16k", "n128-d4k", "n64-d64k"),
    "gpu": ("n256-d16k", "n64-d802k", "n4096-d512"),
    "quick-cpu": ("n128-d4k",),
    "quick-gpu": ("n256-d16k", "n64-d802k"),  # every GPU target
}
TARGETS = (
    Target.speedup("cpu", "n256-d16k", "full", 2.0, "reference"),
    # GPU (issue 12): fwd+bwd within 1.5× of the floor and ≥ 3× faster than torch.compile of the reference
    *(
        t
        for shape in ("n256-d16k", "n64-d802k")
        for t in (
            Target.floor("cuda", shape, "full", 1.5),
            Target.speedup("cuda", shape, "full", 3.0, "reference-compile"),
        )
    ),
)


def make_inputs(dims: Dims, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    n, dx, dy = dims
    x, y = latent_features(n, (dx, dy), device, dtype)
    return x.requires_grad_(), y


def cost(dims: Dims, mode: str, esize: int) -> tuple[float, float]:
    n, dx, dy = dims
    fwd = (min(2 * n * n * (dx + dy), 2 * n * (dx * dx + dx * dy + dy * dy)), n * (dx + dy) * esize)
    bwd = (min(2 * n * n * dx, 2 * n * dx * (dx + dy)), 2 * n * dx * esize)
    return mode_cost(mode, fwd, bwd)


def ckakd_loss(x: Tensor, y: Tensor, backend: str = "auto") -> Tensor:
    return 1.0 - ckakd.cka(x, y, backend=backend)


def reference_loss(x: Tensor, y: Tensor) -> Tensor:
    return 1.0 - reference.cka(x, y, dtype=x.dtype)


def providers(device: torch.device) -> list[Provider]:
    return reference_providers(device, ckakd_loss, reference_loss)


BENCH = OpBench(
    op="alignment_stats",
    shapes=SHAPES,
    presets=PRESETS,
    make_inputs=make_inputs,
    cost=cost,
    providers=providers,
    baseline="reference",
    targets=TARGETS,
)

if __name__ == "__main__":
    sys.exit(cli.main([BENCH], description=__doc__.splitlines()[0]))
