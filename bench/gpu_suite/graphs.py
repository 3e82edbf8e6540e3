"""``graphs``: CUDA-graph capture + replay of a CKA distillation step against eager, and the same step on a side
stream against the default stream."""

from __future__ import annotations

from collections.abc import Callable

from gpu_suite.support import Env, Runner, close, expect_dispatch, randn


def _distill_step(kind: str):
    """A CKA distillation step's loss from static student / teacher tensors (student ones require grad)."""
    import ckakd

    if kind == "cka":

        def step(feat_s, logits_s, feat_t, logits_t):
            return ckakd.cka_loss(feat_s, feat_t, backend="triton") + ckakd.rcka_loss(
                feat_s, feat_t, logits_s, logits_t, backend="triton"
            )

        return step

    def pcka(feat_s, logits_s, feat_t, logits_t):
        return ckakd.patch_cka_loss(feat_s, feat_t, patch_size=2, backend="triton")

    return pcka


def _step_inputs(env: Env, seed: int):
    b, c, h, w, k = env.size(32, 8), env.size(16, 4), 8, 8, env.size(10, 5)
    feat_s = randn(env, b, c, h, w, seed=seed, offset=1.0)
    feat_t = 0.5 * feat_s + randn(env, b, c, h, w, seed=seed + 1)
    logits_s, logits_t = randn(env, b, k, seed=seed + 2), randn(env, b, k, seed=seed + 3)
    return [feat_s, logits_s, feat_t, logits_t]


# which of (feat_s, logits_s, feat_t, logits_t) the step differentiates: the student's inputs it uses
NEEDS_GRAD = {"cka": (True, True, False, False), "pcka": (True, False, False, False)}


def _eager(step, data, needs):
    """(loss, student grads) of one eager step on fresh leaves."""
    leaves = [t.detach().clone().requires_grad_(g) for t, g in zip(data, needs, strict=True)]
    loss = step(*leaves)
    loss.backward()
    return loss.detach(), [t.grad for t, g in zip(leaves, needs, strict=True) if g]


def _compare_step(label: str, loss, grads, ref_loss, ref_grads) -> str:
    errs = [close(f"{label} loss", loss, ref_loss, rtol=1e-5)]
    errs += [close(f"{label} grad", g, r, rtol=1e-5) for g, r in zip(grads, ref_grads, strict=True)]
    bitwise = all(bool((a == b).all()) for a, b in zip([loss, *grads], [ref_loss, *ref_grads], strict=True))
    return f"max rel err {max(errs):.1e}, bitwise {'identical' if bitwise else 'different'}"


def graphs(env: Env, runner: Runner) -> None:
    """CUDA-graph capture of one CKA distillation step, replayed on new data, against eager; side stream."""
    import torch

    primitives = {"cka": ("gram", "frobenius_dots", "gram_apply"), "pcka": ("patch_cka_forward", "patch_cka_backward")}

    def capture(kind: str) -> Callable[[], str]:
        def run() -> str:
            step, needs = _distill_step(kind), NEEDS_GRAD[kind]
            static = [t.clone().requires_grad_(g) for t, g in zip(_step_inputs(env, seed=10), needs, strict=True)]
            leaves = [t for t, g in zip(static, needs, strict=True) if g]

            def train_step():
                for t in leaves:
                    t.grad = None
                loss = step(*static)
                loss.backward()
                return loss

            if env.dry:  # no CUDA graphs on the CPU: the step logic, run again on the same static tensors
                train_step()
                with expect_dispatch("triton", *primitives[kind]):
                    static_loss = train_step()
                replay = train_step
            else:
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):  # warm-up (autotuning, compilation) outside the capture
                    for _ in range(3):
                        train_step()
                torch.cuda.current_stream().wait_stream(side)
                for t in leaves:
                    t.grad = None  # the captured backward allocates the grads in the graph's pool
                graph = torch.cuda.CUDAGraph()
                with expect_dispatch("triton", *primitives[kind]):
                    with torch.cuda.graph(graph):
                        static_loss = step(*static)
                        static_loss.backward()

                def replay():
                    graph.replay()
                    torch.cuda.synchronize()
                    return static_loss

            details = []
            for seed in (20, 30):  # two fresh batches: the replay must follow the new data
                fresh = _step_inputs(env, seed=seed)
                with torch.no_grad():
                    for t, new in zip(static, fresh, strict=True):
                        t.copy_(new)
                loss = replay()
                ref_loss, ref_grads = _eager(step, fresh, needs)
                details.append(_compare_step("replay", loss, [t.grad for t in leaves], ref_loss, ref_grads))
            return "; ".join(details) + (" (dry: no graph capture on the CPU)" if env.dry else "")

        return run

    runner.run("graphs/capture+replay cka_loss + rcka_loss step", capture("cka"))
    runner.run("graphs/capture+replay patch_cka_loss step", capture("pcka"))

    def side_stream(kind: str) -> Callable[[], str]:
        def run() -> str:
            step, needs = _distill_step(kind), NEEDS_GRAD[kind]
            data = _step_inputs(env, seed=40)
            ref_loss, ref_grads = _eager(step, data, needs)
            if env.dry:
                with expect_dispatch("triton", *primitives[kind]):
                    loss, grads = _eager(step, data, needs)
                return _compare_step("rerun", loss, grads, ref_loss, ref_grads) + " (dry: no streams on the CPU)"
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side), expect_dispatch("triton", *primitives[kind]):
                loss, grads = _eager(step, data, needs)
            torch.cuda.current_stream().wait_stream(side)
            torch.cuda.synchronize()
            return _compare_step("side stream", loss, grads, ref_loss, ref_grads)

        return run

    runner.run("graphs/side stream vs default stream (cka step)", side_stream("cka"))
    runner.run("graphs/side stream vs default stream (pcka step)", side_stream("pcka"))
