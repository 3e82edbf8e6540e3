"""A test run on a GPU machine proves the fast paths ran: missing ones fail, and the rule itself is tested here.

* ``test_every_fast_path_is_active_on_cuda``: on a CUDA machine, the Triton kernels and the CUDA extension must be
  active (skipped only where there is no CUDA).
* The conftest rule is exercised on the CPU by simulating a CUDA machine (``CKAKD_TEST_ASSUME_CUDA=1``) with Triton
  made unimportable: the kernel test modules and the check above must *fail*, where the same absence on a CPU
  machine only skips.
* ``setup.py`` picks CUDA architectures without a visible GPU (``FORCE_CUDA=1`` on a build host).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import HAS_CUDA, fast_path_problems

REPO = Path(__file__).resolve().parents[2]
GRAM_KERNELS = "tests/ops/test_gram_kernels.py"


@pytest.mark.skipif(not HAS_CUDA, reason="the fast paths are required on CUDA machines only")
def test_every_fast_path_is_active_on_cuda():
    problems = fast_path_problems()
    assert not problems, "fast paths inactive on a CUDA machine: " + "; ".join(problems)


def _run_pytest(tmp_path: Path, assume_cuda: bool, *args: str) -> subprocess.CompletedProcess:
    """pytest in a subprocess with triton unimportable (a sitecustomize blocks it), optionally 'on CUDA'."""
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(
        textwrap.dedent(
            """
            import sys
            sys.modules["triton"] = None  # import triton -> ImportError
            """
        )
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(REPO)]), CKAKD_NO_JIT="1")
    env.pop("TRITON_INTERPRET", None)
    if assume_cuda:
        env["CKAKD_TEST_ASSUME_CUDA"] = "1"
    else:
        env.pop("CKAKD_TEST_ASSUME_CUDA", None)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.skipif(HAS_CUDA, reason="simulates a CUDA machine on a CPU one")
def test_missing_fast_paths_fail_on_a_cuda_machine_and_skip_on_a_cpu_one(tmp_path):
    files = (GRAM_KERNELS, "tests/ops/test_sinkhorn_ext.py", "tests/ops/test_fast_paths.py::" + _ACTIVE)
    cuda = _run_pytest(tmp_path, True, "-rA", *files)
    out = cuda.stdout
    assert cuda.returncode not in (0, 5), out[-3000:]
    # the kernel tests cannot import triton: a collection error, not a skip
    assert f"ERROR {GRAM_KERNELS}" in out and "import of triton halted" in out, out[-3000:]
    # the CPU-only extension is refused on a CUDA machine
    assert "ERROR tests/ops/test_sinkhorn_ext.py" in out, out[-3000:]
    assert "must be built with CUDA on a CUDA machine" in out, out[-3000:]
    # pytest stops at collection errors; the backend check itself, run alone, fails naming triton
    alone = _run_pytest(tmp_path, True, "tests/ops/test_fast_paths.py::" + _ACTIVE)
    assert alone.returncode == 1, alone.stdout[-3000:]
    assert "fast paths inactive on a CUDA machine: triton" in alone.stdout, alone.stdout[-3000:]
    cpu = _run_pytest(tmp_path, False, GRAM_KERNELS, "tests/ops/test_patch_alignment_stats_kernels.py")
    assert cpu.returncode in (0, 5) and "skipped" in cpu.stdout and "passed" not in cpu.stdout, cpu.stdout[-2000:]


_ACTIVE = "test_every_fast_path_is_active_on_cuda"


def _setup_module():
    spec = importlib.util.spec_from_file_location("ckakd_setup", REPO / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # setup() runs only as __main__
    return module


def test_setup_cuda_arch_defaults_without_a_visible_gpu():
    setup = _setup_module()
    assert setup.cuda_arch_list(None, []) == "9.0+PTX"
    assert setup.cuda_arch_list("", []) == "9.0+PTX"
    assert setup.cuda_arch_list(None, ["9.0", "8.0", "9.0"]) == "8.0;9.0"
    assert setup.cuda_arch_list("8.6", ["9.0"]) == "8.6"


def test_torch_accepts_the_default_arch_list_on_a_host_without_gpu(monkeypatch):
    """torch's own arch detection fails without a GPU (the FORCE_CUDA=1 IndexError); with the default it
    yields the sm_90 machine code and compute_90 PTX flags."""
    from torch.utils import cpp_extension

    setup = _setup_module()
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", setup.cuda_arch_list(None, setup._visible_archs()))
    flags = cpp_extension._get_cuda_arch_flags()
    assert "-gencode=arch=compute_90,code=sm_90" in flags and "-gencode=arch=compute_90,code=compute_90" in flags
