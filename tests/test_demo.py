"""``python -m ckakd.demo`` / ``ckakd demo``: argument handling (the full tiny run is in test_cli.py)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("sklearn")


def test_demo_main_runs_and_writes_results(tmp_path, capsys):
    from ckakd import demo

    args = ["--methods", "ce,kd", "--seeds", "1", "--epochs", "1", "--teacher-epochs", "1", "--no-progress"]
    assert demo.main([*args, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| kd |" in out and "| ce |" in out and str(tmp_path) in out
    results = json.loads((tmp_path / "results.json").read_text())
    assert [s["method"] for s in results["summary"]] == ["ce", "kd"]
    assert all(s["seeds"] == 1 for s in results["summary"])


def test_demo_rejects_unknown_methods_and_seeds(tmp_path, capsys):
    from ckakd import demo

    assert demo.main(["--methods", "ce,nosuch", "--out", str(tmp_path)]) == 2
    assert "nosuch" in capsys.readouterr().out
    assert demo.main(["--seeds", "0", "--out", str(tmp_path)]) == 2
    assert "seeds" in capsys.readouterr().out
    assert not any(tmp_path.rglob("*.pt"))
