"""Typed YAML trainer configs: schema checks, inheritance, overrides, round trips and the shipped configs."""

from __future__ import annotations

import ast
import fnmatch
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ckakd.train import list_models
from ckakd.train.config import (
    Config,
    ModelSpec,
    apply_overrides,
    config_from_dict,
    config_path,
    configs_root,
    list_configs,
    load_config,
    parse_override,
)

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "ckakd" / "configs"

# The distillers' keyword arguments (ckakd.train.distillers.build_distiller); feature paths may be omitted.
DISTILLER_KWARGS: dict[str, set[str]] = {
    "ce": {"ce_weight"},
    "kd": {"temperature", "ce_weight", "kd_weight"},
    "lskd": {"temperature", "ce_weight", "kd_weight"},
    "dkd": {"alpha", "beta", "temperature", "ce_weight", "warmup"},
    "dist": {"beta", "gamma", "temperature", "ce_weight"},
    "fitnet": {"feature_path_s", "feature_path_t", "hint_weight", "ce_weight"},
    "at": {"feature_paths_s", "feature_paths_t", "at_weight", "p", "ce_weight"},
    "fcka": {"feature_paths_s", "feature_paths_t", "alpha", "mode", "global_batch", "ce_weight"},
    "lcka": {"beta", "mode", "with_l2_norm", "soften", "temperature", "global_batch", "ce_weight"},
    "rcka": {
        "feature_paths_s",
        "feature_paths_t",
        "alpha",
        "beta",
        "mode",
        "with_l2_norm",
        "soften",
        "temperature",
        "global_batch",
        "ce_weight",
    },
    "patch_cka": {
        "feature_paths_s", "feature_paths_t", "weight", "patch_size", "reduce", "mode", "resize", "ce_weight"
    },
    "mmd": {"feature_paths_s", "feature_paths_t", "weight", "global_batch", "ce_weight"},
    "wkd_l": {
        "temperature", "gamma", "use_target", "eps", "iters", "gamma_schedule", "decay_start", "sharpen", "ce_weight",
    },
    "wkd_f": {"feature_path_s", "feature_path_t", "weight", "mean_weight", "grid", "cov", "ce_weight"},
    "wkd_lf": {
        "temperature", "gamma", "use_target", "eps", "iters", "gamma_schedule", "decay_start", "sharpen",
        "feature_path_s", "feature_path_t", "feature_weight", "mean_weight", "grid", "cov", "ce_weight",
    },
    "ensemble_kd": {"temperature", "reduce", "standardize", "ce_weight", "kd_weight", "teacher_views"},
}  # fmt: skip

METHODS = ["ce", "kd", "lskd", "dkd", "dist", "fitnet", "at", "fcka", "lcka", "rcka", "patch_cka", "mmd", "wkd_l",
           "wkd_f", "wkd_lf"]  # fmt: skip


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------ shipped configs


def test_list_configs_has_every_method_for_every_dataset():
    names = list_configs()
    assert names == sorted(names)
    for ds in ("digits", "cifar100", "imagenet"):
        assert f"{ds}/base" in names
        assert f"{ds}/student" in names
        for m in METHODS:
            assert f"{ds}/{m}" in names, f"{ds}/{m}"
    assert {"digits/teacher", "cifar100/teacher_resnet32x4", "imagenet/teacher_resnet34"} <= set(names)
    assert "cifar100/wkd_l_shufflenetv2" in names


