"""bench/gpu_validate.sh and bench/gpu_checks.py on a CPU machine: syntax, the --dry paths end to end, failures.

The GPU stages themselves need the lent GPU machine; here every stage that can run without one runs in reduced form.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

import ckakd

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "gpu_validate.sh"
CHECKS = REPO / "bench" / "gpu_checks.py"
STAGES = ("env", "build", "tests", "selftest", "sanitizer", "checks", "bench")

sys.path.insert(0, str(REPO / "bench"))  # the checks' modules: bench/gpu_suite/

from gpu_suite.support import Failed, Runner, close, expect_dispatch  # noqa: E402

needs_bash = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash")


def _validate(tmp_path: Path, *args: str, timeout: int = 900, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env}
    full_env.pop("CKAKD_SELFTEST_ASSUME_CUDA", None)
    return subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, env=full_env, cwd=tmp_path, timeout=timeout
    )


@needs_bash
def test_script_syntax():
    res = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


@needs_bash
def test_bad_arguments_exit_2(tmp_path):
    assert _validate(tmp_path).returncode == 2
    assert _validate(tmp_path, str(tmp_path / "o"), "--wet").returncode == 2
    res = _validate(tmp_path, str(tmp_path / "o"), "--dry", GPU_VALIDATE_STAGES="env,nonsense")
    assert res.returncode == 2 and "unknown stage 'nonsense'" in res.stderr


@needs_bash
@pytest.mark.slow
def test_dry_run_end_to_end(tmp_path):
    """Every stage runs (reduced) or says what it would run; at most 8 files; a summary row per stage."""
    out = tmp_path / "out"
    bench_args = "--ops alignment_stats --providers ckakd,reference"
    res = _validate(tmp_path, str(out), "--dry", GPU_VALIDATE_BENCH_ARGS=bench_args)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8, files
    assert {"summary.md", "validate.log", "selftest.json", "tests.xml", "bench.csv", "bench.md"} <= set(files)
    summary = (out / "summary.md").read_text()
    for stage in STAGES:
        assert f"\n| {stage} | " in summary, stage
    assert "| build | DRY |" in summary and "FAIL" not in summary
    report = json.loads((out / "selftest.json").read_text())
    assert report["summary"]["ok"] and report["summary"]["pass"] > 50
    suites = ET.parse(out / "tests.xml").getroot()
    assert int(suites.get("tests")) > 20 and suites.get("failures") == "0" and suites.get("errors") == "0"
    assert len(suites) >= 2  # several pytest processes, merged
    rows = list(csv.DictReader((out / "bench.csv").open()))
    assert rows and all(r["device"] for r in rows) and {r["op"] for r in rows} == {"alignment_stats"}
    log = (out / "validate.log").read_text()
    for marker in ("01-env", "02-build", "pytest-kernels-1", "04-selftest", "05-sanitizer", "06-checks-3-bigoffset"):
        assert marker in log, marker
    assert "PASS graphs/capture+replay" in log and "PASS bigoffset/patch CKA" in log


@needs_bash
def test_failed_stage_does_not_stop_the_others_and_fails_the_run(tmp_path):
    """Triton made inactive: the (dry) build check fails, the bench after it still runs, the run exits 1."""
    out = tmp_path / "out"
    res = _validate(
        tmp_path,
        str(out),
        "--dry",
        GPU_VALIDATE_STAGES="env,build,bench",
        GPU_VALIDATE_BENCH_ARGS="--ops alignment_stats --providers ckakd",
        TRITON_INTERPRET="0",
        timeout=600,
    )
    assert res.returncode == 1, res.stdout[-3000:]
    summary = (out / "summary.md").read_text()
    assert "| build | FAIL |" in summary and "| env | PASS |" in summary and "| bench | PASS |" in summary
    assert "| tests | SKIP |" in summary and "not selected" in summary
    assert "FAILED stages: build" in res.stdout
    assert "INACTIVE: triton" in (out / "validate.log").read_text()
    assert (out / "bench.csv").exists() and len(list(out.iterdir())) <= 8


def test_gpu_checks_dry_all_passes():
    res = subprocess.run(
        [sys.executable, str(CHECKS), "--dry", "all"], capture_output=True, text=True, cwd=REPO, timeout=900
    )
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    lines = res.stdout.splitlines()
    for command in ("sanitizer-cases", "graphs", "determinism", "bigoffset"):
        assert any(line.startswith(f"PASS {command}/") for line in lines), command
    assert not any(line.startswith("FAIL") for line in lines)
    assert "ALL PASSED" in lines[-1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_gpu_checks_refuse_to_run_without_cuda_unless_dry():
    res = subprocess.run([sys.executable, str(CHECKS), "graphs"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert res.returncode == 2 and "no CUDA device" in res.stdout


def test_expect_dispatch_fails_on_a_fallback():
    x, y = torch.randn(8, 5), torch.randn(8, 4)
    with expect_dispatch("torch", "gram"):
        ckakd.cka(x, y, mode="debiased", backend="torch")
    with pytest.raises(Failed, match=r"missing: \['gram'\]"), expect_dispatch("triton", "gram"):
        ckakd.cka(x, y, mode="debiased", backend="torch")


def test_runner_reports_failures():
    runner = Runner()
    runner.run("ok", lambda: "fine")
    runner.run("bad", lambda: close("x", torch.ones(3), torch.zeros(3) + 2))
    assert runner.failed == 1
    assert [ok for _, ok, _, _ in runner.results] == [True, False]
