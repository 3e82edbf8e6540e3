"""The C++ / CUDA Sinkhorn ops ``torch.ops.ckakd.sinkhorn_fixed_forward`` / ``sinkhorn_fixed_backward``.

Compared with a straightforward float64 autograd implementation of the same fixed iterations (written here, on
purpose independent of the package): cost, all histories and both gradients, for softmax, peaked (logits x 50,
many probabilities underflow) and zero-mass (target-separation) inputs, symmetric and asymmetric costs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from ckakd import _ext
from tests.aten_calls import AtenCallsInsideCkakd
from tests.conftest import require_extension

EXT = require_extension()  # fails this module on a CUDA machine without the CUDA extension, skips elsewhere

DELTA = 1e-8
TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-5, 5e-4)}  # (atol x scale, rtol)
# Peaked inputs (logits x 50, eps = 0.05) make the unrolled backward a sum of large terms that cancel: torch's own
# float32 autograd of the same iterations is off by up to ~6e-3 of the gradient's scale there (seeds 0-5), so
# float32 gradients on them are held to that, not to the float32 tolerance; their forward and float64 stay exact.
PEAKED_FP32_GRAD_TOL = (1e-2, 0.0)
SHAPES = [(1, 2), (3, 7), (8, 100), (4, 257)]
KINDS = ["softmax", "peaked", "zero_mass", "asymmetric"]


def ops():
    return torch.ops.ckakd


# ---------------------------------------------------------------------------------------------------------
# reference and inputs


def reference_forward(p, q, K, KC, u0, iters):
    """Same iterations as the op, in the row-vector form; returns (cost, u_hist, v_hist, a_hist, b_hist, w)
    with w = v_T KC^T (the op returns it for its backward)."""
    u, us, vs, as_, bs = u0, [u0], [], [], []
    for _ in range(iters):
        a = u @ K + DELTA
        v = q / a
        b = v @ K.T + DELTA
        u = p / b
        us.append(u)
        vs.append(v)
        as_.append(a)
        bs.append(b)
    cost = ((u @ KC) * v).sum(1)  # sum_ij u_i KC_ij v_j
    return cost, torch.stack(us), torch.stack(vs), torch.stack(as_), torch.stack(bs), v @ KC.T


def reference_grads(p, q, K, KC, u0, iters, grad_cost):
    p = p.detach().double().requires_grad_()
    q = q.detach().double().requires_grad_()
    cost = reference_forward(p, q, K.double(), KC.double(), u0.double(), iters)[0]
    return torch.autograd.grad(cost, (p, q), grad_cost.double())


def make_problem(B, C, eps, kind="softmax", dtype=torch.float64, device="cpu", seed=0):
    """p, q, K, KC, u0, grad_cost; computed in float64, then rounded to ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    cost = torch.rand(C, C, generator=g, dtype=f64)
    if kind != "asymmetric":
        cost = (cost + cost.T) / 2
    cost.fill_diagonal_(0)
    K = torch.exp(-cost / eps)
    KC = K * cost
    scale = 50.0 if kind == "peaked" else 1.0
    p = (torch.randn(B, C, generator=g, dtype=f64) * scale).softmax(1)
    q = (torch.randn(B, C, generator=g, dtype=f64) * scale).softmax(1)
    u0 = torch.full((B, C), 1.0 / C, dtype=f64)
    if kind == "zero_mass":  # target separation: class y_b carries no mass and starts at u0 = 0
        mask = torch.zeros(B, C, dtype=torch.bool)
        mask[torch.arange(B), torch.randint(C, (B,), generator=g)] = True
        p = p.masked_fill(mask, 0)
        q = q.masked_fill(mask, 0)
        p, q = p / p.sum(1, keepdim=True), q / q.sum(1, keepdim=True)
        u0 = u0.masked_fill(mask, 0)
    grad_cost = torch.randn(B, generator=g, dtype=f64)
    return [t.to(device=device, dtype=dtype) for t in (p, q, K, KC, u0, grad_cost)]


def assert_close_scaled(actual, expected, dtype, what, tol=None):
    """|actual - expected| <= atol * max|expected| + rtol * |expected| (atol relative to the tensor's scale)."""
    atol, rtol = tol or TOL[dtype]
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    scale = expected.abs().max().item() if expected.numel() else 0.0
    err = (actual - expected).abs()
    bound = atol * scale + rtol * expected.abs()
    worst = (err - bound).max().item() if err.numel() else -1.0
    assert worst <= 0, f"{what}: max error {err.max().item():.3e} exceeds the bound (scale {scale:.3e})"


