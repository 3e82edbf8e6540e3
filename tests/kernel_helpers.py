"""Shared helpers of the Triton kernel tests: float64 references of the kernels' outputs, tolerances, inputs."""

from __future__ import annotations

import torch

TOLERANCES = {
    torch.float32: (1e-5, 5e-4),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (5e-3, 5e-2),
}

LOW = [torch.float16, torch.bfloat16]


# ---------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------


def _randn(shape, device, dtype=torch.float32, offset: float = 0.0, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(shape, dtype=torch.float64) * scale + offset).to(dtype).to(device)


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """assert_close with the dtype's (atol, rtol), both relative to max |expected| (at least 1)."""
    atol, rtol = TOLERANCES[dtype]
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual.double().cpu() / scale, expected.double().cpu() / scale, atol=atol, rtol=rtol)


def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double().cpu() - expected.cpu()).norm() / expected.cpu().norm().clamp_min(1e-300)).item()


def _ref_gram(x: torch.Tensor, center: bool) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.double()
    mean = x.mean(dim=1)
    xc = x - mean[:, None] if center else x
    return xc @ xc.transpose(1, 2), mean


def _ref_dots(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    k, l = k.double(), l.double()
    return torch.stack([(k * l).sum((1, 2)), (k * k).sum((1, 2)), (l * l).sum((1, 2))], dim=1)


def _problems(f: torch.Tensor, ph: int, pw: int, reduce: str) -> torch.Tensor:
    """(G, P, D) problem matrices of a (B, C, H, W) tensor, feature order as in kernels.patch_alignment_stats."""
    B, C, H, W = f.shape
    v = f.reshape(B, C, H // ph, ph, W // pw, pw)  # b c pi i pj j
    P = (H // ph) * (W // pw)
    if reduce == "channel":
        return v.permute(1, 2, 4, 0, 3, 5).reshape(C, P, B * ph * pw)
    if reduce == "batch":
        return v.permute(0, 2, 4, 1, 3, 5).reshape(B, P, C * ph * pw)
    return v.permute(3, 5, 2, 4, 0, 1).reshape(ph * pw, P, B * C)


def _unproblems(x: torch.Tensor, shape, ph: int, pw: int, reduce: str) -> torch.Tensor:
    """Inverse of :func:`_problems`."""
    B, C, H, W = shape
    Ph, Pw = H // ph, W // pw
    if reduce == "channel":
        return x.reshape(C, Ph, Pw, B, ph, pw).permute(3, 0, 1, 4, 2, 5).reshape(shape)
    if reduce == "batch":
        return x.reshape(B, Ph, Pw, C, ph, pw).permute(0, 3, 1, 4, 2, 5).reshape(shape)
    return x.reshape(ph, pw, Ph, Pw, B, C).permute(4, 5, 2, 0, 3, 1).reshape(shape)


def _center_problems(x: torch.Tensor, center: bool) -> torch.Tensor:
    return x - x.mean(dim=1, keepdim=True) if center else x


def _ref_patch(f_s, f_t, ph, pw, reduce, center):
    xs = _center_problems(_problems(f_s.double(), ph, pw, reduce), center)
    xt = _center_problems(_problems(f_t.double(), ph, pw, reduce), center)
    ks, kt = xs @ xs.transpose(1, 2), xt @ xt.transpose(1, 2)
    return _ref_dots(ks, kt), ks, kt, xs, xt
