"""`run.tensorboard` / `run.wandb` from the command line: the resolved config reaches the loggers, bad values are
config errors, and a missing library stops the command with one line before any run folder exists."""

from __future__ import annotations

from pathlib import Path

from ckakd.apps import cli
from tests.train.test_loggers import fake_loggers, no_logger_libraries  # noqa: F401 (fixtures)

TINY = ["schedule.epochs=1", "data.max_train_batches=2", "run.progress=false", "train.log_every=1"]


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = cli.main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def teacher_args(out: Path, *extra: str) -> list[str]:
    return ["train-teacher", "digits/teacher", f"run.out_dir={out}", "run.name=t", *TINY, *extra]


def test_wandb_and_tensorboard_from_the_cli_get_the_resolved_config(tmp_path, capsys, fake_loggers):  # noqa: F811
    writers, runs = fake_loggers
    wandb = ["run.wandb.mode=offline", "run.wandb.project=ckakd-digits", "run.wandb.tags=[teacher,digits]"]
    code, out, err = run_cli(teacher_args(tmp_path, "run.tensorboard=true", *wandb), capsys)
    assert code == 0, err
    (run,) = runs
    assert (run.kwargs["project"], run.kwargs["mode"], run.kwargs["tags"]) == (
        "ckakd-digits",
        "offline",
        ["teacher", "digits"],
    )
    config = run.kwargs["config"]  # the config file's sections, as written to config.yaml
    assert config["run"]["wandb"]["project"] == "ckakd-digits" and config["model"]["name"] and config["optim"]["lr"]
    assert run.exit_code == 0 and [s for v, s in run.logs if "step/train/loss" in v] == [1, 2]
    (w,) = writers
    assert w.log_dir == str(tmp_path / "t" / "tensorboard") and w.hparams[0]["optim.lr"] == config["optim"]["lr"]


def test_a_misspelt_wandb_key_or_mode_is_a_config_error(tmp_path, capsys, fake_loggers):  # noqa: F811
    code, _, err = run_cli(teacher_args(tmp_path, "run.wandb.projct=x"), capsys)
    assert code == 2 and "unknown config key 'run.wandb.projct' (did you mean 'project'?)" in err, err
    code, _, err = run_cli(teacher_args(tmp_path, "run.wandb.mode=onlin"), capsys)
    assert code == 2 and "run.wandb.mode: expected one of 'disabled', 'offline', 'online'" in err, err
    assert not (tmp_path / "t").exists()


def test_wandb_without_its_package_stops_before_training(tmp_path, capsys, no_logger_libraries):  # noqa: F811
    code, _, err = run_cli(teacher_args(tmp_path, "run.wandb.mode=offline"), capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert "run.wandb.mode=offline needs the `wandb` package" in err and 'pip install "ckakd[wandb]"' in err, err
    code, _, err = run_cli(teacher_args(tmp_path, "run.tensorboard=true"), capsys)
    assert code == 2 and 'pip install "ckakd[tensorboard]"' in err, err
    assert not (tmp_path / "t").exists() and not list(tmp_path.iterdir())
