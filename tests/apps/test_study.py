"""``ckakd study``: the ensemble-KD grid end to end on tiny digits settings, and its argument errors."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("sklearn")


def test_study_tiny_grid(tmp_path, capsys):
    from ckakd.apps import cli

    args = ["study", "--out", str(tmp_path), "--settings", "T1wT2sSs", "--epochs", "1", "--teacher-epochs", "1"]
    assert cli.main([*args, "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "| T1wT2sSs | vanilla |" in out and "| T1wT2sSs | standardized |" in out
    results = json.loads((tmp_path / "study.json").read_text())
    rows = results["rows"]
    assert [(r["setting"], r["kd"]) for r in rows] == [("T1wT2sSs", "vanilla"), ("T1wT2sSs", "standardized")]
    for r in rows:
        assert 0.0 < r["affinity"] <= 1.5 and 0.0 <= r["iou_t1_t2"] <= 1.0 and 0.0 <= r["agree_ens_s"] <= 1.0
        assert r["kl_ens_s"] >= 0.0 and 0.0 <= r["student_acc"] <= 1.0
        assert any("diag/agree/ens-S" in h for h in r["history"]), "per-epoch diagnostics are logged"
    for name in ("study.md", "iou_fidelity_over_training.png", "fidelity_vs_accuracy.png", "attention_overlays.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    # the two settings share the teachers: the second call reuses them
    assert cli.main([*args, "--kd", "vanilla", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "teacher seed 0: reused" in out and "teacher seed 1: reused" in out


def test_study_rejects_bad_arguments(tmp_path, capsys):
    from ckakd.apps import cli

    # the shared error-to-exit mapping of every command (ckakd.apps.errors.run_guarded): one line on stderr
    assert cli.main(["study", "--out", str(tmp_path), "--settings", "T1xT2wSw"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ckakd study: error: ") and "T1xT2wSw" in err and err.count("\n") == 1, err
    assert cli.main(["study", "--out", str(tmp_path), "--kd", "fancy"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ckakd study: error: ") and "fancy" in err and err.count("\n") == 1, err
    assert not any(tmp_path.rglob("*.pt"))


def test_study_ctrl_c_exits_130_with_one_line(tmp_path, capsys, monkeypatch):
    from ckakd.apps import cli, study

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(study, "run_study", interrupted)
    assert cli.main(["study", "--out", str(tmp_path)]) == 130
    err = capsys.readouterr().err
    assert err == "ckakd study: interrupted (Ctrl-C); run it again to continue (trained teachers are reused)\n", err
