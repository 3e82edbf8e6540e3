"""``ckakd selftest``: is this installation correct and fast here?

Prints the versions (python, torch and its CUDA, triton, the GPU, the C++/CUDA extension) and
``ckakd.backends()``, then checks every public op on every active backend against the float64 formulas
of ``ckakd.reference``: the forward value and the gradient (of a weighted sum, so the incoming gradient is
not 1), fp32 everywhere and on CUDA also fp16 / bf16 for the CKA family, plus a large-offset case
(features + 1000), odd shapes and, on CUDA, shapes that reach the multi-tile / split-K / general-Sinkhorn
paths. Each check records what actually ran (``ckakd.ops.track_dispatch``): a check whose requested
backend fell back to another one fails, whatever its numbers.

On a CUDA machine an inactive fast path (Triton, the CUDA extension) is a failure. Without CUDA the
Triton kernels are checked under the CPU interpreter: the command sets ``TRITON_INTERPRET=1`` itself
before triton is first imported (``ckakd`` imports triton lazily), unless the variable is already set;
with it set to ``0`` Triton is reported inactive, which is no failure on a CPU machine.

``--bench`` also runs the benchmarks of a source checkout (``bench/run_all.py``: the GPU presets on CUDA,
the quick CPU presets otherwise); ``--json PATH`` writes the whole report. Exit status 0 only when every
check passed.

``CKAKD_SELFTEST_ASSUME_CUDA=1`` applies the CUDA machine's rule (inactive fast paths fail) on a machine
without CUDA, tensors staying on the CPU: it is how the rule itself is tested.

The modules, by job: :mod:`.env` (the machine: CUDA rule, Triton interpreter, versions), :mod:`.compare`
(tolerances and the value / gradient comparison), :mod:`.check` (one check and its inputs), :mod:`.cka_checks` and
:mod:`.sinkhorn_checks` (the checks per op family), :mod:`.plan` (which checks run on which device),
:mod:`.runner` (running them, dispatch records), :mod:`.report` (table and JSON), :mod:`.bench` (``--bench``) and
:mod:`.command` (the command itself).
"""

from __future__ import annotations

from .bench import bench_dir, run_bench
from .check import CONVERGED, FIXED, GRAM, PATCH, STATS, Check
from .command import add_selftest_arguments, main, run_selftest_from_args
from .compare import DTYPE_NAMES, TOLERANCES, Comparison, compare, value_and_grad_check
from .env import ASSUME_CUDA_ENV, cuda_rules, environment, prepare_environment, versions
from .plan import build_checks
from .report import format_table
from .runner import dispatch_problems, fast_path_records, run_check, run_checks

__all__ = [
    "ASSUME_CUDA_ENV",
    "CONVERGED",
    "DTYPE_NAMES",
    "FIXED",
    "GRAM",
    "PATCH",
    "STATS",
    "TOLERANCES",
    "Check",
    "Comparison",
    "add_selftest_arguments",
    "bench_dir",
    "build_checks",
    "compare",
    "cuda_rules",
    "dispatch_problems",
    "environment",
    "fast_path_records",
    "format_table",
    "main",
    "prepare_environment",
    "run_bench",
    "run_check",
    "run_checks",
    "run_selftest_from_args",
    "value_and_grad_check",
    "versions",
]
