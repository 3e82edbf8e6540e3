"""Speed and accuracy of the Gram kernels' ``tl.dot`` input precisions: ``ieee``, ``tf32x3``, ``tf32``.

For each shape ``(n, d)`` (the GPU shapes of ``bench_centered_gram`` / ``bench_alignment_stats``) and each precision,
times ``ckakd.kernels.gram_forward`` + ``gram_backward`` — the Triton work of ``centered_gram``'s forward
and backward — with ``triton.testing.do_bench``, and reports the relative Frobenius error of the Gram
``K = Xc Xcᵀ`` and of the backward product ``M Xc`` against float64 references computed from the same
fp32 inputs. ``M = H (G + Gᵀ) H`` for a random ``G``, as the op's backward forms it.

Flop model for the TFLOP/s column: 4·n²·d (a dense forward Gram, 2·n²·d, plus the backward product,
2·n²·d; the kernels compute only the upper triangle of ``K``, so the forward really does about half).

Writes ``precision-<device>-<UTC time>.csv`` (one row per shape and precision, with the device name and
the torch / triton versions) and the same table as markdown to ``--out`` (default ``bench/out/``).

    python bench/bench_precision.py                      # CUDA GPU: the three GPU shapes
    python bench/bench_precision.py --device cpu --quick # dry run under the Triton interpreter

On the CPU the kernels run under the Triton interpreter (``TRITON_INTERPRET=1``, set here before triton is
imported): the timings there are meaningless (plain wall-clock of an interpreter) and the interpreter
computes every precision as fp32, so all three rows show fp32 errors. Only the GPU numbers mean anything.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from harness.spec import DTYPES

SHAPES: dict[str, tuple[int, int]] = {
    "n256-d16k": (256, 16384),
    "n64-d802k": (64, 256 * 56 * 56),
    "n4096-d512": (4096, 512),
}
QUICK_CPU_SHAPES: dict[str, tuple[int, int]] = {"n40-d96": (40, 96), "n70-d64": (70, 64)}
COLUMNS = (
    "op",
    "shape",
    "n",
    "d",
    "dtype",
    "precision",
    "median_ms",
    "p20_ms",
    "p80_ms",
    "forward_ms",
    "backward_ms",
    "tflops",
    "rel_err_gram",
    "rel_err_grad",
    "configs",
    "device",
    "torch",
    "triton",
    "timestamp",
    "notes",
)


def features(n: int, d: int, device: torch.device, dtype: torch.dtype, offset: float, seed: int = 0) -> torch.Tensor:
    """(1, n, d) features z·W + noise with a rank-16 latent z shared by the samples, plus ``offset``:
    Grams that are not dominated by their diagonal, as for real network features."""
    gen = torch.Generator(device=device).manual_seed(seed)
    z = torch.randn(n, 16, generator=gen, device=device)
    x = z @ torch.randn(16, d, generator=gen, device=device) / 4.0
    x += torch.randn(n, d, generator=gen, device=device)
    return (x + offset).to(dtype).unsqueeze(0)


def coefficients(n: int, device: torch.device, seed: int = 1) -> torch.Tensor:
    """(1, n, n) ``H (G + Gᵀ) H`` for a random ``G`` (the matrix centered_gram's backward multiplies)."""
    g = torch.randn(n, n, generator=torch.Generator(device=device).manual_seed(seed), device=device)
    m = g + g.T
    m = m - m.mean(dim=0, keepdim=True)
    return (m - m.mean(dim=1, keepdim=True)).unsqueeze(0)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected).norm() / expected.norm().clamp_min(1e-300)).item()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu {platform.processor() or platform.machine()} (Triton interpreter)"


def time_ms(fn, device: torch.device, quick: bool) -> tuple[float, float, float]:
    """(median, p20, p80) in ms: ``triton.testing.do_bench`` on a GPU, a few wall-clock runs on the CPU."""
    if device.type == "cuda":
        import triton.testing

        rep = 50 if quick else 200
        med, p20, p80 = triton.testing.do_bench(fn, warmup=25, rep=rep, quantiles=[0.5, 0.2, 0.8])
        return med, p20, p80
    times = []
    for _ in range(2 if quick else 5):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    q = lambda f: times[min(len(times) - 1, int(f * len(times)))]  # noqa: E731
    return q(0.5), q(0.2), q(0.8)


def tuned_since(before: dict, launch_mod) -> str:
    """The autotuning decisions made since ``before`` (one per kernel and shape bucket), as text."""
    out = []
    for entry, best in launch_mod.tuned_configs().items():
        if entry not in before:
            name, _, _, candidates = entry
            out.append(name + ":" + ",".join(f"{k}={v}" for k, v in candidates[best]))
    return " ".join(out) or "first candidates (no autotuning)"


