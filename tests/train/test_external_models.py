"""Teachers and models from other codebases: plain state dicts and their wrappers as checkpoints (``module.`` /
``_orig_mod.`` stripped, ``key_map`` prefix rewrites, strict loading with a report, ``strict: false``), and
``timm.<name>`` / ``torchvision.<name>`` models.

timm is absent on the CPU machine: a small fake ``timm`` module injected into ``sys.modules`` stands in for it
(ckakd imports the library by name when the model is built, so the fake is what it finds). torchvision comes
from a plain import where it works, else from ``tests/torchvision_shim.py`` with ``CKAKD_TORCHVISION_SHIM=1``,
else those tests skip.
"""

from __future__ import annotations

import json
import logging
import sys
import types

import pytest
import torch
from torch import nn

from ckakd.train import create_model, register_model
from ckakd.train.config import ConfigError, config_from_dict, load_config
from ckakd.train.engine import save_checkpoint
from ckakd.train.models.external import create_external_model, external_stage_names
from ckakd.train.run_models import build_model, read_weights
from ckakd.train.state_dicts import (
    KeyMapError,
    apply_key_map,
    find_state_dict,
    load_external_state_dict,
    parse_key_map,
    strip_wrapper_prefixes,
)
from tests.torchvision_shim import load_torchvision

pytest.importorskip("yaml")

TINY = ["schedule.epochs=1", "data.max_train_batches=2", "run.progress=false"]


