"""COCO input validation and scoring against the loader's cleaned ground truth (CocoDetection + CocoEvaluator)."""

from __future__ import annotations

import copy
import json
import math
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("PIL")
pytest.importorskip("pycocotools")
from PIL import Image  # noqa: E402

from ckakd.detection.data import CocoDetection  # noqa: E402
from ckakd.detection.evaluation import CocoEvaluator  # noqa: E402
from ckakd.detection.task import DetectionTask, coco_ground_truth  # noqa: E402

H, W = 40, 50  # every test image: 40 rows, 50 columns


def _clean_coco() -> dict:
    """Four 40 x 50 images, two categories (ids 4 and 9), a few boxes of several sizes, one crowd region."""
    images = [{"id": 10 + i, "file_name": f"{i}.png", "height": H, "width": W} for i in range(4)]
    boxes = {
        10: [([2, 3, 10, 12], 4), ([20, 5, 25, 30], 9)],
        11: [([0, 0, 50, 40], 9)],
        12: [([5, 5, 6, 6], 4), ([30, 10, 15, 20], 4), ([45, 30, 5, 10], 9)],
        13: [([10, 10, 20, 20], 9)],
    }
    anns = []
    for image_id, items in boxes.items():
        for bbox, cat in items:
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cat, "bbox": bbox, "iscrowd": 0})
    anns.append({"id": 100, "image_id": 13, "category_id": 4, "bbox": [35, 0, 15, 15], "iscrowd": 1})
    return {"images": images, "annotations": anns, "categories": [{"id": 9, "name": "b"}, {"id": 4, "name": "a"}]}


def _dirty_coco() -> dict:
    """The clean file plus entries the loader repairs or drops (the same objects once cleaned)."""
    data = _clean_coco()
    anns = data["annotations"]
    for a in anns:
        if a["bbox"] == [45, 30, 5, 10]:
            a["bbox"] = [45, 30, 20, 20]  # reaches outside the 50 x 40 image: clipped to [45, 30, 5, 10]
            a["area"] = -3.0  # negative area: replaced by the box area
    anns += [
        {"id": 201, "image_id": 10, "category_id": 4, "bbox": [5, 5, 0, 7], "iscrowd": 0},  # zero width
        {"id": 202, "image_id": 11, "category_id": 9, "bbox": [60, 5, 5, 5], "iscrowd": 0},  # fully outside
        {"id": 203, "image_id": 11, "category_id": 77, "bbox": [5, 5, 5, 5], "iscrowd": 0},  # unknown category
        {"id": 204, "image_id": 999, "category_id": 4, "bbox": [5, 5, 5, 5], "iscrowd": 0},  # unknown image
        {"id": 205, "image_id": 12, "category_id": 4, "bbox": [8, 8, 4, -2], "iscrowd": 0},  # negative height
        {"id": 206, "image_id": 12, "category_id": 9, "bbox": [8, 8, math.nan, 4], "iscrowd": 0},  # not finite
    ]
    return data


def _write(tmp_path, data: dict, name: str = "ann.json"):
    root = tmp_path / "imgs"
    root.mkdir(exist_ok=True)
    for img in data.get("images", []):
        path = root / str(img.get("file_name", "x.png"))
        if not path.exists():
            Image.fromarray(np.full((H, W, 3), 100, np.uint8)).save(path)
    ann = tmp_path / name
    ann.write_text(json.dumps(data))
    return root, ann


def _load(root, ann) -> CocoDetection:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return CocoDetection(root, ann)


def _perfect_ap(ds: CocoDetection) -> dict[str, float]:
    """COCO metrics of predictions equal to the dataset's (cleaned) targets, scored as DetectionTask scores."""
    gt, mapping = DetectionTask().ground_truth(ds)
    evaluator = CocoEvaluator(gt, label_to_cat_id=mapping)
    preds, ids = [], []
    for i in range(len(ds)):
        t = ds.target(i)
        n = len(t["labels"])
        preds.append({"boxes": t["boxes"], "scores": torch.linspace(1.0, 0.5, n), "labels": t["labels"]})
        ids.append(t["image_id"])
    evaluator.update(preds, ids)
    return evaluator.compute()


