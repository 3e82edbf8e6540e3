"""``ckakd-demo`` / ``ckakd demo``: argument handling (the full tiny run is in test_cli.py)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("sklearn")


def test_demo_main_runs_and_writes_results(tmp_path, capsys):
    from ckakd.apps import demo

    args = ["--methods", "ce,kd", "--seeds", "1", "--epochs", "1", "--teacher-epochs", "1", "--no-progress"]
    assert demo.main([*args, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| kd |" in out and "| ce |" in out and str(tmp_path) in out
    results = json.loads((tmp_path / "results.json").read_text())
    assert [s["method"] for s in results["summary"]] == ["ce", "kd"]
    assert all(s["seeds"] == 1 for s in results["summary"])


def test_demo_rejects_unknown_methods_and_seeds(tmp_path, capsys):
    from ckakd.apps import demo

    assert demo.main(["--methods", "ce,nosuch", "--out", str(tmp_path)]) == 2
    assert "nosuch" in capsys.readouterr().err
    assert demo.main(["--seeds", "0", "--out", str(tmp_path)]) == 2
    assert "seeds" in capsys.readouterr().err
    assert not any(tmp_path.rglob("*.pt"))


@pytest.mark.parametrize("flag", ["--epochs", "--teacher-epochs"])
def test_demo_rejects_zero_epochs_before_training_the_teacher(tmp_path, capsys, flag):
    from ckakd.apps import demo

    args = ["--methods", "kd", "--seeds", "1", "--teacher-epochs", "1", "--no-progress", "--out", str(tmp_path)]
    assert demo.main([*args, flag, "0"]) == 2
    err = capsys.readouterr().err
    assert f"{flag} must be >= 1, got 0" in err
    assert not any(tmp_path.rglob("*.pt")), "the teacher must not be trained first"


def test_demo_out_under_a_file_is_refused(tmp_path, capsys):
    from ckakd.apps import demo

    (tmp_path / "file").write_text("x")
    assert demo.main(["--methods", "kd", "--seeds", "1", "--out", str(tmp_path / "file" / "demo")]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "file is a file, not a folder" in err and "Traceback" not in err


def test_demo_ctrl_c_exits_130_with_one_line(tmp_path, capsys, monkeypatch):
    from ckakd.apps import demo

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "run_demo", interrupted)
    assert demo.main(["--out", str(tmp_path)]) == 130
    err = capsys.readouterr().err
    assert err == "ckakd demo: interrupted (Ctrl-C); run it again to continue (a trained teacher is reused)\n", err