@pytest.mark.parametrize("name", [n for n in list_configs() if not n.startswith("detection/")])
def test_shipped_config_resolves(name):
    cfg = load_config(name)
    assert isinstance(cfg, Config)
    assert cfg.distiller.name in DISTILLER_KWARGS, cfg.distiller.name
    extra = set(cfg.distiller.kwargs) - DISTILLER_KWARGS[cfg.distiller.name]
    assert not extra, f"{name}: unexpected {cfg.distiller.name} kwargs {sorted(extra)}"
    models = set(list_models())
    assert cfg.model.name in models
    for t in ([cfg.teacher] if cfg.teacher.name else []) + list(cfg.teachers):
        assert t.name in models
        assert t.checkpoint, f"{name}: teacher {t.name} without a checkpoint path"
    if cfg.distiller.name != "ce":
        assert cfg.teacher.name is not None, name
    if cfg.distiller.name in ("wkd_l", "wkd_lf"):
        assert cfg.distiller.cost, name
    # the resolved config round-trips through its own YAML
    assert config_from_dict(yaml.safe_load(cfg.to_yaml())) == cfg
    # the name resolves with a suffix too, and to a file under the configs root
    assert load_config(name + ".yaml") == cfg
    assert config_path(name).is_relative_to(configs_root())


def test_digits_defaults_and_teacher_student_pair():
    base = load_config("digits/base")
    d = base.data
    assert (d.name, d.augment, d.batch_size, d.image_size) == ("digits", "none", 64, None)
    assert (base.optim.name, base.optim.lr, base.optim.momentum, base.optim.weight_decay) == ("sgd", 0.05, 0.9, 5e-4)
    assert base.schedule.kind == "cosine" and base.run.device == "auto"
    teacher, student = load_config("digits/teacher"), load_config("digits/student")
    assert teacher.model.name == student.teacher.name == "resnet8x4"
    assert student.model.name == "resnet8"
    assert student.teacher.checkpoint == f"{teacher.run.out_dir}/{teacher.run.name}/best.pt"


def test_cifar_recipe_and_published_weights():
    base = load_config("cifar100/base")
    assert base.data.name == "cifar100" and base.data.augment == "weak" and base.data.root is None
    assert (base.optim.lr, base.optim.momentum, base.optim.weight_decay, base.data.batch_size) == (0.05, 0.9, 5e-4, 64)
    assert (base.schedule.epochs, base.schedule.kind, base.schedule.milestones) == (240, "step", [150, 180, 210])
    assert load_config("cifar100/teacher_resnet32x4").model.name == "resnet32x4"
    kw = {m: load_config(f"cifar100/{m}").distiller.kwargs for m in METHODS}
    assert kw["kd"] == {"temperature": 4.0, "ce_weight": 0.1, "kd_weight": 0.9}
    assert {k: kw["dkd"][k] for k in ("alpha", "beta", "temperature", "warmup")} == {
        "alpha": 1.0, "beta": 8.0, "temperature": 4.0, "warmup": 20}  # fmt: skip
    assert (kw["lskd"]["temperature"], kw["lskd"]["kd_weight"]) == (2.0, 9.0)
    assert (kw["dist"]["beta"], kw["dist"]["gamma"], kw["dist"]["temperature"]) == (2.0, 2.0, 4.0)
    assert kw["fitnet"]["hint_weight"] == 100.0 and kw["at"]["at_weight"] == 1000.0
    assert (kw["rcka"]["alpha"], kw["rcka"]["beta"]) == (5.0, 5.0)
    wkd_l = kw["wkd_l"]
    assert (wkd_l["temperature"], wkd_l["gamma"], wkd_l["gamma_schedule"], wkd_l["decay_start"]) == (
        8.0,
        600.0,
        "cosine",
        150,
    )
    assert (kw["wkd_f"]["weight"], kw["wkd_f"]["mean_weight"], kw["wkd_f"]["grid"]) == (0.08, 4.0, 1)
    shv2 = load_config("cifar100/wkd_l_shufflenetv2")
    assert shv2.model.name == "shufflenetv2" and shv2.optim.lr == 0.01 and shv2.teacher.name == "resnet32x4"
    assert shv2.distiller.kwargs == wkd_l


