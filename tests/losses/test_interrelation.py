"""Category interrelations, the WKD-L cost, streamed accumulation and storage."""

from __future__ import annotations

import pytest
import torch

from ckakd import reference as R
from ckakd.interrelation import (
    InterrelationBuilder,
    cost_from_interrelation,
    interrelation,
    interrelation_from_loader,
    load_interrelation,
    save_interrelation,
)
from tests.conftest import TOLERANCES

f64 = torch.float64
FEATURE_KERNELS = ["cka", "poly", "rbf", "centroid"]


def _class_features(c=5, b=9, d=6, dtype=torch.float32):
    shared = torch.randn(1, b, d, dtype=f64)  # correlated classes: IR well away from 0
    return (torch.randn(c, b, d, dtype=f64) + shared * torch.rand(c, 1, 1, dtype=f64) * 2).to(dtype)


def _close(actual, expected, dtype):
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol, check_dtype=False)


# --------------------------------------------------------------------------------------------- interrelation


@pytest.mark.parametrize("dtype", [f64, torch.float32])
@pytest.mark.parametrize("kernel", FEATURE_KERNELS)
def test_interrelation_vs_reference(kernel, dtype):
    x = _class_features(dtype=dtype)
    ir = interrelation(x, kernel=kernel)
    assert ir.shape == (5, 5) and ir.dtype == dtype
    _close(ir, R.interrelation(x.double(), kernel=kernel), dtype)


def test_interrelation_cka_pairs_are_reference_cka():
    x = _class_features(c=4, b=7, d=11, dtype=f64)
    ir = interrelation(x)
    for i in range(4):
        for j in range(4):
            if i != j:
                assert ir[i, j].item() == pytest.approx(R.cka(x[i], x[j]).item(), abs=1e-12)


@pytest.mark.parametrize("degree", [1, 3])
def test_interrelation_poly_degree(degree):
    x = _class_features(dtype=f64)
    _close(interrelation(x, kernel="poly", degree=degree), R.interrelation(x, kernel="poly", degree=degree), f64)


def test_interrelation_rbf_with_duplicate_rows():
    x = _class_features(c=3, b=6, d=4, dtype=f64)
    x[0, 1] = x[0, 0]  # a zero distance: excluded from the median
    x[1, 2:4] = x[1, 0:2]
    _close(interrelation(x, kernel="rbf"), R.interrelation(x, kernel="rbf"), f64)


def test_interrelation_cosine_vs_reference():
    w = torch.randn(7, 12)
    ir = interrelation(w, kernel="cosine")
    _close(ir, R.interrelation(w.double(), kernel="cosine"), torch.float32)


@pytest.mark.parametrize("kernel", FEATURE_KERNELS + ["cosine"])
def test_interrelation_symmetric_unit_diagonal(kernel):
    x = torch.randn(6, 5) if kernel == "cosine" else _class_features(c=6)
    ir = interrelation(x, kernel=kernel)
    torch.testing.assert_close(ir, ir.T, atol=0, rtol=0)
    torch.testing.assert_close(ir.diagonal(), torch.ones(6))
    assert (ir.abs() <= 1).all()


def test_interrelation_cka_offset_invariant_fp32():
    x = _class_features(c=4, b=16, d=8, dtype=f64)
    ref = R.interrelation(x, kernel="cka")
    shifted = interrelation((x + 1000).float(), kernel="cka").double()
    assert ((shifted - ref).abs().max() / ref.abs().max()).item() < 1e-5


def test_interrelation_constant_class_is_finite():
    x = _class_features(c=3)
    x[1] = 4.0
    ir = interrelation(x)
    assert torch.isfinite(ir).all()
    assert ir[0, 1].item() == 0.0 and ir[1, 1].item() == 1.0


