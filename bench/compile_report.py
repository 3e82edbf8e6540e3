"""Offline compile report: every Triton kernel at every configuration the launchers can start, and the CUDA
sources, compiled for sm_90 without a GPU; registers, spills, stack and shared memory per compiled variant.

python bench/compile_report.py                                  # installs triton 3.6.0 into a temp folder
python bench/compile_report.py --triton-target /tmp/triton36    # reuse (or fill) a --target folder
python bench/compile_report.py --triton-target /tmp/triton36 --repo /tmp/before --no-cu --allow-spills

How it works
------------
1. The report re-executes itself with ``PYTHONPATH=<--triton-target>``, so that ``import triton`` is the
   version the GPU machines run (3.6), and installs a fake Triton driver whose current target is
   ``GPUTarget("cuda", <--arch>, 32)``: kernels compile to PTX and cubin with no GPU present.
2. It drives the real launchers of ``ckakd.kernels`` (everything callable that the package exports) on
   ``device="meta"`` tensors inside ``ckakd.kernels._launch.recording``: launches are recorded instead of
   run, and ``_launch.choose`` offers every candidate configuration. Launchers that start a kernel with
   ``kernel[grid](...)`` directly (older code) are recorded by patching ``JITFunction.run`` for the sweep.
   While recording, ``num_sms`` reports ``--sms`` (132, an H200) so that the split heuristics choose
   what they choose on the GPU.
3. The shapes (``--sweep``, default all three):
   ``tests``: the literal shapes of the kernel test files (``tests/ops/test_*_kernels.py``, listed in
   ``TEST_FILES``, read with ``ast``), each with the patch sizes, reduces,
   centers, dtypes, ``need_*`` pairs and launcher keywords (``split_k=3``, ``block_d=16`` ...) of its own test
   function, patch inputs in the tests' layouts; ``bench``: the ``CASES`` / ``SHAPES`` of every ``bench/bench_*.py``
   as its op calls the launchers (``alignment_stats``, ``centered_gram``, ``precision``, ``patch_alignment_stats``),
   in fp32/fp16/bf16; ``tables``: a sweep that reaches every candidate of every launch table -- Gram sizes in every
   bucket (n = 7, 24, 48, 200; fp32 centered and not, bf16 centered, each at every dot precision; fp16 centered) and,
   for patch CKA, every ``P_PAD`` (16 ... ``MAX_PATCHES``) x ``reduce`` x ``center`` in fp32 (backward with both
   gradients; student-only when centered; teacher-only for channel), fp16/bf16 centered for channel and spatial. That
   is a covering design, not the full cross product (which compiles ~4x
   longer for variants that differ only in their load instructions); ``tests/test_compile_report.py``
   checks that it reaches every table entry, every ``P_PAD`` / ``reduce`` / ``center`` / ``need_*`` and
   every input dtype.
4. Launches are deduplicated on what Triton specializes on: the kernel, its constexprs, the launch options
   (``num_warps`` ...), the pointer dtypes and 16-byte alignment, and per integer argument its type and
   whether it equals 1 or is divisible by 16 (``specialization_key``). Each variant is compiled once with
   ``kernel.warmup``; ``ptxas -v`` (the target triton's, with Triton's own flags) on its PTX gives the
   registers, stack and spills, cross-checked against ``cuobjdump --dump-resource-usage`` of Triton's cubin;
   the shared memory is Triton's (``metadata.shared``, dynamic shared memory per block).
5. ``csrc/*.cu`` are compiled with ``nvcc -Xptxas -v`` for the same arch (torch's headers and nvcc flags);
   every ``__global__`` function instance becomes a row (config = its template arguments).

Output: ``--csv`` (default ``bench/out/compile_report.csv``) with
``kernel,config,num_warps,registers,spill_stores,spill_loads,stack_bytes,shared_bytes`` and a markdown
table plus a per-kernel summary on stdout. ``config`` is the constexprs, then ``ptrs=`` the pointer dtypes
(``!`` marks a pointer that is not 16-byte aligned) and ``ints=`` one letter per integer argument
(``.`` i32, ``D`` i32 divisible by 16, ``1`` equal to 1, ``l``/``L`` i64 / i64 divisible by 16, ``b`` bool,
``f`` float, ``n`` None). About 1,200 variants, ~9 CPU-minutes (``--jobs`` compiles in parallel; Triton's
cache makes a rerun fast). Exit status 1 when a variant spills (``--allow-spills``: report only), when one needs more
shared memory than a block may opt in to (232,448 bytes on sm_90), or when something does not compile.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import csv
import dataclasses
import importlib
import inspect
import itertools
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CSV = REPO / "bench" / "out" / "compile_report.csv"
DEFAULT_TRITON = "3.6.0"
CHILD_ENV = "CKAKD_COMPILE_REPORT_CHILD"
CSV_COLUMNS = (
    "kernel",
    "config",
    "num_warps",
    "registers",
    "spill_stores",
    "spill_loads",
    "stack_bytes",
    "shared_bytes",
)
# Shared memory a block may opt in to (cudaFuncAttributeMaxDynamicSharedMemorySize), per compute capability.
SHARED_LIMITS = {80: 166_912, 86: 101_376, 89: 101_376, 90: 232_448, 100: 232_448, 120: 101_376}
H200_SMS = 132
TEST_FILES = (
    "tests/ops/test_gram_kernels.py",
    "tests/ops/test_frobenius_kernels.py",
    "tests/ops/test_column_mean_kernels.py",
    "tests/ops/test_patch_alignment_stats_kernels.py",
)
LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg", "enable_fp_fusion", "launch_cooperative_grid")


# ---------------------------------------------------------------------------------------------------
# ptxas / cuobjdump output
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Usage:
    """Resource usage of one compiled function."""

    registers: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    stack_bytes: int = 0
    shared_bytes: int = 0


_PTXAS_ENTRY = re.compile(r"Compiling entry function '([^']+)'")
_PTXAS_PROPS = re.compile(r"Function properties for (\S+)")
_PTXAS_STACK = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_USED = re.compile(r"Used (\d+) registers")
_PTXAS_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas(text: str) -> dict[str, Usage]:
    """Per-entry-function usage from ``ptxas -v`` output (also as printed by ``nvcc -Xptxas -v``).

    Device functions that only get a "Function properties" block (no "Used N registers") are left out.
    """
    props: dict[str, tuple[int, int, int]] = {}
    out: dict[str, Usage] = {}
    entry = None
    last_props = None
    for line in text.splitlines():
        if m := _PTXAS_ENTRY.search(line):
            entry = m.group(1)
        elif m := _PTXAS_PROPS.search(line):
            last_props = m.group(1)
        elif (m := _PTXAS_STACK.search(line)) and last_props is not None:
            props[last_props] = (int(m.group(1)), int(m.group(2)), int(m.group(3)))
        elif (m := _PTXAS_USED.search(line)) and entry is not None:
            stack, stores, loads = props.get(entry, (0, 0, 0))
            smem = _PTXAS_SMEM.search(line)
            out[entry] = Usage(int(m.group(1)), stores, loads, stack, int(smem.group(1)) if smem else 0)
    return out


_CUOBJ_FUNC = re.compile(r"^\s*Function (\S+?):\s*$")
_CUOBJ_FIELD = re.compile(r"(\w+(?:\[\d+\])?):(\d+)")


def parse_cuobjdump(text: str) -> dict[str, dict[str, int]]:
    """``cuobjdump --dump-resource-usage`` -> {function: {"REG": .., "STACK": .., "SHARED": .., "LOCAL": ..}}."""
    out: dict[str, dict[str, int]] = {}
    func = None
    for line in text.splitlines():
        if m := _CUOBJ_FUNC.match(line):
            func = m.group(1)
        elif func is not None and "REG:" in line:
            out[func] = {k: int(v) for k, v in _CUOBJ_FIELD.findall(line)}
            func = None
    return out


def split_demangled(name: str) -> tuple[str, str]:
    """``void ns::kern<float, 4>(float const*, int)`` -> (``kern``, ``float, 4``); other names unchanged."""
    depth = 0
    cut = len(name)
    for i, ch in enumerate(name):
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0 and not name.startswith("(anonymous namespace)", i):
            cut = i
            break
    head = name[:cut].strip()
    if head.startswith("void "):
        head = head[len("void ") :]
    config = ""
    if head.endswith(">"):
        depth = 0
        for i in range(len(head) - 1, -1, -1):
            depth += {">": 1, "<": -1}.get(head[i], 0)
            if depth == 0:
                config = head[i + 1 : -1].strip()
                head = head[:i]
                break
    return head.split("::")[-1], config


def demangle(names: Sequence[str]) -> list[str]:
    """Demangle C++ symbol names with ``c++filt`` (unchanged when it is not installed)."""
    tool = shutil.which("c++filt")
    if not tool or not names:
        return list(names)
    res = subprocess.run([tool], input="\n".join(names) + "\n", capture_output=True, text=True, check=False)
    lines = res.stdout.splitlines()
    return lines if res.returncode == 0 and len(lines) == len(names) else list(names)


# ---------------------------------------------------------------------------------------------------
# launches: recording and the specialization key
# ---------------------------------------------------------------------------------------------------

_DTYPE_NAMES = {
    "float32": "fp32",
    "float16": "fp16",
    "bfloat16": "bf16",
    "float64": "fp64",
    "int8": "i8",
    "int16": "i16",
    "int32": "i32",
    "int64": "i64",
    "uint8": "u8",
    "bool": "i1",
    "float8_e4m3fn": "fp8e4nv",
    "float8_e5m2": "fp8e5",
}


def dtype_name(dtype: Any) -> str:
    """Triton's short name of a torch dtype (``torch.bfloat16`` -> ``bf16``)."""
    name = str(dtype).removeprefix("torch.")
    return _DTYPE_NAMES.get(name, name)