def test_imagenet_recipe_and_published_weights():
    base = load_config("imagenet/base")
    assert (base.data.name, base.data.image_size, base.data.batch_size) == ("imagefolder", 224, 256)
    assert (base.optim.lr, base.optim.weight_decay) == (0.1, 1e-4)
    assert (base.schedule.epochs, base.schedule.milestones) == (100, [30, 60, 90])
    assert load_config("imagenet/teacher_resnet34").model.name == "resnet34"
    student = load_config("imagenet/wkd_l")
    assert (student.model.name, student.teacher.name) == ("resnet18", "resnet34")
    assert (student.distiller.kwargs["temperature"], student.distiller.kwargs["gamma"]) == (2.0, 30.0)
    f = load_config("imagenet/wkd_f").distiller.kwargs
    assert (f["weight"], f["mean_weight"], f["grid"]) == (0.02, 2.0, 4)
    mv1 = load_config("imagenet/wkd_l_r50_mobilenetv1")
    assert (mv1.model.name, mv1.teacher.name, mv1.distiller.sharpen) == ("mobilenetv1", "resnet50", 2.0)


def test_configs_are_found_through_the_package():
    """The shipped configs resolve through the installed package: with the editable install (the test
    environment) to the repo's ckakd/configs/ folder, with a regular install to identical package data."""
    import ckakd

    root = configs_root()
    assert (root / "digits" / "base.yaml").is_file()
    if Path(ckakd.__file__).resolve().is_relative_to(REPO):
        assert root.resolve() == CONFIGS.resolve()
    shipped = {p.relative_to(root).as_posix() for p in root.rglob("*.yaml")}
    assert shipped == {p.relative_to(CONFIGS).as_posix() for p in CONFIGS.rglob("*.yaml")}


def test_package_data_globs_cover_every_shipped_config():
    """A regular install copies only what setup.py's package_data globs match: every YAML must match one."""
    tree = ast.parse((REPO / "setup.py").read_text(encoding="utf-8"))
    package_dir = package_data = None
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "package_data":
            package_data = ast.literal_eval(node.value)
        if isinstance(node, ast.keyword) and node.arg == "package_dir":
            package_dir = ast.literal_eval(node.value)
    # ckakd/configs is a plain subpackage: no package_dir mapping moves it elsewhere
    assert package_dir is None or package_dir.get("ckakd.configs", "ckakd/configs") == "ckakd/configs"
    assert (CONFIGS / "__init__.py").is_file()
    patterns = package_data["ckakd.configs"]
    files = sorted(CONFIGS.rglob("*.yaml"))
    assert files
    for f in files:
        rel = f.relative_to(CONFIGS).as_posix()
        # setuptools globs: '*' does not cross '/'
        assert any(fnmatch.fnmatch(rel, p) and rel.count("/") == p.count("/") for p in patterns), rel


# ------------------------------------------------------------------------------------------ schema


def test_defaults():
    cfg = config_from_dict({})
    assert cfg == Config()
    assert cfg.run.name == "run" and cfg.run.device == "auto" and cfg.run.amp_dtype == "bfloat16"
    assert cfg.data.name == "digits" and cfg.data.augment == "weak" and cfg.data.val_fraction == 0.25
    assert cfg.model.name == "resnet8" and cfg.teacher.name is None and cfg.teachers == []
    assert cfg.distiller.name == "ce" and cfg.distiller.sharpen == 1.0
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.weight_decay) == ("sgd", 0.05, 5e-4)
    assert (cfg.schedule.epochs, cfg.schedule.kind, cfg.schedule.milestones) == (240, "step", [150, 180, 210])
    assert cfg.train.cka_pairs == [] and cfg.train.grad_clip is None
    assert config_from_dict(None) == cfg


