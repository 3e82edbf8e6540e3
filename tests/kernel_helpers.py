"""Shared helpers of the op and kernel tests (tests/ops/, tests/losses/): inputs, float64 references of the
kernels' outputs, comparisons with the per-dtype tolerances of ``tests.conftest.TOLERANCES``, weighted gradients,
and the ``backend_device`` fixture (torch on the CPU, Triton on CUDA or the interpreter)."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import TOLERANCES

LOW = [torch.float16, torch.bfloat16]


# ---------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------


def rand_input(shape, device, dtype=torch.float32, offset: float = 0.0, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(shape, dtype=torch.float64) * scale + offset).to(dtype).to(device)


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """assert_close with the dtype's (atol, rtol), both relative to max |expected| (at least 1)."""
    atol, rtol = TOLERANCES[dtype]
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual.double().cpu() / scale, expected.double().cpu() / scale, atol=atol, rtol=rtol)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double().cpu() - expected.cpu()).norm() / expected.cpu().norm().clamp_min(1e-300)).item()


def ref_gram(x: torch.Tensor, center: bool) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.double()
    mean = x.mean(dim=1)
    xc = x - mean[:, None] if center else x
    return xc @ xc.transpose(1, 2), mean


def ref_dots(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    k, l = k.double(), l.double()
    return torch.stack([(k * l).sum((1, 2)), (k * k).sum((1, 2)), (l * l).sum((1, 2))], dim=1)


def problem_matrices(f: torch.Tensor, ph: int, pw: int, reduce: str) -> torch.Tensor:
    """(G, P, D) problem matrices of a (B, C, H, W) tensor, feature order as in kernels.patch_alignment_stats."""
    B, C, H, W = f.shape
    v = f.reshape(B, C, H // ph, ph, W // pw, pw)  # b c pi i pj j
    P = (H // ph) * (W // pw)
    if reduce == "channel":
        return v.permute(1, 2, 4, 0, 3, 5).reshape(C, P, B * ph * pw)
    if reduce == "batch":
        return v.permute(0, 2, 4, 1, 3, 5).reshape(B, P, C * ph * pw)
    return v.permute(3, 5, 2, 4, 0, 1).reshape(ph * pw, P, B * C)


def from_problem_matrices(x: torch.Tensor, shape, ph: int, pw: int, reduce: str) -> torch.Tensor:
    """Inverse of :func:`problem_matrices`."""
    B, C, H, W = shape
    Ph, Pw = H // ph, W // pw
    if reduce == "channel":
        return x.reshape(C, Ph, Pw, B, ph, pw).permute(3, 0, 1, 4, 2, 5).reshape(shape)
    if reduce == "batch":
        return x.reshape(B, Ph, Pw, C, ph, pw).permute(0, 3, 1, 4, 2, 5).reshape(shape)
    return x.reshape(ph, pw, Ph, Pw, B, C).permute(4, 5, 2, 0, 3, 1).reshape(shape)


def center_problem_matrices(x: torch.Tensor, center: bool) -> torch.Tensor:
    return x - x.mean(dim=1, keepdim=True) if center else x


def ref_patch(f_s, f_t, ph, pw, reduce, center):
    xs = center_problem_matrices(problem_matrices(f_s.double(), ph, pw, reduce), center)
    xt = center_problem_matrices(problem_matrices(f_t.double(), ph, pw, reduce), center)
    ks, kt = xs @ xs.transpose(1, 2), xt @ xt.transpose(1, 2)
    return ref_dots(ks, kt), ks, kt, xs, xt


def ref_gram_backward(m, x, mean, center):
    """float64 ``m @ (x - mean)`` (``m @ x`` when not ``center``), the reference of ``gram_backward``."""
    xd = x.double()
    return m.double() @ (xd - mean.double()[:, None] if center else xd)


def record_launches(fn) -> list[tuple]:
    """The launches ``fn()`` makes, as (kernel name, grid, args, meta), without running any."""
    from ckakd.kernels import _launch  # needs triton

    out: list[tuple] = []
    with _launch.recording(lambda kernel, grid, args, meta: out.append((kernel.__name__, grid, args, meta))):
        fn()
    return out


def launch_metas(launches, name: str) -> list[dict]:
    """The meta-parameters of the recorded launches of kernel ``name``."""
    return [meta for kernel, _, _, meta in launches if kernel == name]


def table_ids(table: dict) -> list[tuple[int, int]]:
    """(key, index) of every candidate of a keyed launch table."""
    return [(key, i) for key, configs in table.items() for i in range(len(configs))]


def sum_f64(*tensors: torch.Tensor, rows: int = 4096) -> float:
    """Σ of the elementwise product of same-shape tensors in float64, ``rows`` leading indices at a time."""
    total = 0.0
    for i in range(0, tensors[0].shape[0], rows):
        prod = tensors[0][i : i + rows].double()
        for t in tensors[1:]:
            prod = prod * t[i : i + rows].double()
        total += prod.sum().item()
    return total


@pytest.fixture(params=["torch", "triton"])
def backend_device(request, triton_device):
    """(backend, device) pairs: the torch path on the CPU, Triton on CUDA or the CPU interpreter."""
    if request.param == "torch":
        return "torch", "cpu"
    return "triton", triton_device


def rand_features(*shape, device="cpu", dtype=torch.float32, offset=0.0) -> torch.Tensor:
    """Standard normal features (+ offset) drawn in float64, then cast to ``dtype`` on ``device``."""
    return (torch.randn(*shape, dtype=torch.float64) + offset).to(device=device, dtype=dtype)


def assert_close_tol(actual, expected, dtype, scale=1.0) -> None:
    """assert_close with the dtype's (atol · scale, rtol) from ``tests.conftest.TOLERANCES``, any dtypes."""
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(
        actual.double().cpu(), expected.double().cpu(), atol=atol * scale, rtol=rtol, check_dtype=False
    )


def weighted_grads(fn, *inputs, weight=None):
    """(output, gradients of weight·fn(*inputs), weight); weight ≠ 1 exercises grad_output scaling."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    if weight is None:  # the same pseudo-random weights for every call with this output shape
        gen = torch.Generator().manual_seed(1234)
        w = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out)
    else:
        w = torch.full_like(out, weight)
    (out * w).sum().backward()
    return out.detach(), [t.grad for t in leaves], w