def is_pointer(value: Any) -> bool:
    return hasattr(value, "data_ptr") and hasattr(value, "dtype")


def data_ptr(value: Any) -> int:
    """The address Triton sees: meta tensors have none, so it is a 1024-aligned base plus the storage offset."""
    if getattr(getattr(value, "device", None), "type", None) == "meta":
        return 1024 + value.storage_offset() * value.element_size()
    return int(value.data_ptr())


def arg_spec(value: Any, specialize: bool = True, align: bool = True) -> tuple[str, Any]:
    """(type, key) of a non-constexpr argument, as Triton's ``native_specialize_impl`` computes it.

    ints equal to 1 become the constant 1, others are i32 / i64 / u64 by range and keyed ``"D"`` when
    divisible by 16; pointers are keyed ``"D"`` when 16-byte aligned; bools are ``u1``, floats ``fp32``.
    """
    if value is None:
        return ("constexpr", None)
    if isinstance(value, bool):
        return ("u1", None)
    if isinstance(value, int):
        if specialize and value == 1:
            return ("constexpr", 1)
        if -(2**31) <= value < 2**31:
            ty = "i32"
        elif 2**63 <= value < 2**64:
            ty = "u64"
        else:
            ty = "i64"
        return (ty, "D" if specialize and value % 16 == 0 else "")
    if isinstance(value, float):
        return ("fp32", None)
    if is_pointer(value):
        return ("*" + dtype_name(value.dtype), "D" if align and data_ptr(value) % 16 == 0 else "")
    raise TypeError(f"cannot specialize a kernel argument of type {type(value).__name__}")