def test_types_are_checked_and_converted():
    cfg = config_from_dict({"optim": {"lr": 1, "weight_decay": 0}, "train": {"cka_pairs": [["a", "b"]]}})
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)  # int accepted for float
    assert cfg.train.cka_pairs == [("a", "b")]
    assert cfg.to_dict()["train"]["cka_pairs"] == [["a", "b"]]
    cases = [
        ({"optim": {"lr": "fast"}}, r"optim\.lr: expected a number .*'fast' \(str\)"),
        ({"optim": {"lr": True}}, r"optim\.lr: expected a number"),
        ({"data": {"batch_size": 1.5}}, r"data\.batch_size: expected an int, got 1\.5 \(float\)"),
        ({"data": {"batch_size": True}}, r"data\.batch_size: expected an int, got True \(bool\)"),
        ({"run": {"amp": 1}}, r"run\.amp: expected a bool \(true/false\), got 1 \(int\)"),
        ({"run": {"seed": None}}, r"run\.seed: expected an int, got null \(this key is not optional\)"),
        ({"run": {"name": 3}}, r"run\.name: expected a string, got 3 \(int\)"),
        ({"data": {"image_size": "big"}}, r"data\.image_size: expected an int or null, got 'big'"),
        ({"schedule": {"milestones": [10, "x"]}}, r"schedule\.milestones\[1\]: expected an int"),
        ({"schedule": {"milestones": 10}}, r"schedule\.milestones: expected a list of ints, got 10 \(int\)"),
        ({"train": {"cka_pairs": [["a"]]}}, r"train\.cka_pairs\[0\]: expected a \[string, string\] pair"),
        ({"model": {"kwargs": [1]}}, r"model\.kwargs: expected a mapping"),
        ({"optim": {"lr": float("nan")}}, r"optim\.lr: expected a finite number"),
        ({"optim": 0.1}, r"optim: expected a mapping \(OptimConfig fields\), got 0\.1"),
        ({"teachers": [{"kwargs": {}}]}, r"teachers\[0\]\.name: required key is missing"),
    ]
    for d, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            config_from_dict(d)


def test_optional_fields_accept_null():
    data = {"root": None, "image_size": None, "max_train_batches": 2}
    cfg = config_from_dict({"data": data, "train": {"grad_clip": 5}})
    assert cfg.data.root is None and cfg.data.max_train_batches == 2 and cfg.train.grad_clip == 5.0


def test_enumerations_and_ranges():
    cases = [
        ({"data": {"augment": "strongest"}}, r"data\.augment: expected one of 'none', 'weak', 'strong'.*"
                                             r"did you mean 'strong'"),
        ({"data": {"name": "cifar10"}}, r"data\.name: expected one of 'digits', 'cifar100', 'imagefolder'"),
        ({"run": {"amp_dtype": "fp16"}}, r"run\.amp_dtype: expected one of 'float16', 'bfloat16'"),
        ({"optim": {"name": "adamx"}}, r"optim\.name: unknown optimizer 'adamx' \(did you mean 'Adamax'\?\); "
                                       r"expected sgd, adamw, a torch\.optim class"),  # adam: torch.optim.Adam
        ({"schedule": {"kind": "linear"}}, r"schedule\.kind: expected one of 'step', 'cosine', 'constant'"),
        ({"run": {"device": "gpu"}}, r"run\.device: must be 'auto', 'cpu', 'cuda' or 'cuda:N'"),
        ({"optim": {"lr": 0}}, r"optim\.lr: must be > 0, got 0\.0"),
        ({"optim": {"momentum": 1.0}}, r"optim\.momentum: must be in \[0, 1\)"),
        ({"data": {"val_fraction": 1}}, r"data\.val_fraction: must be strictly between 0 and 1"),
        ({"data": {"batch_size": 0}}, r"data\.batch_size: must be > 0"),
        ({"data": {"num_workers": -1}}, r"data\.num_workers: must be >= 0"),
        ({"distiller": {"sharpen": 0}}, r"distiller\.sharpen: must be > 0"),
        ({"run": {"name": " "}}, r"run\.name: must be a non-empty string"),
        ({"schedule": {"milestones": [30, 20]}}, r"schedule\.milestones: expected strictly increasing"),
        ({"teacher": {"checkpoint": "t.pt"}}, r"teacher\.name is null but teacher\.checkpoint"),
    ]  # fmt: skip
    for d, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            config_from_dict(d)
    for device in ("auto", "cpu", "cuda", "cuda:1"):
        assert config_from_dict({"run": {"device": device}}).run.device == device