def other_repo_keys(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s weights as another repository would ship them: DDP's ``module.`` prefix, the head called
    ``fc`` instead of ``classifier``."""
    return {"module." + k.replace("classifier.", "fc.", 1): v.clone() for k, v in model.state_dict().items()}


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def perturbed(model: nn.Module, seed: int = 0) -> nn.Module:
    """``model`` with every float tensor (BN statistics too) set to random values: a load must copy all of them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
    return model


# ------------------------------------------------------------------------------------------ state-dict pieces


def test_find_state_dict_plain_and_wrapped():
    sd = {"a.weight": torch.ones(2), "a.bias": torch.zeros(2)}
    assert find_state_dict(sd) == (sd, "a plain state dict")
    for wrapped, where in (
        ({"model": sd, "epoch": 3, "best_acc": 71.2}, "['model']"),
        ({"state_dict": sd, "optimizer": {"state": {}}, "arch": "resnet"}, "['state_dict']"),
        ({"checkpoint_meta": 1, "model": {"state_dict": sd}}, "['model']['state_dict']"),
    ):
        found, source = find_state_dict(wrapped)
        assert found == sd and source.endswith(where), source
    with pytest.raises(ValueError, match=r"has no state dict.*top-level keys: \['epoch', 'optimizer'\]"):
        find_state_dict({"epoch": 3, "optimizer": {"lr": 0.1}})
    with pytest.raises(ValueError, match="holds a list"):
        find_state_dict([torch.ones(1)])


def test_wrapper_prefixes_are_stripped_only_when_the_model_lacks_them():
    sd = {"module._orig_mod.conv.weight": 1, "module._orig_mod.fc.bias": 2}
    out, stripped = strip_wrapper_prefixes(sd, ["conv.weight", "fc.bias"])
    assert out == {"conv.weight": 1, "fc.bias": 2} and stripped == ["module.", "_orig_mod."]
    # a compiled submodule: `_orig_mod.` after its name
    out, _ = strip_wrapper_prefixes({"backbone._orig_mod.conv.weight": 1}, ["backbone.conv.weight"])
    assert out == {"backbone.conv.weight": 1}
    # a model whose own keys start with module. (a wrapper module) keeps them; a partial prefix is not a wrapper's
    assert strip_wrapper_prefixes({"module.w": 1}, ["module.w"]) == ({"module.w": 1}, [])
    assert strip_wrapper_prefixes({"module.w": 1, "head.b": 2}, ["w", "head.b"])[1] == []


def test_key_map_is_ordered_prefix_rewrites():
    assert parse_key_map({"fc.": "classifier.", "": "net."}) == [("fc.", "classifier."), ("", "net.")]
    assert parse_key_map([["a.", "b."]]) == [("a.", "b.")]
    assert parse_key_map(None) == []
    sd = {"fc.weight": 1, "layer1.0.conv.weight": 2, "fcx.bias": 3}
    out, unused = apply_key_map(sd, [("fc.", "classifier."), ("layer", "stage"), ("stage1.", "s1.")])
    # prefixes only (fcx. untouched), in order: the third rule sees the second's output
    assert out == {"classifier.weight": 1, "s1.0.conv.weight": 2, "fcx.bias": 3} and unused == []
    _, unused = apply_key_map(sd, [("head.", "classifier.")])
    assert unused == ["'head.' -> 'classifier.'"]
    assert apply_key_map({"w": 1}, [("", "model.")])[0] == {"model.w": 1}
    with pytest.raises(KeyMapError, match="gives two tensors the name 'b.w'"):
        apply_key_map({"a.w": 1, "b.w": 2}, [("a.", "b.")])
    for bad, message in (
        (3, r"key_map: expected a mapping of prefixes"),
        ([["a."]], r"key_map\[0\]: expected an \[old prefix, new prefix\] pair"),
        ({"a.": 1}, r"key_map\[0\]: prefixes must be strings"),
        ({"a.": "a."}, r"renames nothing"),
    ):
        with pytest.raises(KeyMapError, match=message):
            parse_key_map(bad)


def test_strict_load_reports_missing_unexpected_and_shapes():
    src = perturbed(create_model("resnet8", num_classes=10, in_channels=1))
    shipped = other_repo_keys(src)
    dst = create_model("resnet8", num_classes=10, in_channels=1)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(ValueError) as info:
        load_external_state_dict(dst, {"model": shipped})
    text = str(info.value)
    assert "2 missing keys: ['classifier.weight', 'classifier.bias']" in text
    assert "2 unexpected keys: ['fc.weight', 'fc.bias']" in text and "key_map" in text and "strict=false" in text
    assert all(torch.equal(before[k], v) for k, v in dst.state_dict().items()), "a failed strict load changes nothing"

    report = load_external_state_dict(dst, {"model": shipped}, key_map={"fc.": "classifier."})
    assert same_weights(dst, src) and report.fit.ok and report.stripped == ["module."]
    assert report.text() == (
        f"loaded {len(before)}/{len(before)} tensors from the state dict under ['model'] (stripped 'module.'; "
        "key_map 'fc.' -> 'classifier.')"
    )

    other = create_model("resnet8", num_classes=7, in_channels=1)
    with pytest.raises(ValueError, match=r"2 shape mismatches: \['classifier.weight: checkpoint \(10, 64\) vs model"):
        load_external_state_dict(other, shipped, key_map={"fc.": "classifier."})
    with pytest.raises(ValueError, match=r"key_map rules that matched no key: 'head\.' -> 'classifier\.'"):
        load_external_state_dict(dst, shipped, key_map=[("fc.", "classifier."), ("head.", "classifier.")])


def test_many_problems_are_listed_with_counts():
    model = create_model("resnet8", num_classes=10, in_channels=1)
    shipped = {"net." + k: v for k, v in model.state_dict().items()}  # nothing fits
    n = len(shipped)
    with pytest.raises(ValueError, match=rf"{n} missing keys: \[.*\] \(\+{n - 5} more\); {n} unexpected keys"):
        load_external_state_dict(model, shipped)


def test_non_strict_load_takes_what_fits_and_reports_the_rest():
    src = perturbed(create_model("resnet8", num_classes=10, in_channels=1))
    dst = create_model("resnet8", num_classes=7, in_channels=1)  # another class count: a new head
    head = {k: v.clone() for k, v in dst.state_dict().items() if k.startswith("classifier.")}
    report = load_external_state_dict(dst, other_repo_keys(src), key_map={"fc.": "classifier."}, strict=False)
    got, want = dst.state_dict(), src.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in got if not k.startswith("classifier."))
    assert all(torch.equal(got[k], v) for k, v in head.items()), "mismatched tensors stay as they were"
    assert not report.fit.ok and report.fit.matched == len(got) - 2 and len(report.fit.mismatched) == 2
    assert "not loaded (strict=false): 2 shape mismatches" in report.text()


# ------------------------------------------------------------------------------------------ files and configs


