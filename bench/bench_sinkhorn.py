"""Benchmark of WKD-L's Sinkhorn: mean_b ⟨P_b, C⟩ between softmax(z_s/T) and softmax(z_t/T), shared C×C cost.

Student logits z_s (B, C) require grad, teacher z_t does not; eps 0.05, 10 fixed iterations, T = 2.
Providers: ``ckakd`` (backend "auto": the C++/CUDA extension when built), ``ckakd-torch`` (ckakd's
pure-torch path, same formulas), ``torch-batched`` (the same iterations written plainly with a shared
K, differentiated by autograd), ``authors`` (the WKD public code's formulation: per-sample cost copies
(B, C, C), bmm, an explicit B×C×C plan), ``pot`` (POT's ``ot.batch.solve_batch`` Sinkhorn, 10
iterations of its own log-domain scheme: a different algorithm, timed but not value-checked).

Cost model for the floor: each iteration is two (B×C)·(C×C) products (4·B·C² flops) forward and two
backward; bytes: K and K∘C read once per product (they stay in cache on the CPU), histories B·C each.
On CUDA the ``launches`` column counts the kernels launched inside the Sinkhorn ops (``KERNEL_SCOPE``) per call;
it is empty for providers that never enter them (torch-batched, authors, pot).
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from harness import cli
from harness.providers import ckakd_providers, mode_cost
from harness.spec import Dims, OpBench, Provider, Target
from torch import Tensor

import ckakd

EPS, ITERS, TEMPERATURE = 0.05, 10, 2.0

SHAPES: dict[str, Dims] = {"b64-c100": (64, 100), "b256-c1000": (256, 1000), "b512-c1000": (512, 1000)}
PRESETS: dict[str, tuple[str, ...]] = {
    "cpu": ("b64-c100", "b256-c1000", "b512-c1000"),
    "gpu": ("b64-c100", "b256-c1000", "b512-c1000"),
    "quick-cpu": ("b64-c100",),
    "quick-gpu": ("b64-c100", "b512-c1000"),  # every GPU target
}
TARGETS = (
    Target.speedup("cpu", "b256-c1000", "full", 1.0, "torch-batched"),
    Target.speedup("cpu", "b256-c1000", "full", 10.0, "authors"),
    # GPU (issue 12): (512, 1000) fwd+bwd in ≤ 1 ms and ≥ 30× the per-sample formulation; at (64, 100) the
    # Sinkhorn forward and backward are one kernel launch each (the fused one-block-per-sample kernels)
    Target.time("cuda", "b512-c1000", "full", 1.0),
    Target.speedup("cuda", "b512-c1000", "full", 30.0, "authors"),
    Target.launches("cuda", "b64-c100", "forward", 1),
    Target.launches("cuda", "b64-c100", "backward", 1),
)
# The `launches` column counts the kernels launched inside the Sinkhorn ops only (not the softmax, mean, ... of
# the loss around them): the fixed-mode ops of the extension and their torch twins (ckakd/ops/sinkhorn_fixed.py).
KERNEL_SCOPE = (
    "ckakd::sinkhorn_fixed_forward",
    "ckakd::sinkhorn_fixed_backward",
    "ckakd::sinkhorn_fixed_forward_torch",
    "ckakd::sinkhorn_fixed_backward_torch",
)


def make_inputs(dims: Dims, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    b, c = dims
    gen = torch.Generator().manual_seed(0)
    zt = torch.randn(b, c, generator=gen) * 3
    zs = (0.7 * zt + torch.randn(b, c, generator=gen) * 2).to(device=device, dtype=dtype)
    a = torch.rand(c, c, generator=gen)
    cost = ((a + a.T) / 2).fill_diagonal_(0) + 1e-8
    return zs.requires_grad_(), zt.to(device=device, dtype=dtype), cost.to(device=device, dtype=dtype)


def cost_model(dims: Dims, mode: str, esize: int) -> tuple[float, float]:
    b, c = dims
    fwd = (ITERS * 4 * b * c * c, (3 * b * c + 2 * c * c + ITERS * 4 * b * c) * esize)
    bwd = (ITERS * 4 * b * c * c, (2 * b * c + ITERS * 4 * b * c) * esize)
    return mode_cost(mode, fwd, bwd)


def _probs(zs: Tensor, zt: Tensor) -> tuple[Tensor, Tensor]:
    return F.softmax(zs.float() / TEMPERATURE, 1), F.softmax(zt.float() / TEMPERATURE, 1)


def ckakd_loss(zs: Tensor, zt: Tensor, cost: Tensor, backend: str = "auto") -> Tensor:
    return ckakd.wkd_logit_loss(zs, zt, cost, temperature=TEMPERATURE, eps=EPS, iters=ITERS, backend=backend)


def torch_batched_loss(zs: Tensor, zt: Tensor, cost: Tensor) -> Tensor:
    p, q = _probs(zs, zt)
    k = torch.exp(-cost.float() / EPS)
    u = torch.full_like(p, 1.0 / p.shape[1])
    v = q
    for _ in range(ITERS):
        v = q / (u @ k + 1e-8)
        u = p / (v @ k.T + 1e-8)
    return ((u @ (k * cost.float())) * v).sum(1).mean()


# Per-sample (B, C, C) formulations get slow and large: on the CPU, skip them beyond this many elements
# (B=256, C=1000 takes ~15 s per call; POT's autodiff keeps several B×C×C tensors per iteration).
CPU_LIMITS = {"authors": 256 * 1000 * 1000, "pot": 64 * 100 * 100}


def _guard(name: str, p: Tensor) -> None:
    b, c = p.shape
    if p.device.type == "cpu" and b * c * c > CPU_LIMITS[name]:
        raise RuntimeError(f"skipped on the CPU: B·C² = {b * c * c:.2g} > {CPU_LIMITS[name]:.2g} elements")


def authors_loss(zs: Tensor, zt: Tensor, cost: Tensor) -> Tensor:
    p, q = _probs(zs, zt)
    _guard("authors", p)
    b, c = p.shape
    costs = (F.relu(cost.float()) + 0.0).repeat(b, 1, 1)  # per-sample cost copies, as the public code builds
    k = torch.exp(-costs / EPS)
    kt = k.transpose(2, 1)
    u = torch.full_like(p, 1.0 / c)[:, :, None]
    w1, w2 = p[:, :, None], q[:, :, None]
    v = w2
    for _ in range(ITERS):
        v = w2 / (torch.bmm(kt, u) + 1e-8)
        u = w1 / (torch.bmm(k, v) + 1e-8)
    flow = u.reshape(b, -1, 1) * k * v.reshape(b, 1, -1)
    return (flow * costs).sum(-1).sum(-1).mean()


def pot_loss(zs: Tensor, zt: Tensor, cost: Tensor) -> Tensor:
    from ot.batch import solve_batch

    p, q = _probs(zs, zt)
    _guard("pot", p)
    b, c = p.shape
    res = solve_batch(cost.float().expand(b, c, c), reg=EPS, a=p, b=q, max_iter=ITERS, tol=0.0, grad="autodiff")
    return res.value_linear.mean()


def providers(device: torch.device) -> list[Provider]:
    out = ckakd_providers(device, ckakd_loss, torch_on_cpu=True) + [
        Provider("torch-batched", torch_batched_loss),
        Provider("authors", authors_loss),
    ]
    try:
        import ot.batch  # noqa: F401

        out.append(Provider("pot", pot_loss, checked=False))
    except ImportError:
        pass
    return out


BENCH = OpBench(
    op="sinkhorn",
    shapes=SHAPES,
    presets=PRESETS,
    make_inputs=make_inputs,
    cost=cost_model,
    providers=providers,
    baseline="torch-batched",
    targets=TARGETS,
    kernel_scope=KERNEL_SCOPE,
)

if __name__ == "__main__":
    sys.exit(cli.main([BENCH], description=__doc__.splitlines()[0]))