@dataclasses.dataclass(frozen=True)
class Param:
    name: str
    constexpr: bool
    specialize: bool = True
    align: bool = True


def kernel_params(kernel: Any) -> list[Param]:
    """The parameters of a ``@triton.jit`` kernel (JITFunction or the interpreter's InterpretedFunction)."""
    params = getattr(kernel, "params", None)
    if params:
        return [
            Param(
                p.name,
                bool(p.is_constexpr),
                not getattr(p, "do_not_specialize", False),
                not getattr(p, "do_not_specialize_on_alignment", False),
            )
            for p in params
        ]
    out = []
    for p in inspect.signature(kernel.fn).parameters.values():
        ann = p.annotation
        constexpr = "constexpr" in ann if isinstance(ann, str) else getattr(ann, "__name__", "") == "constexpr"
        out.append(Param(p.name, constexpr))
    return out


def kernel_name(kernel: Any) -> str:
    fn = getattr(kernel, "fn", kernel)
    return getattr(fn, "__name__", str(fn))


@dataclasses.dataclass
class Launch:
    """One recorded launch: the kernel, its grid, its arguments (bound by name) and launch options."""

    kernel: Any
    grid: tuple
    args: dict[str, Any]
    options: dict[str, Any]
    source: str = ""

    @property
    def name(self) -> str:
        return kernel_name(self.kernel)

    def constexprs(self) -> dict[str, Any]:
        return {p.name: self.args.get(p.name) for p in kernel_params(self.kernel) if p.constexpr}


def bind_launch(kernel: Any, grid: Any, args: Sequence[Any], meta: dict[str, Any], source: str = "") -> Launch:
    """Bind ``kernel[grid](*args, **meta)`` to parameter names; the rest of ``meta`` are launch options."""
    names = [p.name for p in kernel_params(kernel)]
    if len(args) > len(names):
        raise TypeError(f"{kernel_name(kernel)}: {len(args)} positional arguments for {len(names)} parameters")
    bound = dict(zip(names, args, strict=False))
    options = {}
    for key, value in meta.items():
        if key in names:
            bound[key] = value
        else:
            options[key] = value
    if callable(grid):
        try:
            grid = grid(dict(bound, **options))
        except Exception:
            grid = ("?",)
    return Launch(kernel, tuple(grid), bound, options, source)


def specialization_key(launch: Launch) -> tuple:
    """What Triton compiles a separate binary for: kernel, constexprs, options, argument types / specialization."""
    parts = []
    for p in kernel_params(launch.kernel):
        value = launch.args.get(p.name)
        if p.constexpr:
            parts.append((p.name, "constexpr", repr(value)))
        else:
            parts.append((p.name, *arg_spec(value, p.specialize, p.align)))
    fn = getattr(launch.kernel, "fn", launch.kernel)
    module = getattr(fn, "__module__", "")
    return (f"{module}.{launch.name}", tuple(parts), tuple(sorted((k, repr(v)) for k, v in launch.options.items())))


def _short(value: Any) -> str:
    if isinstance(value, bool):
        return str(int(value))
    return str(value)


def config_string(launch: Launch) -> str:
    """Compact description of a variant (see the module docstring); no commas."""
    consts, ptrs, ints = [], [], []
    for p in kernel_params(launch.kernel):
        value = launch.args.get(p.name)
        if p.constexpr:
            consts.append(f"{p.name}={_short(value)}")
            continue
        ty, key = arg_spec(value, p.specialize, p.align)
        if ty.startswith("*"):
            ptrs.append(ty[1:] + ("" if key == "D" else "!"))
        elif ty == "constexpr":
            ints.append("1" if value == 1 else "n")
        elif ty in ("i64", "u64"):
            ints.append("L" if key == "D" else "l")
        elif ty == "u1":
            ints.append("b")
        elif ty == "fp32":
            ints.append("f")
        else:
            ints.append("D" if key == "D" else ".")
    extra = [f"{k}={_short(v)}" for k, v in sorted(launch.options.items()) if k != "num_warps"]
    out = consts + extra
    if ptrs:
        out.append("ptrs=" + "/".join(ptrs))
    if ints:
        out.append("ints=" + "".join(ints))
    return " ".join(out)


def _jit_classes() -> list[type]:
    from triton.runtime.jit import JITFunction

    classes: list[type] = [JITFunction]
    with contextlib.suppress(Exception):
        from triton.runtime.interpreter import InterpretedFunction

        classes.append(InterpretedFunction)
    return classes


