"""plot_detections: a PNG grid of ground truth and detections."""

from __future__ import annotations

import pytest
import torch

from ckakd.detection.data import SyntheticDigitsDetection
from ckakd.detection.models import RetinaNet
from ckakd.detection.visualize import plot_detections


class Oracle(torch.nn.Module):
    """Returns the ground truth of the dataset's first images as detections (score 1)."""

    def __init__(self, dataset) -> None:
        super().__init__()
        self.dataset = dataset

    def forward(self, images, image_sizes=None):
        return [
            {"boxes": t["boxes"], "labels": t["labels"], "scores": torch.ones(len(t["labels"]))}
            for _, t in (self.dataset[i] for i in range(images.shape[0]))
        ]


def test_plot_detections_writes_a_png(tmp_path, one_thread):
    from PIL import Image

    data = SyntheticDigitsDetection(4, image_size=64, max_objects=2, scales=(16, 32), split="val")
    torch.manual_seed(0)
    model = RetinaNet(10, depth=18, width=8, out_channels=16, num_convs=1, score_thresh=0.0)
    out = plot_detections({"oracle": Oracle(data), "random": model}, data, tmp_path / "d.png", num_images=2)
    with Image.open(out) as im:
        w, h = im.size
    assert out.is_file() and w == pytest.approx(1.5 * h, rel=0.02)  # 3 columns (gt + 2 models) x 2 rows
    assert model.training  # the mode is restored


def test_plot_detections_errors(tmp_path):
    data = SyntheticDigitsDetection(2, image_size=64, max_objects=1, scales=(16, 32))
    with pytest.raises(ValueError, match="models"):
        plot_detections({}, data, tmp_path / "x.png")
    with pytest.raises(ValueError, match="indices"):
        plot_detections({"o": Oracle(data)}, data, tmp_path / "x.png", indices=[5])
    with pytest.raises(ValueError, match="score_thresh"):
        plot_detections({"o": Oracle(data)}, data, tmp_path / "x.png", score_thresh=2.0)
