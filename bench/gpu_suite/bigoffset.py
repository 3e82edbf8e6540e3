"""``bigoffset``: views whose elements lie past 2**31 elements of one buffer (an 8 GiB fp32 buffer on a GPU) against
the same data in a fresh small tensor."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from gpu_suite.support import Env, Failed, Runner, close, expect_dispatch, fwd_bwd, gen


def _last_element(view) -> int:
    """Offset (in elements) of the view's farthest element from the start of its storage."""
    return view.storage_offset() + sum((s - 1) * st for s, st in zip(view.shape, view.stride(), strict=True))


def bigoffset(env: Env, runner: Runner) -> None:
    """Views whose elements lie past ``limit`` elements of one buffer (2**31 on a GPU: an 8 GiB fp32 buffer)."""
    import torch

    import ckakd

    limit = 2**31 if not env.dry else 2**12
    extra = 1 << 22 if not env.dry else 1 << 11
    holder: list = []

    def allocate() -> str:
        holder.append(torch.empty(limit + extra, dtype=torch.float32, device=env.device))
        return f"{holder[0].numel()} fp32 elements ({holder[0].numel() * 4 / 2**30:.2f} GiB), limit {limit}"

    runner.run("bigoffset/allocate the buffer", allocate)
    if not holder:
        return
    buf = holder.pop()

    def place(shape: Sequence[int], strides: Sequence[int], offset: int, seed: int):
        view = buf.as_strided(tuple(shape), tuple(strides), offset)
        if _last_element(view) < limit:
            raise Failed(f"test setup: view {tuple(shape)} / {tuple(strides)} + {offset} stays below {limit}")
        if _last_element(view) >= buf.numel():
            raise Failed("test setup: view runs past the buffer")
        data = torch.randn(*shape, generator=gen(seed)).to(env.device) + 1.5
        view.copy_(data)
        return view, data

    def compare(fn: Callable, views: Sequence, copies: Sequence, need: Sequence[bool], backend, primitives) -> str:
        with expect_dispatch(backend, *primitives):
            got = fwd_bwd(fn, views, need, copy=False)  # the kernels read the views in the big buffer
        env.sync()
        want = fwd_bwd(fn, [c.contiguous() for c in copies], need)
        errs = [close("value", got[0], want[0], rtol=1e-5)]
        errs += [close("grad", g, w, rtol=1e-5) for g, w in zip(got[1], want[1], strict=True)]
        bitwise = all(torch.equal(a, b) for a, b in zip([got[0], *got[1]], [want[0], *want[1]], strict=True))
        return f"max rel err {max(errs):.1e}, {'bitwise identical' if bitwise else 'not bitwise identical'}"

    n, d, dy = env.size(48, 6), env.size(64, 8), env.size(40, 6)
    row = limit // (n - 1) + 1  # row n-1 starts past the limit

    def gram_rows() -> str:
        x, data = place((n, d), (row, 1), 0, seed=1)
        return compare(
            lambda a: ckakd.centered_gram(a, backend="triton"), [x], [data], [True], "triton", ("gram", "gram_apply")
        )

    def gram_offset() -> str:
        x, data = place((n, d), (d, 1), limit + 16, seed=2)
        return compare(
            lambda a: ckakd.centered_gram(a, backend="triton"), [x], [data], [True], "triton", ("gram", "gram_apply")
        )

    def cka_rows() -> str:
        x, dx_ = place((n, d), (row, 1), 0, seed=3)
        y, dy_ = place((n, dy), (row, 1), d + 8, seed=4)
        stats = ("gram", "frobenius_dots", "gram_apply")
        return compare(
            lambda a, b: ckakd.cka(a, b, backend="triton"), [x, y], [dx_, dy_], [True, True], "triton", stats
        )

    def cka_batch() -> str:
        bstride = limit + 32
        x, dx_ = place((2, n, d), (bstride, d, 1), 0, seed=5)
        y, dy_ = place((2, n, dy), (bstride, dy, 1), n * d + 64, seed=6)
        stats = ("gram", "frobenius_dots", "gram_apply")
        return compare(
            lambda a, b: ckakd.cka(a, b, backend="triton"), [x, y], [dx_, dy_], [True, True], "triton", stats
        )

    runner.run(f"bigoffset/gram fwd+bwd, rows {row} apart ({n}x{d})", gram_rows)
    runner.run(f"bigoffset/gram fwd+bwd, storage offset {limit + 16}", gram_offset)
    runner.run("bigoffset/cka, rows past the limit", cka_rows)
    runner.run("bigoffset/cka batched, batch stride past the limit", cka_batch)

    shape = (2, env.size(8, 3), env.size(16, 4), env.size(16, 4))
    b, c, h, w = shape
    pstride = (limit + 64, h * w, w, 1)
    for reduce in ("channel", "batch", "spatial"):

        def patch(reduce=reduce) -> str:
            f_s, ds = place(shape, pstride, 0, seed=7)
            f_t, dt = place(shape, pstride, c * h * w + 128, seed=8)
            return compare(
                lambda a, t: ckakd.patch_cka_loss(a, t, patch_size=2, reduce=reduce, backend="triton"),
                [f_s, f_t],
                [ds, dt],
                [True, False],
                "triton",
                ("patch_cka_forward", "patch_cka_backward"),
            )

        runner.run(f"bigoffset/patch CKA {reduce}, batch stride {pstride[0]}", patch)
    buf = None  # the closures above hold the cell: free the buffer through it
    if not env.dry:
        torch.cuda.empty_cache()