def check_against_reference(B, C, iters, eps, kind, dtype, device="cpu"):
    p, q, K, KC, u0, grad_cost = make_problem(B, C, eps, kind, dtype, device)
    out = ops().sinkhorn_fixed_forward(p, q, K, KC, u0, iters)
    ref = reference_forward(*(t.double().cpu() for t in (p, q, K, KC, u0)), iters)
    for name, a, e in zip(("cost", "u_hist", "v_hist", "a_hist", "b_hist", "w"), out, ref, strict=True):
        assert a.dtype == dtype and a.device == p.device, name
        assert_close_scaled(a, e, dtype, name)
    # w = v_T KC^T of the op's own v_T, and cost = sum_i u_T,i w_i
    w_own = (out[2][-1].double() @ KC.double().T).cpu()
    assert_close_scaled(out[5], w_own, dtype, "w vs v_T KC^T")
    assert_close_scaled(out[0], (out[1][-1].double().cpu() * w_own).sum(1), dtype, "cost vs sum u_T w")
    gp, gq = ops().sinkhorn_fixed_backward(grad_cost, p, q, K, KC, *out[1:])
    rp, rq = reference_grads(*(t.cpu() for t in (p, q, K, KC, u0)), iters, grad_cost.cpu())
    assert gp.dtype == dtype and gq.dtype == dtype
    tol = PEAKED_FP32_GRAD_TOL if (kind == "peaked" and dtype == torch.float32) else None
    assert_close_scaled(gp, rp, dtype, "grad_p", tol)
    assert_close_scaled(gq, rq, dtype, "grad_q", tol)


# ---------------------------------------------------------------------------------------------------------
# CPU


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("B,C", SHAPES, ids=[f"{b}x{c}" for b, c in SHAPES])
@pytest.mark.parametrize("iters", [1, 3, 10])
@pytest.mark.parametrize("eps", [0.05, 0.5])
@pytest.mark.parametrize("kind", KINDS)
def test_cpu_matches_reference(B, C, iters, eps, kind, dtype):
    check_against_reference(B, C, iters, eps, kind, dtype)


def test_reference_is_wkd_loss():
    """The reference's cost is <P, cost> with the plan P = diag(u) K diag(v) of WKD's Sinkhorn."""
    p, q, K, KC, u0, _ = make_problem(3, 7, 0.1)
    cost_matrix = -0.1 * torch.log(K)
    c, u_hist, v_hist, _, _, w = reference_forward(p, q, K, KC, u0, 10)
    torch.testing.assert_close(c, (u_hist[-1] * w).sum(1))
    plan = u_hist[-1][:, :, None] * K * v_hist[-1][:, None, :]
    torch.testing.assert_close(c, (plan * cost_matrix).sum((1, 2)))


def test_zero_mass_classes_stay_zero():
    p, q, K, KC, u0, g = make_problem(5, 9, 0.05, "zero_mass")
    cost, u_hist, v_hist, a_hist, b_hist, w = ops().sinkhorn_fixed_forward(p, q, K, KC, u0, 10)
    zero = p == 0
    assert (u_hist[:, zero] == 0).all() and (v_hist[:, zero] == 0).all()
    grads = ops().sinkhorn_fixed_backward(g, p, q, K, KC, u_hist, v_hist, a_hist, b_hist, w)
    for t in (cost, a_hist, b_hist, w, *grads):
        assert torch.isfinite(t).all()


def test_peaked_fp32_has_exact_zeros_and_stays_finite():
    p, q, K, KC, u0, g = make_problem(8, 100, 0.05, "peaked", torch.float32)
    assert (p == 0).any() and (q == 0).any()  # the case this guards: probabilities underflowing to 0
    out = ops().sinkhorn_fixed_forward(p, q, K, KC, u0, 10)
    grads = ops().sinkhorn_fixed_backward(g, p, q, K, KC, *out[1:])
    for t in (*out, *grads):
        assert torch.isfinite(t).all()


def test_noncontiguous_and_expanded_inputs():
    p, q, K, KC, u0, g = make_problem(4, 11, 0.2, "asymmetric")
    expected = ops().sinkhorn_fixed_forward(p, q, K, KC, u0, 4)
    pt = p.T.contiguous().T  # same values, column-major strides
    Kt = K.T.contiguous().T
    u0e = torch.full((1, 11), 1.0 / 11, dtype=torch.float64).expand(4, 11)
    got = ops().sinkhorn_fixed_forward(pt, q, Kt, KC, u0e, 4)
    for a, e in zip(got, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-13, atol=0)
    ge = ops().sinkhorn_fixed_backward(g, p, q, K, KC, *expected[1:])
    g_strided = torch.stack([g, -g], 1)[:, 0]
    hists = [h.transpose(-1, -2).contiguous().transpose(-1, -2) for h in expected[1:]]
    gg = ops().sinkhorn_fixed_backward(g_strided, pt, q, Kt, KC, *hists)
    for a, e in zip(gg, ge, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-13, atol=0)


