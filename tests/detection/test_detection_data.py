"""Synthetic digits detection, the COCO-format loader, box-aware transforms and the detection loader."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

from ckakd.detection.data import (  # noqa: E402
    DIGIT_ALPHA_MIN,
    MIN_VISIBLE_FRACTION,
    CocoDetection,
    ComposeBoxes,
    RandomHorizontalFlipBoxes,
    ResizeBoxes,
    SyntheticDigitsDetection,
    detection_collate,
    digit_alpha,
    make_detection_loader,
)


def _save_png(image: torch.Tensor, path) -> None:
    arr = (image.permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)
    Image.fromarray(arr).save(path)


# ---- synthetic dataset ---------------------------------------------------------------------------


def test_synthetic_is_deterministic_and_seed_dependent():
    a = SyntheticDigitsDetection(num_images=4, seed=1)
    b = SyntheticDigitsDetection(num_images=4, seed=1)
    c = SyntheticDigitsDetection(num_images=4, seed=2)
    for i in range(4):
        (xa, ta), (xb, tb) = a[i], b[i]
        assert torch.equal(xa, xb) and torch.equal(ta["boxes"], tb["boxes"]) and torch.equal(ta["labels"], tb["labels"])
    assert not torch.equal(a[0][0], c[0][0])
    assert a.to_coco() == b.to_coco()


def test_single_object_box_is_tight_bounds_of_the_pasted_digit():
    ds = SyntheticDigitsDetection(num_images=12, min_objects=1, max_objects=1, seed=5)
    for i in range(len(ds)):
        image, target, placements, background = ds.render(i)
        assert len(placements) == 1 and placements[0].kept
        p = placements[0]
        # independent re-render: where the image differs from the bare canvas is exactly the digit
        changed = ((image - background).abs().amax(0) > 1e-6).nonzero()
        ys, xs = changed[:, 0], changed[:, 1]
        expected = torch.tensor([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=torch.float32)
        assert torch.equal(target["boxes"], expected)
        # and it is the composite of the bilinearly upsampled digit at the recorded place and colour
        digit = ds.digits[p.digit_index]
        alpha = F.interpolate(digit[None, None], size=(p.scale, p.scale), mode="bilinear", align_corners=False)[0, 0]
        alpha = torch.where(alpha >= DIGIT_ALPHA_MIN, alpha.clamp(0, 1), torch.zeros_like(alpha))
        region = background[:, p.top : p.top + p.scale, p.left : p.left + p.scale]
        composite = region * (1 - alpha) + alpha * torch.tensor(p.color).view(3, 1, 1)
        assert torch.allclose(image[:, p.top : p.top + p.scale, p.left : p.left + p.scale], composite, atol=1e-6)
        assert target["labels"].tolist() == [int(ds.digit_labels[p.digit_index])]
        assert ds.scales[0] <= p.scale <= ds.scales[1]


@pytest.mark.parametrize("occlusion", [True, False])
def test_synthetic_targets_are_valid(occlusion):
    ds = SyntheticDigitsDetection(
        num_images=30, image_size=(96, 112), min_objects=2, max_objects=4, seed=0, scales=(16, 40), occlusion=occlusion
    )
    dropped = 0
    for i in range(len(ds)):
        image, target, placements, _ = ds.render(i)
        assert image.shape == (3, 96, 112) and image.dtype == torch.float32
        assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
        boxes, labels = target["boxes"], target["labels"]
        assert 2 <= len(labels) <= 4 and boxes.shape == (len(labels), 4) and labels.dtype == torch.long
        assert ((labels >= 0) & (labels < 10)).all()
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
        assert (boxes[:, 2] <= 112).all() and (boxes[:, 3] <= 96).all()
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
        assert target["image_id"] == i and target["orig_size"] == (96, 112)
        dropped += sum(not p.kept for p in placements)
        if not occlusion:
            for a in range(len(boxes)):
                for b in range(a + 1, len(boxes)):
                    lo = torch.maximum(boxes[a, :2], boxes[b, :2])
                    hi = torch.minimum(boxes[a, 2:], boxes[b, 2:])
                    assert ((hi - lo) <= 0).any(), "boxes overlap with occlusion=False"
    if not occlusion:
        assert dropped == 0


def test_occluded_digits_are_dropped_and_visible_ones_kept():
    ds = SyntheticDigitsDetection(num_images=25, min_objects=1, max_objects=4, scales=(40, 64), seed=0)
    n_dropped = 0
    for i in range(len(ds)):
        _, target, placements, _ = ds.render(i)
        kept = [p for p in placements if p.kept]
        n_dropped += len(placements) - len(kept)
        assert [list(p.box) for p in kept] == target["boxes"].int().tolist()
        assert placements[-1].kept  # the top digit is never covered
        masks = []
        for p in placements:  # every placed digit is drawn, kept or not
            m = torch.zeros(128, 128, dtype=torch.bool)
            m[p.top : p.top + p.scale, p.left : p.left + p.scale] = digit_alpha(ds.digits[p.digit_index], p.scale) > 0
            masks.append(m)
        for k, p in enumerate(placements):
            visible = masks[k].clone()
            for later in masks[k + 1 :]:
                visible &= ~later
            fraction = visible.sum().item() / masks[k].sum().item()
            assert (fraction >= MIN_VISIBLE_FRACTION) == p.kept, (i, k, fraction)
    assert n_dropped > 0  # big digits on a crowded canvas: some get covered


def test_train_and_val_use_disjoint_digits():
    train = SyntheticDigitsDetection(num_images=1, split="train")
    val = SyntheticDigitsDetection(num_images=1, split="val")
    flat_t = {tuple(d.flatten().tolist()) for d in train.digits}
    flat_v = {tuple(d.flatten().tolist()) for d in val.digits}
    assert len(train.digits) + len(val.digits) == 1797
    # sklearn digits has a handful of exact duplicate images; the index split is disjoint
    assert len(flat_t & flat_v) <= 5
    with pytest.raises(ValueError, match="split"):
        SyntheticDigitsDetection(split="test")
    with pytest.raises(ValueError, match="min_objects"):
        SyntheticDigitsDetection(min_objects=3, max_objects=2)


def test_to_coco_round_trip_through_coco_detection(tmp_path):
    ds = SyntheticDigitsDetection(num_images=5, seed=4, split="val")
    coco = ds.to_coco()
    assert {"images", "annotations", "categories"} <= set(coco)
    assert all(a["iscrowd"] == 0 and a["id"] >= 1 for a in coco["annotations"])
    images = tmp_path / "images"
    images.mkdir()
    for i in range(len(ds)):
        _save_png(ds[i][0], images / ds.file_name(i))
    ann = tmp_path / "instances.json"
    ann.write_text(json.dumps(coco))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # clean data: no warning
        loaded = CocoDetection(images, ann)
    assert len(loaded) == len(ds) and loaded.num_classes == 10
    assert loaded.cat_id_to_label == ds.cat_id_to_label and loaded.label_to_cat_id == ds.label_to_cat_id
    for i in range(len(ds)):
        x, t = loaded[i]
        x0, t0 = ds[i]
        assert x.shape == x0.shape and torch.allclose(x, x0, atol=1 / 255 + 1e-6)
        assert torch.allclose(t["boxes"], t0["boxes"], atol=1e-4)
        assert torch.equal(t["labels"], t0["labels"])
        assert t["image_id"] == t0["image_id"] and t["orig_size"] == t0["orig_size"]
    assert all(v == 0 for v in loaded.skipped.values())


# ---- COCO loader: bad input ----------------------------------------------------------------------


def _write_bad_coco(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    Image.fromarray(np.full((40, 50, 3), 128, np.uint8)).save(root / "a.png")  # H 40, W 50
    Image.fromarray(np.zeros((30, 30), np.uint8)).save(root / "gray.png")  # grayscale: loaded as RGB
    (root / "broken.png").write_bytes(b"this is not an image")
    data = {
        "images": [
            {"id": 1, "file_name": "a.png", "height": 40, "width": 50},
            {"id": 2, "file_name": "gray.png", "height": 30, "width": 30},
            {"id": 3, "file_name": "broken.png", "height": 10, "width": 10},
        ],
        "categories": [{"id": 9, "name": "x"}, {"id": 4, "name": "y"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 4, "bbox": [5, 5, 10, 10]},  # fine, label 0 (id 4 < 9)
            {"id": 2, "image_id": 1, "category_id": 9, "bbox": [45, 30, 20, 20]},  # clipped to [45, 30, 50, 40]
            {"id": 3, "image_id": 1, "category_id": 9, "bbox": [60, 5, 5, 5]},  # fully outside: dropped
            {"id": 4, "image_id": 1, "category_id": 9, "bbox": [5, 5, 0, 7]},  # zero width: dropped
            {"id": 5, "image_id": 1, "category_id": 77, "bbox": [5, 5, 5, 5]},  # unknown category: dropped
            {"id": 6, "image_id": 2, "category_id": 9, "bbox": [-4, -4, 10, 10]},  # clipped to [0, 0, 6, 6]
            {"id": 7, "image_id": 3, "category_id": 9, "bbox": [1, 1, 2, 2]},  # on the undecodable image
        ],
    }
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(data))
    return root, ann


def test_coco_bad_input_is_counted_with_one_warning(tmp_path):
    root, ann = _write_bad_coco(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = CocoDetection(root, ann)
    assert len(caught) == 1
    msg = str(caught[0].message)
    for kind in ("clipped_box=2", "outside_box=1", "degenerate_box=1", "unknown_category=1", "undecodable_image=1"):
        assert kind in msg
    assert ds.skipped["clipped_box"] == 2 and ds.skipped["outside_box"] == 1
    assert ds.skipped["degenerate_box"] == 1 and ds.skipped["unknown_category"] == 1
    assert ds.skipped["undecodable_image"] == 1
    assert len(ds) == 2 and ds.image_ids == [1, 2]
    x, t = ds[0]
    assert x.shape == (3, 40, 50) and torch.allclose(x, torch.full_like(x, 128 / 255))
    assert t["boxes"].tolist() == [[5.0, 5.0, 15.0, 15.0], [45.0, 30.0, 50.0, 40.0]]
    assert t["labels"].tolist() == [0, 1] and t["orig_size"] == (40, 50) and t["image_id"] == 1
    x, t = ds[1]
    assert x.shape == (3, 30, 30) and t["boxes"].tolist() == [[0.0, 0.0, 6.0, 6.0]]


def test_coco_truncated_image_is_skipped_at_load_time(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    Image.fromarray(np.full((20, 20, 3), 50, np.uint8)).save(root / "ok.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(root / "t.png")
    data = (root / "t.png").read_bytes()
    (root / "t.png").write_bytes(data[: len(data) // 2])  # the header reads, the pixels do not
    ann = tmp_path / "ann.json"
    images = [{"id": 1, "file_name": "t.png"}, {"id": 2, "file_name": "ok.png"}]
    boxes = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 4, 4]}]  # on t.png only
    ann.write_text(json.dumps({"images": images, "annotations": boxes, "categories": [{"id": 1}]}))
    ds = CocoDetection(root, ann)
    assert len(ds) == 2
    with pytest.warns(UserWarning, match="could not decode"):
        x, t = ds[0]
    assert t["image_id"] == 2 and x.shape == (3, 20, 20) and ds.skipped["undecodable_image"] == 1
    assert t["boxes"].shape == (0, 4) and t["labels"].shape == (0,)


def test_coco_missing_and_malformed_inputs(tmp_path):
    root, ann = _write_bad_coco(tmp_path)
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        CocoDetection(tmp_path / "no_such_dir", ann)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        CocoDetection(root, tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(ValueError, match="'categories'"):
        CocoDetection(root, bad)
    one_box = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1]}]
    bad.write_text(json.dumps({"images": [{"id": 1}], "annotations": one_box, "categories": [{"id": 1}]}))
    with pytest.raises(ValueError, match="'file_name'"):
        CocoDetection(root, bad)
    images = [{"id": 1, "file_name": "a.png"}]
    no_cat = [{"image_id": 1, "bbox": [0, 0, 1, 1]}]
    bad.write_text(json.dumps({"images": images, "annotations": no_cat, "categories": [{"id": 1}]}))
    with pytest.raises(ValueError, match="'category_id'"):
        CocoDetection(root, bad)
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        CocoDetection(root, bad)


# ---- transforms, collate, loader -----------------------------------------------------------------


def _sample(h: int = 30, w: int = 40):
    image = torch.rand(3, h, w, generator=torch.Generator().manual_seed(0))
    target = {
        "boxes": torch.tensor([[2.0, 3.0, 12.0, 20.0], [30.0, 0.0, 40.0, 30.0]]),
        "labels": torch.tensor([1, 2]),
        "image_id": 7,
        "orig_size": (h, w),
    }
    return image, target


def test_flip_moves_boxes_and_twice_is_identity():
    image, target = _sample()
    flip = RandomHorizontalFlipBoxes(p=1.0)
    x1, t1 = flip(image, target)
    assert torch.equal(x1, image.flip(-1))
    assert t1["boxes"].tolist() == [[28.0, 3.0, 38.0, 20.0], [0.0, 0.0, 10.0, 30.0]]
    # the flipped box covers the flipped pixels
    assert torch.equal(x1[:, 3:20, 28:38], image[:, 3:20, 2:12].flip(-1))
    x2, t2 = flip(x1, t1)
    assert torch.equal(x2, image) and torch.equal(t2["boxes"], target["boxes"])
    x0, t0 = RandomHorizontalFlipBoxes(p=0.0)(image, target)
    assert x0 is image and torch.equal(t0["boxes"], target["boxes"])
    assert target["boxes"][0, 0] == 2.0  # input target not modified


def test_resize_scales_boxes_by_the_image_scale():
    image, target = _sample(30, 40)
    x, t = ResizeBoxes(60, 1000)(image, target)
    assert x.shape == (3, 60, 80)
    assert torch.allclose(t["boxes"], target["boxes"] * 2.0)
    x, t = ResizeBoxes(60, 64)(image, target)  # longer side capped: 40 -> 64, 30 -> 48
    assert x.shape == (3, 48, 64)
    assert torch.allclose(t["boxes"], target["boxes"] * 1.6)
    assert t["orig_size"] == (30, 40)


def test_compose_and_collate_shapes():
    t = ComposeBoxes([ResizeBoxes(16, 100), RandomHorizontalFlipBoxes(0.5)])
    a = t(*_sample(30, 40), generator=torch.Generator().manual_seed(1))
    b = t(*_sample(20, 20), generator=torch.Generator().manual_seed(1))
    images, targets, sizes = detection_collate([a, b])
    assert images.shape == (2, 3, 16, 21)
    assert sizes == [(16, 21), (16, 16)]
    assert torch.equal(images[1, :, :, 16:], torch.zeros(3, 16, 5)) and torch.equal(images[0], a[0])
    assert targets[0] is a[1]
    with pytest.raises(ValueError, match="empty"):
        detection_collate([])


def test_loader_is_seeded_and_reseedable():
    ds = SyntheticDigitsDetection(num_images=6, image_size=(64, 48), scales=(12, 24), seed=0)
    tf = ComposeBoxes([RandomHorizontalFlipBoxes(0.5), ResizeBoxes(32, 64)])

    def run(loader):
        return [(x.clone(), [t["image_id"] for t in ts], [t["boxes"].clone() for t in ts]) for x, ts, _ in loader]

    l1 = make_detection_loader(ds, batch_size=4, shuffle=True, seed=3, transform=tf)
    l2 = make_detection_loader(ds, batch_size=4, shuffle=True, seed=3, transform=tf)
    r1, r2 = run(l1), run(l2)
    assert len(r1) == 2 and r1[0][0].shape == (4, 3, 43, 32)  # 64 x 48 -> 42.67 x 32, rounded
    for (xa, ia, ba), (xb, ib, bb) in zip(r1, r2, strict=True):
        assert torch.equal(xa, xb) and ia == ib and all(torch.equal(p, q) for p, q in zip(ba, bb, strict=True))
    assert sorted(i for _, ids, _ in r1 for i in ids) == list(range(6))
    assert isinstance(l1.generator, torch.Generator) and isinstance(l1.collate_fn.generator, torch.Generator)
    l1.generator.manual_seed(3)
    l1.collate_fn.generator.manual_seed(4)
    again = run(l1)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(again, r1, strict=True))


def test_coco_sizes_from_json_without_probing_and_crowd_left_out(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    Image.fromarray(np.full((20, 30, 3), 10, np.uint8)).save(root / "a.png")
    anns = [
        {"id": 1, "image_id": 1, "category_id": 3, "bbox": [25, 1, 10, 5]},  # clipped to x1 = 30 (JSON width)
        {"id": 2, "image_id": 1, "category_id": 3, "bbox": [1, 1, 5, 5], "iscrowd": 1},
        {"id": 3, "image_id": 8, "category_id": 3, "bbox": [1, 1, 5, 5]},  # no such image
    ]
    data = {
        "images": [{"id": 1, "file_name": "a.png", "height": 20, "width": 30}],
        "annotations": anns,
        "categories": [{"id": 3}],
    }
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="crowd=1") as record:
        ds = CocoDetection(root, ann, check_images=False)
    assert len(record) == 1
    assert ds.skipped["clipped_box"] == 1 and ds.skipped["unknown_image"] == 1 and ds.skipped["crowd"] == 1
    assert ds.target(0)["boxes"].tolist() == [[25.0, 1.0, 30.0, 6.0]]
    del data["images"][0]["height"]
    ann.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="'height'"):
        CocoDetection(root, ann, check_images=False)