def test_unknown_keys_are_named_with_suggestions():
    with pytest.raises(ValueError, match=r"unknown config key 'optim\.lrr' \(did you mean 'lr'\?\); valid keys under "
                                         r"'optim': name, lr, momentum, weight_decay, nesterov"):  # fmt: skip
        config_from_dict({"optim": {"lrr": 0.1}})
    with pytest.raises(ValueError, match=r"unknown config key 'sched' \(did you mean 'schedule'\?\); valid keys at "
                                         r"the top level: task, run, data"):  # fmt: skip
        config_from_dict({"sched": {}})
    with pytest.raises(ValueError, match=r"unknown config key 'teachers\[1\]\.ckpt'"):
        config_from_dict({"teachers": [{"name": "a"}, {"name": "b", "ckpt": "x"}]})
    with pytest.raises(ValueError, match=r"unknown config key 'base'"):
        config_from_dict({"base": "digits/base"})
    # the free-form kwargs mappings take any keys
    cfg = config_from_dict({"distiller": {"kwargs": {"anything": [1, 2]}}, "model": {"kwargs": {"drop_rate": 0.1}}})
    assert cfg.distiller.kwargs == {"anything": [1, 2]} and cfg.model.kwargs == {"drop_rate": 0.1}


def test_teachers_list():
    extra = {"name": "wrn_16_2", "checkpoint": "b.pt", "kwargs": {"drop_rate": 0.0}}
    cfg = config_from_dict({"teacher": {"name": "resnet8x4", "checkpoint": "a.pt"}, "teachers": [extra]})
    assert cfg.teachers == [ModelSpec(name="wrn_16_2", kwargs={"drop_rate": 0.0}, checkpoint="b.pt")]
    with pytest.raises(ValueError, match=r"teachers: expected a list of mappings \(ModelSpec fields\)"):
        config_from_dict({"teachers": {"name": "x"}})


def test_per_teacher_augment():
    cfg = config_from_dict({"teacher": {"name": "resnet8x4"}, "teachers": [{"name": "a"}]})
    assert cfg.teacher.augment is None and cfg.teachers[0].augment is None  # default: the student's view
    cfg = config_from_dict(
        {
            "data": {"augment": "strong"},
            "teacher": {"name": "resnet8x4", "augment": "weak"},
            "teachers": [{"name": "a", "augment": "none"}, {"name": "b", "augment": None}],
        }
    )
    assert (cfg.data.augment, cfg.teacher.augment) == ("strong", "weak")
    assert [t.augment for t in cfg.teachers] == ["none", None]
    assert config_from_dict(yaml.safe_load(cfg.to_yaml())) == cfg
    cfg = load_config("digits/kd", ["teacher.augment=strong"])
    assert cfg.teacher.augment == "strong"
    with pytest.raises(ValueError, match=r"teachers\[0\]\.augment: expected one of 'none', 'weak', 'strong' or null"):
        config_from_dict({"teachers": [{"name": "a", "augment": "medium"}]})
    with pytest.raises(ValueError, match="teacher.augment"):
        config_from_dict({"teacher": {"augment": "weak"}})  # no teacher named


def test_digits_ensemble_configs():
    cfg = load_config(CONFIGS / "digits" / "ensemble_kd.yaml")
    assert cfg.distiller.name == "ensemble_kd" and cfg.distiller.kwargs["reduce"] == "mean_loss"
    assert cfg.teacher.name == cfg.teachers[0].name == "resnet8x4" and len(cfg.teachers) == 1
    assert cfg.teacher.checkpoint != cfg.teachers[0].checkpoint  # two differently seeded teachers
    assert cfg.teachers[0].checkpoint == "runs/digits_teacher_s1/best.pt"
    assert (cfg.data.augment, cfg.teacher.augment, cfg.teachers[0].augment) == ("weak", "weak", "weak")
    text = (CONFIGS / "digits" / "ensemble_kd.yaml").read_text()
    assert "ckakd train-teacher digits/teacher run.seed=1 run.name=digits_teacher_s1" in text
    ls = load_config(CONFIGS / "digits" / "ensemble_lskd.yaml")
    assert ls.distiller.kwargs == {
        "temperature": 2.0,
        "reduce": "mean_loss",
        "standardize": True,
        "ce_weight": 0.1,
        "kd_weight": 9.0,
    }
    assert ls.teachers == cfg.teachers and ls.teacher == cfg.teacher


