"""`ckakd --plugin MODULE <command>`: the plugin's registrations are usable by name in the command's config; a plugin
that is missing or fails to import stops the command with one line naming it (status 2)."""

from __future__ import annotations

import builtins
import sys
import textwrap

import pytest

from ckakd.apps import cli
from ckakd.train.config import load_config
from ckakd.train.distillers.registry import DISTILLERS

TINY = ["schedule.epochs=1", "data.max_train_batches=2", "run.progress=false"]

PLUGIN = textwrap.dedent(
    '''
    import ckakd
    from ckakd.train import Distiller, register_distiller


    @register_distiller("my_kd")
    class MyKD(Distiller):
        """KD on temperature-softened logits, as a user would write it."""

        def __init__(self, student, teacher, *, temperature=4.0, ce_weight=0.1, kd_weight=0.9, input_shape=None):
            super().__init__(student, teacher, ce_weight=ce_weight, input_shape=input_shape)
            self.T, self.kd_weight = temperature, kd_weight

        def losses(self, x, y, logits_s):
            (z_t,) = self.teacher_logits(x)
            return {"my_kd": self.kd_weight * ckakd.kd_loss(logits_s, z_t, self.T)}
    '''
)


@pytest.fixture
def plugin_dir(tmp_path, monkeypatch):
    (tmp_path / "p3_user_plugin.py").write_text(PLUGIN)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield tmp_path
    DISTILLERS.pop("my_kd", None)
    sys.modules.pop("p3_user_plugin", None)


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = cli.main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> list[str]:
    out = tmp_path_factory.mktemp("plugin-teacher")
    assert cli.main(["train-teacher", "digits/teacher", f"run.out_dir={out}", "run.name=t", *TINY]) == 0
    name = load_config(out / "t" / "config.yaml").model.name
    return [f"teacher.name={name}", f"teacher.checkpoint={out / 't' / 'best.pt'}"]


@pytest.mark.parametrize("form", ["module", "file"])
def test_a_plugin_distiller_is_used_by_name(form, plugin_dir, teacher, capsys):
    plugin = "p3_user_plugin" if form == "module" else str(plugin_dir / "p3_user_plugin.py")
    args = ["--plugin", plugin, "distill", "digits/kd", "distiller.name=my_kd", f"run.out_dir={plugin_dir}"]
    code, out, err = run_cli([*args, "run.name=s", *TINY, *teacher], capsys)
    assert code == 0, err
    header = (plugin_dir / "s" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "train/my_kd" in header and "train/ce" in header
    assert "distill done" in out


def test_without_the_plugin_the_name_is_unknown(plugin_dir, teacher, capsys):
    args = ["distill", "digits/kd", "distiller.name=my_kd", f"run.out_dir={plugin_dir}", *TINY, *teacher]
    code, _, err = run_cli(args, capsys)
    assert code == 2 and "my_kd" in err, err


def test_a_plugin_that_does_not_import_is_named(plugin_dir, capsys):
    code, _, err = run_cli(["--plugin", "p3_no_such_plugin", "configs"], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("ckakd configs: error: --plugin p3_no_such_plugin: no module named 'p3_no_such_plugin'")
    (plugin_dir / "p3_broken.py").write_text("import p3_missing_dependency\n")
    code, _, err = run_cli(["--plugin", "p3_broken", "configs"], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert "--plugin p3_broken failed to import: ModuleNotFoundError" in err and "p3_missing_dependency" in err
    (plugin_dir / "p3_raises.py").write_text("raise RuntimeError('bad plugin')\n")
    code, _, err = run_cli(["--plugin", "p3_raises", "configs"], capsys)
    assert code == 2 and "--plugin p3_raises failed to import: RuntimeError: bad plugin" in err, err
    code, _, err = run_cli(["--plugin", str(plugin_dir / "nope.py"), "configs"], capsys)
    assert code == 2 and "nope.py: no such file" in err, err
    sys.modules.pop("p3_broken", None)
    sys.modules.pop("p3_raises", None)


def test_plugins_are_imported_in_order_before_the_command(plugin_dir, capsys):
    (plugin_dir / "p3_first.py").write_text("import builtins\nbuiltins.p3_order = ['first']\n")
    (plugin_dir / "p3_second.py").write_text("import builtins\nbuiltins.p3_order.append('second')\n")
    try:
        code, out, _ = run_cli(["--plugin", "p3_first", "--plugin", "p3_second", "configs"], capsys)
        assert code == 0 and "digits/kd" in out.split()
        assert builtins.p3_order == ["first", "second"]
    finally:
        builtins.__dict__.pop("p3_order", None)
        sys.modules.pop("p3_first", None)
        sys.modules.pop("p3_second", None)


def test_plugin_is_in_the_help(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "--plugin MODULE" in capsys.readouterr().out
