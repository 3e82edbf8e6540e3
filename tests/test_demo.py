"""The main job runs end to end on the embedded digits data (tiny settings)."""

from __future__ import annotations

import json

import pytest


def test_demo_runs(tmp_path, capsys):
    pytest.importorskip("sklearn")
    from ckakd import demo

    assert (
        demo.main(
            [
                "--epochs",
                "1",
                "--seeds",
                "1",
                "--teacher-width",
                "8",
                "--student-width",
                "4",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "| rcka |" in out and "| ce |" in out
    results = json.loads((tmp_path / "results.json").read_text())
    assert {r["method"] for r in results["runs"]} == {"ce", "rcka"}
    for run in results["runs"]:
        assert 0.0 <= run["accuracy"] <= 1.0 and 0.0 <= run["feature_cka"] <= 1.0 + 1e-6