@contextlib.contextmanager
def recording_launches(callback: Callable[[Any, Any, tuple, dict], None], sms: int = H200_SMS) -> Iterator[None]:
    """Record every kernel launch of ckakd's launchers instead of running it.

    Uses ``ckakd.kernels._launch.recording`` when the package has it (then ``choose`` offers every
    candidate), and in any case patches ``JITFunction.run`` (and the interpreter's) so that a launcher
    calling ``kernel[grid](...)`` directly is recorded too. ``num_sms`` of every kernels module reports
    ``sms``.
    """
    import ckakd.kernels  # noqa: F401  (its modules must be loaded to patch num_sms)

    patched: list[tuple[Any, str, Any]] = []

    def patch(obj: Any, attr: str, value: Any) -> None:
        patched.append((obj, attr, getattr(obj, attr)))
        setattr(obj, attr, value)

    def make_run(original: Callable) -> Callable:
        def run(self, *args, grid, warmup, **kwargs):
            if warmup:
                return original(self, *args, grid=grid, warmup=warmup, **kwargs)
            callback(self, grid, args, kwargs)
            return None

        return run

    with contextlib.ExitStack() as stack:
        for cls in _jit_classes():
            patch(cls, "run", make_run(cls.run))
        for name, mod in list(sys.modules.items()):
            if name.startswith("ckakd.kernels") and callable(getattr(mod, "num_sms", None)):
                patch(mod, "num_sms", lambda device, _sms=sms: _sms)
        try:
            launch_mod = importlib.import_module("ckakd.kernels._launch")
        except ImportError:
            launch_mod = None
        if launch_mod is not None and hasattr(launch_mod, "recording"):
            stack.enter_context(launch_mod.recording(callback))
        try:
            yield
        finally:
            for obj, attr, value in reversed(patched):
                setattr(obj, attr, value)


# ---------------------------------------------------------------------------------------------------
# the sweep
# ---------------------------------------------------------------------------------------------------


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
REDUCES = ("channel", "batch", "spatial")
GRAM_LAUNCHERS = ("gram_forward", "gram_backward", "frobenius_dots")
PATCH_LAUNCHERS = ("patch_cka_forward", "patch_cka_backward")
SOURCES = ("tests", "bench", "tables")
# position of ph (pw follows) and of center in the launchers' positional arguments
_PATCH_ARG = {"patch_cka_forward": 2, "patch_cka_backward": 4}
_CENTER_ARG = {"gram_forward": 1, "gram_backward": 3, "patch_cka_forward": 5, "patch_cka_backward": 7}


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


@dataclasses.dataclass
class TestGroup:
    """The literals of one test function (with its decorators and the module-level constants it names).

    ``shapes``: int tuples by length -> for each, the ``(ph, pw)`` tuples and ``reduce`` strings written
    next to it (``((2, 3, 8, 12), (2, 4), 16)`` in a parametrize row, ``{16: ((1, 3, 8, 12), (2, 4))}``);
    ``patches``: the other ``(ph, pw)`` (loose int pairs, the patch arguments of ``patch_cka_*`` calls);
    ``ints`` / ``bools``: keyword or parametrize name -> values; ``centers``: ``center`` values (parametrized
    or literal launcher arguments); ``reduces``: reduce strings; ``needs``: parametrized ``(need_s, need_t)``
    pairs; ``low``: it uses fp16 / bf16 (``LOW``, ``torch.float16`` ...); ``launchers``: the launchers it calls.
    """

    name: str
    shapes: dict[int, dict[tuple[int, ...], tuple[set, set]]] = dataclasses.field(default_factory=dict)
    patches: set[tuple[int, int]] = dataclasses.field(default_factory=set)
    ints: dict[str, set[int]] = dataclasses.field(default_factory=dict)
    bools: dict[str, set[bool]] = dataclasses.field(default_factory=dict)
    centers: set[bool] = dataclasses.field(default_factory=set)
    reduces: set[str] = dataclasses.field(default_factory=set)
    needs: set[tuple[bool, bool]] = dataclasses.field(default_factory=set)
    low: bool = False
    launchers: set[str] = dataclasses.field(default_factory=set)

    def need_pairs(self) -> list[tuple[bool, bool]]:
        """(need_s, need_t) of the backward calls: both, and whatever the test passes."""
        need_s = self.bools.get("need_s", set()) | {True}
        need_t = self.bools.get("need_t", set()) | {True}
        pairs = set(itertools.product(need_s, need_t)) | self.needs
        return sorted((p for p in pairs if any(p)), reverse=True)

    def patch_items(self) -> Iterator[tuple[tuple[int, ...], tuple[int, int], tuple[str, ...]]]:
        """(shape, patch, reduces) of every 4-D shape of the group, paired as the test pairs them."""
        for shape, (near_patches, near_reduces) in sorted(self.shapes.get(4, {}).items()):
            reduces = near_reduces or self.reduces or set(REDUCES)
            for patch in sorted(near_patches or self.patches):
                yield shape, patch, tuple(r for r in REDUCES if r in reduces)


def _literal(node: ast.AST) -> Any:
    try:
        return ast.literal_eval(node)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _bool_pair(value: Any) -> bool:
    return isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, bool) for v in value)


def _int_tuple(value: Any) -> bool:
    return isinstance(value, tuple) and bool(value) and all(_is_int(v) and v > 0 for v in value)