def run_shape(name: str, n: int, d: int, args, kernels, launch_mod, meta: dict) -> list[dict]:
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    x = features(n, d, device, dtype, args.offset)
    m = coefficients(n, device)
    xd = x.double()
    xc = xd - xd.mean(dim=1, keepdim=True)
    k_ref = xc @ xc.transpose(1, 2)
    g_ref = m.double() @ xc
    del xc
    rows = []
    for precision in args.precisions:
        before = launch_mod.tuned_configs()
        k, mean = kernels.gram_forward(x, True, precision=precision)  # warm-up: compiles and autotunes
        g = kernels.gram_backward(m, x, mean, True, precision=precision)
        configs = tuned_since(before, launch_mod)
        err_k, err_g = rel_err(k, k_ref), rel_err(g, g_ref)
        del k, g

        def forward(p=precision):
            return kernels.gram_forward(x, True, precision=p)

        def backward(p=precision, mu=mean):
            return kernels.gram_backward(m, x, mu, True, precision=p)

        def both(p=precision):
            _, mu = kernels.gram_forward(x, True, precision=p)
            return kernels.gram_backward(m, x, mu, True, precision=p)

        med, p20, p80 = time_ms(both, device, args.quick)
        fwd = time_ms(forward, device, args.quick)[0]
        bwd = time_ms(backward, device, args.quick)[0]
        notes = (
            "" if device.type == "cuda" else "Triton interpreter: time meaningless, every precision computed as fp32"
        )
        row = {
            "op": "gram_forward+gram_backward",
            "shape": name,
            "n": n,
            "d": d,
            "dtype": args.dtype,
            "precision": precision,
            "median_ms": med,
            "p20_ms": p20,
            "p80_ms": p80,
            "forward_ms": fwd,
            "backward_ms": bwd,
            "tflops": 4.0 * n * n * d / (med * 1e-3) / 1e12,
            "rel_err_gram": err_k,
            "rel_err_grad": err_g,
            "configs": configs,
            "notes": notes,
            **meta,
        }
        print(
            f"[precision] {name} {precision:<6} {med:9.3f} ms (fwd {fwd:.3f}, bwd {bwd:.3f})  "
            f"err K {err_k:.2e}  err MXc {err_g:.2e}",
            file=sys.stderr,
            flush=True,
        )
        rows.append(row)
    return rows


def _fmt(v) -> str:
    if isinstance(v, float):
        return "" if math.isnan(v) else (f"{v:.3g}" if abs(v) < 1e3 else f"{v:.0f}")
    return str(v)


def markdown(rows: list[dict], meta: dict, quick: bool, device: torch.device) -> str:
    header = ["shape", "precision", "median ms", "p20", "p80", "fwd ms", "bwd ms", "TFLOP/s", "err K", "err M·Xc"]
    keys = ["shape", "precision", "median_ms", "p20_ms", "p80_ms", "forward_ms", "backward_ms", "tflops"]
    lines = [
        f"## Gram kernels by dot precision — {meta['device']}",
        "",
        f"torch {meta['torch']}, triton {meta['triton']}, {meta['timestamp']}{' (quick)' if quick else ''}. "
        "Errors: relative Frobenius error against float64 references of the same fp32 inputs.",
    ]
    if device.type != "cuda":
        lines.append(
            "**Dry run under the Triton interpreter: the times are meaningless and every precision is "
            "computed as fp32.**"
        )
    lines += ["", "| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        cells = [_fmt(r[k]) for k in keys] + [f"{r['rel_err_gram']:.2e}", f"{r['rel_err_grad']:.2e}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cuda = torch.cuda.is_available()
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if cuda else "cpu")
    ap.add_argument("--quick", action="store_true", help="GPU: the first shape only; CPU: two tiny shapes")
    ap.add_argument("--shapes", default=None, help=f"comma-separated names from {', '.join(SHAPES)}")
    ap.add_argument(
        "--precisions", default=None, help="comma-separated subset of ckakd.kernels.gram.PRECISIONS (default: all)"
    )
    ap.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    ap.add_argument("--offset", type=float, default=0.0, help="add this to every feature (e.g. 1000)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out", help="output directory")
    args = ap.parse_args(argv)
    if args.precisions is not None:
        args.precisions = tuple(p.strip() for p in args.precisions.split(",") if p.strip())
    if args.device == "cuda" and not cuda:
        ap.error("--device cuda requested but torch.cuda.is_available() is False")
    return args


def select(args) -> dict[str, tuple[int, int]]:
    if args.shapes:
        names = [s.strip() for s in args.shapes.split(",") if s.strip()]
        table = {**SHAPES, **QUICK_CPU_SHAPES}
        unknown = [s for s in names if s not in table]
        if unknown:
            raise SystemExit(f"unknown shape(s) {unknown}; known: {', '.join(table)}")
        return {s: table[s] for s in names}
    if args.device == "cpu":
        if not args.quick:
            print("[precision] the GPU shapes take hours under the interpreter: using --quick's", file=sys.stderr)
        return dict(QUICK_CPU_SHAPES)
    return dict(list(SHAPES.items())[:1]) if args.quick else dict(SHAPES)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        if "triton" in sys.modules:
            raise SystemExit("triton was imported before TRITON_INTERPRET=1 could be set")
        os.environ["TRITON_INTERPRET"] = "1"  # must precede the first import of triton
    import triton

    from ckakd import kernels
    from ckakd.kernels import _launch
    from ckakd.kernels.gram import PRECISIONS  # after TRITON_INTERPRET: importing the kernels imports triton

    bad = [p for p in args.precisions or () if p not in PRECISIONS]
    if bad:
        raise SystemExit(f"--precisions: unknown precision(s) {bad}; choose from {', '.join(PRECISIONS)}")
    args.precisions = args.precisions or PRECISIONS

    device = torch.device(args.device)
    now = datetime.now(timezone.utc)
    meta = {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "timestamp": now.isoformat(timespec="seconds"),
    }
    if device.type == "cpu":
        print("[precision] CPU: Triton interpreter dry run; timings are meaningless", file=sys.stderr)
    rows: list[dict] = []
    for name, (n, d) in select(args).items():
        rows += run_shape(name, n, d, args, kernels, _launch, meta)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"precision-{device.type}-{now.strftime('%Y%m%d-%H%M%S')}"
    with (args.out / f"{stem}.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    text = markdown(rows, meta, args.quick, device)
    (args.out / f"{stem}.md").write_text(text)
    print(text)
    print(f"[precision] wrote {args.out / (stem + '.csv')} and {args.out / (stem + '.md')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
