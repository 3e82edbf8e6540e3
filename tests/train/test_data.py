"""Tests for ckakd.train.data: datasets in their exact on-disk formats, tensor augmentations, loaders."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from ckakd.train.data import (
    CenterCrop,
    Cifar100Dataset,
    Cutout,
    ImageFolderDataset,
    MultiView,
    Normalize,
    RandAugmentLite,
    RandomCropFlip,
    RandomResizedCrop,
    Resize,
    load_digits_dataset,
    make_loader,
    strong_augment,
    weak_augment,
)

# ------------------------------------------------------------------ digits


def test_digits_split_sizes_range_and_determinism() -> None:
    train = load_digits_dataset("train")
    val = load_digits_dataset("val")
    xt, yt = train.tensors
    xv, yv = val.tensors
    assert len(train) + len(val) == 1797
    assert abs(len(val) - 0.25 * 1797) <= 10
    assert xt.shape[1:] == (1, 8, 8) and xt.dtype == torch.float32 and yt.dtype == torch.long
    for x in (xt, xv):
        assert x.min() >= 0.0 and x.max() <= 1.0 and x.max() == 1.0
    assert set(yt.tolist()) == set(range(10)) and set(yv.tolist()) == set(range(10))
    # Stratified: every class gets about a quarter in val.
    for c in range(10):
        n_c = int((yt == c).sum() + (yv == c).sum())
        assert abs(int((yv == c).sum()) - 0.25 * n_c) <= 1
    again = load_digits_dataset("train")
    assert torch.equal(again.tensors[0], xt) and torch.equal(again.tensors[1], yt)
    other = load_digits_dataset("train", seed=1)
    assert not torch.equal(other.tensors[0], xt)
    # Together the two splits are exactly the full data set (same labels, same pixel mass, per class).
    from sklearn.datasets import load_digits

    full = load_digits()
    assert torch.equal(torch.sort(torch.cat([yt, yv])).values, torch.sort(torch.as_tensor(full.target)).values)
    for c in range(10):
        got = float(xt[yt == c].sum() + xv[yv == c].sum())
        assert got == pytest.approx(float(full.images[full.target == c].sum()) / 16.0, rel=1e-6)


def test_digits_bad_arguments() -> None:
    with pytest.raises(ValueError):
        load_digits_dataset("test")
    with pytest.raises(ValueError):
        load_digits_dataset("train", val_fraction=1.0)


# ------------------------------------------------------------------ CIFAR-100


def _write_cifar(root: Path, n_train: int = 7, n_test: int = 3) -> dict[str, tuple[np.ndarray, list[int]]]:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    out = {}
    for name, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
        fine = rng.integers(0, 100, size=n).tolist()
        entry = {
            b"filenames": [f"img{i}.png".encode() for i in range(n)],
            b"batch_label": f"{name} batch".encode(),
            b"fine_labels": fine,
            b"coarse_labels": [f // 5 for f in fine],
            b"data": images.reshape(n, 3072),  # CHW-flattened rows: 1024 R, 1024 G, 1024 B
        }
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f, protocol=2)
        out[name] = (images, fine)
    with open(folder / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [f"c{i}".encode() for i in range(100)]}, f)
    return out


def test_cifar100_roundtrip_exact(tmp_path: Path) -> None:
    written = _write_cifar(tmp_path)
    for train, name in ((True, "train"), (False, "test")):
        ds = Cifar100Dataset(tmp_path, train=train)
        images, fine = written[name]
        assert len(ds) == len(fine)
        assert ds.classes[:2] == ["c0", "c1"]
        for i in range(len(ds)):
            x, y = ds[i]
            assert x.shape == (3, 32, 32) and x.dtype == torch.float32
            assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
            assert y == fine[i]
            assert torch.equal(torch.round(x * 255).to(torch.uint8), torch.from_numpy(images[i]))
    # Red channel really is the first 1024 bytes of the row.
    ds = Cifar100Dataset(tmp_path / "cifar-100-python", train=True)
    raw = written["train"][0][0].reshape(3072)
    assert torch.equal(torch.round(ds[0][0][0] * 255).to(torch.uint8).flatten(), torch.from_numpy(raw[:1024]))


def test_cifar100_transform_applied(tmp_path: Path) -> None:
    _write_cifar(tmp_path)
    ds = Cifar100Dataset(tmp_path, train=False, transform=lambda x: x[:, :8, :8])
    assert ds[0][0].shape == (3, 8, 8)


def test_cifar100_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="cifar-100-python"):
        Cifar100Dataset(tmp_path / "nowhere")


# ------------------------------------------------------------------ ImageFolder


def test_image_folder(tmp_path: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(1)
    arrays = {}
    for cls, n in (("zebra", 2), ("ant", 3)):
        (tmp_path / cls).mkdir()
        for i in range(n):
            arr = rng.integers(0, 256, size=(6, 10, 3), dtype=np.uint8)  # H=6, W=10
            Image.fromarray(arr).save(tmp_path / cls / f"{i}.png")
            arrays[(cls, i)] = arr
    (tmp_path / "ant" / "notes.txt").write_text("not an image")
    ds = ImageFolderDataset(tmp_path)
    assert ds.classes == ["ant", "zebra"]
    assert ds.class_to_idx == {"ant": 0, "zebra": 1}
    assert len(ds) == 5 and ds.targets == [0, 0, 0, 1, 1]
    x, y = ds[3]
    assert x.shape == (3, 6, 10) and x.dtype == torch.float32 and y == 1
    expected = torch.from_numpy(arrays[("zebra", 0)]).permute(2, 0, 1)
    assert torch.equal(torch.round(x * 255).to(torch.uint8), expected)
    gray = ImageFolderDataset(tmp_path, mode="L", transform=lambda t: t * 0.5)
    xg, _ = gray[0]
    assert xg.shape == (1, 6, 10) and float(xg.max()) <= 0.5


def test_image_folder_empty(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        ImageFolderDataset(tmp_path)
    (tmp_path / "a").mkdir()
    with pytest.raises(ValueError):
        ImageFolderDataset(tmp_path)


# ------------------------------------------------------------------ augmentations


def _img(c: int = 3, h: int = 32, w: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(c, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 8, 8), (3, 12, 20)])
def test_augment_shapes_ranges_determinism(shape: tuple[int, int, int]) -> None:
    x = _img(*shape)
    size = (shape[1], shape[2])
    for t in (
        RandomCropFlip(size),
        Cutout(4),
        RandAugmentLite(),
        weak_augment(size),
        strong_augment(size),
    ):
        for seed in range(5):
            a = t(x, generator=torch.Generator().manual_seed(seed))
            b = t(x, generator=torch.Generator().manual_seed(seed))
            assert a.shape == x.shape, type(t).__name__
            assert torch.equal(a, b)
            assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    assert x.shape == shape and torch.equal(x, _img(*shape))  # inputs never modified in place


def test_augments_change_images_and_crop_size() -> None:
    x = _img()
    gen = torch.Generator().manual_seed(0)
    outs = [strong_augment(32)(x, generator=gen) for _ in range(4)]
    assert all(not torch.equal(o, x) for o in outs)
    assert not torch.equal(outs[0], outs[1])
    assert RandomCropFlip(24)(x).shape == (3, 24, 24)
    assert RandomCropFlip(40, padding=0)(x).shape == (3, 40, 40)


def test_augment_identities() -> None:
    x = _img()
    g = torch.Generator().manual_seed(0)
    assert torch.equal(RandomCropFlip(32, padding=0, flip_p=0.0)(x, generator=g), x)
    assert torch.equal(RandomCropFlip(32, padding=0, flip_p=1.0)(x, generator=g), x.flip(-1))
    assert torch.equal(Cutout(0)(x, generator=g), x)
    assert torch.equal(Cutout(8, p=0.0)(x, generator=g), x)
    assert torch.equal(RandAugmentLite(num_ops=0)(x, generator=g), x)
    ra0 = RandAugmentLite(num_ops=3, magnitude=0)
    for _ in range(10):
        torch.testing.assert_close(ra0(x, generator=g), x, atol=1e-5, rtol=0)
    for op in RandAugmentLite.ops:
        torch.testing.assert_close(ra0.apply_op(x, op, 0.0), x, atol=1e-5, rtol=0)
        y = ra0.apply_op(x, op, 0.9)
        assert y.shape == x.shape and not torch.equal(y, x), op
    with pytest.raises(ValueError):
        RandAugmentLite(magnitude=11)


def test_cutout_zeroes_square() -> None:
    x = torch.ones(3, 16, 16)
    y = Cutout(4)(x, generator=torch.Generator().manual_seed(0))
    zeros = int((y == 0).all(0).sum())
    assert 1 <= zeros <= 16 and torch.all((y == 0) | (y == 1))


# ------------------------------------------------------------------ loaders


def _batches(loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in loader]


def test_loader_determinism_with_seed() -> None:
    ds = load_digits_dataset("val")
    kw = dict(batch_size=32, shuffle=True, transform=strong_augment(8, padding=1))
    a = _batches(make_loader(ds, seed=5, **kw))
    b = _batches(make_loader(ds, seed=5, **kw))
    c = _batches(make_loader(ds, seed=6, **kw))
    assert len(a) == len(b) == int(np.ceil(len(ds) / 32))
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b, strict=True))
    assert not all(torch.equal(ya, yc) for (_, ya), (_, yc) in zip(a, c, strict=True))
    x, y = a[0]
    assert x.shape == (32, 1, 8, 8) and y.dtype == torch.long
    assert float(x.min()) >= 0 and float(x.max()) <= 1


def test_loader_no_transform_and_drop_last() -> None:
    xs = torch.arange(10, dtype=torch.float32).view(10, 1, 1, 1).expand(10, 1, 8, 8).contiguous()
    ds = TensorDataset(xs, torch.arange(10))
    batches = _batches(make_loader(ds, batch_size=4, shuffle=False, seed=0, drop_last=True))
    assert len(batches) == 2
    assert torch.equal(batches[0][1], torch.arange(4)) and torch.equal(batches[0][0], xs[:4])
    plain = _batches(make_loader(ds, batch_size=4, shuffle=False, seed=0, transform=lambda t: t + 1))
    assert len(plain) == 3 and torch.equal(plain[2][0], xs[8:] + 1)


def test_loader_workers_deterministic() -> None:
    ds = load_digits_dataset("val")
    kw = dict(batch_size=128, shuffle=True, seed=2, num_workers=2, transform=weak_augment(8, padding=2))
    a = _batches(make_loader(ds, **kw))
    b = _batches(make_loader(ds, **kw))
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b, strict=True))


# ----------------------------------------------------------------------------------- resize and crops


def test_resize_shorter_side_and_exact():
    x = torch.rand(3, 20, 40)
    assert Resize(10)(x).shape == (3, 10, 20)
    assert Resize((7, 9))(x).shape == (3, 7, 9)
    flat = torch.full((1, 16, 16), 0.25)
    torch.testing.assert_close(Resize(8)(flat), torch.full((1, 8, 8), 0.25))


def test_center_crop_takes_the_middle_and_pads_small_images():
    x = torch.arange(36.0).view(1, 6, 6)
    torch.testing.assert_close(CenterCrop(2)(x), x[:, 2:4, 2:4])
    assert CenterCrop(8)(x).shape == (1, 8, 8)
    assert CenterCrop(8)(x)[0, 0, 0] == 0 and CenterCrop(8)(x)[0, 1, 1] == x[0, 0, 0]


def test_random_resized_crop_is_seeded_and_sized():
    x = torch.rand(3, 50, 70)
    t = RandomResizedCrop(24)
    a = t(x, generator=torch.Generator().manual_seed(3))
    b = t(x, generator=torch.Generator().manual_seed(3))
    c = t(x, generator=torch.Generator().manual_seed(4))
    assert a.shape == (3, 24, 24)
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, c)
    full = RandomResizedCrop(10, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0)(torch.rand(1, 10, 10))
    assert full.shape == (1, 10, 10)


def test_normalize_checks_channels():
    x = torch.rand(3, 4, 4)
    out = Normalize([0.5, 0.5, 0.5], [0.25, 0.25, 0.25])(x)
    torch.testing.assert_close(out, (x - 0.5) / 0.25)
    with pytest.raises(ValueError, match="channels"):
        Normalize([0.5], [0.2])(x)


# ----------------------------------------------------------------------------------- multi-view


def test_flip_p_of_weak_and_strong_augment() -> None:
    x = _img(1, 8, 8)
    assert weak_augment(8).transforms[0].flip_p == 0.5 and strong_augment(8).transforms[0].flip_p == 0.5
    for seed in range(20):  # no flip: every output is a (zero-filled) shift of x by at most one pixel
        y = weak_augment(8, padding=1, flip_p=0.0)(x, generator=torch.Generator().manual_seed(seed))
        padded = torch.nn.functional.pad(x, (1, 1, 1, 1))
        assert any(torch.equal(y, padded[:, a : a + 8, b : b + 8]) for a in range(3) for b in range(3))
    assert strong_augment(8, padding=1, flip_p=0.0).transforms[0].flip_p == 0.0
    flipped = weak_augment(8, padding=0, flip_p=1.0)(x, generator=torch.Generator().manual_seed(0))
    assert torch.equal(flipped, x.flip(-1))


def test_multiview_transform() -> None:
    x = _img(1, 8, 8)
    mv = MultiView({"a": None, "b": strong_augment(8, padding=1), "c": strong_augment(8, padding=1)})
    assert mv.names == ["a", "b", "c"]
    out = mv(x, generator=torch.Generator().manual_seed(0))
    assert list(out) == ["a", "b", "c"] and torch.equal(out["a"], x)
    assert not torch.equal(out["b"], out["c"])  # independent draws
    again = mv(x, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(out[k], again[k]) for k in out)
    # the views are drawn in order from the one generator: view b equals a single-view draw of b
    g = torch.Generator().manual_seed(0)
    assert torch.equal(out["b"], strong_augment(8, padding=1)(x, generator=g))
    with pytest.raises(ValueError, match="non-empty mapping"):
        MultiView({})
    with pytest.raises(ValueError, match="non-empty strings"):
        MultiView({"": None})
    with pytest.raises(TypeError, match="callable or None"):
        MultiView({"a": 3})


def test_multiview_loader_workers_deterministic_and_shape_errors() -> None:
    ds = load_digits_dataset("val")
    mv = MultiView({"student": weak_augment(8, padding=1), "teacher0": strong_augment(8, padding=1)})
    kw = dict(batch_size=128, shuffle=True, seed=2, num_workers=2, transform=mv)
    a = [(dict(x), y) for x, y in make_loader(ds, **kw)]
    b = [(dict(x), y) for x, y in make_loader(ds, **kw)]
    assert len(a) == len(b) == 4
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert torch.equal(ya, yb) and list(xa) == ["student", "teacher0"]
        assert all(torch.equal(xa[k], xb[k]) for k in xa)
    # views may differ in shape from each other, not within a view
    sizes = MultiView({"small": RandomCropFlip(6, padding=0), "full": None})
    x, _ = next(iter(make_loader(ds, 4, False, 0, transform=sizes)))
    assert x["small"].shape == (4, 1, 6, 6) and x["full"].shape == (4, 1, 8, 8)
    ragged = TensorDataset(torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.long))
    calls = iter([6, 7])
    bad = MultiView({"v": lambda t: t[:, : next(calls)]})
    with pytest.raises(ValueError, match=r"view 'v' has different shapes in one batch"):
        next(iter(make_loader(ragged, 2, False, 0, transform=bad)))