def _harvest(group: TestGroup, root: ast.AST, constants: dict[str, ast.AST]) -> TestGroup:
    def keyword(name: str, value: Any) -> None:
        if _is_int(value):
            group.ints.setdefault(name, set()).add(value)
        elif isinstance(value, bool):
            group.bools.setdefault(name, set()).add(value)
            if name == "center":
                group.centers.add(value)
        elif name.startswith("need") and _bool_pair(value):
            group.needs.add(value)

    near: set[int] = set()  # ids of int pairs written next to a shape
    loose: list[tuple[int, tuple[int, int]]] = []
    todo, seen = [root], set()
    while todo:
        top = todo.pop()
        for node in ast.walk(top):
            if isinstance(node, ast.Name) and node.id in constants and node.id not in seen:
                seen.add(node.id)
                todo.append(constants[node.id])
            if isinstance(node, ast.Name) and node.id in ("LOW", "LOW_DTYPES"):
                group.low = True
            elif isinstance(node, ast.Attribute) and node.attr in ("float16", "bfloat16", "half"):
                group.low = True
            elif isinstance(node, ast.Name) and node.id == "REDUCES":
                group.reduces |= set(REDUCES)
            elif isinstance(node, ast.Constant) and node.value in REDUCES:
                group.reduces.add(node.value)
            if isinstance(node, ast.Tuple) and _int_tuple(value := _literal(node)) and len(value) > 2:
                group.shapes.setdefault(len(value), {}).setdefault(value, (set(), set()))
            if isinstance(node, (ast.Tuple, ast.List)):
                values = [(el, _literal(el)) for el in node.elts]
                for el, value in values:
                    if _int_tuple(value) and len(value) > 2:
                        patches = {v for e, v in values if _int_tuple(v) and len(v) == 2 and not near.add(id(e))}
                        reduces = {v for _, v in values if isinstance(v, str) and v in REDUCES}
                        old = group.shapes.setdefault(len(value), {}).setdefault(value, (set(), set()))
                        old[0].update(patches)
                        old[1].update(reduces)
                    elif _int_tuple(value) and len(value) == 2:
                        loose.append((id(el), value))
            if not isinstance(node, ast.Call):
                continue
            func = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if func in GRAM_LAUNCHERS + PATCH_LAUNCHERS:
                group.launchers.add(func)
            for kw in node.keywords:
                if kw.arg:
                    keyword(kw.arg, _literal(kw.value))
            for arg in node.args:
                if _int_tuple(value := _literal(arg)) and len(value) == 2:
                    loose.append((id(arg), value))
            positional = not any(isinstance(a, ast.Starred) for a in node.args)
            i = _PATCH_ARG.get(func)
            if positional and i is not None and len(node.args) > i + 1:
                ph, pw = _literal(node.args[i]), _literal(node.args[i + 1])
                if _is_int(ph) and _is_int(pw):
                    group.patches.add((ph, pw))
            i = _CENTER_ARG.get(func)
            if positional and i is not None and len(node.args) > i and isinstance(_literal(node.args[i]), bool):
                group.centers.add(_literal(node.args[i]))
            if func == "parametrize" and len(node.args) >= 2:
                names, values = _literal(node.args[0]), _literal(node.args[1])
                if isinstance(names, str) and isinstance(values, list):
                    names_list = [n.strip() for n in names.split(",")]
                    for row in values:
                        for name, value in zip(names_list, row if len(names_list) > 1 else (row,), strict=False):
                            keyword(name, value)
    group.patches |= {value for i, value in loose if i not in near}
    return group


def harvest_tests(path: Path) -> list[TestGroup]:
    """One :class:`TestGroup` per test function of a file that calls a kernel launcher, so that a shape goes
    with the patch sizes, reduces, centers, dtypes and launcher keywords of its own test."""
    tree = ast.parse(path.read_text())
    constants: dict[str, ast.AST] = {}
    funcs: list[ast.FunctionDef] = []
    for node in tree.body:
        if isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    constants[target.id] = node.value
        elif isinstance(node, ast.FunctionDef):
            funcs.append(node)
        elif isinstance(node, ast.ClassDef):
            funcs += [n for n in node.body if isinstance(n, ast.FunctionDef)]
    groups = [_harvest(TestGroup(f.name), f, constants) for f in funcs]
    return [g for g in groups if g.launchers]


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


def dedupe(launches: Iterable[Launch]) -> dict[tuple, Launch]:
    """One launch per specialization key (the first seen; its ``source`` lists every source that reached it)."""
    out: dict[tuple, Launch] = {}
    for launch in launches:
        key = specialization_key(launch)
        if key in out:
            if launch.source not in out[key].source.split("+"):
                out[key].source += "+" + launch.source
        else:
            out[key] = dataclasses.replace(launch)
    return out


# ---------------------------------------------------------------------------------------------------
# compiling (child process, target triton)
# ---------------------------------------------------------------------------------------------------


def install_fake_driver(arch: int) -> None:
    """Make Triton compile for ``GPUTarget("cuda", arch, 32)`` with no GPU (no launches possible)."""
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase
    from triton.runtime import driver

    class FakeDriver(DriverBase):
        def __init__(self) -> None:
            pass

        @classmethod
        def is_active(cls) -> bool:
            return True

        def get_current_target(self) -> GPUTarget:
            return GPUTarget("cuda", arch, 32)

        def get_current_device(self) -> int:
            return 0

        def get_current_stream(self, device: int | None = None) -> int:
            return 0

        def get_active_torch_device(self) -> Any:
            return torch.device("cpu")

        def get_device_interface(self) -> Any:
            return torch.cuda

        def get_benchmarker(self) -> Any:
            raise RuntimeError("no GPU: the compile report does not run kernels")

        def map_python_to_cpp_type(self, ty: str) -> str:
            return ty

    driver.set_active(FakeDriver())