def test_read_weights_keeps_ckakd_checkpoints_and_reads_plain_files(tmp_path):
    src = perturbed(create_model("resnet8", num_classes=10, in_channels=1))
    ours = save_checkpoint(tmp_path / "ours.pt", {"student": src.state_dict(), "epoch": 1})
    dst = create_model("resnet8", num_classes=10, in_channels=1)
    assert read_weights(dst, ours, "teacher") is None and same_weights(dst, src)  # as before: no report
    # with strict=false (or a key map) its student weights go the state-dict way, with a report
    dst = create_model("resnet8", num_classes=10, in_channels=1)
    report = read_weights(dst, ours, "teacher", strict=False)
    assert report is not None and report.fit.ok and same_weights(dst, src)

    plain = tmp_path / "plain.pth"
    torch.save(other_repo_keys(src), plain)
    dst = create_model("resnet8", num_classes=10, in_channels=1)
    assert read_weights(dst, plain, "teacher", key_map=[["fc.", "classifier."]]).fit.ok and same_weights(dst, src)
    with pytest.raises(
        ConfigError, match=r"teacher\.checkpoint='.*plain\.pth' does not fit teacher\.name: .*fc\.weight"
    ):
        read_weights(dst, plain, "teacher")
    with pytest.raises(ConfigError, match=r"teachers\[1\]\.checkpoint: file not found"):
        read_weights(dst, tmp_path / "nope.pth", "teachers[1]")
    (tmp_path / "junk.pth").write_bytes(b"not a pickle")
    with pytest.raises(ConfigError, match=r"model\.checkpoint='.*junk\.pth' cannot be read as weights"):
        read_weights(dst, tmp_path / "junk.pth", "model")


def test_config_key_map_spellings_round_trip(tmp_path):
    cfg = load_config("digits/kd")
    assert cfg.teacher.key_map == [] and cfg.teacher.strict is True and cfg.model.key_map == []
    cfg = load_config("digits/kd", ["teacher.key_map={fc.: classifier., layer: stage}", "teacher.strict=false"])
    assert cfg.teacher.key_map == [("fc.", "classifier."), ("layer", "stage")] and cfg.teacher.strict is False
    assert load_config("digits/kd", ["teacher.key_map=[[fc., classifier.]]"]).teacher.key_map == [
        ("fc.", "classifier.")
    ]
    cfg.save(tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml").to_dict() == cfg.to_dict()
    with pytest.raises(ValueError, match=r"teachers\[0\]\.key_map\[0\]: expected an \[old prefix, new prefix\] pair"):
        config_from_dict({"teachers": [{"name": "resnet8", "key_map": [["a."]]}]})
    with pytest.raises(ValueError, match=r"unknown config key 'teacher\.key_mapp' \(did you mean 'key_map'\?\)"):
        load_config("digits/kd", ["teacher.key_mapp={}"])
    with pytest.raises(ValueError, match=r"teacher\.name is null but .*teacher\.key_map"):
        config_from_dict({"teacher": {"key_map": {"fc.": "classifier."}}})


def test_distill_cli_with_a_plain_state_dict_teacher(tmp_path, capsys, caplog):
    """The teacher another repository shipped (``module.`` prefixes, ``fc`` head) distilled from the command line."""
    pytest.importorskip("sklearn")
    from ckakd.apps import cli
    from ckakd.train import runner

    teacher = perturbed(create_model("resnet8x4", num_classes=10, in_channels=1))
    path = tmp_path / "teacher_state_dict.pth"
    torch.save(other_repo_keys(teacher), path)
    base = ["distill", "digits/kd", f"teacher.checkpoint={path}", f"run.out_dir={tmp_path}", *TINY]

    assert cli.main([*base, "run.name=no_map"]) == 2
    err = capsys.readouterr().err
    assert "teacher.checkpoint=" in err and "'fc.weight'" in err and "'classifier.weight'" in err and "key_map" in err
    assert not (tmp_path / "no_map").exists()

    key_map = "teacher.key_map={fc.: classifier.}"
    with caplog.at_level(logging.INFO, logger="ckakd.train"):
        assert cli.main([*base, key_map, "run.name=mapped"]) == 0
    n = len(teacher.state_dict())
    assert f"teacher.checkpoint: loaded {n}/{n} tensors from a plain state dict (stripped 'module.'" in caplog.text
    assert (tmp_path / "mapped" / "best.pt").is_file()
    saved = load_config(tmp_path / "mapped" / "config.yaml")
    assert saved.teacher.key_map == [("fc.", "classifier.")]
    (loaded,) = runner.build_teachers(saved, runner.build_data(saved))
    assert same_weights(loaded, teacher)

    # `ckakd eval` reads it too (model.key_map), with the metrics of the same weights as a ckakd checkpoint
    ours = save_checkpoint(tmp_path / "ours.pt", {"student": teacher.state_dict()})
    capsys.readouterr()
    results = []
    for ckpt, extra in ((path, ["model.key_map={fc.: classifier.}"]), (ours, [])):
        assert cli.main(["eval", "digits/teacher", "--checkpoint", str(ckpt), *extra]) == 0
        results.append(json.loads(capsys.readouterr().out))
    assert results[0] == results[1] and results[0]["n"] == 450


# ------------------------------------------------------------------------------------------ timm (faked)


class FakeTimmNet(nn.Module):
    """A timm-like classifier: ``conv_stem``/``bn1``/``act1``, two stages, ``fc``, and timm's ``feature_info``."""

    def __init__(self, num_classes: int, in_chans: int, width: int = 8) -> None:
        super().__init__()
        self.conv_stem = nn.Conv2d(in_chans, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.act1 = nn.ReLU()
        self.stages = nn.Sequential(
            nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU()),
            nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU()),
        )
        self.fc = nn.Linear(2 * width, num_classes)
        self.feature_info = [
            {"num_chs": width, "reduction": 1, "module": "act1"},
            {"num_chs": width, "reduction": 1, "module": "stages.0"},
            {"num_chs": 2 * width, "reduction": 2, "module": "stages.1"},
        ]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.stages(self.act1(self.bn1(self.conv_stem(x)))).mean((2, 3)))