# ------------------------------------------------------------------------------------------ files and inheritance


def test_save_round_trip_is_atomic(tmp_path):
    cfg = load_config("digits/rcka", ["train.cka_pairs=[[layer3,layer3]]", "optim.lr=1e-3"])
    out = cfg.save(tmp_path / "run" / "config.yaml")
    assert out == tmp_path / "run" / "config.yaml"
    assert [p.name for p in out.parent.iterdir()] == ["config.yaml"]  # no temporary file left behind
    assert load_config(out) == cfg
    assert load_config(str(out)) == cfg
    text = out.read_text()
    assert "base:" not in text and "milestones: []" in text and "cka_pairs: [[layer3, layer3]]" in text
    cfg.save(out)  # overwriting works
    assert load_config(out) == cfg


def test_base_chain_relative_paths_and_merge(tmp_path):
    _write(tmp_path / "a.yaml", "run: {name: a, seed: 1}\nmodel: {name: resnet20, kwargs: {x: 1}}\n"
           "schedule: {milestones: [5, 6]}\n")  # fmt: skip
    _write(tmp_path / "sub" / "b.yaml", "base: ../a.yaml\nrun: {name: b}\nmodel: {kwargs: {y: 2}}\n"
           "schedule: {milestones: [7]}\n")  # fmt: skip
    _write(tmp_path / "sub" / "c.yaml", "base: b\nrun:\n  # every key commented out: keeps the parent's section\n"
           "optim: {lr: 0.2}\n")  # fmt: skip
    cfg = load_config(tmp_path / "sub" / "c.yaml")
    assert cfg.run.name == "b" and cfg.run.seed == 1  # child wins, parent's other keys kept
    assert cfg.model.name == "resnet20" and cfg.model.kwargs == {"x": 1, "y": 2}  # mappings merged
    assert cfg.schedule.milestones == [7]  # lists replaced
    assert cfg.optim.lr == 0.2
    # a shipped name as base from a user file
    _write(tmp_path / "mine.yaml", "base: digits/kd\ndistiller: {kwargs: {temperature: 2}}\n")
    mine = load_config(tmp_path / "mine.yaml")
    assert (
        mine.distiller.name == "kd"
        and mine.distiller.kwargs["temperature"] == 2
        and mine.distiller.kwargs["kd_weight"] == 0.9
    )
    assert mine.model.name == "resnet8"


def test_base_cycles_are_detected(tmp_path):
    _write(tmp_path / "a.yaml", "base: b.yaml\n")
    _write(tmp_path / "b.yaml", "base: c.yaml\n")
    _write(tmp_path / "c.yaml", "base: a.yaml\n")
    with pytest.raises(ValueError, match=r"config inheritance cycle: .*a\.yaml -> .*b\.yaml -> .*c\.yaml -> .*a\.yaml"):
        load_config(tmp_path / "a.yaml")
    _write(tmp_path / "self.yaml", "base: self\n")
    with pytest.raises(ValueError, match="inheritance cycle"):
        load_config(tmp_path / "self.yaml")