def test_empty_batch():
    p, q, K, KC, u0, g = make_problem(0, 5, 0.1)
    cost, u_hist, v_hist, a_hist, b_hist, w = ops().sinkhorn_fixed_forward(p, q, K, KC, u0, 3)
    assert cost.shape == (0,) and u_hist.shape == (4, 0, 5) and v_hist.shape == (3, 0, 5) and w.shape == (0, 5)
    gp, gq = ops().sinkhorn_fixed_backward(g, p, q, K, KC, u_hist, v_hist, a_hist, b_hist, w)
    assert gp.shape == (0, 5) and gq.shape == (0, 5)
    gp, gq = ops().sinkhorn_fixed_backward(g, p, q, K, KC, u_hist, v_hist, a_hist, b_hist, w, False)
    assert gp.shape == (0, 5) and gq.shape == (0,)  # the schema's (0,) without need_q, also for B = 0


def test_argument_checks():
    p, q, K, KC, u0, g = make_problem(3, 6, 0.1)
    fwd, bwd = ops().sinkhorn_fixed_forward, ops().sinkhorn_fixed_backward
    with pytest.raises(RuntimeError, match="iters must be >= 1"):
        fwd(p, q, K, KC, u0, 0)
    with pytest.raises(RuntimeError, match="q must have the shape of p"):
        fwd(p, q[:, :5], K, KC, u0, 2)
    with pytest.raises(RuntimeError, match=r"K must have shape \(C, C\)"):
        fwd(p, q, K[:5], KC, u0, 2)
    with pytest.raises(RuntimeError, match="same dtype"):
        fwd(p, q.float(), K, KC, u0, 2)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        fwd(p.half(), q.half(), K.half(), KC.half(), u0.half(), 2)
    with pytest.raises(RuntimeError, match=r"p must have shape \(B, C\)"):
        fwd(p[0], q[0], K, KC, u0[0], 2)
    out = fwd(p, q, K, KC, u0, 2)
    with pytest.raises(RuntimeError, match=r"grad_cost must have shape \(B,\)"):
        bwd(g[:2], p, q, K, KC, *out[1:])
    with pytest.raises(RuntimeError, match=r"u_hist must have shape \(T \+ 1, B, C\)"):
        bwd(g, p, q, K, KC, out[1][:2], *out[2:])
    with pytest.raises(RuntimeError, match="a_hist must have the shape of v_hist"):
        bwd(g, p, q, K, KC, out[1], out[2], out[3][:1], *out[4:])
    with pytest.raises(RuntimeError, match="w must have the shape of p"):
        bwd(g, p, q, K, KC, *out[1:5], out[5][:2])


# ---------------------------------------------------------------------------------------------------------
# registration, fake kernels, loader


@pytest.mark.parametrize("B,C,iters", [(3, 7, 3), (1, 2, 1)])
def test_opcheck(B, C, iters):
    p, q, K, KC, u0, g = make_problem(B, C, 0.3)
    torch.library.opcheck(ops().sinkhorn_fixed_forward.default, (p, q, K, KC, u0, iters))
    grad_in = (p.clone().requires_grad_(), q.clone().requires_grad_())  # the autograd registered on the op
    torch.library.opcheck(ops().sinkhorn_fixed_forward.default, (*grad_in, K, KC, u0, iters))
    out = ops().sinkhorn_fixed_forward(p, q, K, KC, u0, iters)
    torch.library.opcheck(ops().sinkhorn_fixed_backward.default, (g, p, q, K, KC, *out[1:]))
    torch.library.opcheck(ops().sinkhorn_fixed_backward.default, (g, p, q, K, KC, *out[1:], False))


@pytest.mark.parametrize("iters", [1, 2, 5])
@pytest.mark.parametrize("kind", KINDS)
def test_backward_without_grad_q(iters, kind):
    """need_q=False skips the last step's q half: grad_p is unchanged (bitwise) and grad_q is empty."""
    p, q, K, KC, u0, g = make_problem(4, 13, 0.2, kind)
    out = ops().sinkhorn_fixed_forward(p, q, K, KC, u0, iters)
    gp, gq = ops().sinkhorn_fixed_backward(g, p, q, K, KC, *out[1:])
    gp_only, gq_none = ops().sinkhorn_fixed_backward(g, p, q, K, KC, *out[1:], False)
    assert gq.shape == p.shape and gq_none.shape == (0,)
    torch.testing.assert_close(gp_only, gp, rtol=0, atol=0)