def test_interrelation_bad_inputs():
    with pytest.raises(ValueError, match=r"class_features must have shape \(C, b, d\).*got \(5, 4\)"):
        interrelation(torch.randn(5, 4))
    with pytest.raises(ValueError, match=r"class_features must have shape \(C, d\).*got \(5, 4, 3\)"):
        interrelation(torch.randn(5, 4, 3), kernel="cosine")
    with pytest.raises(TypeError, match="class_features must have a floating-point dtype"):
        interrelation(torch.ones(3, 4, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="kernel must be one of"):
        interrelation(torch.randn(3, 4, 2), kernel="linear")
    with pytest.raises(ValueError, match=r"at least 2 samples per class.*\(3, 1, 2\)"):
        interrelation(torch.randn(3, 1, 2))
    with pytest.raises(ValueError, match="degree must be a positive int"):
        interrelation(torch.randn(3, 4, 2), kernel="poly", degree=0)


# --------------------------------------------------------------------------------------------- cost


def test_cost_from_interrelation_vs_reference_and_properties():
    ir = interrelation(_class_features(c=6, dtype=f64))
    ir[0, 1] = ir[1, 0] = 1.0 + 1e-9  # rounding above 1: relu keeps the cost nonnegative
    cost = cost_from_interrelation(ir)
    _close(cost, R.cost_from_interrelation(ir), f64)
    torch.testing.assert_close(cost.diagonal(), torch.full((6,), 1e-8, dtype=f64), atol=1e-12, rtol=0)
    assert (cost >= 1e-8).all() and (cost < 1).all()
    sharper = cost_from_interrelation(ir, sharpen=2.0)
    _close(sharper, R.cost_from_interrelation(ir, sharpen=2.0), f64)
    off = ~torch.eye(6, dtype=torch.bool)
    assert (sharper[off] >= cost[off]).all() and (sharper[off] > cost[off]).any()


def test_cost_from_interrelation_bad_inputs():
    with pytest.raises(ValueError, match=r"ir must be a square \(C, C\) matrix, got \(3, 4\)"):
        cost_from_interrelation(torch.rand(3, 4))
    with pytest.raises(ValueError, match=r"square.*\(3,\)"):
        cost_from_interrelation(torch.rand(3))
    for sharpen in (0.0, -1.0):
        with pytest.raises(ValueError, match="sharpen must be > 0"):
            cost_from_interrelation(torch.eye(3), sharpen=sharpen)


# --------------------------------------------------------------------------------------------- builder


def _stream(c=4, per_class=10, d=5, seed=0):
    """A shuffled stream of (features, labels) rows with `per_class` rows of every class."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(c).repeat_interleave(per_class)[torch.randperm(c * per_class, generator=g)]
    feats = torch.randn(c * per_class, d, generator=g) + labels[:, None].float()
    return feats, labels


def _first_rows(feats, labels, c, b):
    return torch.stack([feats[labels == k][:b] for k in range(c)])


@pytest.mark.parametrize("kernel", ["cka", "rbf"])
def test_builder_streamed_equals_one_shot(kernel):
    feats, labels = _stream()
    builder = InterrelationBuilder(4, kernel=kernel, samples_per_class=6)
    for i in range(0, feats.shape[0], 7):
        builder.update(feats[i : i + 7], labels[i : i + 7])
    assert builder.is_full and builder.counts.tolist() == [6] * 4
    expected = interrelation(_first_rows(feats, labels, 4, 6), kernel=kernel)
    torch.testing.assert_close(builder.compute(), expected, atol=0, rtol=0)


def test_builder_centroid_uses_all_rows():
    feats, labels = _stream(per_class=10)
    feats, labels = feats[:-5], labels[:-5]  # unequal counts are fine for centroids
    builder = InterrelationBuilder(4, kernel="centroid")
    for i in range(0, feats.shape[0], 8):
        builder.update(feats[i : i + 8], labels[i : i + 8])
    assert not builder.is_full
    means = torch.stack([feats[labels == k].double().mean(0) for k in range(4)])
    ir = builder.compute()
    assert ir.dtype == torch.float32
    _close(ir, R.interrelation(means.unsqueeze(1), kernel="centroid"), torch.float32)


def test_builder_spatial_layout():
    maps = torch.randn(6, 3, 2, 2)
    labels = torch.tensor([0, 1, 0, 1, 1, 0])
    builder = InterrelationBuilder(2, samples_per_class=8, feature_layout="spatial")
    builder.update(maps[:3], labels[:3])
    builder.update(maps[3:], labels[3:])
    rows = maps.permute(0, 2, 3, 1).reshape(-1, 3)
    row_labels = labels.repeat_interleave(4)
    expected = interrelation(_first_rows(rows, row_labels, 2, 8))
    torch.testing.assert_close(builder.compute(), expected, atol=0, rtol=0)
    with pytest.raises(ValueError, match=r"features must have shape \(N, C, H, W\).*\(6, 12\)"):
        builder.update(maps.reshape(6, -1), labels)
    rows_builder = InterrelationBuilder(2)
    with pytest.raises(ValueError, match=r"features must have shape \(N, d\).*feature_layout='spatial'"):
        rows_builder.update(maps, labels)


def test_builder_too_few_samples_names_classes():
    feats, labels = _stream(c=5, per_class=4)
    keep = labels != 3
    feats, labels = feats[keep], labels[keep]
    labels[labels == 1] = 0  # class 1 now empty too, class 0 has 8 rows
    builder = InterrelationBuilder(5, samples_per_class=4)
    builder.update(feats, labels)
    with pytest.raises(ValueError, match=r"needs 4 rows per class.*fewer: 1, 3 \(counts \[0, 0\]\)"):
        builder.compute()
    with pytest.raises(ValueError, match="fewer: 0, 1, 2"):
        InterrelationBuilder(3, samples_per_class=4).compute()


def test_builder_bad_inputs():
    builder = InterrelationBuilder(3, samples_per_class=2)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\), got 3, 7"):
        builder.update(torch.randn(3, 4), torch.tensor([0, 3, 7]))
    with pytest.raises(TypeError, match="labels must be a 1-D integer tensor"):
        builder.update(torch.randn(3, 4), torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match=r"same batch size N.*\(3, 4\) and \(2,\)"):
        builder.update(torch.randn(3, 4), torch.tensor([0, 1]))
    builder.update(torch.randn(3, 4), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="dimension 5, but earlier batches had 4"):
        builder.update(torch.randn(3, 5), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="cosine"):
        InterrelationBuilder(3, kernel="cosine")
    with pytest.raises(ValueError, match="samples_per_class must be an int >= 2"):
        InterrelationBuilder(3, samples_per_class=1)
    with pytest.raises(ValueError, match="feature_layout must be one of"):
        InterrelationBuilder(3, feature_layout="channels")


def test_builder_state_dict_roundtrip():
    feats, labels = _stream()
    one = InterrelationBuilder(4, samples_per_class=6)
    one.update(feats[:20], labels[:20])
    two = InterrelationBuilder(4, samples_per_class=6)
    two.load_state_dict(one.state_dict())
    for b in (one, two):
        b.update(feats[20:], labels[20:])
    torch.testing.assert_close(one.compute(), two.compute(), atol=0, rtol=0)
    with pytest.raises(ValueError, match="samples_per_class=6"):
        InterrelationBuilder(4, samples_per_class=5).load_state_dict(one.state_dict())


# --------------------------------------------------------------------------------------------- loader


class _CountingLoader:
    """A list of (x, y) batches that records how many were consumed."""

    def __init__(self, batches):
        self.batches, self.consumed = batches, 0

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        for batch in self.batches:
            self.consumed += 1
            yield batch


def _batches(feats, labels, size):
    return [(feats[i : i + size], labels[i : i + size]) for i in range(0, feats.shape[0], size)]


@pytest.mark.parametrize("progress", [True, False])
def test_from_loader_matches_builder_and_stops_early(progress):
    feats, labels = _stream(per_class=30)
    proj = torch.nn.Linear(5, 3)
    loader = _CountingLoader(_batches(feats, labels, 10))
    ir = interrelation_from_loader(proj, loader, 4, samples_per_class=5, progress=progress, device="cpu")
    assert loader.consumed < len(loader)
    with torch.no_grad():
        expected = interrelation(_first_rows(proj(feats), labels, 4, 5))
    torch.testing.assert_close(ir, expected, atol=0, rtol=0)


def test_from_loader_centroid_reads_everything():
    feats, labels = _stream(per_class=8)
    loader = _CountingLoader(_batches(feats, labels, 6))
    ir = interrelation_from_loader(lambda x: x, loader, 4, kernel="centroid", progress=False)
    assert loader.consumed == len(loader)
    means = torch.stack([feats[labels == k].mean(0) for k in range(4)])
    torch.testing.assert_close(ir, interrelation(means.unsqueeze(1), kernel="centroid"))


def test_from_loader_errors():
    with pytest.raises(ValueError, match="loader yielded no batches"):
        interrelation_from_loader(lambda x: x, [], 3, progress=False)
    feats, labels = _stream(c=3, per_class=2)
    with pytest.raises(ValueError, match=r"fewer: 0, 1, 2"):
        interrelation_from_loader(lambda x: x, _batches(feats, labels, 4), 3, samples_per_class=5, progress=False)


# --------------------------------------------------------------------------------------------- storage


def test_save_load_roundtrip(tmp_path):
    ir = interrelation(_class_features())
    path = tmp_path / "ir.pt"
    save_interrelation(path, ir, kernel="cka", teacher="resnet32x4", samples_per_class=9, layers=["layer4"])
    loaded, meta = load_interrelation(path)
    torch.testing.assert_close(loaded, ir, atol=0, rtol=0)
    assert meta == {"kernel": "cka", "teacher": "resnet32x4", "samples_per_class": 9, "layers": ["layer4"]}
    assert [p.name for p in tmp_path.iterdir()] == ["ir.pt"]  # no temporary file left behind


def test_load_wrong_files(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torch file at all")
    with pytest.raises(ValueError, match="is not a ckakd interrelation file"):
        load_interrelation(junk)
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(ValueError, match="missing format tag"):
        load_interrelation(other)
    newer = tmp_path / "newer.pt"
    torch.save({"format": "ckakd.interrelation", "version": 99, "ir": torch.eye(3), "num_classes": 3}, newer)
    with pytest.raises(ValueError, match="format version 99"):
        load_interrelation(newer)
    bad = tmp_path / "bad.pt"
    torch.save({"format": "ckakd.interrelation", "version": 1, "ir": torch.rand(3, 4), "num_classes": 3}, bad)
    with pytest.raises(ValueError, match=r"expected a \(3, 3\) interrelation matrix, found \(3, 4\)"):
        load_interrelation(bad)
    with pytest.raises(FileNotFoundError):
        load_interrelation(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match=r"ir must be a square"):
        save_interrelation(tmp_path / "x.pt", torch.rand(2, 3))
    with pytest.raises(TypeError, match="meta value 'model' has type Linear"):
        save_interrelation(tmp_path / "x.pt", torch.eye(2), model=torch.nn.Linear(2, 2))
