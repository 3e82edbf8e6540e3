"""The ``ckakd`` command end to end on tiny digits runs, and its errors on bad configs (before training)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("yaml")

from ckakd.apps import cli  # noqa: E402

TINY = ["schedule.epochs=1", "data.max_train_batches=3", "run.progress=false"]


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = cli.main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """A digits teacher trained for one tiny epoch (shared by the tests of this module)."""
    out = tmp_path_factory.mktemp("cli")
    code = cli.main(["train-teacher", "digits/teacher", f"run.out_dir={out}", "run.name=teacher", *TINY])
    assert code == 0
    return out / "teacher"


def test_info_and_configs(capsys):
    code, out, _ = run_cli(["info"], capsys)
    assert code == 0 and "torch" in out and "backends:" in out and "cpp" in out
    code, out, _ = run_cli(["info", "--json"], capsys)
    assert code == 0 and json.loads(out)["backends"]["torch"]["active"] is True
    code, out, _ = run_cli(["configs"], capsys)
    names = out.split()
    assert code == 0 and {"digits/teacher", "digits/rcka", "digits/wkd_l", "cifar100/rcka"} <= set(names)


def test_train_teacher_writes_outputs(teacher):
    for name in ("config.yaml", "latest.pt", "best.pt", "metrics.csv", "metrics.jsonl"):
        assert (teacher / name).is_file(), name
    from ckakd.train.config import load_config

    saved = load_config(teacher / "config.yaml")
    assert saved.schedule.epochs == 1 and saved.data.max_train_batches == 3 and saved.run.name == "teacher"


def test_eval_interrelation_and_distill(teacher, tmp_path, capsys):
    from ckakd.train.config import load_config

    tname = load_config(teacher / "config.yaml").model.name
    code, out, err = run_cli(["eval", "digits/teacher", "--checkpoint", str(teacher / "best.pt")], capsys)
    assert code == 0, err
    metrics = json.loads(out)
    assert 0.0 <= metrics["top1"] <= 100.0 and metrics["n"] == 450  # percent

    cost = tmp_path / "ir.pt"
    base = [f"teacher.name={tname}", f"teacher.checkpoint={teacher / 'best.pt'}"]
    code, out, err = run_cli(["interrelation", "digits/wkd_l", *base, "--out", str(cost), "run.progress=false"], capsys)
    assert code == 0, err
    from ckakd.interrelation import load_interrelation

    ir, meta = load_interrelation(cost)
    assert ir.shape == (10, 10) and meta["kernel"] == "cka"
    assert torch.allclose(torch.diagonal(ir), torch.ones(10, dtype=ir.dtype), atol=1e-5)

    for method in ("rcka", "wkd_lf"):
        extra = [f"distiller.cost={cost}"] if method == "wkd_lf" else []
        args = ["distill", f"digits/{method}", *base, *extra, f"run.out_dir={tmp_path}", f"run.name={method}", *TINY]
        code, out, err = run_cli(args, capsys)
        assert code == 0, err
        rows = (tmp_path / method / "metrics.csv").read_text().splitlines()
        assert len(rows) == 2 and any(h.startswith("cka/") for h in rows[0].split(","))
        assert (tmp_path / method / "config.yaml").is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        (["train-teacher", "digits/teacher", "optim.lrr=0.1"], "optim.lrr"),
        (["train-teacher", "digits/teacher", "optim.lr=fast"], "optim.lr"),
        (["train-teacher", "digits/teacher", "data.name=cifar100", "data.root=/nonexistent/cifar"], "not found"),
        (["train-teacher", "digits/teacher", "model.name=resnet9000"], "resnet9000"),
        (["distill", "digits/kd"], "teacher.checkpoint"),
        (["train-teacher", "no/such/config"], "no/such/config"),
    ],
)
def test_bad_configs_fail_before_training(args, message, tmp_path, capsys):
    code, _, err = run_cli([*args, f"run.out_dir={tmp_path}", *TINY], capsys)
    assert code == 2
    assert message in err
    assert not any(tmp_path.rglob("*.pt")), "nothing may be trained or written"


def test_wrong_format_dataset_folder(tmp_path, capsys):
    (tmp_path / "cifar").mkdir()
    (tmp_path / "cifar" / "train").write_text("not a pickle")
    code, _, err = run_cli(
        ["train-teacher", "digits/teacher", "data.name=cifar100", f"data.root={tmp_path / 'cifar'}", *TINY], capsys
    )
    assert code == 2 and "CIFAR-100" in err


def test_distill_errors_name_the_problem(teacher, tmp_path, capsys):
    from ckakd.train.config import load_config

    tname = load_config(teacher / "config.yaml").model.name
    ckpt = str(teacher / "best.pt")
    other = "resnet8" if tname != "resnet8" else "resnet14"
    cases = [
        ([f"teacher.name={other}", f"teacher.checkpoint={ckpt}"], "teacher.checkpoint"),
        ([f"teacher.name={tname}", f"teacher.checkpoint={ckpt}", "train.cka_pairs=[[nolayer,layer3]]"], "nolayer"),
        ([f"teacher.name={tname}", f"teacher.checkpoint={ckpt}", "teacher.kwargs.num_classes=7"], "teacher"),
        ([f"teacher.name={tname}", f"teacher.checkpoint={ckpt}"], "distiller.cost"),
    ]
    for i, (extra, message) in enumerate(cases):
        method = "wkd_l" if message == "distiller.cost" else "kd"
        code, _, err = run_cli(["distill", f"digits/{method}", *extra, f"run.out_dir={tmp_path}", *TINY], capsys)
        assert code == 2, (i, err)
        assert message in err, (i, err)
    assert not any(tmp_path.rglob("*.pt"))


def test_demo_tiny(tmp_path, capsys):
    from ckakd.apps.demo import run_demo

    results = run_demo(["ce", "rcka", "wkd_l"], 2, tmp_path, epochs=1, teacher_epochs=1, progress=False)
    out = capsys.readouterr().out
    assert "| rcka |" in out and "| wkd_l |" in out and "teacher val top-1" in out
    assert {s["method"] for s in results["summary"]} == {"ce", "rcka", "wkd_l"}
    assert len(results["runs"]) == 6
    for r in results["runs"]:
        assert 0.0 <= r["final_top1"] <= 100.0 and len(r["curve"]) == 1  # percent
    assert (tmp_path / "results.json").is_file() and (tmp_path / "results.md").is_file()
    assert (tmp_path / "curves.png").stat().st_size > 1000
    # a second run reuses the cached teacher
    run_demo(["ce"], 1, tmp_path, epochs=1, teacher_epochs=1, progress=False)
    assert "reusing the cached teacher" in capsys.readouterr().out


@pytest.mark.skipif(shutil.which("ckakd") is None, reason="the ckakd console script is not installed")
def test_console_script():
    proc = subprocess.run(["ckakd", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    for command in ("demo", "train-teacher", "distill", "eval", "interrelation", "info"):
        assert command in proc.stdout


@pytest.mark.parametrize("module", ["ckakd", "ckakd.apps.cli"])
def test_module_entry_point(module):
    proc = subprocess.run([sys.executable, "-m", module, "info"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "backends:" in proc.stdout


# ------------------------------------------------------------------------------------------------ user reports


def _copy_run(teacher: Path, tmp_path: Path) -> Path:
    """A private copy of the fixture's teacher run (tests that resume must not touch the shared one)."""
    shutil.copytree(teacher, tmp_path / "teacher")
    return tmp_path / "teacher"