class _CalledOps(AtenCallsInsideCkakd):
    """Records (op name, output shape) of the ATen calls made inside ckakd's ops (a ``ckakd::`` op is redispatched
    to its CPU kernel with this mode active again; plain dispatch would show only the op itself)."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, tuple[int, ...] | None]] = []

    def observe(self, func, out):
        self.calls.append((func.overloadpacket.__name__, tuple(out.shape) if isinstance(out, torch.Tensor) else None))
        return out

    def count(self, name: str, shape: tuple[int, ...] | None = None) -> int:
        return sum(n == name and (shape is None or s == shape) for n, s in self.calls)


@pytest.mark.parametrize("iters", [1, 2, 5])
def test_backward_without_grad_q_skips_its_work(iters):
    """need_q=False allocates no grad_q and skips the products that only feed it: 2T products with grad_q
    (u_T KC, then T for vbar and T - 1 for ubar), 2T - 1 without it for T > 1 (no vbar_1), none for T = 1."""
    B, C = 4, 13
    p, q, K, KC, u0, g = make_problem(B, C, 0.2)
    out = ops().sinkhorn_fixed_forward(p, q, K, KC, u0, iters)
    products = {}
    allocations = {}
    for need_q in (True, False):
        with _CalledOps() as called:
            ops().sinkhorn_fixed_backward(g, p, q, K, KC, *out[1:], need_q)
        products[need_q] = called.count("mm") + called.count("addmm_")
        allocations[need_q] = called.count("empty", (B, C))
    assert products[True] == 2 * iters
    assert products[False] == (2 * iters - 1 if iters > 1 else 0)
    assert allocations[True] == 4 and allocations[False] == 3  # grad_p, grad_q, ubar, tmp


def test_schemas():
    fwd = str(ops().sinkhorn_fixed_forward.default._schema)
    bwd = str(ops().sinkhorn_fixed_backward.default._schema)
    assert fwd == (
        "ckakd::sinkhorn_fixed_forward(Tensor p, Tensor q, Tensor K, Tensor KC, Tensor u0, int iters) -> "
        "(Tensor cost, Tensor u_hist, Tensor v_hist, Tensor a_hist, Tensor b_hist, Tensor w)"
    )
    assert bwd == (
        "ckakd::sinkhorn_fixed_backward(Tensor grad_cost, Tensor p, Tensor q, Tensor K, Tensor KC, Tensor u_hist, "
        "Tensor v_hist, Tensor a_hist, Tensor b_hist, Tensor w, bool need_q=True) -> (Tensor grad_p, Tensor grad_q)"
    )


def test_status_and_has_cuda():
    ok, detail = _ext.status()
    assert ok and ("prebuilt" in detail or "JIT" in detail), detail
    assert isinstance(EXT.has_cuda(), bool)
    if not torch.cuda.is_available():
        return
    assert EXT.has_cuda(), "a CUDA machine should build the extension with its CUDA kernels"


def _run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=full_env, timeout=600
    )


def test_ops_found_after_import_ckakd():
    """The package's Python ops (torch.library FRAGMENTs in ``ckakd``) and the extension's TORCH_LIBRARY coexist,
    whichever is imported first."""
    for first, second in (
        ("import ckakd, ckakd.ops", "from ckakd import _ext; assert _ext.load() is not None"),
        ("from ckakd import _ext; assert _ext.load() is not None", "import ckakd, ckakd.ops"),
    ):
        res = _run_python(
            f"""
            import torch
            {first}
            {second}
            assert torch.ops.ckakd.sinkhorn_fixed_forward.default is not None
            assert torch.ops.ckakd.sinkhorn_fixed_backward.default is not None
            assert torch.ops.ckakd.centered_gram.default is not None
            p = torch.full((2, 3), 1 / 3, dtype=torch.float64)
            K = torch.eye(3, dtype=torch.float64)
            print(torch.ops.ckakd.sinkhorn_fixed_forward(p, p, K, K, p, 2)[0].tolist())
            """
        )
        assert res.returncode == 0, res.stderr


def test_unavailable_extension_warns_once():
    res = _run_python(
        """
        import sys, warnings
        sys.modules["ckakd._C"] = None  # makes `from ckakd import _C` raise ImportError
        from ckakd import _ext
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert _ext.load() is None and _ext.load() is None
            ok, detail = _ext.status()
        assert not ok and "CKAKD_NO_JIT" in detail, detail
        msgs = [str(w.message) for w in caught]
        assert len(msgs) == 1 and "pure-torch" in msgs[0], msgs
        """,
        CKAKD_NO_JIT="1",
    )
    assert res.returncode == 0, res.stderr


@pytest.mark.slow
def test_jit_fallback_builds_and_matches():
    """Without the prebuilt module, load() JIT-compiles csrc/ (cached by torch after the first build)."""
    res = _run_python(
        """
        import sys
        sys.modules["ckakd._C"] = None
        import torch
        from ckakd import _ext
        mod = _ext.load()
        assert mod is not None and mod.__name__ == "ckakd_C_jit", _ext.status()
        assert "JIT" in _ext.status()[1]
        p = torch.full((2, 3), 1 / 3, dtype=torch.float64)
        K = torch.eye(3, dtype=torch.float64)
        out = torch.ops.ckakd.sinkhorn_fixed_forward(p, p, K, K, p, 2)
        assert torch.isfinite(out[0]).all()
        """,
        CKAKD_NO_JIT="0",
    )
    assert res.returncode == 0, res.stderr


# ---------------------------------------------------------------------------------------------------------
# CUDA (the lent GPU machine)

GPU_CASES = [(64, 100), (5, 128), (32, 1000), (3, 129)]  # C <= 128: one-launch kernels; otherwise cuBLAS path


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("B,C", GPU_CASES, ids=[f"{b}x{c}" for b, c in GPU_CASES])
@pytest.mark.parametrize("iters", [1, 10])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("path", ["auto", "general"])
def test_cuda_matches_reference(B, C, iters, kind, dtype, path, monkeypatch):
    if path == "general":
        monkeypatch.setenv("CKAKD_SINKHORN_CUDA_GENERAL", "1")
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # full-precision cuBLAS GEMMs
    check_against_reference(B, C, iters, 0.05, kind, dtype, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("C", [100, 1000])
def test_cuda_matches_cpu_extension(C):
    p, q, K, KC, u0, g = make_problem(16, C, 0.05, "softmax", torch.float64)
    cpu = ops().sinkhorn_fixed_forward(p, q, K, KC, u0, 10)
    cuda_in = [t.cuda() for t in (p, q, K, KC, u0, g)]
    gpu = ops().sinkhorn_fixed_forward(*cuda_in[:5], 10)
    for name, a, e in zip(("cost", "u_hist", "v_hist", "a_hist", "b_hist", "w"), gpu, cpu, strict=True):
        assert_close_scaled(a, e, torch.float64, name)
    gc = ops().sinkhorn_fixed_backward(g, p, q, K, KC, *cpu[1:])
    gg = ops().sinkhorn_fixed_backward(cuda_in[5], *cuda_in[:4], *gpu[1:])
    for name, a, e in zip(("grad_p", "grad_q"), gg, gc, strict=True):
        assert_close_scaled(a, e, torch.float64, name)


@pytest.mark.gpu
def test_cuda_side_stream_and_opcheck():
    p, q, K, KC, u0, g = make_problem(6, 100, 0.05, "softmax", torch.float32, device="cuda")
    expected = ops().sinkhorn_fixed_forward(p, q, K, KC, u0, 10)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got = ops().sinkhorn_fixed_forward(p, q, K, KC, u0, 10)
    torch.cuda.current_stream().wait_stream(stream)
    for a, e in zip(got, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=0, atol=0)
    torch.library.opcheck(
        ops().sinkhorn_fixed_forward.default, (p.double(), q.double(), K.double(), KC.double(), u0.double(), 3)
    )


@pytest.mark.gpu
@pytest.mark.parametrize("C", [100, 1000])  # the one-launch kernel and the cuBLAS path
@pytest.mark.parametrize("iters", [1, 2, 10])
def test_cuda_backward_without_grad_q(C, iters):
    """need_q=False on CUDA: grad_p bitwise as with grad_q, grad_q of shape (0,)."""
    p, q, K, KC, u0, g = make_problem(8, C, 0.05, "zero_mass", torch.float64, device="cuda")
    out = ops().sinkhorn_fixed_forward(p, q, K, KC, u0, iters)
    gp, gq = ops().sinkhorn_fixed_backward(g, p, q, K, KC, *out[1:])
    gp_only, gq_none = ops().sinkhorn_fixed_backward(g, p, q, K, KC, *out[1:], False)
    assert gq.shape == p.shape and gq_none.shape == (0,)
    torch.testing.assert_close(gp_only, gp, rtol=0, atol=0)
    rp, _ = reference_grads(*(t.cpu() for t in (p, q, K, KC, u0)), iters, g.cpu())
    assert_close_scaled(gp_only, rp, torch.float64, "grad_p")
