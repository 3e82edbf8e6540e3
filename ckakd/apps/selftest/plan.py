"""Which checks run where: the problem sizes per case (CPU, and the larger CUDA ones) and :func:`build_checks`."""

from __future__ import annotations

import os

import torch

from .check import Check
from .cka_checks import cka_checks
from .sinkhorn_checks import sinkhorn_checks, wasserstein_checks

__all__ = ["CKA_BACKENDS", "CPU_CASES", "CUDA_EXTRA_CASES", "SINKHORN_CASES", "SINKHORN_CUDA_CASES", "build_checks"]

CKA_BACKENDS = ("torch", "triton")

# Problem sizes: tiny on the CPU (the Triton interpreter runs every program one after the other), larger
# on CUDA where the multi-tile (n > 64), split-K (large d) and general Sinkhorn (C > 128) paths are reached.
CPU_CASES = {
    "regular": {"cka": (16, 32, 24), "maps": (2, 4, 8, 8), "patch": (2, 2)},
    "odd": {
        "cka": (13, 37, 21),
        "maps": (3, 3, 9, 7),  # resized to (8, 6) for (2, 3) patches
        "patch": (2, 3),
        "classes": 7,
        "ops": (
            "centered_gram",
            "hsic[unbiased]",
            "cka[centered]",
            "cka[debiased]",
            "rcka_loss",
            "patch_cka_loss[channel]",
            "patch_cka_loss[spatial]",
        ),
    },
    "few-features": {"cka": (40, 5, 7), "maps": (2, 4, 8, 8), "patch": (2, 2), "ops": ("cka[centered]", "mmd_loss")},
    "offset+1000": {
        "cka": (24, 40, 30),
        "maps": (2, 4, 8, 8),
        "patch": (2, 2),
        "offset": 1000.0,
        # centered_gram's torch path is not held to the fp32 tolerance at this offset (about 2e-5 of the largest
        # entry, from the fp32 column mean); CKA, HSIC and the losses are.
        "ops": ("cka[centered]", "cka[debiased]", "cka[uncentered]", "hsic[biased]", "patch_cka_loss[channel]"),
    },
}
CUDA_EXTRA_CASES = {
    "multi-tile": {
        "cka": (130, 300, 200),
        "maps": (2, 8, 40, 48),  # 4x4 patches: 120 per problem, the fused kernel's range (the reference loops)
        "patch": (4, 4),
        "ops": ("centered_gram", "cka[centered]", "cka[debiased]", "patch_cka_loss[channel]", "patch_cka_loss[batch]"),
    },
    "split-k": {"cka": (64, 40000, 30000), "maps": (2, 4, 8, 8), "patch": (2, 2), "ops": ("cka[centered]",)},
}
SINKHORN_CASES = {"regular": {"sinkhorn": (6, 10)}, "odd": {"sinkhorn": (3, 7), "ops": ("sinkhorn[fixed]",)}}
SINKHORN_CUDA_CASES = {
    "fused C=100": {"sinkhorn": (16, 100), "ops": ("sinkhorn[fixed]", "wkd_logit_loss[target]")},
    "general C=200": {"sinkhorn": (8, 200), "ops": ("sinkhorn[fixed]", "wkd_logit_loss[target]")},
    "forced general C=64": {
        "sinkhorn": (8, 64),
        "ops": ("sinkhorn[fixed]",),
        "env": {"CKAKD_SINKHORN_CUDA_GENERAL": "1"},
    },
}


def build_checks(device: str, status: dict, *, on_cuda_rules: bool) -> list[Check]:
    """The checks for tensors on ``device`` ('cpu' | 'cuda'), given ``ckakd.backends()`` ``status``.

    Checks of an inactive backend are kept as skipped ones (with the reason): under the CUDA rule the
    separate fast-path check is what fails for them.
    """
    checks: list[Check] = []
    cuda = device == "cuda"
    low = (torch.float16, torch.bfloat16) if cuda else ()

    def why_inactive(backend: str, dev: str) -> str | None:
        b = status[backend]
        if not b.active:
            return f"{backend} inactive: {b.detail}"
        if backend == "triton" and dev == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            return "triton on CPU tensors needs TRITON_INTERPRET=1"
        if backend == "cuda" and dev != "cuda":
            return "the CUDA extension runs on CUDA tensors"
        return None

    def extend(new: list[Check], reason: str | None) -> None:
        for c in new:
            c.skip = reason
        checks.extend(new)

    for backend in CKA_BACKENDS:
        reason = why_inactive(backend, device)
        cases = dict(CPU_CASES, **(CUDA_EXTRA_CASES if cuda else {}))
        for case, dims in cases.items():
            extend(cka_checks(backend, device, torch.float32, case, dims), reason)
        for dtype in low:
            extend(cka_checks(backend, device, dtype, "regular", CPU_CASES["regular"]), reason)

    sinkhorn_targets = [("torch", device), ("cuda", "cuda")] if cuda else [("torch", "cpu")]
    sinkhorn_targets.append(("cpp", "cpu"))
    for backend, dev in sinkhorn_targets:
        reason = why_inactive(backend, dev)
        cases = dict(SINKHORN_CASES, **(SINKHORN_CUDA_CASES if dev == "cuda" else {}))
        for case, dims in cases.items():
            extend(sinkhorn_checks(backend, dev, case, dims), reason)
    extend(wasserstein_checks(device), None)
    return checks
