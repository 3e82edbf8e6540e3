"""One spelling for the temperature in the distillers and configs: ``temperature`` (the shipped configs use it);
the old ``T`` still builds the same distiller, with a DeprecationWarning, from Python and from a config."""

from __future__ import annotations

import pytest
import torch

from ckakd.train import create_model
from ckakd.train.config import load_config
from ckakd.train.distillers.registry import build_distiller, distiller_arguments, get_distiller

TEMPERATURE_METHODS = ("kd", "lskd", "dkd", "dist", "ensemble_kd", "wkd_l", "wkd_lf")


@pytest.mark.parametrize("name", TEMPERATURE_METHODS)
def test_temperature_is_the_one_spelling(name):
    args = distiller_arguments(get_distiller(name))
    assert "temperature" in args and "T" not in args


def _pair():
    torch.manual_seed(0)
    return create_model("resnet8", num_classes=10), create_model("resnet8", num_classes=10)


@pytest.mark.parametrize("name", ("kd", "lskd", "dkd", "dist"))
def test_old_T_builds_the_same_distiller_with_a_warning(name):
    s, t = _pair()
    new = build_distiller(name, s, t, temperature=3.0)
    with pytest.warns(DeprecationWarning, match="'T' is deprecated, use 'temperature'"):
        old = build_distiller(name, s, t, T=3.0)
    assert old.temperature == new.temperature == 3.0
    with pytest.raises(TypeError, match="both 'temperature' and its deprecated spelling 'T'"):
        build_distiller(name, s, t, T=3.0, temperature=3.0)
    with pytest.raises(ValueError, match=r"unknown argument\(s\) \['tau'\]"):
        build_distiller(name, s, t, tau=3.0)


def test_shipped_configs_use_temperature():
    for name in ("digits/kd", "digits/dkd", "digits/dist", "digits/lskd", "digits/wkd_l", "cifar100/kd"):
        kwargs = load_config(name).distiller.kwargs
        assert "T" not in kwargs and kwargs["temperature"] > 0, name


def test_a_config_with_the_old_key_still_builds(tmp_path):
    """An old config's ``distiller.kwargs.T`` builds with a warning; one that also inherits ``temperature`` from a
    shipped base gets a clear error (not a silent choice between the two)."""
    cfg = load_config("digits/kd")
    kwargs = dict(cfg.distiller.kwargs)
    kwargs["T"] = kwargs.pop("temperature") / 2
    s, t = _pair()
    with pytest.warns(DeprecationWarning, match="'T' is deprecated"):
        d = build_distiller(cfg.distiller.name, s, t, **kwargs)
    assert d.temperature == cfg.distiller.kwargs["temperature"] / 2
    (tmp_path / "mine.yaml").write_text("base: digits/kd\ndistiller: {kwargs: {T: 2}}\n")
    mine = load_config(str(tmp_path / "mine.yaml"))
    with pytest.raises(TypeError, match="both 'temperature' and its deprecated spelling 'T'"):
        build_distiller(mine.distiller.name, s, t, **mine.distiller.kwargs)