def _teacher_args(out: Path, *extra: str) -> list[str]:
    return ["train-teacher", "digits/teacher", f"run.out_dir={out}", "run.name=teacher", *TINY, *extra]


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lr=1e9", "optim.lr: checkpoint 0.05, this run 1000000000.0"),  # was printed, then not used
        ("optim.name=adamw", "optim.name: checkpoint 'sgd', this run 'adamw'"),  # was KeyError: 'step' in torch
        ("model.name=resnet14", "model.name: checkpoint 'resnet8x4', this run 'resnet14'"),
        ("schedule.epochs=3", "schedule.epochs 1 -> 3: the cosine schedule spreads over all epochs"),  # ran at lr 0
    ],
)
def test_resume_refuses_changes_it_cannot_honour(teacher, tmp_path, capsys, override, message):
    run = _copy_run(teacher, tmp_path)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    code, _, err = run_cli([*_teacher_args(tmp_path, override), "--resume"], capsys)
    assert code == 2, err
    assert message in err and "only these may change: run.name, run.out_dir, run.device, run.progress" in err
    assert "Traceback" not in err
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before  # config.yaml not rewritten


def test_resume_accepts_the_allowed_changes(teacher, tmp_path, capsys):
    _copy_run(teacher, tmp_path)
    code, out, err = run_cli([*_teacher_args(tmp_path, "train.log_every=3", "train.eval_every=2"), "--resume"], capsys)
    assert code == 0, err
    assert "epochs_run=0" in out


