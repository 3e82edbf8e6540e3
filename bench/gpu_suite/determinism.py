"""``determinism``: two runs of the same forward + backward (after a warm-up) are bitwise identical."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from gpu_suite.support import Env, Failed, Runner, expect_dispatch, fwd_bwd, histograms, randn


def determinism(env: Env, runner: Runner) -> None:
    """The same forward + backward twice (after a warm-up): bitwise-identical values and gradients."""
    import torch

    import ckakd

    def twice(fn: Callable, inputs: Sequence, need: Sequence[bool], backend: str, primitives: Sequence[str]) -> str:
        fwd_bwd(fn, inputs, need)  # warm-up: compilation, autotuning
        with expect_dispatch(backend, *primitives):
            first = fwd_bwd(fn, inputs, need)
            second = fwd_bwd(fn, inputs, need)
        env.sync()
        tensors = [(first[0], second[0])] + list(zip(first[1], second[1], strict=True))
        differ = [i for i, (a, b) in enumerate(tensors) if not torch.equal(a, b)]
        if differ:
            worst = max((a.double() - b.double()).abs().max().item() for a, b in tensors)
            raise Failed(f"outputs {differ} (0 = value, then grads) differ between runs, by up to {worst:.3g}")
        return "bitwise identical"

    n_big, d_big = env.size(64, 12), env.size(60000, 300)
    n_tiles, d_tiles = env.size(200, 70), env.size(3000, 40)
    stats = ("gram", "frobenius_dots", "gram_apply")
    for mode in ("centered", "debiased", "uncentered"):
        for n, d, what in ((n_big, d_big, "long d (split-K)"), (n_tiles, d_tiles, "multi-tile")):
            x, y = randn(env, n, d, seed=1, offset=2.0), randn(env, n, d // 2, seed=2)

            def run(x=x, y=y, mode=mode) -> str:
                return twice(
                    lambda a, b: ckakd.cka(a, b, mode=mode, backend="triton"), [x, y], [True, True], "triton", stats
                )

            runner.run(f"determinism/cka {mode} n={n} d={d} ({what})", run)

    shape = (2, env.size(64, 4), env.size(32, 8), env.size(32, 8))
    ps = env.size(4, 2)
    for reduce in ("channel", "batch", "spatial", "mix"):
        levels = 3 if reduce == "mix" else 1
        f_s = [randn(env, *shape, seed=10 + i) for i in range(levels)]
        f_t = [randn(env, *shape, seed=20 + i) for i in range(levels)]

        def run_patch(f_s=f_s, f_t=f_t, reduce=reduce, levels=levels) -> str:
            def fn(*ts):
                return ckakd.patch_cka_loss(
                    list(ts[:levels]), list(ts[levels:]), patch_size=ps, reduce=reduce, backend="triton"
                )

            return twice(fn, f_s + f_t, [True] * levels + [False] * levels, "triton", ("patch_cka_forward",))

        runner.run(f"determinism/patch_cka_loss {reduce} {shape} {ps}x{ps} patches", run_patch)

    for c in (env.size(100, 10), env.size(1000, 20)):
        b = env.size(64, 6)
        zs, zt = randn(env, b, c, seed=30), randn(env, b, c, seed=31)
        _, _, cost = histograms(env, 1, c, seed=32)
        target = (torch.arange(b) % c).to(env.device)

        def run_wkd(zs=zs, zt=zt, cost=cost, target=target) -> str:
            return twice(
                lambda s: ckakd.wkd_logit_loss(s, zt, cost, target=target, temperature=4.0, backend=env.ext),
                [zs],
                [True],
                env.ext,
                ("sinkhorn_fixed_forward", "sinkhorn_fixed_backward"),
            )

        runner.run(f"determinism/wkd_logit_loss B={b} C={c} ({env.ext})", run_wkd)
