"""CocoEvaluator on hand-made predictions with known COCO AP."""

from __future__ import annotations

import json
import sys

import pytest
import torch

pytest.importorskip("pycocotools")

from ckakd.detection.data import SyntheticDigitsDetection  # noqa: E402
from ckakd.detection.evaluation import METRIC_NAMES, CocoEvaluator, rescale_boxes  # noqa: E402


def _gt(boxes_per_image: list[list[list[float]]], cats: list[list[int]]) -> dict:
    """COCO GT from xyxy boxes per image (image i has id i + 10, 200 x 200; category ids 5 and 7)."""
    images, anns = [], []
    for i, (boxes, cs) in enumerate(zip(boxes_per_image, cats, strict=True)):
        images.append({"id": i + 10, "file_name": f"{i}.png", "height": 200, "width": 200})
        for (x0, y0, x1, y1), c in zip(boxes, cs, strict=True):
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": i + 10,
                    "category_id": c,
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": (x1 - x0) * (y1 - y0),
                    "iscrowd": 0,
                }
            )
    return {"images": images, "annotations": anns, "categories": [{"id": 5, "name": "a"}, {"id": 7, "name": "b"}]}


def _pred(boxes: list[list[float]], scores: list[float], labels: list[int]) -> dict:
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "scores": torch.tensor(scores),
        "labels": torch.tensor(labels, dtype=torch.long),
    }


GT_BOX = [20.0, 30.0, 120.0, 130.0]  # 100 x 100: a "large" object


def test_perfect_predictions_on_synthetic_ground_truth():
    ds = SyntheticDigitsDetection(num_images=6, seed=3, split="val")
    ev = CocoEvaluator(ds.to_coco(), label_to_cat_id=ds.label_to_cat_id)
    for i in range(len(ds)):
        _, t = ds[i]
        ev.update([_pred(t["boxes"].tolist(), [1.0] * len(t["labels"]), t["labels"].tolist())], [t["image_id"]])
    m = ev.compute()
    assert set(m) == set(METRIC_NAMES)
    assert m["AP"] == pytest.approx(1.0) and m["AP50"] == pytest.approx(1.0) and m["AP75"] == pytest.approx(1.0)
    assert all(0.0 <= v <= 1.0 for v in m.values())


def test_iou_06_counts_at_50_not_at_75():
    ev = CocoEvaluator(_gt([[GT_BOX]], [[5]]))
    x0, y0, _, y1 = GT_BOX
    ev.update([_pred([[x0, y0, x0 + 60.0, y1]], [0.9], [0])], [10])  # IoU = 60 / 100 = 0.6
    m = ev.compute()
    assert m["AP50"] == pytest.approx(1.0)
    assert m["AP75"] == pytest.approx(0.0)
    # thresholds 0.50 and 0.55 match (0.60 is within float noise of the IoU), 0.65..0.95 do not
    assert 0.1 <= m["AP"] <= 0.3


def test_wrong_class_scores_zero():
    ev = CocoEvaluator(_gt([[GT_BOX]], [[5]]))
    ev.update([_pred([GT_BOX], [0.9], [1])], [10])  # label 1 -> category 7, GT is category 5
    assert all(v == 0.0 for v in ev.compute().values())


def test_no_predictions_scores_zero():
    ev = CocoEvaluator(_gt([[GT_BOX]], [[5]]))
    assert ev.compute() == dict.fromkeys(METRIC_NAMES, 0.0)
    ev.update([_pred([], [], [])], [10])
    assert ev.compute() == dict.fromkeys(METRIC_NAMES, 0.0)


def test_higher_scored_false_positive_halves_ap50():
    ev = CocoEvaluator(_gt([[GT_BOX]], [[5]]))
    ev.update([_pred([[150.0, 150.0, 190.0, 190.0], GT_BOX], [0.9, 0.8], [0, 0])], [10])
    m = ev.compute()
    # ranked: FP (precision 0) then TP (recall 1, precision 1/2): interpolated precision 1/2 at all 101 recalls
    assert m["AP50"] == pytest.approx(0.5, abs=1e-6)


def test_two_images_exact_101_point_ap50():
    other = [10.0, 10.0, 60.0, 60.0]
    ev = CocoEvaluator(_gt([[GT_BOX], [other]], [[5], [5]]))
    # ranked over both images: TP (0.9), FP (0.8), TP (0.7) -> (recall, precision) = (.5, 1), (.5, .5), (1, 2/3)
    ev.update([_pred([GT_BOX, [150.0, 150.0, 190.0, 190.0]], [0.9, 0.8], [0, 0])], [10])
    ev.update([_pred([other], [0.7], [0])], [11])
    m = ev.compute()
    expected = (51 * 1.0 + 50 * (2.0 / 3.0)) / 101  # recall thresholds 0.00..0.50 -> 1, 0.51..1.00 -> 2/3
    assert m["AP50"] == pytest.approx(expected, abs=1e-6)


def test_only_updated_images_are_scored_and_ids_checked(tmp_path):
    gt = _gt([[GT_BOX], [GT_BOX]], [[5], [7]])
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    ev = CocoEvaluator(str(path))
    ev.update([_pred([GT_BOX], [0.9], [0])], torch.tensor([10]))  # image 11 never seen: not a miss
    assert ev.compute()["AP"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="not in the ground truth"):
        ev.update([_pred([GT_BOX], [0.9], [0])], [99])
    with pytest.raises(ValueError, match="no category id"):
        ev.update([_pred([GT_BOX], [0.9], [5])], [10])
    with pytest.raises(FileNotFoundError, match="nope.json"):
        CocoEvaluator(tmp_path / "nope.json")


def test_quiet_unless_verbose(capsys):
    ev = CocoEvaluator(_gt([[GT_BOX]], [[5]]))
    ev.update([_pred([GT_BOX], [0.9], [0])], [10])
    ev.compute()
    assert capsys.readouterr().out == ""
    ev = CocoEvaluator(_gt([[GT_BOX]], [[5]]), verbose=True)
    ev.update([_pred([GT_BOX], [0.9], [0])], [10])
    ev.compute()
    assert "Average Precision" in capsys.readouterr().out


def test_missing_pycocotools_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "pycocotools", None)
    monkeypatch.setitem(sys.modules, "pycocotools.coco", None)
    with pytest.raises(ImportError, match="pip install pycocotools"):
        CocoEvaluator(_gt([[GT_BOX]], [[5]]))


def test_rescale_boxes():
    b = torch.tensor([[10.0, 20.0, 30.0, 40.0]])
    assert torch.allclose(rescale_boxes(b, (100, 200), (50, 400)), torch.tensor([[20.0, 10.0, 60.0, 20.0]]))
