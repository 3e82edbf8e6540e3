"""What one check is (:class:`Check`), the primitives each family must dispatch to, and the seeded float64
inputs the checks draw."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .compare import DTYPE_NAMES, Comparison

__all__ = [
    "CONVERGED",
    "FIXED",
    "GRAM",
    "PATCH",
    "STATS",
    "Check",
    "feature_pair",
    "histogram_pair",
    "map_pair",
    "randn64",
    "random_cost",
    "to_device",
]


@dataclass
class Check:
    """One op × backend × device × dtype × case, with the primitives that must run on ``backend``."""

    op: str
    backend: str
    device: str
    dtype: torch.dtype
    case: str
    run: Callable[[], list[Comparison]]
    required: tuple[str, ...] = ()  # fast backends: each must run on it and on no other backend
    env: dict[str, str] = field(default_factory=dict)  # environment for the check only
    skip: str | None = None

    @property
    def name(self) -> str:
        return f"{self.op} {self.backend}/{self.device} {DTYPE_NAMES[self.dtype]} {self.case}"


# The primitives (``ckakd.ops`` dispatch points) that a family's fast backend must run.
GRAM = ("gram", "gram_apply")
STATS = ("gram", "frobenius_dots", "gram_apply")
PATCH = ("patch_cka_forward", "patch_cka_backward")
FIXED = ("sinkhorn_fixed_forward", "sinkhorn_fixed_backward")
CONVERGED = ("sinkhorn_converged",)


def randn64(gen: torch.Generator, *shape: int) -> Tensor:
    """Standard normal float64 samples of ``shape`` from ``gen``."""
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def feature_pair(gen: torch.Generator, n: int, dx: int, dy: int, offset: float = 0.0) -> tuple[Tensor, Tensor]:
    """Correlated (n, dx), (n, dy) features so that CKA sits inside (0, 1)."""
    x = randn64(gen, n, dx)
    y = 0.6 * (x @ randn64(gen, dx, dy)) / dx**0.5 + randn64(gen, n, dy)
    return x + offset, y + offset


def map_pair(gen: torch.Generator, shape: tuple[int, ...], offset: float = 0.0) -> tuple[Tensor, Tensor]:
    """Two correlated feature maps of ``shape`` (e.g. (B, C, H, W)), shifted by ``offset``."""
    s = randn64(gen, *shape)
    return s + offset, 0.5 * s + randn64(gen, *shape) + offset


def to_device(dev: str, dtype: torch.dtype, *ts: Tensor) -> list[Tensor]:
    """``ts`` cast to ``dtype`` (on the CPU first, then moved to ``dev``)."""
    return [t.to(dtype).to(dev) for t in ts]


def histogram_pair(gen: torch.Generator, b: int, c: int) -> tuple[Tensor, Tensor]:
    """Two (b, c) batches of strictly positive histograms (softmax of scaled normals)."""
    return torch.softmax(2 * randn64(gen, b, c), 1), torch.softmax(2 * randn64(gen, b, c), 1)


def random_cost(gen: torch.Generator, c: int) -> Tensor:
    """A symmetric (c, c) cost in [0, 1) with a zero diagonal."""
    a = torch.rand(c, c, generator=gen, dtype=torch.float64)
    cost = (a + a.T) / 2
    cost.fill_diagonal_(0)
    return cost
