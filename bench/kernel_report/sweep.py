"""The sweep: the launcher calls of the report from its three shape sources (the kernel tests, the benchmarks,
the launch tables), built on meta tensors, and running them under recording."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import itertools
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from kernel_report.harvest import GRAM_LAUNCHERS, PATCH_LAUNCHERS, REDUCES, harvest_tests
from kernel_report.launches import H200_SMS, Launch, bind_launch, recording_launches

TEST_FILES = (
    "tests/ops/test_gram_kernels.py",
    "tests/ops/test_frobenius_kernels.py",
    "tests/ops/test_column_mean_kernels.py",
    "tests/ops/test_patch_alignment_stats_kernels.py",
)


@dataclasses.dataclass
class Call:
    """One launcher call of the sweep; tensors are built on the meta device when it runs."""

    launcher: str
    args: tuple
    kwargs: dict[str, Any]
    source: str


@dataclasses.dataclass(frozen=True)
class Spec:
    """A tensor to build: shape, dtype and layout (``contiguous`` / ``channels_last`` / ``strided``: a
    ``[:, ::2, :, ::2]`` slice of a twice wider tensor, as the patch-kernel tests build their teacher)."""

    shape: tuple[int, ...]
    dtype: str = "float32"
    layout: str = "contiguous"

    def build(self) -> Any:
        import torch

        dtype = getattr(torch, self.dtype)
        if self.layout == "channels_last":
            return torch.empty(self.shape, device="meta", dtype=dtype).to(memory_format=torch.channels_last)
        if self.layout == "strided":
            b, c, h, w = self.shape
            return torch.empty((b, 2 * c, h, 2 * w), device="meta", dtype=dtype)[:, ::2, :, ::2]
        return torch.empty(self.shape, device="meta", dtype=dtype)


def _build(value: Any) -> Any:
    return value.build() if isinstance(value, Spec) else value


LOW_DTYPES = ("float16", "bfloat16")
DTYPES = ("float32", *LOW_DTYPES)
SOURCES = ("tests", "bench", "tables")


def launcher_keywords(fn: Callable) -> dict[str, inspect.Parameter]:
    """The keyword-only parameters of a launcher (``split_k``, ``block_d``, ``need_s``, ``precision`` ...)."""
    return {p.name: p for p in inspect.signature(fn).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY}


def string_choices(fn: Callable, default: str) -> tuple[str, ...]:
    """The values of a string keyword: a module-level tuple of strings of the launcher's module that holds
    its default (``PRECISIONS = ("ieee", "tf32x3", "tf32")`` for ``precision="ieee"``), else the default."""
    mod = sys.modules.get(getattr(fn, "__module__", ""))
    for name, value in sorted(vars(mod).items()) if mod else ():
        if name.isupper() and isinstance(value, tuple) and default in value and all(isinstance(v, str) for v in value):
            return value
    return (default,)


def keyword_sets(fn: Callable, ints: dict[str, set[int]] | None = None, strings: bool = False) -> list[dict]:
    """Keyword combinations to call a launcher with: every bool keyword both ways; every optional int keyword
    at its default and at the values in ``ints`` (the tests'); with ``strings`` every string keyword at every
    value of :func:`string_choices`, otherwise at its default."""
    axes = []
    for name, p in launcher_keywords(fn).items():
        if isinstance(p.default, bool):
            axes.append([(name, True), (name, False)])
        elif p.default is None and ints and ints.get(name):
            axes.append([(name, None)] + [(name, v) for v in sorted(ints[name])])
        elif isinstance(p.default, str) and strings:
            axes.append([(name, v) for v in string_choices(fn, p.default)])
    return [dict(combo) for combo in itertools.product(*axes)]


class Sweep:
    """Builds the launcher calls of the report for the ``ckakd.kernels`` package ``kernels``."""

    def __init__(self, kernels: Any, repo: Path):
        self.kernels = kernels
        self.repo = repo
        self.notes: list[str] = []
        self.launchers = {
            name: getattr(kernels, name)
            for name in getattr(kernels, "__all__", dir(kernels))
            if inspect.isfunction(getattr(kernels, name, None))
        }
        self.max_patches = int(getattr(kernels, "MAX_PATCHES", 128))

    def _calls(self, launcher: str, args: tuple, source: str, ints: dict | None, strings: bool) -> list[Call]:
        fn = self.launchers.get(launcher)
        if fn is None:
            return []
        return [Call(launcher, args, kw, source) for kw in keyword_sets(fn, ints, strings)]

    # -- per-op call builders ---------------------------------------------------------------------

    def gram_calls(
        self,
        shape: tuple[int, int, int],
        dtype: str,
        center: bool,
        source: str,
        ints: dict | None = None,
        strings: bool = False,
        launchers: Iterable[str] = ("gram_forward", "gram_backward"),
    ) -> list[Call]:
        """Gram forward (x of ``shape``) and backward (fp32 contiguous m and mean, as the ops pass them)."""
        b, n, d = shape
        x = Spec(shape, dtype)
        out = []
        if "gram_forward" in launchers:
            out += self._calls("gram_forward", (x, center), source, ints, strings)
        if "gram_backward" in launchers:
            out += self._calls("gram_backward", (Spec((b, n, n)), x, Spec((b, d)), center), source, ints, strings)
        return out

    def frobenius_calls(self, b: int, n: int, source: str, ints: dict | None = None) -> list[Call]:
        k = Spec((b, n, n))
        return self._calls("frobenius_dots", (k, k), source, ints, False)

    def patch_calls(
        self,
        shape: tuple[int, int, int, int],
        patch: tuple[int, int],
        reduce: str,
        center: bool,
        dtype: str,
        source: str,
        layouts: tuple[str, str] = ("contiguous", "contiguous"),
        need: Sequence[tuple[bool, bool]] = ((True, True),),
        ints: dict | None = None,
        launchers: Iterable[str] = PATCH_LAUNCHERS,
    ) -> list[Call]:
        """Forward and backward calls; ``need``: the (need_s, need_t) pairs of the backward, where the
        launcher has those keywords (older ones compute both)."""
        B, C, H, W = shape
        ph, pw = patch
        P = (H // ph) * (W // pw)
        G = {"channel": C, "batch": B, "spatial": ph * pw}[reduce]
        f_s, f_t = Spec(shape, dtype, layouts[0]), Spec(shape, dtype, layouts[1])
        out = []
        if "patch_cka_forward" in launchers:
            out += self._calls("patch_cka_forward", (f_s, f_t, ph, pw, reduce, center), source, ints, False)
        bwd = self.launchers.get("patch_cka_backward")
        if bwd is not None and "patch_cka_backward" in launchers:
            m = Spec((G, P, P))
            has_need = bool({"need_s", "need_t"} & set(launcher_keywords(bwd)))
            for call in self._calls(
                "patch_cka_backward", (m, m, f_s, f_t, ph, pw, reduce, center), source, ints, False
            ):
                pair = (call.kwargs.get("need_s", True), call.kwargs.get("need_t", True))
                if not has_need or pair in need:
                    out.append(call)
        return out

    # -- the three shape sources ------------------------------------------------------------------

    def test_calls(self) -> list[Call]:
        """The literal shapes of the kernel test files, each with the patch sizes, reduces, centers, dtypes,
        launcher keywords and launchers of its own test function; patch inputs in the tests' layouts
        (student channels_last, teacher a strided slice)."""
        out: list[Call] = []
        for rel in TEST_FILES:
            path = self.repo / rel
            if not path.exists():
                self.notes.append(f"{rel} not found: its shapes are not in the sweep")
                continue
            src = f"tests:{path.stem}"
            for g in harvest_tests(path):
                centers = sorted(g.centers or {True, False}, reverse=True)
                dtypes = DTYPES if g.low else ("float32",)
                for (b, n, d), dtype in itertools.product(sorted(g.shapes.get(3, {})), dtypes):
                    for center in centers:
                        out += self.gram_calls((b, n, d), dtype, center, src, g.ints, launchers=g.launchers)
                    if "frobenius_dots" in g.launchers and dtype == "float32" and n == d:
                        out += self.frobenius_calls(b, n, src, g.ints)
                if not g.launchers & set(PATCH_LAUNCHERS):
                    continue
                for (shape, patch, reduces), dtype in itertools.product(g.patch_items(), dtypes):
                    B, C, H, W = shape
                    ph, pw = patch
                    if H % ph or W % pw or (H // ph) * (W // pw) > self.max_patches:
                        continue
                    for reduce, center in itertools.product(reduces, centers):
                        out += self.patch_calls(shape, patch, reduce, center, dtype, src, ("channels_last", "strided"),
                                                g.need_pairs(), g.ints, g.launchers)  # fmt: skip
        return out

    def bench_calls(self) -> list[Call]:
        """The shapes of every ``bench/bench_*.py`` (``CASES`` where it has them, else ``SHAPES``) as its op calls
        the launchers, in fp32 / fp16 / bf16."""
        out: list[Call] = []
        bench_dir = self.repo / "bench"
        if str(bench_dir) not in sys.path:
            sys.path.insert(0, str(bench_dir))
        for path in sorted(bench_dir.glob("bench_*.py")):
            try:
                mod = importlib.import_module(path.stem)
            except Exception as exc:  # a benchmark that cannot be imported here
                self.notes.append(f"{path.name}: not imported ({type(exc).__name__}: {exc})")
                continue
            op = getattr(getattr(mod, "BENCH", None), "op", path.stem.removeprefix("bench_"))
            src = f"bench:{op}"
            cases = dict(getattr(mod, "CASES", None) or getattr(mod, "SHAPES", {}))
            for dtype, dims in itertools.product(DTYPES, cases.values()):
                if op == "alignment_stats":  # ckakd.cka(x (n, dx), y (n, dy)): two Grams, one Frobenius sum, grad x
                    n, dx, dy = dims
                    out += self.gram_calls((1, n, dx), dtype, True, src)
                    out += self.gram_calls((1, n, dy), dtype, True, src, launchers=("gram_forward",))
                    out += self.frobenius_calls(1, n, src)
                elif op == "centered_gram":
                    n, d = dims
                    out += self.gram_calls((1, n, d), dtype, True, src)
                elif op == "precision":  # kernels.gram_forward / gram_backward at every dot precision
                    n, d = dims
                    out += self.gram_calls((1, n, d), dtype, True, src, strings=True)
                elif op == "patch_alignment_stats":  # patch_cka_loss: resized to multiples of the patch, frozen teacher
                    patch = tuple(getattr(mod, "PATCH", (16, 16)))
                    resize = getattr(mod, "resized_hw", None)
                    b, c, h, w, *rest = dims
                    reduce = rest[0] if rest else "channel"
                    h, w = resize(h, w) if resize else (h, w)
                    if (h // patch[0]) * (w // patch[1]) <= self.max_patches:
                        out += self.patch_calls((b, c, h, w), patch, reduce, True, dtype, src, need=[(True, False)])
                elif op != "sinkhorn":  # sinkhorn: the C++/CUDA extension, in the .cu part of the report
                    self.notes.append(f"{path.name}: op {op!r} has no launcher mapping in compile_report.py")
                    break
        return out

    def table_calls(self) -> list[Call]:
        """Shapes that reach every entry of every candidate table (module docstring, point 3)."""
        out: list[Call] = []
        src = "tables"
        gram_n = (7, 24, 48, 200)  # every Gram / Gram-backward bucket (16, 32, 64: single tile; 128: n > 128)
        # fp32: centered and not, every dot precision (string keywords); bf16 centered, every precision;
        # fp16 centered, default precision
        combos = [("float32", True, True), ("float32", False, True), ("bfloat16", True, True), ("float16", True, False)]
        for n, (dtype, center, strings) in itertools.product(gram_n, combos):
            out += self.gram_calls((2, n, 16384), dtype, center, src, strings=strings)
        for n in gram_n:
            out += self.frobenius_calls(2, n, src)
        ph, pw = 16, 16
        for p_pad in self.p_pads():
            rows, cols = _factor(p_pad * 3 // 4 if p_pad < self.max_patches else p_pad)
            shape = (2, 64, rows * ph, cols * pw)
            for reduce, center in itertools.product(REDUCES, (True, False)):
                # both gradients everywhere; the student's only (frozen teacher) when centered; the teacher's once
                need = [(True, True)] + [(True, False)] * center + [(False, True)] * (center and reduce == "channel")
                out += self.patch_calls(shape, (ph, pw), reduce, center, "float32", src, need=need)
            for dtype, reduce in itertools.product(LOW_DTYPES, ("channel", "spatial")):
                out += self.patch_calls(shape, (ph, pw), reduce, True, dtype, src, need=[(True, False)])
        return out

    def p_pads(self) -> list[int]:
        """The padded patch counts of the patch-CKA kernels: 16, 32, ... MAX_PATCHES."""
        out, p = [], 16
        while p <= self.max_patches:
            out.append(p)
            p *= 2
        return out

    def calls(self, sources: Iterable[str] = SOURCES) -> list[Call]:
        """The calls of the sweep from ``sources`` (tests, bench, tables), and a note per launcher it cannot drive."""
        for name in sorted(set(self.launchers) - set(GRAM_LAUNCHERS + PATCH_LAUNCHERS)):
            self.notes.append(f"ckakd.kernels.{name}: exported launcher without a sweep in compile_report.py")
        builders = {"tests": self.test_calls, "bench": self.bench_calls, "tables": self.table_calls}
        return [call for source in sources for call in builders[source]()]


def _factor(p: int) -> tuple[int, int]:
    """(rows, cols) with rows * cols == p and rows the largest divisor <= sqrt(p)."""
    rows = max(r for r in range(1, int(p**0.5) + 1) if p % r == 0)
    return rows, p // rows


def record(sweep: Sweep, calls: Iterable[Call], sms: int = H200_SMS) -> tuple[list[Launch], list[str]]:
    """Run ``calls`` under recording; returns every recorded launch and the calls the launchers refused."""
    launches: list[Launch] = []
    refused: list[str] = []
    current = [""]

    def callback(kernel: Any, grid: Any, args: tuple, meta: dict) -> None:
        launches.append(bind_launch(kernel, grid, args, dict(meta), current[0]))

    with recording_launches(callback, sms):
        for call in calls:
            current[0] = call.source
            try:
                sweep.launchers[call.launcher](*map(_build, call.args), **call.kwargs)
            except ValueError as exc:  # a shape / keyword this launcher refuses (the tests check those too)
                refused.append(f"{call.launcher}{tuple(getattr(a, 'shape', a) for a in call.args)}: {exc}")
    return launches, refused