@pytest.fixture
def fake_timm(monkeypatch):
    calls: list[tuple[str, dict]] = []
    timm = types.ModuleType("timm")
    models = {"fake_net": FakeTimmNet, "fake_net_wide": FakeTimmNet}

    def create_model(name: str, pretrained: bool = False, **kwargs):
        calls.append((name, {"pretrained": pretrained, **kwargs}))
        if name not in models:
            raise RuntimeError(f"Unknown model ({name})")
        kwargs.pop("drop_rate", None)
        return models[name](**kwargs)

    timm.create_model = create_model
    timm.is_model = lambda name: name in models
    timm.list_models = lambda pattern="": sorted(models)
    timm.calls = calls
    monkeypatch.setitem(sys.modules, "timm", timm)
    return timm


def test_timm_names_build_through_timm_create_model(fake_timm):
    model = build_model("timm.fake_net", {"width": 4, "drop_rate": 0.1}, 10, 1, section="teacher")
    assert fake_timm.calls == [
        ("fake_net", {"pretrained": False, "num_classes": 10, "in_chans": 1, "width": 4, "drop_rate": 0.1})
    ]
    assert isinstance(model, FakeTimmNet) and model.fc.out_features == 10
    assert model.stage_names == ["act1", "stages.0", "stages.1"]  # from feature_info
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    build_model("timm.fake_net", {"pretrained": True}, 10, 3, section="model")
    assert fake_timm.calls[-1][1]["pretrained"] is True  # kwargs override the defaults
    assert isinstance(create_model("timm.fake_net", num_classes=5), FakeTimmNet)  # the Python API too
    with pytest.raises(
        ConfigError,
        match=r"teacher\.name='timm\.fake_nett': timm has no model 'fake_nett' \(did you mean 'timm\.fake_net'",
    ):
        build_model("timm.fake_nett", {}, 10, 1, section="teacher")
    with pytest.raises(ConfigError, match=r"model\.name='timm\.fake_net': timm could not build 'fake_net'.*bogus"):
        build_model("timm.fake_net", {"bogus": 1}, 10, 1, section="model")


