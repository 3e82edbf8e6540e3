"""Pictures of detections: ground truth and each model's boxes on the same validation images, one PNG."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ckakd.detection.task import detector_of

__all__ = ["plot_detections"]


def _image(x: Tensor) -> Any:
    """(C, H, W) float image -> (H, W[, 3]) array in [0, 1] for imshow (per-image min-max when outside [0, 1])."""
    img = x.detach().float().cpu()
    lo, hi = float(img.min()), float(img.max())
    if lo < 0.0 or hi > 1.0:
        img = (img - lo) / max(hi - lo, 1e-12)
    img = img.permute(1, 2, 0).numpy()
    return img[..., 0] if img.shape[-1] == 1 else img


@torch.no_grad()
def plot_detections(
    models: Mapping[str, nn.Module],
    dataset: Any,
    path: str | os.PathLike,
    *,
    indices: Sequence[int] | None = None,
    num_images: int = 6,
    score_thresh: float = 0.3,
    class_names: Sequence[str] | None = None,
    device: str | torch.device = "cpu",
) -> Path:
    """Draw ground truth (first column, green) and each model's detections with score >= ``score_thresh`` (one
    column per model, red, labelled ``class score``) on ``num_images`` images of ``dataset`` (items
    ``(image (C, H, W), target)``), and save the grid to ``path`` (PNG). ``models`` maps a column title to a
    detector (or a distiller, whose student is drawn). Returns the path."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    if not models:
        raise ValueError("models: give at least one {title: detector}")
    if not 0.0 <= score_thresh <= 1.0:
        raise ValueError(f"score_thresh must lie in [0, 1], got {score_thresh}")
    n = len(dataset)
    if n == 0:
        raise ValueError("dataset is empty")
    idx = list(indices) if indices is not None else list(range(min(num_images, n)))
    bad = [i for i in idx if not 0 <= int(i) < n]
    if bad or not idx:
        raise ValueError(f"indices must be non-empty and lie in [0, {n}), got {list(idx)}")
    device = torch.device(device)
    items = [dataset[int(i)] for i in idx]
    dets: dict[str, list[dict[str, Tensor]]] = {}
    for title, model in models.items():
        det = detector_of(model)
        was = det.training
        det.eval()
        try:
            batch = torch.stack([img for img, _ in items]).to(device)
            dets[title] = [{k: v.cpu() for k, v in p.items()} for p in det(batch)]
        finally:
            det.train(was)

    def name(label: int) -> str:
        return class_names[label] if class_names is not None and 0 <= label < len(class_names) else str(label)

    cols = 1 + len(models)
    fig = Figure(figsize=(2.4 * cols, 2.4 * len(items)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(items), cols, squeeze=False)
    for r, (img, target) in enumerate(items):
        panels = [("ground truth", target["boxes"], target["labels"], None, "lime")]
        for title, preds in dets.items():
            keep = preds[r]["scores"] >= score_thresh
            panels.append((title, preds[r]["boxes"][keep], preds[r]["labels"][keep], preds[r]["scores"][keep], "red"))
        for c, (title, boxes, labels, scores, colour) in enumerate(panels):
            ax = axes[r][c]
            ax.imshow(_image(img), cmap="gray", interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=9)
            for j, (x1, y1, x2, y2) in enumerate(boxes.tolist()):
                ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=colour, linewidth=1.2))
                text = name(int(labels[j])) + ("" if scores is None else f" {float(scores[j]):.2f}")
                ax.text(x1, y1, text, color=colour, fontsize=6, va="bottom")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
