"""The checks of the CKA family: centered_gram, hsic, cka, cka_loss, rcka_loss, patch_cka_loss and mmd_loss,
each on one backend against ``ckakd.reference``."""

from __future__ import annotations

import zlib
from collections.abc import Callable

import torch

import ckakd
from ckakd import reference as R

from .check import GRAM, PATCH, STATS, Check, feature_pair, map_pair, to_device
from .compare import Comparison, value_and_grad_check

__all__ = ["cka_checks"]


def cka_checks(backend: str, dev: str, dtype: torch.dtype, case: str, dims: dict) -> list[Check]:
    """Every CKA-family op for one (backend, device, dtype, case); ``dims`` sizes the inputs."""
    n, dx, dy = dims["cka"]
    offset = dims.get("offset", 0.0)
    maps_shape = dims["maps"]
    patch = dims["patch"]
    ops = dims.get("ops")  # None: all
    checks: list[Check] = []

    def add(op: str, fn: Callable[[], list[Comparison]], required: tuple[str, ...]) -> None:
        if ops is None or op in ops:
            checks.append(Check(op, backend, dev, dtype, case, fn, required))

    def seeded() -> torch.Generator:
        return torch.Generator().manual_seed(zlib.crc32(f"{case} {n} {dx} {dy}".encode()))

    def gram_check() -> list[Comparison]:
        (x, _) = feature_pair(seeded(), n, dx, dy, offset)
        (x,) = to_device(dev, dtype, x)
        return value_and_grad_check(
            lambda a: ckakd.centered_gram(a, backend=backend), R.centered_gram, [x], [True], dtype, ["x"]
        )

    add("centered_gram", gram_check, GRAM)

    for mode in ("biased", "unbiased"):

        def hsic_check(mode=mode) -> list[Comparison]:
            x, y = to_device(dev, dtype, *feature_pair(seeded(), n, dx, dy, offset))
            return value_and_grad_check(
                lambda a, b: ckakd.hsic(a, b, mode=mode, backend=backend),
                lambda a, b: R.hsic(a, b, mode=mode),
                [x, y],
                [True, True],
                dtype,
                ["x", "y"],
            )

        add(f"hsic[{mode}]", hsic_check, STATS)

    for mode in ("centered", "debiased", "uncentered"):

        def cka_check(mode=mode) -> list[Comparison]:
            x, y = to_device(dev, dtype, *feature_pair(seeded(), n, dx, dy, offset))
            grad = mode != "uncentered" or not offset
            return value_and_grad_check(
                lambda a, b: ckakd.cka(a, b, mode=mode, backend=backend),
                lambda a, b: R.cka(a, b, mode=mode),
                [x, y],
                [grad, grad],
                dtype,
                ["x", "y"] if grad else [],
            )

        # Uncentered alignment of offset features is ~1 with a gradient that cancels O(1) terms: ill-conditioned
        # in fp32 by definition, so the offset case checks its value only (as the tests do).
        add(f"cka[{mode}]", cka_check, STATS if mode != "uncentered" or not offset else ("gram", "frobenius_dots"))

    def cka_loss_check() -> list[Comparison]:
        _, c, h, w = maps_shape  # n samples of (C, H, W) maps
        gen = seeded()
        x, y = map_pair(gen, (n, c, h, w), offset)
        x, y = to_device(dev, dtype, x, y[:, : max(1, c - 1)])
        return value_and_grad_check(
            lambda a, t: ckakd.cka_loss(a, t, backend=backend), R.cka_loss, [x, y], [True, False], dtype, ["x"]
        )

    add("cka_loss", cka_loss_check, STATS)

    def rcka_check() -> list[Comparison]:
        gen = seeded()
        _, c, h, w = maps_shape
        k = dims.get("classes", 10)
        x1, y1 = map_pair(gen, (n, c, h, w), offset)
        x2, y2 = feature_pair(gen, n, dx, dy, offset)
        zs, zt = feature_pair(gen, n, k, k)
        inputs = to_device(dev, dtype, x1, x2, zs, y1, y2, zt)

        def fast(a1, a2, s, t1, t2, t):
            return ckakd.rcka_loss([a1, a2], [t1, t2], s, t, alpha=2.0, beta=3.0, backend=backend)

        def ref(a1, a2, s, t1, t2, t):
            return R.rcka_loss([a1, a2], [t1, t2], s, t, alpha=2.0, beta=3.0)

        return value_and_grad_check(
            fast, ref, inputs, [True, True, True, False, False, False], dtype, ["feats_s[0]", "feats_s[1]", "logits_s"]
        )

    add("rcka_loss", rcka_check, STATS)

    reduces = [("channel", "centered"), ("batch", "centered"), ("spatial", "centered"), ("mix", "centered")]
    reduces.append(("channel", "debiased"))
    for reduce, mode in reduces:

        def patch_check(reduce=reduce, mode=mode) -> list[Comparison]:
            gen = seeded()
            if reduce == "mix":  # three levels: batch, spatial, channel reductions
                b, c, h, w = maps_shape
                shapes = [(b, c, h, w), (b, c, max(patch[0] * 2, h * 3 // 4), max(patch[1] * 2, w * 3 // 4))]
                shapes.append((b, c, patch[0] * 2, patch[1] * 2))
            else:
                shapes = [maps_shape]
            pairs = [map_pair(gen, s, offset) for s in shapes]
            inputs = to_device(dev, dtype, *[p[0] for p in pairs], *[p[1] for p in pairs])
            levels = len(shapes)

            def fast(*ts):
                return ckakd.patch_cka_loss(
                    list(ts[:levels]), list(ts[levels:]), patch_size=patch, reduce=reduce, mode=mode, backend=backend
                )

            def ref(*ts):
                return R.patch_cka_loss(
                    list(ts[:levels]), list(ts[levels:]), patch_size=patch, reduce=reduce, mode=mode
                )

            names = [f"f_s[{i}]" for i in range(levels)]
            return value_and_grad_check(fast, ref, inputs, [True] * levels + [False] * levels, dtype, names)

        label = f"patch_cka_loss[{reduce}]" if mode == "centered" else f"patch_cka_loss[{reduce};{mode}]"
        add(label, patch_check, PATCH)

    def mmd_check() -> list[Comparison]:
        x, y = to_device(dev, dtype, *feature_pair(seeded(), n, dx, dy, offset))
        return value_and_grad_check(
            lambda a, b: ckakd.mmd_loss(a, b, backend=backend), R.mmd_loss, [x, y], [True, False], dtype, ["x"]
        )

    add("mmd_loss", mmd_check, STATS)
    return checks
