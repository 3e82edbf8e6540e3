"""The dataset registry behind ``data.name``: the built-ins registered through ``@register_dataset``, a user's
dataset (with ``data.kwargs``) trained on from Python and from the command line, and the errors of bad names,
builders and their results."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import Dataset, TensorDataset

from ckakd.train.config import ConfigError, config_from_dict, load_config
from ckakd.train.data import (
    DatasetSplits,
    RandomCropFlip,
    RandomResizedCrop,
    build_dataset,
    list_datasets,
    register_dataset,
    unregister_dataset,
)
from ckakd.train.run_data import build_data, build_loaders, train_transform

pytest.importorskip("yaml")

TINY = ["schedule.epochs=1", "data.max_train_batches=2", "run.progress=false"]


class Stripes(Dataset):
    """3-channel 12x12 images of 4 classes: class k has bright rows at phase k (learnable in a few steps)."""

    def __init__(self, n: int, seed: int, size: int = 12) -> None:
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, 4, (n,), generator=g)
        rows = torch.arange(size)
        base = torch.stack([((rows + k) % 4 == 0).float() for k in range(4)])  # (4, size)
        img = base[self.labels][:, None, :, None].expand(n, 3, size, size)
        self.images = (0.8 * img + 0.2 * torch.rand(n, 3, size, size, generator=g)).contiguous()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.images[i], int(self.labels[i])


@pytest.fixture
def stripes():
    seen: list[dict] = []

    @register_dataset("stripes")
    def stripes_splits(data) -> DatasetSplits:
        seen.append(dict(data.kwargs))
        n = int(data.kwargs.get("n", 96))
        return DatasetSplits(Stripes(n, 0), Stripes(n // 2, 1), num_classes=4, channels=3, native_size=12)

    try:
        yield seen
    finally:
        unregister_dataset("stripes")


def test_builtins_are_registered_in_order():
    assert list_datasets()[:3] == ["digits", "cifar100", "imagefolder"]
    with pytest.raises(ValueError, match="already registered"):
        register_dataset("digits")(lambda data: None)
    with pytest.raises(ValueError, match="non-empty string"):
        register_dataset(" ")
    with pytest.raises(ValueError, match="unknown dataset 'nope'"):
        unregister_dataset("nope")


def test_unknown_names_fail_at_load_with_a_suggestion():
    with pytest.raises(ValueError, match=r"data\.name: expected one of 'digits', 'cifar100', 'imagefolder'.*did you "
                                         r"mean 'cifar100'.*register_dataset.*got 'cifar10'"):  # fmt: skip
        config_from_dict({"data": {"name": "cifar10"}})
    with pytest.raises(ValueError, match=r"data\.kwargs: the built-in dataset 'digits' takes none, got \['n'\]"):
        build_dataset(config_from_dict({"data": {"kwargs": {"n": 3}}}).data)


def test_a_registered_dataset_is_a_data_name(stripes):
    cfg = load_config("digits/teacher", ["data.name=stripes", "data.kwargs={n: 64}", "data.augment=weak"])
    bundle = build_data(cfg)
    assert stripes == [{"n": 64}]
    assert (bundle.num_classes, bundle.input_shape, len(bundle.train), len(bundle.val)) == (4, (3, 12, 12), 64, 32)
    assert bundle.recipe == "crop_flip" and bundle.dataset == "stripes"
    # the CIFAR recipe: padded crop + flip at the native size
    (crop,) = bundle.train_transform.transforms
    assert isinstance(crop, RandomCropFlip) and crop.flip_p == 0.5
    strong = train_transform(bundle, "strong")
    assert len(strong.transforms) > 1
    train, _ = build_loaders(cfg, bundle)
    x, y = next(iter(train))
    assert x.shape == (64, 3, 12, 12) and y.dtype == torch.long


def test_the_recipe_picks_the_augmentation_family():
    @register_dataset("big")
    def big(data) -> DatasetSplits:
        ds = TensorDataset(torch.rand(8, 3, 40, 40), torch.arange(8) % 2)
        return DatasetSplits(ds, ds, num_classes=2, channels=3, native_size=40, recipe="resized_crop")

    try:
        bundle = build_data(load_config("digits/teacher", ["data.name=big", "data.image_size=32", "data.augment=weak"]))
        assert isinstance(bundle.train_transform.transforms[0], RandomResizedCrop)
        assert bundle.input_shape == (3, 32, 32)
    finally:
        unregister_dataset("big")


@pytest.mark.parametrize(
    "result, message",
    [
        ("not splits", r"returned str, not a DatasetSplits"),
        (DatasetSplits(Stripes(4, 0), Stripes(4, 0), 1, 3, 12), r"num_classes must be >= 2"),
        (DatasetSplits(Stripes(4, 0), Stripes(4, 0), 4, 0, 12), r"DatasetSplits\.channels must be a positive int"),
        (DatasetSplits(Stripes(4, 0), Stripes(4, 0), 4, 3, 12, recipe="mirror"), r"recipe must be one of crop_flip"),
        (DatasetSplits(Stripes(4, 0), TensorDataset(torch.zeros(0, 3)), 4, 3, 12), r"the val split is empty"),
    ],
)
def test_bad_builder_results_are_config_errors(result, message):
    register_dataset("bad")(lambda data: result)
    try:
        cfg = load_config("digits/teacher", ["data.name=bad"])
        with pytest.raises(ConfigError, match=rf"the builder of data\.name='bad'.*{message}"):
            build_data(cfg)
    finally:
        unregister_dataset("bad")


def test_a_failing_builder_is_named():
    def broken(data):
        raise FileNotFoundError(f"no annotations under {data.root}")

    register_dataset("broken")(broken)
    try:
        cfg = load_config("digits/teacher", ["data.name=broken", "data.root=/nowhere"])
        with pytest.raises(ConfigError, match=r"data\.name='broken': the dataset builder failed: FileNotFoundError: "
                                              r"no annotations under /nowhere"):  # fmt: skip
            build_data(cfg)
    finally:
        unregister_dataset("broken")


def test_train_and_distill_on_a_registered_dataset(stripes, tmp_path):
    """From Python: a teacher trained on the user's dataset, then distilled from (its checkpoint, same dataset)."""
    from ckakd.train import runner

    common = ["data.name=stripes", f"run.out_dir={tmp_path}", *TINY]
    t = runner.train_teacher(load_config("digits/teacher", [*common, "run.name=t"]))
    assert (tmp_path / "t" / "best.pt").is_file() and t["out_dir"] == str(tmp_path / "t")
    cfg = load_config("digits/kd", [*common, "run.name=s", f"teacher.checkpoint={tmp_path / 't' / 'best.pt'}"])
    runner.distill(cfg)
    rows = (tmp_path / "s" / "metrics.csv").read_text().splitlines()
    assert len(rows) == 2 and "val/top1" in rows[0]