def test_resume_with_another_distiller_names_both(teacher, tmp_path, capsys):
    from ckakd.train.config import load_config

    t = [f"teacher.name={load_config(teacher / 'config.yaml').model.name}", f"teacher.checkpoint={teacher / 'best.pt'}"]
    common = [f"run.out_dir={tmp_path}", "run.name=student", *TINY, *t]
    code, _, err = run_cli(["distill", "digits/kd", *common], capsys)
    assert code == 0, err
    code, _, err = run_cli(["distill", "digits/dkd", *common, "--resume"], capsys)
    assert code == 2 and "distiller.name: checkpoint 'kd', this run 'dkd'" in err, err
    code, _, err = run_cli(["distill", "digits/kd", *common, "model.name=resnet14", "--resume"], capsys)
    assert code == 2 and "model.name: checkpoint 'resnet8', this run 'resnet14'" in err, err


def test_distill_refuses_ce_no_teacher_and_empty_configs(tmp_path, capsys):
    (tmp_path / "empty.yaml").write_text("# nothing here yet\n")
    (tmp_path / "kd.yaml").write_text("base: digits/base\ndistiller:\n  name: kd\n")  # no teacher section
    cases = [
        (["distill", str(tmp_path / "empty.yaml")], "the config has no keys"),
        (["distill", "digits/ce"], "distiller.name='ce' trains the student alone"),
        (["distill", str(tmp_path / "kd.yaml")], "distiller 'kd' needs a teacher: set teacher.name"),
        (["train-teacher", str(tmp_path / "empty.yaml")], "the config has no keys"),
    ]
    for args, message in cases:
        code, _, err = run_cli([*args, f"run.out_dir={tmp_path}", *TINY], capsys)
        assert code == 2 and message in err, (args, err)
    assert not any(tmp_path.rglob("*.pt")) and not any(tmp_path.rglob("metrics.csv"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", ["train-teacher", "eval"])
def test_cuda_without_gpu_is_refused_before_training(tmp_path, capsys, command, teacher):
    extra = ["--checkpoint", str(teacher / "best.pt")] if command == "eval" else []
    code, _, err = run_cli(
        [command, "digits/teacher", f"run.out_dir={tmp_path}", "run.device=cuda", *TINY, *extra], capsys
    )
    assert code == 2 and "run.device='cuda' but" in err and "run.device=cpu" in err, err
    assert not any(tmp_path.rglob("*.pt"))


def test_unwritable_out_dir_and_escaping_run_name(tmp_path, capsys):
    (tmp_path / "file.txt").write_text("a regular file")
    code, _, err = run_cli(
        ["train-teacher", "digits/teacher", f"run.out_dir={tmp_path / 'file.txt' / 'runs'}", *TINY], capsys
    )
    assert code == 2 and "run.out_dir=" in err and "file.txt is a file, not a folder" in err, err
    inner = tmp_path / "a" / "b"
    code, _, err = run_cli(
        ["train-teacher", "digits/teacher", f"run.out_dir={inner}", "run.name=../../x", *TINY], capsys
    )
    assert code == 2 and "run.name: must name a folder inside run.out_dir" in err, err
    assert not (tmp_path / "x").exists() and not any(tmp_path.rglob("*.pt"))


def test_unwritable_out_dir_is_refused_by_a_probe(tmp_path, capsys, monkeypatch):
    import errno
    import tempfile

    def mkdtemp(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)
    code, _, err = run_cli(["train-teacher", "digits/teacher", f"run.out_dir={tmp_path}", *TINY], capsys)
    assert code == 2 and "cannot create files in" in err and "Read-only file system [EROFS]" in err, err


def test_disk_full_stops_with_one_message(tmp_path, capsys, monkeypatch):
    import errno
    import os

    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if ".latest.pt." in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    code, _, err = run_cli(_teacher_args(tmp_path), capsys)
    assert code == 1, err
    assert err.strip().count("\n") == 0 and "stopped: cannot write" in err and "latest.pt: No space left" in err
    assert not list((tmp_path / "teacher").glob(".*.tmp"))


def test_latest_pt_folder_is_refused_before_training(tmp_path, capsys):
    (tmp_path / "teacher" / "latest.pt").mkdir(parents=True)
    for resume in ([], ["--resume"]):
        code, _, err = run_cli([*_teacher_args(tmp_path), *resume], capsys)
        assert code == 2 and "latest.pt is a folder" in err, err
    assert not (tmp_path / "teacher" / "metrics.jsonl").exists()  # no epoch was trained


def test_ctrl_c_prints_the_resume_command_and_exits_130(tmp_path, capsys, monkeypatch):
    import shlex

    from ckakd.train.engine import Trainer

    real = Trainer._run_epoch

    def run_epoch(self, epoch: int) -> None:
        if epoch == 1:
            raise KeyboardInterrupt
        real(self, epoch)

    monkeypatch.setattr(Trainer, "_run_epoch", run_epoch)
    args = [*_teacher_args(tmp_path), "schedule.epochs=2", "schedule.kind=constant"]
    try:
        code, _, err = run_cli(args, capsys)
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped ckakd as a traceback")
    assert code == 130
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "interrupted (Ctrl-C)" in lines[0], err
    command = lines[0].split("continue with: ", 1)[1]
    assert command.startswith("ckakd train-teacher digits/teacher") and command.endswith("--resume")
    from ckakd.train.engine import load_checkpoint

    assert load_checkpoint(tmp_path / "teacher" / "latest.pt")["epoch"] == 1
    monkeypatch.setattr(Trainer, "_run_epoch", real)
    code, out, err = run_cli(shlex.split(command)[1:], capsys)
    assert code == 0 and "epochs_run=1" in out, err


def test_binary_config_file_is_named(tmp_path, capsys):
    (tmp_path / "model.pt").write_bytes(b"PK\x03\x04\x14\x00\x00\x08\x08\x00\x9c\xff" * 10)
    code, _, err = run_cli(["train-teacher", str(tmp_path / "model.pt"), *TINY], capsys)
    assert code == 2 and f"{tmp_path / 'model.pt'}: not a YAML config" in err, err


def test_unknown_key_suggests_the_right_section(capsys):
    code, _, err = run_cli(["train-teacher", "digits/teacher", "train.epochs=3"], capsys)
    assert code == 2 and "unknown config key 'train.epochs' (did you mean 'schedule.epochs'?)" in err


def test_outputs_are_world_readable(teacher):
    import os

    mask = os.umask(0)
    os.umask(mask)
    for name in ("latest.pt", "best.pt", "metrics.csv", "metrics.jsonl", "config.yaml", "curves.png"):
        assert (teacher / name).stat().st_mode & 0o777 == 0o666 & ~mask, name


def test_eval_of_a_checkpoint_folder_is_named(tmp_path, capsys):
    (tmp_path / "best.pt").mkdir()
    code, _, err = run_cli(["eval", "digits/teacher", "--checkpoint", str(tmp_path / "best.pt")], capsys)
    assert code == 2 and f"{tmp_path / 'best.pt'} is a folder" in err, err


def test_paths_of_the_wrong_kind_are_named(teacher, tmp_path, capsys):
    (tmp_path / "cifar").write_text("not a folder")
    (tmp_path / "ir.pt").mkdir()
    tname_args = ["teacher.name=resnet8x4", f"teacher.checkpoint={teacher / 'best.pt'}"]
    cases = [
        (["train-teacher", "digits/teacher", "data.name=cifar100", f"data.root={tmp_path / 'cifar'}"], "is a file"),
        (["distill", "digits/wkd_l", *tname_args, f"distiller.cost={tmp_path / 'ir.pt'}"], "ir.pt is a folder"),
        (["distill", "digits/kd", "teacher.name=resnet8x4", f"teacher.checkpoint={tmp_path / 'ir.pt'}"], "is a folder"),
    ]
    for args, message in cases:
        code, _, err = run_cli([*args, f"run.out_dir={tmp_path / 'runs'}", *TINY], capsys)
        assert code == 2 and message in err, (args, err)


def test_tensorboard_without_its_package_is_refused_before_training(tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard -> ImportError
    code, _, err = run_cli(_teacher_args(tmp_path, "run.tensorboard=true"), capsys)
    assert code == 2 and "run.tensorboard=true needs the `tensorboard` package" in err, err
    assert not (tmp_path / "teacher").exists()