# ---- item: score against the cleaned ground truth --------------------------------------------------------


def test_perfect_predictions_score_the_same_on_a_file_with_bad_entries(tmp_path):
    (tmp_path / "clean").mkdir()
    (tmp_path / "dirty").mkdir()
    clean = _perfect_ap(_load(*_write(tmp_path / "clean", _clean_coco())))
    dirty = _perfect_ap(_load(*_write(tmp_path / "dirty", _dirty_coco())))
    assert clean["AP"] == pytest.approx(1.0)
    for name, value in clean.items():
        assert dirty[name] == pytest.approx(value, abs=1e-9), name


def test_ground_truth_is_the_cleaned_dataset(tmp_path):
    ds = _load(*_write(tmp_path, _dirty_coco()))
    gt = coco_ground_truth(ds)
    assert isinstance(gt, dict)
    assert sorted(img["id"] for img in gt["images"]) == ds.image_ids
    boxes = {a["id"]: a for a in gt["annotations"]}
    assert not {201, 202, 203, 204, 205, 206} & set(boxes)  # dropped entries are not ground truth
    clipped = next(a for a in gt["annotations"] if a["image_id"] == 12 and a["category_id"] == 9)
    assert clipped["bbox"] == [45.0, 30.0, 5.0, 10.0] and clipped["area"] == 50.0
    crowd = boxes[100]
    assert crowd["iscrowd"] == 1 and crowd["bbox"] == [35.0, 0.0, 15.0, 15.0]  # kept as an ignore region
    for i in range(len(ds)):
        t = ds.target(i)
        own = [a for a in gt["annotations"] if a["image_id"] == t["image_id"] and not a["iscrowd"]]
        xyxy = [[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]] for a in own]
        assert xyxy == t["boxes"].tolist()
        assert [ds.cat_id_to_label[a["category_id"]] for a in own] == t["labels"].tolist()


def test_repeated_image_predictions_are_scored_once(tmp_path):
    """A sampler that pads a shard by repeating images (DistributedSampler) or the loader's substitute for an
    undecodable image gives one image's detections twice: the duplicates must not become false positives."""
    ds = _load(*_write(tmp_path, _clean_coco()))
    gt, mapping = DetectionTask().ground_truth(ds)
    evaluator = CocoEvaluator(gt, label_to_cat_id=mapping)
    t = ds.target(0)
    pred = {"boxes": t["boxes"], "scores": torch.ones(len(t["labels"])), "labels": t["labels"]}
    evaluator.update([pred, pred], [t["image_id"], t["image_id"]])
    assert evaluator.compute()["AP"] == pytest.approx(1.0)
    assert evaluator.repeated == 1


# ---- item: validation before training ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "bbox", [[1, 2, 3], [1, 2, 3, 4, 5], "1 2 3 4", [1, "2", 3, 4], [1, 2, True, 4], None, {"x": 1}]
)
def test_malformed_bbox_is_refused_at_construction_with_its_annotation_id(tmp_path, bbox):
    data = _clean_coco()
    data["annotations"][2]["bbox"] = bbox
    data["annotations"][2]["id"] = 4242
    root, ann = _write(tmp_path, data)
    with pytest.raises(ValueError, match=r"ann\.json.*annotation id 4242.*bbox"):
        CocoDetection(root, ann)


def test_malformed_bbox_in_a_given_ground_truth_is_refused_by_the_evaluator(tmp_path):
    data = _clean_coco()
    data["annotations"][1]["bbox"] = [1, 2, 3]
    data["annotations"][1]["id"] = 77
    with pytest.raises(ValueError, match=r"annotation id 77.*bbox"):
        CocoEvaluator(data)
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"gt\.json.*annotation id 77"):
        DetectionTask(coco_gt=path)  # at construction: before any epoch