def test_the_cli_finds_a_dataset_a_module_registers(tmp_path, monkeypatch, capsys):
    """A user's module registering a dataset, imported before the command runs (as a plugin), then `data.name`."""
    from ckakd.apps import cli

    (tmp_path / "my_datasets.py").write_text(
        "import torch\n"
        "from torch.utils.data import TensorDataset\n"
        "from ckakd.train.data import DatasetSplits, register_dataset\n\n"
        "@register_dataset('noise10', overwrite=True)\n"
        "def noise10(data):\n"
        "    g = torch.Generator().manual_seed(0)\n"
        "    ds = TensorDataset(torch.rand(64, 1, 8, 8, generator=g), torch.arange(64) % 10)\n"
        "    return DatasetSplits(ds, ds, num_classes=10, channels=1, native_size=8, recipe='shift')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    importlib.import_module("my_datasets")
    try:
        code = cli.main(["train-teacher", "digits/teacher", "data.name=noise10", f"run.out_dir={tmp_path}", *TINY])
        assert code == 0, capsys.readouterr().err
        assert (tmp_path / "digits_teacher" / "best.pt").is_file()
    finally:
        unregister_dataset("noise10")


def test_the_readme_registration_example_runs():
    """The README's "Your teachers, models and datasets" example, as written."""
    import re
    from pathlib import Path

    from ckakd.train import unregister_model

    text = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    section = text.split("### Your teachers, models and datasets", 1)[1]
    section = re.split(r"\n##+ ", section, maxsplit=1)[0]  # up to the next heading
    (block,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    namespace: dict = {}
    try:
        exec(compile(block, "README.md", "exec"), namespace)
        bundle = namespace["bundle"]
        assert (bundle.num_classes, bundle.input_shape, len(bundle.train)) == (5, (3, 16, 16), 32)
        assert namespace["cfg"].model.name == "my_net" and "my_noise" in list_datasets()
    finally:
        unregister_dataset("my_noise")
        unregister_model("my_net")
