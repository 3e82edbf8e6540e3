"""The checks of the optimal-transport ops: sinkhorn (fixed iterations and converged), wkd_logit_loss,
wkd_feature_loss and gaussian_wasserstein, against ``ckakd.reference``."""

from __future__ import annotations

from collections.abc import Callable

import torch

import ckakd
from ckakd import reference as R

from .check import CONVERGED, FIXED, Check, feature_pair, histogram_pair, map_pair, randn64, random_cost, to_device
from .compare import Comparison, compare, forward_backward, value_and_grad_check

__all__ = ["sinkhorn_checks", "wasserstein_checks"]


def sinkhorn_checks(backend: str, dev: str, case: str, dims: dict) -> list[Check]:
    """Sinkhorn (fixed, converged) and WKD-L for one backend and device, fp32."""
    dtype = torch.float32
    b, c = dims["sinkhorn"]
    ops = dims.get("ops")
    env = dims.get("env", {})
    eps, iters = 0.1, 10
    checks: list[Check] = []

    def add(op: str, fn: Callable[[], list[Comparison]], required: tuple[str, ...]) -> None:
        if ops is None or op in ops:
            checks.append(Check(op, backend, dev, dtype, case, fn, required, env=dict(env)))

    def seeded() -> torch.Generator:
        return torch.Generator().manual_seed(1000 * b + c)

    def fixed_check() -> list[Comparison]:
        gen = seeded()
        p, q = histogram_pair(gen, b, c)
        cost = random_cost(gen, c)
        (cost_d,) = to_device(dev, dtype, cost)
        p, q = to_device(dev, dtype, p, q)
        return value_and_grad_check(
            lambda a, t: ckakd.sinkhorn(a, t, cost_d, eps=eps, iters=iters, backend=backend),
            lambda a, t: R.sinkhorn_fixed(a, t, cost.double(), eps=eps, iters=iters),
            [p, q],
            [True, True],
            dtype,
            ["p", "q"],
            grad_rtol_mult=10.0,
        )

    add("sinkhorn[fixed]", fixed_check, FIXED)

    def converged_check() -> list[Comparison]:
        gen = seeded()
        p64, q64 = histogram_pair(gen, b, c)
        cost = random_cost(gen, c)
        ceps = 0.2
        p, q, cost_d = to_device(dev, dtype, p64, q64, cost)
        out, (gp, gq), w = forward_backward(
            lambda a, t: ckakd.sinkhorn(a, t, cost_d, eps=ceps, tol=1e-9, max_iter=5000, backend=backend),
            [p, q],
            [True, True],
        )
        # Value: <P*, C> of the converged plan = the fixed iterations run to convergence (float64 reference).
        pr, qr = (t.double().cpu() for t in (p, q))
        pr, qr = pr / pr.sum(1, keepdim=True), qr / qr.sum(1, keepdim=True)  # exact histograms in float64
        ref_value = R.sinkhorn_fixed(pr, qr, cost, eps=ceps, iters=3000)
        comps = [compare("value", out, ref_value, dtype, value=True)]
        # Gradient: that of the returned value <P*, C> (implicit differentiation); check directional derivatives
        # along zero-sum directions against central differences of the converged reference iterations.
        h = 1e-5
        rows = min(b, 2)
        for name, g, which in (("p", gp, 0), ("q", gq, 1)):
            # zero-sum directions proportional to the histogram, so that the moved one stays positive
            base = (pr, qr)[which][:rows]
            r = randn64(gen, rows, c)
            dirs = base * (r - (base * r).sum(1, keepdim=True))
            got, want = [], []
            for i in range(rows):
                args = [pr[i], qr[i]]

                def objective(step: float, args=args, which=which, d=dirs[i]) -> float:
                    moved = list(args)
                    moved[which] = args[which] + step * d
                    return R.sinkhorn_fixed(moved[0][None], moved[1][None], cost, eps=ceps, iters=3000).item()

                fd = (objective(h) - objective(-h)) / (2 * h)
                got.append((g[i].double().cpu() * dirs[i]).sum())
                want.append(w[i] * fd)
            comps.append(compare(f"grad {name} (directional)", torch.stack(got), torch.stack(want), dtype, value=False))
        return comps

    add("sinkhorn[converged]", converged_check, CONVERGED)

    def wkd_check(with_target: bool) -> list[Comparison]:
        gen = seeded()
        zs, zt = feature_pair(gen, b, c, c)
        zs, zt = 2 * zs, 2 * zt
        cost = random_cost(gen, c)
        target = torch.randint(0, c, (b,), generator=gen)
        temperature, gamma = 4.0, 2.0
        zs_d, zt_d, cost_d = to_device(dev, dtype, zs, zt, cost)
        target_d = target.to(dev)

        def fast(s, t):
            return ckakd.wkd_logit_loss(
                s,
                t,
                cost_d,
                temperature=temperature,
                gamma=gamma,
                eps=eps,
                iters=iters,
                target=target_d if with_target else None,
                backend=backend,
            )

        def ref(s, t):
            if with_target:
                return R.wkd_logit_loss_reduced(
                    s, t, target, cost.double(), temperature=temperature, gamma=gamma, eps=eps, iters=iters
                )
            p, q = torch.softmax(s / temperature, 1), torch.softmax(t / temperature, 1)
            return gamma * R.sinkhorn_fixed(p, q, cost.double(), eps=eps, iters=iters).mean()

        return value_and_grad_check(fast, ref, [zs_d, zt_d], [True, False], dtype, ["logits_s"], grad_rtol_mult=10.0)

    add("wkd_logit_loss[target]", lambda: wkd_check(True), FIXED)
    add("wkd_logit_loss[no target]", lambda: wkd_check(False), FIXED)
    return checks