class _Ptr:
    """A pointer argument for ``warmup``: the dtype and an address with the recorded alignment."""

    def __init__(self, dtype: Any, ptr: int):
        self.dtype = dtype
        self._ptr = ptr

    def data_ptr(self) -> int:
        return self._ptr


def _nvidia_tool(name: str) -> str:
    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    env = os.environ.get(f"TRITON_{name.upper()}_PATH")
    for cand in (env, str(bundled), shutil.which(name)):
        if cand and Path(cand).exists():
            return cand
    raise FileNotFoundError(f"no {name}: not bundled with triton at {bundled.parent} and not on PATH")


@dataclasses.dataclass
class Row:
    kernel: str
    config: str
    num_warps: int | str
    registers: int
    spill_stores: int
    spill_loads: int
    stack_bytes: int
    shared_bytes: int
    source: str = ""
    note: str = ""

    def csv(self) -> list[Any]:
        return [getattr(self, c) for c in CSV_COLUMNS]


def compile_launch(launch: Launch) -> Row:
    """Compile one variant with ``warmup`` and measure it (ptxas -v on its PTX, cuobjdump on its cubin)."""
    kwargs = {name: _Ptr(v.dtype, data_ptr(v)) if is_pointer(v) else v for name, v in launch.args.items()}
    compiled = launch.kernel.warmup(grid=launch.grid, **kwargs, **launch.options)
    if hasattr(compiled, "result"):
        compiled = compiled.result()
    ptx = compiled.asm["ptx"]
    target = re.search(r"^\.target\s+(\w+)", ptx, re.MULTILINE)
    arch = target.group(1) if target else "sm_90a"
    fmad = [] if getattr(compiled.metadata, "enable_fp_fusion", True) else ["--fmad=false"]
    extra = (getattr(compiled.metadata, "ptx_options", None) or "").split()
    with tempfile.TemporaryDirectory(prefix="compile-report-") as tmp:
        src, cubin = Path(tmp) / "k.ptx", Path(tmp) / "k.cubin"
        src.write_text(ptx)
        cmd = [
            _nvidia_tool("ptxas"),
            "-lineinfo",
            *fmad,
            "-v",
            *extra,
            f"--gpu-name={arch}",
            str(src),
            "-o",
            str(cubin),
        ]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode:
            raise RuntimeError(f"ptxas failed on {launch.name}: {res.stderr[-2000:]}")
        usage = parse_ptxas(res.stdout + res.stderr)
        dump = ""
        with contextlib.suppress(FileNotFoundError):  # the cross-check is optional
            Path(tmp, "triton.cubin").write_bytes(compiled.asm["cubin"])
            cmd = [_nvidia_tool("cuobjdump"), "--dump-resource-usage", str(Path(tmp, "triton.cubin"))]
            dump = subprocess.run(cmd, capture_output=True, text=True, check=False).stdout
    name = compiled.metadata.name if hasattr(compiled.metadata, "name") else launch.name
    u = usage.get(name) or next(iter(usage.values()), Usage())
    note = ""
    res_usage = parse_cuobjdump(dump).get(name)
    if res_usage and (res_usage.get("REG") != u.registers or res_usage.get("STACK") != u.stack_bytes):
        note = f"cuobjdump of Triton's cubin: REG {res_usage.get('REG')} STACK {res_usage.get('STACK')}"
    return Row(
        launch.name,
        config_string(launch),
        int(compiled.metadata.num_warps),
        u.registers,
        u.spill_stores,
        u.spill_loads,
        u.stack_bytes,
        int(compiled.metadata.shared),
        launch.source,
        note,
    )


_WORK: list[Launch] = []


def _compile_index(i: int) -> tuple[int, Row | None, str]:
    try:
        return i, compile_launch(_WORK[i]), ""
    except Exception as exc:
        return i, None, f"{type(exc).__name__}: {str(exc)[-1500:]}"


def compile_all(launches: Sequence[Launch], jobs: int) -> tuple[list[Row], list[str]]:
    """Compile every variant (``jobs`` forked worker processes), with a progress bar."""
    from tqdm import tqdm

    _WORK[:] = launches
    rows: list[Row | None] = [None] * len(launches)
    errors = []
    bar = tqdm(total=len(launches), desc="compiling", unit="kernel", file=sys.stderr, mininterval=1.0)
    if jobs <= 1:
        results: Iterable = map(_compile_index, range(len(launches)))
        pool = None
    else:
        import concurrent.futures
        import multiprocessing

        pool = concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork"))
        results = pool.map(_compile_index, range(len(launches)))
    try:
        for i, row, err in results:
            rows[i] = row
            if err:
                errors.append(f"{launches[i].name} [{config_string(launches[i])}]: {err}")
            bar.update()
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown()
    return [r for r in rows if r is not None], errors


# ---------------------------------------------------------------------------------------------------
# CUDA sources
# ---------------------------------------------------------------------------------------------------


