"""``ckakd selftest``: passes here (Triton under the interpreter), reports every op, and fails loudly when a check
is broken: a wrong value, a silent fallback to another backend, an inactive fast path on a CUDA machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ckakd
from ckakd.apps import selftest
from ckakd.apps.cli import build_parser
from ckakd.apps.selftest import bench

REPO = Path(__file__).resolve().parents[2]

# every public op family the sweep must cover (labels as in the report's "op" field)
EXPECTED_OPS = {
    "centered_gram",
    "hsic[biased]",
    "hsic[unbiased]",
    "cka[centered]",
    "cka[debiased]",
    "cka[uncentered]",
    "cka_loss",
    "rcka_loss",
    "patch_cka_loss[channel]",
    "patch_cka_loss[batch]",
    "patch_cka_loss[spatial]",
    "patch_cka_loss[mix]",
    "patch_cka_loss[channel;debiased]",
    "mmd_loss",
    "sinkhorn[fixed]",
    "sinkhorn[converged]",
    "wkd_logit_loss[target]",
    "wkd_logit_loss[no target]",
    "wkd_feature_loss[diag;grid=2]",
    "wkd_feature_loss[full;grid=1]",
    "gaussian_wasserstein[diag]",
    "gaussian_wasserstein[full]",
}


def _run(tmp_path: Path, *argv: str) -> tuple[int, dict | None]:
    report = tmp_path / "report.json"
    rc = selftest.main(["--no-progress", "--json", str(report), *argv])
    return rc, (json.loads(report.read_text()) if report.exists() else None)


@pytest.fixture(scope="module")
def full_report(tmp_path_factory):
    """The whole CPU sweep, once for the module (about 20 s)."""
    path = tmp_path_factory.mktemp("selftest") / "report.json"
    rc = selftest.main(["--no-progress", "--json", str(path)])
    return rc, json.loads(path.read_text())


def test_selftest_passes_on_cpu_and_covers_every_op(full_report):
    rc, report = full_report
    failures = [f"{c['name']}: {c['message']}" for c in report["checks"] if c["status"] == "fail"]
    assert rc == 0 and not failures, failures
    assert report["summary"]["ok"] and report["summary"]["fail"] == 0
    assert EXPECTED_OPS <= set(report["ops"]), EXPECTED_OPS - set(report["ops"])
    ran = [c for c in report["checks"] if c["status"] == "pass"]
    for backend in ("torch", "triton", "cpp"):
        assert {c["op"] for c in ran if c["backend"] == backend}, f"no check ran on {backend}"
    # both CKA backends cover the whole CKA family, Sinkhorn runs on torch and the C++ extension
    cka_ops = {op for op in EXPECTED_OPS if not op.startswith(("sinkhorn", "wkd", "gaussian"))}
    assert cka_ops <= {c["op"] for c in ran if c["backend"] == "triton"}
    assert cka_ops <= {c["op"] for c in ran if c["backend"] == "torch"}
    assert {"sinkhorn[fixed]", "sinkhorn[converged]", "wkd_logit_loss[target]"} <= {
        c["op"] for c in ran if c["backend"] == "cpp"
    }
    assert {c["case"] for c in ran} >= {"regular", "odd", "offset+1000"}


def test_report_records_errors_tolerances_dispatch_and_versions(full_report):
    _, report = full_report
    for c in report["checks"]:
        if c["status"] != "pass":
            continue
        assert c["comparisons"] and c["comparisons"][0]["what"] == "value"
        assert 0 <= c["ratio"] <= 1 and c["max_err"] is not None and c["tol"]
        assert c["seconds"] >= 0
        if c["backend"] != "torch" or c["required_dispatch"]:
            assert c["dispatch"], c["name"]
        if c["backend"] in ("triton", "cpp"):
            assert all(f"{p}/{c['backend']}" in c["dispatch"] for p in c["required_dispatch"]), c
        # a gradient was checked wherever one is meaningful
        if not c["op"].startswith("cka[uncentered]") or c["case"] != "offset+1000":
            assert any(x["what"].startswith("grad") for x in c["comparisons"]), c["name"]
    v = report["versions"]
    assert v["torch"] == torch.__version__ and v["python"] and "extension" in v
    assert report["backends"]["triton"]["active"] and report["device"] == "cpu"


def test_wrong_reference_value_fails_with_a_clear_message(tmp_path, monkeypatch, capsys):
    real = ckakd.reference.cka
    monkeypatch.setattr(ckakd.reference, "cka", lambda *a, **k: real(*a, **k) * 1.01)
    rc, report = _run(tmp_path, "--only", "cka[centered] torch/cpu fp32 regular")
    out = capsys.readouterr().out
    assert rc == 1
    assert "FAIL cka[centered] torch/cpu fp32 regular: value: max error" in out
    assert "FAILED: 0 passed, 1 failed" in out
    (check,) = report["checks"]
    assert check["status"] == "fail" and check["ratio"] > 1 and not report["summary"]["ok"]


def test_silent_fallback_to_torch_fails(tmp_path, monkeypatch, capsys):
    """backend='triton' that quietly runs the torch path: the numbers match, the dispatch record does not."""
    from ckakd.ops import _backend

    real = _backend.resolve
    monkeypatch.setattr(_backend, "resolve", lambda backend, *t: "torch" if backend == "triton" else real(backend, *t))
    rc, report = _run(tmp_path, "--only", "cka[centered] triton/cpu fp32 regular,centered_gram triton/cpu fp32 regular")
    out = capsys.readouterr().out
    assert rc == 1
    assert "gram did not run on triton (ran on torch: a fallback)" in out
    assert all(c["status"] == "fail" and c["ratio"] <= 1 for c in report["checks"])  # right numbers, wrong path


def test_exception_in_a_check_is_a_failure(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ckakd, "mmd_loss", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("kernel exploded")))
    rc, _ = _run(tmp_path, "--only", "mmd_loss torch/cpu fp32 regular")
    assert rc == 1
    assert "RuntimeError: kernel exploded" in capsys.readouterr().out


def test_cuda_rule_makes_inactive_fast_paths_loud_failures():
    """A CUDA machine (simulated) where Triton is inactive and the extension has no CUDA kernels: exit 1, and the
    output says which fast path is inactive and why; through `python -m ckakd selftest`."""
    env = {**os.environ, "CKAKD_SELFTEST_ASSUME_CUDA": "1", "TRITON_INTERPRET": "0"}
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "ckakd",
            "selftest",
            "--no-progress",
            "--only",
            "sinkhorn[fixed] torch/cpu fp32 regular",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
    )
    assert res.returncode == 1, res.stdout + res.stderr
    assert "FAIL fast path triton active: triton is inactive on this CUDA machine" in res.stdout
    assert "FAIL fast path cuda active: cuda is inactive on this CUDA machine" in res.stdout
    assert "would run on the torch path" in res.stdout
    assert "(CUDA rule)" in res.stdout


def test_without_cuda_rule_an_inactive_triton_is_skipped_not_failed(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    rc, report = _run(tmp_path, "--only", "cka[centered] triton/cpu fp32 regular,cka[centered] torch/cpu fp32 regular")
    assert rc == 0
    status = {c["backend"]: c for c in report["checks"]}
    assert status["triton"]["status"] == "skip" and "TRITON_INTERPRET" in status["triton"]["message"]
    assert status["torch"]["status"] == "pass"


def test_command_enables_the_interpreter_before_triton_is_imported(tmp_path):
    """Without TRITON_INTERPRET and without CUDA, `ckakd selftest` sets it itself and the Triton checks run."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    report = tmp_path / "r.json"
    res = subprocess.run(
        [sys.executable, "-m", "ckakd", "selftest", "--no-progress", "--json", str(report), "--only",
         "cka[centered] triton/cpu fp32 regular"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    data = json.loads(report.read_text())
    assert "set TRITON_INTERPRET=1" in data["note"]
    (check,) = data["checks"]
    assert check["status"] == "pass" and check["dispatch"].get("gram/triton")


def test_bench_option_runs_the_checkouts_benchmarks_or_says_why_not(tmp_path, monkeypatch, capsys):
    assert bench.bench_dir() == REPO / "bench"  # this checkout's, found from the package's own path
    monkeypatch.setattr(bench, "bench_dir", lambda: tmp_path)
    rc, report = _run(tmp_path, "--only", "gaussian_wasserstein[diag]", "--bench")
    assert rc == 0 and "--bench needs a source checkout" in capsys.readouterr().out
    assert report["checks"][-1]["op"] == "bench" and report["checks"][-1]["status"] == "skip"
    (tmp_path / "run_all.py").write_text("def main(argv):\n    print('fake run_all', argv)\n    return 1\n")
    rc, report = _run(tmp_path, "--only", "gaussian_wasserstein[diag]", "--bench", "--bench-out", str(tmp_path / "b"))
    out = capsys.readouterr().out
    assert rc == 1 and "fake run_all ['--quick', '--device', 'cpu', '--out'" in out
    assert "FAIL benchmarks (bench/run_all.py): bench/run_all.py --quick --device cpu" in out
    assert report["checks"][-1]["status"] == "fail"
    sys.modules.pop("run_all", None)


def test_cli_wiring_and_listing(capsys):
    args = build_parser().parse_args(["selftest", "--json", "x.json", "--bench", "--only", "cka"])
    assert args.command == "selftest" and args.json == "x.json" and args.bench and args.only == "cka"
    assert ckakd.apps.cli.main(["selftest", "--list", "--only", "sinkhorn"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert listed and all("sinkhorn" in line for line in listed)
    assert ckakd.apps.cli.main(["selftest", "--list", "--only", "no-such-check"]) == 2


def test_compare_flags_nan_and_shape_mismatch():
    e = torch.tensor([1.0, 2.0], dtype=torch.float64)
    assert selftest.compare("v", torch.tensor([1.0, 2.0]), e, torch.float32, value=True).ok
    assert not selftest.compare("v", torch.tensor([1.0, float("nan")]), e, torch.float32, value=True).ok
    assert not selftest.compare("v", torch.tensor([1.0]), e, torch.float32, value=True).ok
    assert not selftest.compare("g", torch.tensor([1.0, 2.01]), e, torch.float32, value=False).ok
    assert selftest.compare("g", torch.tensor([1.0, 2.001]), e, torch.bfloat16, value=False).ok


def test_dispatch_problems_rules():
    check = selftest.Check("cka[centered]", "triton", "cpu", torch.float32, "regular", lambda: [], selftest.STATS)
    good = {("gram", "triton"): 2, ("frobenius_dots", "triton"): 1, ("gram_apply", "triton"): 1}
    assert selftest.dispatch_problems(check, good) == []
    assert selftest.dispatch_problems(check, {**good, ("gram", "torch"): 1}) == ["gram also ran on torch (a fallback)"]
    assert "gram_apply did not run on triton (did not run)" in selftest.dispatch_problems(
        check, {k: v for k, v in good.items() if k[0] != "gram_apply"}
    )
    torch_check = selftest.Check("cka[centered]", "torch", "cpu", torch.float32, "regular", lambda: [], selftest.STATS)
    assert selftest.dispatch_problems(torch_check, {("feature_form", "torch"): 1}) == []
    assert selftest.dispatch_problems(torch_check, {("gram", "triton"): 1}) == [
        "expected only torch, but gram on triton ran",
        "no primitive ran on torch",
    ]


def test_selftest_leaves_the_callers_autotune_setting(monkeypatch):
    """The self-test turns autotuning off for its own run only: an in-process caller keeps its setting."""
    monkeypatch.delenv("CKAKD_AUTOTUNE", raising=False)
    assert selftest.main(["--list", "--only", "sinkhorn"]) == 0
    assert "CKAKD_AUTOTUNE" not in os.environ
    monkeypatch.setenv("CKAKD_AUTOTUNE", "1")
    assert selftest.main(["--list", "--only", "sinkhorn"]) == 0
    assert os.environ["CKAKD_AUTOTUNE"] == "1"