def test_bad_files_and_names(tmp_path):
    with pytest.raises(ValueError, match=r"no shipped config named 'digits/rckaa' \(did you mean 'digits/rcka'\?\)"):
        load_config("digits/rckaa")
    with pytest.raises(ValueError, match=r"config file not found: .*nope\.yaml"):
        load_config(tmp_path / "nope.yaml")
    _write(tmp_path / "list.yaml", "- 1\n- 2\n")
    with pytest.raises(ValueError, match=r"must be a YAML mapping at the top level"):
        load_config(tmp_path / "list.yaml")
    _write(tmp_path / "bad.yaml", "run: [\n")
    with pytest.raises(ValueError, match=r"bad\.yaml: invalid YAML"):
        load_config(tmp_path / "bad.yaml")
    _write(tmp_path / "missing_base.yaml", "base: nothing_here.yaml\n")
    with pytest.raises(ValueError, match=r"config file not found: .*nothing_here\.yaml"):
        load_config(tmp_path / "missing_base.yaml")
    _write(tmp_path / "int_base.yaml", "base: 3\n")
    with pytest.raises(ValueError, match=r"base: expected a config name or a relative path"):
        load_config(tmp_path / "int_base.yaml")
    _write(tmp_path / "empty.yaml", "")
    with pytest.raises(ValueError, match=r"empty\.yaml: the config has no keys .*240 epochs.*base: digits/kd"):
        load_config(tmp_path / "empty.yaml")
    _write(tmp_path / "comments.yaml", "# optim:\n#   lr: 0.1\n")
    with pytest.raises(ValueError, match=r"comments\.yaml: the config has no keys"):
        load_config(tmp_path / "comments.yaml", ["optim.lr=0.1"])
    _write(tmp_path / "typo.yaml", "optim:\n  weight_decy: 0.1\n")
    with pytest.raises(ValueError, match=r"'optim\.weight_decy' \(did you mean 'weight_decay'\?\)"):
        load_config(tmp_path / "typo.yaml")


# ------------------------------------------------------------------------------------------ overrides


def test_overrides():
    cfg = load_config(
        "digits/rcka",
        [
            "optim.lr=0.1",
            "train.cka_pairs=[[layer3,layer3], [layer2, layer2]]",
            "distiller.kwargs.alpha=3",
            "distiller.kwargs.new_key=[1, 2]",
            "optim.weight_decay=1e-4",  # YAML 1.1 would read this as a string
            "run.device=cuda:1",
            "data.max_train_batches=2",
            "train.grad_clip=null",
            "teacher.kwargs.drop_rate=0.1",
            "schedule.milestones=[]",
        ],
    )
    assert cfg.optim.lr == 0.1 and cfg.optim.weight_decay == 1e-4
    assert cfg.train.cka_pairs == [("layer3", "layer3"), ("layer2", "layer2")]
    assert cfg.distiller.kwargs == {"alpha": 3, "beta": 5.0, "mode": "centered", "ce_weight": 1.0, "new_key": [1, 2]}
    assert cfg.run.device == "cuda:1" and cfg.data.max_train_batches == 2 and cfg.train.grad_clip is None
    assert cfg.teacher.kwargs == {"drop_rate": 0.1} and cfg.schedule.milestones == []
    # later overrides win; a section can be reset with null
    assert load_config("digits/kd", ["optim.lr=0.1", "optim.lr=0.2"]).optim.lr == 0.2
    assert load_config("digits/ce", ["teacher=null"]).teacher.name is None
    # list items by index
    ens = load_config("digits/ensemble_kd", ["teachers.0.checkpoint=other.pt"])
    assert ens.teachers[0].checkpoint == "other.pt" and ens.teachers[0].name == "resnet8x4"


def test_override_errors():
    with pytest.raises(ValueError, match=r"malformed override 'optim\.lr': expected dotted\.key=value, e\.g\. optim"):
        load_config("digits/base", ["optim.lr"])
    with pytest.raises(ValueError, match=r"malformed override '\.lr=1'.*must be dotted names"):
        load_config("digits/base", [".lr=1"])
    with pytest.raises(ValueError, match=r"unknown config key 'optim\.lrr' \(did you mean 'lr'\?\)"):
        load_config("digits/base", ["optim.lrr=0.1"])
    with pytest.raises(ValueError, match=r"optim\.lr: expected a number \(int or float\), got 'fast'"):
        load_config("digits/base", ["optim.lr=fast"])
    with pytest.raises(ValueError, match=r"override 'optim\.lr\.x=1': 'optim\.lr' is 0\.05 \(float\), not a mapping"):
        load_config("digits/base", ["optim.lr.x=1"])
    with pytest.raises(ValueError, match=r"'teachers\.3' needs an index 0\.\.0"):
        load_config("digits/ensemble_kd", ["teachers.3.checkpoint=x"])
    with pytest.raises(ValueError, match=r"invalid YAML"):
        load_config("digits/base", ["train.cka_pairs=[[a, b]"])