def test_duplicate_image_ids_are_refused_with_the_ids(tmp_path):
    data = _clean_coco()
    data["images"].append({"id": 12, "file_name": "dup12.png", "height": H, "width": W})
    data["images"].append({"id": 10, "file_name": "dup10.png", "height": H, "width": W})
    data["images"].append({"id": 10, "file_name": "dup10b.png", "height": H, "width": W})
    root, ann = _write(tmp_path, data)
    with pytest.raises(ValueError, match=r"ann\.json.*duplicate image ids.*\b10\b.*\b12\b"):
        CocoDetection(root, ann)
    with pytest.raises(ValueError, match=r"duplicate image ids.*10.*12"):
        CocoEvaluator(data)


@pytest.mark.parametrize(
    ("where", "key", "value", "match"),
    [
        ("annotations", "image_id", "10", r"annotations\[0\].*'image_id' must be an integer.*'10'.*str"),
        ("annotations", "category_id", "4", r"annotations\[0\].*'category_id' must be an integer.*'4'"),
        ("annotations", "id", "1", r"annotations\[0\].*'id' must be an integer.*'1'"),
        ("annotations", "iscrowd", 2, r"annotation id 1.*'iscrowd' must be 0 or 1, got 2"),
        ("annotations", "iscrowd", "0", r"annotation id 1.*'iscrowd' must be 0 or 1, got '0'"),
        ("annotations", "area", "big", r"annotation id 1.*'area' must be a number"),
        ("images", "id", "10", r"images\[0\].*'id' must be an integer.*'10'"),
        ("images", "id", 10.5, r"images\[0\].*'id' must be an integer.*10\.5"),
        ("categories", "id", "9", r"categories\[0\].*'id' must be an integer.*'9'"),
    ],
)
def test_mistyped_fields_are_named(tmp_path, where, key, value, match):
    data = _clean_coco()
    data[where][0][key] = value
    root, ann = _write(tmp_path, data)
    with pytest.raises(ValueError, match=r"ann\.json: .*" + match):
        CocoDetection(root, ann)


@pytest.mark.parametrize("key", ["images", "categories", "annotations"])
def test_empty_sections_are_named_with_the_file(tmp_path, key):
    data = _clean_coco()
    data[key] = []
    root, ann = _write(tmp_path, data)
    with pytest.raises(ValueError, match=rf"ann\.json: {key!r} is empty"):
        CocoDetection(root, ann)
    with pytest.raises(ValueError, match=rf"{key!r} is empty"):
        CocoEvaluator(data)


def test_no_image_found_is_refused(tmp_path):
    data = _clean_coco()
    root, ann = _write(tmp_path, data)
    for p in root.iterdir():
        p.unlink()
    with pytest.raises(ValueError, match=r"none of the 4 images listed in .*ann\.json was found"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            CocoDetection(root, ann)


def test_warning_names_dropped_annotation_ids(tmp_path):
    root, ann = _write(tmp_path, _dirty_coco())
    with pytest.warns(UserWarning) as record:
        ds = CocoDetection(root, ann)
    msg = str(record[0].message)
    assert "degenerate_box=3" in msg and "bad_area=1" in msg
    assert "201" in msg and "205" in msg and "206" in msg  # the annotation ids, to find them in the file
    assert ds.skipped["degenerate_box"] == 3 and ds.skipped["bad_area"] == 1


def test_cleaned_ground_truth_survives_the_evaluator_unchanged(tmp_path):
    ds = _load(*_write(tmp_path, _dirty_coco()))
    gt = ds.to_coco()
    evaluator = CocoEvaluator(copy.deepcopy(gt))
    assert [a["id"] for a in evaluator.gt_dict["annotations"]] == [a["id"] for a in gt["annotations"]]


def test_json_size_that_disagrees_with_the_file_is_reported(tmp_path):
    data = _clean_coco()
    data["images"][1]["height"], data["images"][1]["width"] = 30, 30  # the file is 40 x 50
    root, ann = _write(tmp_path, data)
    with pytest.warns(UserWarning, match=r"size_mismatch=1 \(ids 11\)"):
        ds = CocoDetection(root, ann)
    assert ds.target(ds.image_ids.index(11))["orig_size"] == (H, W)
    assert next(i for i in ds.to_coco()["images"] if i["id"] == 11)["height"] == H