def test_missing_timm_and_torchvision_name_the_library(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` raises ImportError
    with pytest.raises(
        ConfigError, match=r"teacher\.name='timm\.resnet18': model 'timm\.resnet18' needs timm.*pip install timm"
    ):
        build_model("timm.resnet18", {}, 10, 3, section="teacher")
    monkeypatch.setitem(sys.modules, "torchvision", None)
    with pytest.raises(ConfigError, match=r"needs torchvision.*pip install torchvision"):
        build_model("torchvision.resnet18", {}, 10, 3, section="model")
    with pytest.raises(ValueError, match="name timm / torchvision models"):
        register_model("timm.mine")


def test_models_without_stage_names_need_explicit_hook_paths():
    class Plain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Conv2d(1, 4, 3)
            self.head = nn.Linear(4, 10)

        def forward(self, x):
            return self.head(self.body(x).mean((2, 3)))

    assert external_stage_names(Plain()) is None
    from ckakd.train.distillers import build_distiller

    with pytest.raises(ValueError, match=r"has no `stage_names`.*pass explicit dotted module paths"):
        build_distiller("fcka", create_model("resnet8", num_classes=10, in_channels=1), Plain(), input_shape=(1, 8, 8))
    d = build_distiller(
        "fcka", create_model("resnet8", num_classes=10, in_channels=1), Plain(), input_shape=(1, 8, 8),
        feature_paths_t="body",
    )  # fmt: skip
    assert d is not None


def test_distill_a_timm_teacher_from_its_own_state_dict(fake_timm, tmp_path, caplog):
    """A timm teacher shipped as timm's training checkpoint (``{"state_dict": ...}``), feature-distilled on the
    stage its ``feature_info`` names last."""
    pytest.importorskip("sklearn")
    from ckakd.apps import cli

    teacher = perturbed(FakeTimmNet(10, 1, width=4))
    path = tmp_path / "timm_ckpt.pth.tar"
    torch.save({"state_dict": teacher.state_dict(), "epoch": 90, "arch": "fake_net"}, path)
    args = [
        "distill", "digits/fcka", "teacher.name=timm.fake_net", "teacher.kwargs={width: 4}",
        f"teacher.checkpoint={path}", f"run.out_dir={tmp_path}", "run.name=timm_fcka", *TINY,
    ]  # fmt: skip
    with caplog.at_level(logging.INFO, logger="ckakd.train"):
        assert cli.main(args) == 0
    n = len(teacher.state_dict())
    assert f"loaded {n}/{n} tensors from the state dict under ['state_dict']" in caplog.text
    rows = (tmp_path / "timm_fcka" / "metrics.csv").read_text().splitlines()
    assert len(rows) == 2 and "cka/layer3~stages.1" in rows[0]


# ------------------------------------------------------------------------------------------ torchvision


@pytest.fixture(scope="module")
def tv():
    module, how = load_torchvision()
    if module is None:
        pytest.skip(how)
    return module


def test_torchvision_names_build_through_get_model(tv, tmp_path):
    model = build_model("torchvision.resnet18", {}, 10, 3, section="teacher")
    assert isinstance(model, tv.models.ResNet) and model.fc.out_features == 10
    assert model.stage_names == ["layer1", "layer2", "layer3", "layer4"]
    assert build_model("torchvision.mobilenet_v2", {"width_mult": 0.25}, 10, 3, section="model").stage_names == [
        "features"
    ]
    with pytest.raises(ConfigError, match=r"torchvision classifiers take 3-channel images and the data has 1"):
        build_model("torchvision.resnet18", {}, 10, 1, section="teacher")
    with pytest.raises(
        ConfigError, match=r"torchvision has no model 'resnet19' \(did you mean 'torchvision\.resnet18'"
    ):
        build_model("torchvision.resnet19", {}, 10, 3, section="teacher")
    # torchvision's own state dict, as `torch.save(model.state_dict())` ships it, loads without a key map
    src = perturbed(tv.models.resnet18(num_classes=10))
    torch.save(src.state_dict(), tmp_path / "r18.pth")
    assert read_weights(model, tmp_path / "r18.pth", "teacher").fit.ok and same_weights(model, src)
    x = torch.rand(2, 3, 32, 32)
    assert torch.allclose(model.eval()(x), src.eval()(x))


def test_create_external_model_rejects_other_prefixes():
    with pytest.raises(ValueError, match="is not 'timm.<model>' or 'torchvision.<model>'"):
        create_external_model("timm.", num_classes=10)


def test_safetensors_files_load_through_the_safetensors_package(tmp_path, monkeypatch):
    """``.safetensors`` (what the Hugging Face hub ships timm weights as) is read with ``safetensors.torch.load_file``;
    the package is faked here (its ``load_file`` returns the tensors it was given)."""
    src = perturbed(create_model("resnet8", num_classes=10, in_channels=1))
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"stands for a safetensors file")
    shipped = other_repo_keys(src)
    calls = []

    def load_file(filename: str, device: str = "cpu") -> dict:
        calls.append((filename, device))
        return dict(shipped)

    package, module = types.ModuleType("safetensors"), types.ModuleType("safetensors.torch")
    module.load_file = load_file
    package.torch = module
    monkeypatch.setitem(sys.modules, "safetensors", package)
    monkeypatch.setitem(sys.modules, "safetensors.torch", module)
    dst = create_model("resnet8", num_classes=10, in_channels=1)
    report = read_weights(dst, path, "teacher", key_map={"fc.": "classifier."})
    assert calls == [(str(path), "cpu")] and report.fit.ok and same_weights(dst, src)
    with pytest.raises(ConfigError, match=r"teacher\.checkpoint=.*does not fit teacher\.name: .*'fc\.weight'"):
        read_weights(dst, path, "teacher")
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(ConfigError, match=r"is a \.safetensors file, which needs safetensors: pip install safetensors"):
        read_weights(dst, path, "teacher")