def wasserstein_checks(dev: str) -> list[Check]:
    """WKD-F and the Gaussian W2 (pure torch, no backend choice), fp32."""
    dtype = torch.float32
    checks: list[Check] = []

    for cov, grid in (("diag", 2), ("full", 1)):

        def feature_check(cov=cov, grid=grid) -> list[Comparison]:
            gen = torch.Generator().manual_seed(7)
            f_s, f_t = map_pair(gen, (2, 4, 6, 6))
            inputs = to_device(dev, dtype, f_s, f_t)
            return value_and_grad_check(
                lambda a, b: ckakd.wkd_feature_loss(a, b, grid=grid, mean_weight=2.0, cov=cov),
                lambda a, b: R.wkd_feature_loss(a, b, grid=grid, mean_weight=2.0, cov=cov),
                inputs,
                [True, False],
                dtype,
                ["f_s"],
            )

        checks.append(Check(f"wkd_feature_loss[{cov};grid={grid}]", "torch", dev, dtype, "regular", feature_check))

    for full in (False, True):

        def gaussian_check(full=full) -> list[Comparison]:
            gen = torch.Generator().manual_seed(8)
            bsz, d = 3, 5
            mu1, mu2 = randn64(gen, bsz, d), randn64(gen, bsz, d)
            if full:
                a1, a2 = randn64(gen, bsz, d, d), randn64(gen, bsz, d, d)
                eye = 0.3 * torch.eye(d, dtype=torch.float64)
                cov1, cov2 = a1 @ a1.mT / d + eye, a2 @ a2.mT / d + eye
            else:
                cov1 = torch.rand(bsz, d, generator=gen, dtype=torch.float64) + 0.2
                cov2 = torch.rand(bsz, d, generator=gen, dtype=torch.float64) + 0.2
            inputs = to_device(dev, dtype, mu1, cov1, mu2, cov2)

            def ref(m1, c1, m2, c2):
                return torch.stack([R.gaussian_wasserstein(m1[i], c1[i], m2[i], c2[i]) for i in range(m1.shape[0])])

            return value_and_grad_check(
                ckakd.gaussian_wasserstein, ref, inputs, [True, True, True, True], dtype, ["mu1", "cov1", "mu2", "cov2"]
            )

        label = "gaussian_wasserstein[full]" if full else "gaussian_wasserstein[diag]"
        checks.append(Check(label, "torch", dev, dtype, "regular", gaussian_check))
    return checks
