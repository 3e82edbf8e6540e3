"""Tests of ``bench/compile_report.py``: its ptxas / cuobjdump / nvcc parsers on captured output, the
specialization key it deduplicates on, the test-file harvest, and the launch sweep under recording (installed
triton, no compilation): every candidate of every launch table, every patch ``P_PAD`` / ``reduce`` / ``center``
/ ``need_*``, every input dtype. Compiling for real (triton 3.6, ptxas, nvcc) is what ``.ci/run`` does.
"""

from __future__ import annotations

import importlib.util
import inspect
import shutil
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))  # the report's modules: bench/kernel_report/

from kernel_report.harvest import harvest_tests  # noqa: E402
from kernel_report.launches import (  # noqa: E402
    arg_spec,
    bind_launch,
    config_string,
    dedupe,
    dtype_name,
    is_pointer,
    recording_launches,
    specialization_key,
)
from kernel_report.output import CSV_COLUMNS, SHARED_LIMITS, Row, markdown, offenders, summary, write_csv  # noqa: E402
from kernel_report.ptxas import demangle, parse_cuobjdump, parse_ptxas, split_demangled  # noqa: E402
from kernel_report.sweep import Sweep, keyword_sets, record  # noqa: E402


def _load_report():
    spec = importlib.util.spec_from_file_location("compile_report", REPO / "bench" / "compile_report.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["compile_report"] = mod
    spec.loader.exec_module(mod)
    return mod


cr = _load_report()

# ptxas -v of the patch-CKA forward kernel as of commit 8daea7e (P_PAD=16, reduce="spatial"), triton 3.6, sm_90a
PTXAS_SPILLS = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_patch_cka_fwd_kernel' for 'sm_90a'
ptxas info    : Function properties for _patch_cka_fwd_kernel
    720 bytes stack frame, 724 bytes spill stores, 720 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 720 bytes cumulative stack size
ptxas info    : Compile time = 140.858 ms
"""
PTXAS_CLEAN = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_gram_kernel' for 'sm_90a'
ptxas info    : Function properties for _gram_kernel
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 128 registers, used 1 barriers
ptxas info    : Compile time = 98.1 ms
"""
# nvcc -Xptxas -v of csrc/sinkhorn_cuda.cu for sm_90 (two of its kernels), and a device function's block
NVCC_A = (
    "_ZN5ckakd54_GLOBAL__N__3aa46687_16_sinkhorn_cuda_cu_529a8f73_730720backward_step_kernelIfEEvPKT_S4_S4_PS2_S5_lb"
)
NVCC_B = "_ZN5ckakd54_GLOBAL__N__3aa46687_16_sinkhorn_cuda_cu_529a8f73_730714row_dot_kernelIfEEvPKT_S4_PS2_l"
NVCC_SAMPLE = f"""\
ptxas info    : 28 bytes gmem
ptxas info    : Compiling entry function '{NVCC_A}' for 'sm_90'
ptxas info    : Function properties for {NVCC_A}
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 32 registers, used 0 barriers
ptxas info    : Compile time = 67.989 ms
ptxas info    : Compiling entry function '{NVCC_B}' for 'sm_90'
ptxas info    : Function properties for {NVCC_B}
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 22 registers, used 1 barriers, 128 bytes smem
ptxas info    : Compile time = 12.585 ms
ptxas info    : Function properties for _Z9helperfnv
    16 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
"""
CUOBJDUMP_SAMPLE = """\

Resource usage:
 Common:
  GLOBAL:0
 Function _patch_cka_fwd_kernel:
  REG:255 STACK:720 SHARED:1024 LOCAL:0 CONSTANT[0]:624 TEXTURE:0 SURFACE:0 SAMPLER:0
"""


# ---------------------------------------------------------------------------------------------------
# parsers
# ---------------------------------------------------------------------------------------------------


def test_parse_ptxas_spills_and_clean():
    (name, u), *rest = parse_ptxas(PTXAS_SPILLS).items()
    assert not rest and name == "_patch_cka_fwd_kernel"
    assert (u.registers, u.stack_bytes, u.spill_stores, u.spill_loads) == (255, 720, 724, 720)
    u = parse_ptxas(PTXAS_CLEAN)["_gram_kernel"]
    assert (u.registers, u.stack_bytes, u.spill_stores, u.spill_loads, u.shared_bytes) == (128, 0, 0, 0, 0)


def test_parse_ptxas_nvcc_output():
    usage = parse_ptxas(NVCC_SAMPLE)
    assert list(usage) == [NVCC_A, NVCC_B]  # the device function has no "Used N registers": not a kernel
    a, b = usage.values()
    assert (a.registers, a.shared_bytes, a.stack_bytes, a.spill_stores) == (32, 0, 0, 0)
    assert (b.registers, b.shared_bytes, b.stack_bytes, b.spill_stores, b.spill_loads) == (22, 128, 0, 0, 0)


def test_parse_cuobjdump():
    res = parse_cuobjdump(CUOBJDUMP_SAMPLE)
    assert res == {
        "_patch_cka_fwd_kernel": {
            "REG": 255,
            "STACK": 720,
            "SHARED": 1024,
            "LOCAL": 0,
            "CONSTANT[0]": 624,
            "TEXTURE": 0,
            "SURFACE": 0,
            "SAMPLER": 0,
        }
    }


@pytest.mark.parametrize(
    "demangled,expected",
    [
        ("void (anonymous namespace)::row_dot_kernel<double>(double const*, double const*, double*, long)",
         ("row_dot_kernel", "double")),
        ("void fused_forward_kernel<float, 4>(float const*, int)", ("fused_forward_kernel", "float, 4")),
        ("void ns::k<std::pair<int, float> >(int)", ("k", "std::pair<int, float>")),
        ("plain_kernel", ("plain_kernel", "")),
        ("_Z3fooi", ("_Z3fooi", "")),
    ],
)  # fmt: skip
def test_split_demangled(demangled, expected):
    assert split_demangled(demangled) == expected


def test_demangle_with_cxxfilt():
    if shutil.which("c++filt") is None:
        pytest.skip("no c++filt")
    names = demangle([NVCC_B, "_gram_kernel"])
    assert names[0].startswith("void ckakd::(anonymous namespace)::row_dot_kernel<float>(")
    assert split_demangled(names[0]) == ("row_dot_kernel", "float")
    assert names[1] == "_gram_kernel"


def test_offenders_and_outputs(tmp_path):
    rows = [
        Row("a", "X=1 ptrs=fp32", 4, 100, 0, 0, 0, 1024),
        Row("a", "X=2 ptrs=fp32", 8, 255, 724, 720, 720, 0),
        Row("b", "float", "", 30, 0, 0, 0, 232_449),
    ]
    spills, shared = offenders(rows, SHARED_LIMITS[90])
    assert [r.config for r in spills] == ["X=2 ptrs=fp32"] and [r.kernel for r in shared] == ["b"]
    write_csv(rows, tmp_path / "out" / "r.csv")
    lines = (tmp_path / "out" / "r.csv").read_text().splitlines()
    assert lines[0] == ",".join(CSV_COLUMNS) and lines[2] == "a,X=2 ptrs=fp32,8,255,724,720,720,0"
    assert "| a | 2 | 1 | 255 | 724 | 720 | 720 | 1024 |" in summary(rows)
    assert markdown(rows).count("\n") == len(rows) + 1


def test_bad_arguments_name_the_option(capsys, tmp_path):
    for argv, name in (
        (["--arch", "77"], "--arch"),
        (["--jobs", "0"], "--jobs"),
        (["--repo", str(tmp_path)], "--repo"),
        (["--kernels", "("], "--kernels"),
        (["--sweep", "tables,shapes"], "--sweep"),
    ):
        with pytest.raises(SystemExit) as exc:
            cr.parse_args(argv)
        assert exc.value.code == 2
        assert name in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# the specialization key
# ---------------------------------------------------------------------------------------------------


class _FakeTensor:
    def __init__(self, dtype, ptr):
        self.dtype = dtype
        self._ptr = ptr

    def data_ptr(self):
        return self._ptr


def test_arg_spec_matches_triton():
    torch = pytest.importorskip("torch")
    pytest.importorskip("triton")
    try:
        from triton._C.libtriton import native_specialize_impl
        from triton.backends.compiler import BaseBackend
    except ImportError:
        pytest.skip("this triton has no native_specialize_impl")
    values = [1, 0, 2, 15, 16, 17, 48, -16, 2**31 - 1, 2**31, 2**40, 2**63, True, False, 0.5, None]
    values += [_FakeTensor(torch.float32, 1024), _FakeTensor(torch.bfloat16, 1028), _FakeTensor(torch.float16, 8)]
    for v in values:
        assert arg_spec(v) == tuple(native_specialize_impl(BaseBackend, v, False, True, True)), v
    assert arg_spec(16, specialize=False) == ("i32", "")
    assert arg_spec(_FakeTensor(torch.float32, 1024), align=False) == ("*fp32", "")


def _kernel():
    triton = pytest.importorskip("triton")
    tl = pytest.importorskip("triton.language")

    @triton.jit
    def k(x_ptr, out_ptr, n, stride, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(out_ptr + offs, tl.load(x_ptr + offs * stride, mask=offs < n))

    return k


def test_specialization_key():
    torch = pytest.importorskip("torch")
    k = _kernel()
    x = torch.empty(64, device="meta")
    out = torch.empty(64, device="meta")

    def key(*args, **meta):
        return specialization_key(bind_launch(k, (1,), args, dict(meta)))

    base = key(x, out, 17, 3, BLOCK=64, num_warps=4)
    assert key(x, out, 19, 5, BLOCK=64, num_warps=4) == base  # ints neither 1 nor multiples of 16
    assert key(x, out, 16, 3, BLOCK=64, num_warps=4) != base  # divisible by 16
    assert key(x, out, 17, 1, BLOCK=64, num_warps=4) != base  # equal to 1
    assert key(x, out, 17, 2**33 + 3, BLOCK=64, num_warps=4) != base  # i64
    assert key(x[1:], out, 17, 3, BLOCK=64, num_warps=4) != base  # pointer not 16-byte aligned
    assert key(x[4:], out, 17, 3, BLOCK=64, num_warps=4) == base  # 16 bytes further: aligned
    assert key(x.half(), out, 17, 3, BLOCK=64, num_warps=4) != base  # dtype
    assert key(x, out, 17, 3, BLOCK=32, num_warps=4) != base  # constexpr
    assert key(x, out, 17, 3, BLOCK=64, num_warps=8) != base  # launch option
    assert key(x, out, n=17, stride=3, BLOCK=64, num_warps=4) == base  # keywords bind like positionals
    launch = bind_launch(k, (1,), (x.half()[1:], out, 16, 1), {"BLOCK": 64, "num_warps": 4})
    config = config_string(launch)
    assert config == "BLOCK=64 ptrs=fp16!/fp32 ints=D1" and "," not in config


def test_recording_a_direct_launch():
    """A launcher that starts ``kernel[grid](...)`` itself (no ``_launch``) is recorded, not run."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("ckakd.kernels")
    k = _kernel()
    seen = []
    x = torch.empty(40, device="meta")
    with recording_launches(lambda kernel, grid, args, meta: seen.append((kernel, grid, args, meta))):
        k[(3,)](x, x, 40, 1, BLOCK=64, num_warps=2)
        k[lambda meta: (meta["n"] // 8,)](x, x, 40, 1, BLOCK=64)
    launches = [bind_launch(*s) for s in seen]
    assert [(la.grid, la.options) for la in launches] == [((3,), {"num_warps": 2}), ((5,), {})]
    assert launches[0].constexprs() == {"BLOCK": 64} and launches[0].args["n"] == 40


# ---------------------------------------------------------------------------------------------------
# test-file harvest
# ---------------------------------------------------------------------------------------------------

TEST_SOURCE = """
import pytest
SHAPES = [(2, 33, 130), (1, 7, 37)]
REDUCES = ["channel", "batch", "spatial"]

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("center", [True, False])
def test_gram(shape, center):
    kernels.gram_forward(x, center, split_k=3)

@pytest.mark.parametrize("shape,patch,block_d", [((2, 3, 8, 12), (2, 4), 16), ((1, 5, 10, 6), (2, 3), None)])
def test_patch(shape, patch, block_d):
    kernels.patch_cka_forward(f_s, f_t, *patch, "spatial", True, block_d=block_d)

@pytest.mark.parametrize("need", [(True, False), (False, True)])
@pytest.mark.parametrize("dtype", LOW)
def test_bwd(need, dtype):
    f_s = make((1, 2, 16, 8))
    kernels.patch_cka_backward(m, m, f_s, f_t, 1, 1, "channel", True, need_s=need[0])

def helper():
    return (9, 9, 9)
"""


def test_harvest_tests(tmp_path):
    path = tmp_path / "test_x.py"
    path.write_text(textwrap.dedent(TEST_SOURCE))
    groups = {g.name: g for g in harvest_tests(path)}
    assert set(groups) == {"test_gram", "test_patch", "test_bwd"}  # helper calls no launcher
    gram = groups["test_gram"]
    assert set(gram.shapes[3]) == {(2, 33, 130), (1, 7, 37)}  # through the module-level constant
    assert gram.centers == {True, False} and gram.ints == {"split_k": {3}} and not gram.low
    patch = groups["test_patch"]
    assert list(patch.patch_items()) == [((1, 5, 10, 6), (2, 3), ("spatial",)), ((2, 3, 8, 12), (2, 4), ("spatial",))]
    assert patch.ints["block_d"] == {16} and patch.launchers == {"patch_cka_forward"}
    bwd = groups["test_bwd"]
    assert list(bwd.patch_items()) == [((1, 2, 16, 8), (1, 1), ("channel",))]
    assert bwd.low and bwd.centers == {True}
    assert bwd.need_pairs() == [(True, True), (True, False), (False, True)]


def test_keyword_sets():
    def launcher(x, center, *, split_k: int | None = None, need_s: bool = True, precision: str = "b"):
        pass

    launcher.__module__ = __name__
    assert keyword_sets(launcher) == [{"need_s": True}, {"need_s": False}]
    got = keyword_sets(launcher, {"split_k": {2}}, strings=True)
    assert len(got) == 2 * 2 * 3 and {"split_k": 2, "need_s": False, "precision": "c"} in got


CHOICES = ("a", "b", "c")  # string_choices finds the keyword's values here (test_keyword_sets)


# ---------------------------------------------------------------------------------------------------
# the sweep under recording (no compilation)
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def swept():
    pytest.importorskip("triton")
    kernels = pytest.importorskip("ckakd.kernels")
    sweep = Sweep(kernels, REPO)
    calls = sweep.calls()
    launches, refused = record(sweep, calls)
    return kernels, sweep, calls, launches, refused


def _tables(kernels):
    """(module, name, candidates) of every launch table: dicts of candidate lists / single candidates keyed by
    an int, lists of candidate dicts, and single candidate dicts (``*CONFIG*`` names)."""

    def is_candidate(c):
        return isinstance(c, dict) and c and all(isinstance(k, str) for k in c)

    out = []
    for modname, mod in sorted(sys.modules.items()):
        if not modname.startswith(kernels.__name__ + ".") or modname.endswith("_launch"):
            continue
        for name, value in vars(mod).items():
            if not name.isupper() or "CONFIG" not in name:
                continue
            if is_candidate(value):
                out.append((mod, name, [value]))
            elif isinstance(value, list) and value and all(map(is_candidate, value)):
                out.append((mod, name, value))
            elif isinstance(value, dict) and value and all(isinstance(k, int) for k in value):
                for key, entry in value.items():
                    entries = entry if isinstance(entry, list) else [entry]
                    assert all(map(is_candidate, entries)), f"{modname}.{name}[{key}]: not candidate dicts"
                    out.append((mod, f"{name}[{key}]", entries))
    return out


def _module_of(launch):
    return getattr(getattr(launch.kernel, "fn", launch.kernel), "__module__", "")


def test_sweep_drives_every_launcher(swept):
    kernels, sweep, calls, launches, refused = swept
    assert not [n for n in sweep.notes if "without a sweep" in n or "no launcher mapping" in n]
    exported = {n for n in kernels.__all__ if inspect.isfunction(getattr(kernels, n))}
    assert exported <= {c.launcher for c in calls}
    assert len(refused) < len(calls) / 10, refused[:5]
    kernels_seen = {la.name for la in launches}
    for mod in {sys.modules[_module_of(la)] for la in launches}:
        jitted = {n for n, v in vars(mod).items() if hasattr(v, "fn") and n.endswith("_kernel")}
        assert jitted <= kernels_seen, f"{mod.__name__}: kernels never launched: {jitted - kernels_seen}"


def test_sweep_reaches_every_table_candidate(swept):
    kernels, _, _, launches, _ = swept
    tables = _tables(kernels)
    assert tables, "no launch tables found in ckakd.kernels"
    by_module: dict[str, list] = {}
    for la in launches:
        by_module.setdefault(_module_of(la), []).append({**la.args, **la.options})
    missing = []
    for mod, name, candidates in tables:
        seen = by_module.get(mod.__name__, [])
        for c in candidates:
            if not any(all(meta.get(k, 4 if k == "num_warps" else None) == v for k, v in c.items()) for meta in seen):
                missing.append(f"{mod.__name__}.{name}: {c}")
    assert not missing, "candidates the sweep never launches:\n" + "\n".join(missing)


def test_sweep_reaches_every_patch_variant(swept):
    kernels, sweep, _, launches, _ = swept
    p_pads = set(sweep.p_pads())
    assert p_pads == {16, 32, 64, 128} or kernels.MAX_PATCHES != 128
    checked = 0
    for name in sorted({la.name for la in launches}):
        metas = [la.constexprs() for la in launches if la.name == name]
        if "P_PAD" not in metas[0]:
            continue
        checked += 1
        assert {m["P_PAD"] for m in metas} == p_pads, name
        if "REDUCE" in metas[0]:
            want = {(p, r, c) for p in p_pads for r in range(3) for c in (True, False)}
            assert {(m["P_PAD"], m["REDUCE"], m["CENTER"]) for m in metas} == want, name
        if "NEED_S" in metas[0]:
            assert {(m["NEED_S"], m["NEED_T"]) for m in metas} == {(True, True), (True, False), (False, True)}
    assert checked >= 2


def test_sweep_reaches_every_input_dtype(swept):
    _, _, _, launches, _ = swept
    dtypes: dict[str, set[str]] = {}
    for la in launches:
        ptrs = {dtype_name(v.dtype) for v in la.args.values() if is_pointer(v)}
        dtypes.setdefault(la.name, set()).update(ptrs)
    readers = [n for n, d in dtypes.items() if {"fp16", "bf16"} & d]
    assert {"_gram_kernel", "_gram_backward_kernel"} <= set(readers)
    assert any("patch" in n for n in readers)
    for name in readers:
        assert {"fp32", "fp16", "bf16"} <= dtypes[name], name


def test_dedupe_merges_sources(swept):
    _, _, _, launches, _ = swept
    unique = dedupe(launches)
    assert 0 < len(unique) < len(launches)
    assert len({specialization_key(la) for la in unique.values()}) == len(unique)
    assert {s for la in unique.values() for s in la.source.split("+")} >= {"tables", "tests:test_gram_kernels"}
