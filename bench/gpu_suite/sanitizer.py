"""``sanitizer-cases``: tiny cases that launch every CUDA / Triton kernel once forward and backward, for
``compute-sanitizer --tool memcheck / racecheck``."""

from __future__ import annotations

from collections.abc import Callable

from gpu_suite.support import Env, Runner, close, expect_dispatch, fwd_bwd, histograms, randn


def sanitizer_cases(env: Env, runner: Runner) -> None:
    """Tiny cases: every CUDA / Triton kernel launched once forward and backward, synchronized after each."""
    import ckakd
    from ckakd.apps.selftest import environment

    def sinkhorn_case(b: int, c: int, general: bool) -> Callable[[], str]:
        def run() -> str:
            p, q, cost = histograms(env, b, c, seed=c)
            with environment({"CKAKD_SINKHORN_CUDA_GENERAL": "1" if general else "0"}):
                with expect_dispatch(env.ext, "sinkhorn_fixed_forward", "sinkhorn_fixed_backward"):
                    out, grads = fwd_bwd(
                        lambda a, t: ckakd.sinkhorn(a, t, cost, eps=0.1, iters=5, backend=env.ext), [p, q], [True, True]
                    )
                    env.sync()
            ref, ref_grads = fwd_bwd(
                lambda a, t: ckakd.sinkhorn(a, t, cost, eps=0.1, iters=5, backend="torch"), [p, q], [True, True]
            )
            errs = [close("grad", g, r, rtol=1e-3) for g, r in zip(grads, ref_grads, strict=True)]
            err = max(close("cost", out, ref), *errs)
            return f"B={b} C={c} max rel err vs torch {err:.1e}"

        return run

    fused_c = env.size(100, 12)
    runner.run(f"sanitizer-cases/sinkhorn fused (C={fused_c} <= 128)", sinkhorn_case(4, fused_c, False))
    general_c = env.size(160, 20)
    runner.run(f"sanitizer-cases/sinkhorn general (C={general_c} > 128)", sinkhorn_case(3, general_c, False))
    runner.run("sanitizer-cases/sinkhorn general forced (CKAKD_SINKHORN_CUDA_GENERAL=1)", sinkhorn_case(3, 16, True))

    def wkd_target() -> str:
        import torch

        c = env.size(100, 12)
        zs, zt = randn(env, 4, c, seed=1), randn(env, 4, c, seed=2)
        _, _, cost = histograms(env, 1, c, seed=3)
        target = torch.arange(4, device=env.device) % c
        with expect_dispatch(env.ext, "sinkhorn_fixed_forward", "sinkhorn_fixed_backward"):
            fwd_bwd(lambda s: ckakd.wkd_logit_loss(s, zt, cost, target=target, backend=env.ext), [zs], [True])
            env.sync()
        return f"B=4 C={c} (zero-mass start)"

    runner.run("sanitizer-cases/wkd_logit_loss target separation", wkd_target)

    def converged() -> str:
        p, q, cost = histograms(env, 3, 10, seed=4)
        with expect_dispatch(env.ext, "sinkhorn_converged"):
            fwd_bwd(
                lambda a, t: ckakd.sinkhorn(a, t, cost, eps=0.2, tol=1e-6, max_iter=200, backend=env.ext),
                [p, q],
                [True, True],
            )
            env.sync()
        return "B=3 C=10"

    runner.run("sanitizer-cases/sinkhorn converged", converged)

    def gram_case(n: int, d: int) -> Callable[[], str]:
        def run() -> str:
            x = randn(env, n, d, seed=n, offset=3.0)
            with expect_dispatch("triton", "gram", "gram_apply"):
                k, (g,) = fwd_bwd(lambda a: ckakd.centered_gram(a, backend="triton"), [x], [True])
                env.sync()
            rk, (rg,) = fwd_bwd(lambda a: ckakd.centered_gram(a, backend="torch"), [x], [True])
            return f"n={n} d={d} max rel err vs torch {max(close('gram', k, rk), close('grad', g, rg)):.1e}"

        return run

    runner.run("sanitizer-cases/triton gram fwd+bwd (single tile)", gram_case(20, 50))
    runner.run("sanitizer-cases/triton gram fwd+bwd (multi-tile, column means)", gram_case(70, 40))
    split_d = env.size(8192, 256)
    runner.run("sanitizer-cases/triton gram fwd+bwd (long d, split-K on a GPU)", gram_case(16, split_d))

    def frobenius() -> str:
        x, y = randn(env, 24, 40, seed=5), randn(env, 24, 30, seed=6)
        with expect_dispatch("triton", "gram", "frobenius_dots", "gram_apply"):
            fwd_bwd(lambda a, b: ckakd.cka(a, b, mode="debiased", backend="triton"), [x, y], [True, True])
            env.sync()
        return "cka debiased n=24"

    runner.run("sanitizer-cases/triton frobenius dots (cka)", frobenius)

    def patch_case(reduce: str, teacher_grad: bool) -> Callable[[], str]:
        def run() -> str:
            f_s, f_t = randn(env, 2, 6, 8, 8, seed=7), randn(env, 2, 6, 8, 8, seed=8)
            with expect_dispatch("triton", "patch_cka_forward", "patch_cka_backward"):
                fwd_bwd(
                    lambda a, b: ckakd.patch_cka_loss(a, b, patch_size=2, reduce=reduce, backend="triton"),
                    [f_s, f_t],
                    [True, teacher_grad],
                )
                env.sync()
            return f"(2, 6, 8, 8), 2x2 patches, teacher grad {teacher_grad}"

        return run

    for reduce in ("channel", "batch", "spatial"):
        runner.run(f"sanitizer-cases/triton patch CKA fwd+bwd ({reduce})", patch_case(reduce, reduce == "channel"))