def test_parse_and_apply_override_helpers():
    assert parse_override("a.b=1") == (["a", "b"], 1)
    assert parse_override("a= x=y ") == (["a"], "x=y")  # the first '=' splits
    assert parse_override("a=") == (["a"], None)
    raw = {"optim": {"lr": 0.1}}
    out = apply_overrides(raw, ["optim.lr=0.2", "model.kwargs.x=1"])
    assert out == {"optim": {"lr": 0.2}, "model": {"kwargs": {"x": 1}}}
    assert raw == {"optim": {"lr": 0.1}}  # not modified in place
    assert apply_overrides({}, "run.seed=3") == {"run": {"seed": 3}}


# ------------------------------------------------------------------------------------------ user reports


def test_binary_config_file_is_named(tmp_path):
    (tmp_path / "weights.yaml").write_bytes(b"\x80\x02}q\x00(X\x06\x00\x00\x00weights" + bytes(range(256)))
    with pytest.raises(ValueError, match=r"weights\.yaml: not a YAML config \(a binary file\? byte 0x80 at offset 0"):
        load_config(tmp_path / "weights.yaml")
    (tmp_path / "nul.yaml").write_bytes(b"run:\n  name: a\x00b\n")
    with pytest.raises(ValueError, match=r"nul\.yaml: not a YAML config \(a binary file: it contains NUL bytes"):
        load_config(tmp_path / "nul.yaml")


@pytest.mark.parametrize(
    "override, suggestion",
    [
        ("train.epochs=3", "'schedule.epochs'"),  # right name, wrong section
        ("epochs=3", "'schedule.epochs'"),
        ("lr=0.1", "'optim.lr'"),
        ("run.epochs=3", "'schedule.epochs'"),
        ("data.lr=0.1", "'optim.lr'"),
        ("schedule.epoch=3", "'epochs'"),  # a typo within the section
        ("model.checkpiont=x", "'checkpoint'"),
    ],
)
def test_unknown_keys_get_close_match_suggestions(override, suggestion):
    with pytest.raises(
        ValueError, match=rf"unknown config key '{override.split('=')[0]}' \(did you mean {suggestion}\?\)"
    ):
        load_config("digits/kd", [override])


def test_detection_configs_need_the_detection_schema_registered():
    """The train layer does not import ckakd.detection: a ``task: detection`` file loads once ckakd.detection.config
    (which registers the schema) is imported; otherwise the error says so. (Run in a fresh interpreter.)"""
    code = (
        "from ckakd.train.config import load_config\n"
        "try:\n    load_config('detection/retinanet_student')\nexcept ValueError as e:\n    print(e)\n"
        "import sys; print('ckakd.detection.config' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "task: expected one of 'classification', got 'detection'" in out.stdout
    assert "import ckakd.detection.config" in out.stdout and out.stdout.split()[-1] == "False"


@pytest.mark.parametrize("name", ["../../x", "../x", "a/../../b", "/tmp/x", "~/x", ".", "a/.."])
def test_run_name_cannot_leave_out_dir(name):
    with pytest.raises(ValueError, match=r"run\.name: must name a folder inside run\.out_dir"):
        load_config("digits/kd", [f"run.name={name}"])
    assert load_config("digits/kd", ["run.name=group/kd-seed0"]).run.name == "group/kd-seed0"


def test_saved_config_is_world_readable(tmp_path):
    path = load_config("digits/kd").save(tmp_path / "config.yaml")
    assert path.stat().st_mode & 0o777 == 0o666 & ~_umask()
    assert not list(tmp_path.glob(".*.tmp"))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