def nvcc_flags(arch: int) -> tuple[list[str], list[str]]:
    """(flags, include args) for a compile-only nvcc run against torch's headers, as ``.ci/run`` had."""
    import sysconfig

    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS, include_paths

    dirs = include_paths() + [sysconfig.get_paths()["include"]]
    flags = ["-std=c++20", "-O3", "-DWITH_CUDA", "-gencode", f"arch=compute_{arch},code=sm_{arch}", *COMMON_NVCC_FLAGS]
    # The CPU torch wheel ships the c10/cuda headers but not the CMake-generated cuda_cmake_macros.h (it only
    # sets C10_CUDA_BUILD_SHARED_LIBS, for Windows DLL exports); c10's own switch skips that include.
    if not any(os.path.exists(os.path.join(d, "c10/cuda/impl/cuda_cmake_macros.h")) for d in dirs):
        flags.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    return flags, sum((["-I", p] for p in dirs), [])


def cuda_rows(repo: Path, arch: int) -> tuple[list[Row], list[str], list[str]]:
    """Rows for every ``__global__`` instance in ``csrc/*.cu``; (rows, errors, notes)."""
    sources = sorted((repo / "csrc").glob("*.cu"))
    if not sources:
        return [], [], ["no csrc/*.cu: nothing for nvcc"]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return [], [], ["nvcc not found: the .cu part of the report is skipped"]
    flags, inc = nvcc_flags(arch)
    rows, errors = [], []
    for src in sources:
        res = subprocess.run(
            [nvcc, "-c", *flags, "-Xptxas", "-v", str(src), "-o", os.devnull, *inc],
            capture_output=True,
            text=True,
            check=False,
        )
        if res.returncode:
            errors.append(f"nvcc failed on {src.relative_to(repo)} (exit {res.returncode}):\n{res.stderr[-4000:]}")
            continue
        usage = parse_ptxas(res.stdout + res.stderr)
        for mangled, plain in zip(usage, demangle(list(usage)), strict=True):
            name, config = split_demangled(plain)
            u = usage[mangled]
            rows.append(
                Row(
                    name,
                    config,
                    "",
                    u.registers,
                    u.spill_stores,
                    u.spill_loads,
                    u.stack_bytes,
                    u.shared_bytes,
                    f"nvcc:{src.name}",
                )  # fmt: skip
            )
        print(f"nvcc compiled {src.relative_to(repo)}: {len(usage)} kernels")
    return sorted(rows, key=lambda r: (r.kernel, r.config)), errors, []


# ---------------------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------------------


def write_csv(rows: Sequence[Row], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        writer.writerows(r.csv() for r in rows)


def markdown(rows: Sequence[Row]) -> str:
    lines = ["| " + " | ".join(CSV_COLUMNS) + " |", "|" + "---|" * len(CSV_COLUMNS)]
    for r in rows:
        cells = [f"`{r.config}`" if c == "config" and r.config else str(getattr(r, c)) for c in CSV_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary(rows: Sequence[Row]) -> str:
    """Per kernel: variants, how many spill, and the worst registers / spills / stack / shared memory."""
    cols = ("registers", "spill_stores", "spill_loads", "stack_bytes", "shared_bytes")
    lines = [
        "| kernel | variants | spilling | max registers | max spill stores | max spill loads | max stack"
        " | max shared |",
        "|---|---|---|---|---|---|---|---|",
    ]
    by_kernel: dict[str, list[Row]] = {}
    for r in rows:
        by_kernel.setdefault(r.kernel, []).append(r)
    for name, rs in by_kernel.items():
        spilling = sum(r.spill_stores > 0 or r.spill_loads > 0 for r in rs)
        worst = [str(max(getattr(r, c) for r in rs)) for c in cols]
        lines.append(f"| {name} | {len(rs)} | {spilling} | " + " | ".join(worst) + " |")
    return "\n".join(lines)


def offenders(rows: Sequence[Row], shared_limit: int) -> tuple[list[Row], list[Row]]:
    """(variants that spill, variants over the shared-memory limit)."""
    spills = [r for r in rows if r.spill_stores > 0 or r.spill_loads > 0]
    shared = [r for r in rows if r.shared_bytes > shared_limit]
    return spills, shared


# ---------------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--triton-target", type=Path, default=None,
                   help="pip --target folder holding the triton to compile with (installed there when it has none;\n"
                        "default: a new temporary folder)")  # fmt: skip
    p.add_argument(
        "--triton-version", default=DEFAULT_TRITON, help=f"triton to install / expect (default {DEFAULT_TRITON})"
    )
    p.add_argument("--arch", type=int, default=90, help="compute capability to compile for (default 90: H100/H200)")
    p.add_argument("--sms", type=int, default=H200_SMS, help=f"SM count the launch heuristics see (default {H200_SMS})")
    p.add_argument(
        "--repo", type=Path, default=REPO, help="ckakd checkout whose kernels, tests, benchmarks and csrc to use"
    )
    p.add_argument(
        "--csv", type=Path, default=DEFAULT_CSV, help=f"CSV output (default {DEFAULT_CSV.relative_to(REPO)})"
    )
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles (default: CPU count)")
    p.add_argument("--sweep", default=",".join(SOURCES), help=f"shape sources (default {','.join(SOURCES)})")
    p.add_argument("--kernels", default=None, metavar="REGEX", help="only the Triton kernels whose name matches")
    p.add_argument("--allow-spills", action="store_true", help="report spills without failing")
    p.add_argument("--no-cu", action="store_true", help="skip csrc/*.cu")
    p.add_argument("--no-triton", action="store_true", help="only csrc/*.cu (needs no triton install)")
    args = p.parse_args(argv)
    if args.arch not in SHARED_LIMITS:
        p.error(f"--arch {args.arch}: unknown compute capability; known: {', '.join(map(str, SHARED_LIMITS))}")
    if args.jobs < 1:
        p.error(f"--jobs must be >= 1, got {args.jobs}")
    if args.sms < 1:
        p.error(f"--sms must be >= 1, got {args.sms}")
    if not (args.repo / "ckakd" / "kernels").is_dir():
        p.error(f"--repo {args.repo}: no ckakd/kernels package there")
    args.sweep = tuple(x for x in args.sweep.split(",") if x)
    if not args.sweep or set(args.sweep) - set(SOURCES):
        p.error(f"--sweep {','.join(args.sweep)!r}: choose from {', '.join(SOURCES)}")
    if args.kernels is not None:
        try:
            re.compile(args.kernels)
        except re.error as exc:
            p.error(f"--kernels {args.kernels!r}: not a regular expression ({exc})")
    if args.no_cu and args.no_triton:
        p.error("--no-cu and --no-triton together leave nothing to report")
    args.repo = args.repo.resolve()
    return args


def ensure_triton(target: Path | None, version: str) -> Path:
    """A ``--target`` folder holding triton: ``target`` as is when it has one, else install ``version`` there."""
    if target is None:
        target = Path(tempfile.mkdtemp(prefix="compile-report-triton-"))
    target = target.resolve()
    if (target / "triton" / "__init__.py").exists():
        return target
    if target.exists() and not target.is_dir():
        raise SystemExit(f"--triton-target {target}: not a folder")
    print(f"installing triton=={version} into {target}", flush=True)
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), f"triton=={version}"]
    if subprocess.run(cmd, check=False).returncode:
        raise SystemExit(f"--triton-target {target}: pip could not install triton=={version} there")
    return target


def child(args: argparse.Namespace) -> int:
    """The report proper, run with the target triton first on the path."""
    t0 = time.perf_counter()
    rows: list[Row] = []
    errors: list[str] = []
    notes: list[str] = []
    if not args.no_triton:
        import triton

        print(f"triton {triton.__version__} from {Path(triton.__file__).parent}")
        if triton.__version__ != args.triton_version:
            where = args.triton_target or "the temporary target"
            raise SystemExit(f"--triton-target {where} holds triton {triton.__version__}, not {args.triton_version}")
        os.environ.pop("TRITON_INTERPRET", None)
        install_fake_driver(args.arch)
        sys.path.insert(0, str(args.repo))
        import ckakd.kernels

        print(f"ckakd.kernels from {Path(ckakd.kernels.__file__).parent}")
        sweep = Sweep(ckakd.kernels, args.repo)
        calls = sweep.calls(args.sweep)
        launches, refused = record(sweep, calls, args.sms)
        unique = dedupe(launches)
        if args.kernels is not None:
            unique = {k: v for k, v in unique.items() if re.search(args.kernels, v.name)}
        notes += sweep.notes
        print(
            f"{len(calls)} launcher calls ({len(refused)} refused by the launcher), {len(launches)} launches, "
            f"{len(unique)} distinct variants to compile"
        )
        triton_rows, errs = compile_all(list(unique.values()), args.jobs)
        rows += sorted(triton_rows, key=lambda r: (r.kernel, r.config))
        errors += errs
        for r in triton_rows:
            if r.note:
                notes.append(f"{r.kernel} [{r.config}]: {r.note}")
    if not args.no_cu:
        cu_rows, errs, cu_notes = cuda_rows(args.repo, args.arch)
        rows += cu_rows
        errors += errs
        notes += cu_notes
    write_csv(rows, args.csv)
    print()
    print(markdown(rows))
    print()
    print(summary(rows))
    print(f"\n{len(rows)} variants in {time.perf_counter() - t0:.0f} s; CSV: {args.csv}")
    for note in notes:
        print(f"note: {note}")
    limit = SHARED_LIMITS[args.arch]
    spills, shared = offenders(rows, limit)
    status = 0
    for r in spills:
        print(f"SPILL: {r.kernel} [{r.config}] num_warps={r.num_warps}: {r.registers} registers, "
              f"{r.spill_stores} B spill stores, {r.spill_loads} B spill loads, {r.stack_bytes} B stack "
              f"(reached by {r.source})")  # fmt: skip
    for r in shared:
        print(f"SHARED: {r.kernel} [{r.config}]: {r.shared_bytes} B > {limit} B per block on sm_{args.arch}")
    for err in errors:
        print(f"ERROR: {err}")
    if spills and not args.allow_spills:
        print(f"{len(spills)} variants spill registers (--allow-spills to only report)")
        status = 1
    if shared or errors:
        status = 1
    return status


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if os.environ.get(CHILD_ENV) == "1" or args.no_triton:
        return child(args)
    argv = list(sys.argv[1:] if argv is None else argv)
    temporary = args.triton_target is None
    target = ensure_triton(args.triton_target, args.triton_version)
    try:
        env = dict(os.environ, **{CHILD_ENV: "1"})
        paths = [str(target)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        env["PYTHONPATH"] = os.pathsep.join(paths)
        if temporary:
            argv += ["--triton-target", str(target)]
        return subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv], env=env, check=False).returncode
    finally:
        if temporary:  # the folder made for this run
            shutil.rmtree(target, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
