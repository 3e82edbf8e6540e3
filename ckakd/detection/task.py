"""Detection as a task of the shared :class:`~ckakd.train.engine.Trainer`.

:class:`DetectionTask` tells the trainer what a detection batch is (``(images, targets, image_sizes)`` from
:func:`~ckakd.detection.data.make_detection_loader`), how the training forward is called (a
:class:`~ckakd.detection.trainer.DetectionDistiller`'s ``forward_train`` or a detector's training forward, both
returning ``{name: loss}``) and how validation is scored (COCO AP through pycocotools, the six metrics in
percent; ``best.pt`` follows ``AP``). Optimizer, schedule, step warmup, AMP, clipping, DDP, checkpoints, resume,
logs, plots, callbacks and the teacher–student CKA log are the trainer's, as for classification.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ckakd.detection.evaluation import METRIC_NAMES, CocoEvaluator, load_ground_truth, rescale_boxes
from ckakd.train import distributed as dist
from ckakd.train.engine import autocast

__all__ = ["DetectionTask", "detector_of", "coco_ground_truth", "predict"]


def detector_of(model: nn.Module) -> nn.Module:
    """The detector that is scored: a distiller's ``student``, else ``model`` itself."""
    student = getattr(model, "student", None)
    return student if isinstance(student, nn.Module) else model


def coco_ground_truth(dataset: Any) -> dict[str, Any] | str | None:
    """COCO ground truth of ``dataset``: ``to_coco()`` when it has one, else its ``annotation_file``.

    For :class:`~ckakd.detection.data.CocoDetection` that is the cleaned ground truth (clipped boxes, dropped
    entries absent), the boxes the model is trained and validated on, not the raw JSON."""
    if hasattr(dataset, "to_coco"):
        return dataset.to_coco()
    path = getattr(dataset, "annotation_file", None)
    return str(path) if path is not None else None


def _move_targets(targets: Sequence[Mapping[str, Any]], device: torch.device) -> list[dict[str, Any]]:
    return [
        {k: (v.to(device, non_blocking=True) if isinstance(v, Tensor) else v) for k, v in t.items()} for t in targets
    ]


def _split(batch: Any) -> tuple[Tensor, list[dict[str, Any]], list[tuple[int, int]] | None]:
    if not isinstance(batch, list | tuple) or len(batch) not in (2, 3):
        raise TypeError(
            "detection batches are (images, targets[, image_sizes]) as make_detection_loader yields them, got "
            f"{type(batch).__name__}" + (f" of length {len(batch)}" if isinstance(batch, list | tuple) else "")
        )
    images, targets = batch[0], batch[1]
    sizes = batch[2] if len(batch) == 3 else None
    if not isinstance(images, Tensor) or images.dim() != 4:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise TypeError(f"detection batch images must be a (B, C, H, W) tensor, got {shape}")
    if not isinstance(targets, list | tuple) or len(targets) != images.shape[0]:
        n = len(targets) if isinstance(targets, list | tuple) else type(targets).__name__
        raise TypeError(f"detection batch targets must be a list of {images.shape[0]} dicts, got {n}")
    return images, list(targets), (list(sizes) if sizes is not None else None)


@torch.no_grad()
def predict(
    detector: nn.Module, images: Tensor, targets: Sequence[Mapping[str, Any]], sizes: Sequence[tuple[int, int]] | None
) -> tuple[list[int], list[dict[str, Tensor]]]:
    """Detections of one batch as (image ids, per-image ``{"boxes", "scores", "labels"}`` on the CPU in float32),
    boxes rescaled from the loaded size to the target's ``orig_size`` when it has one."""
    preds = detector(images, image_sizes=sizes)
    ids, out = [], []
    for i, (p, t) in enumerate(zip(preds, targets, strict=True)):
        p = {k: v.detach().cpu() for k, v in p.items()}
        p["boxes"], p["scores"] = p["boxes"].float(), p["scores"].float()
        size = tuple(sizes[i]) if sizes is not None else tuple(images.shape[-2:])
        orig = t.get("orig_size")
        if orig is not None and tuple(int(v) for v in orig) != size:
            p["boxes"] = rescale_boxes(p["boxes"], size, orig)
        if "image_id" not in t:
            raise ValueError(f"target {i} has no 'image_id': COCO evaluation needs it to match ground truth")
        ids.append(int(t["image_id"]))
        out.append(p)
    return ids, out


class DetectionTask:
    """``Trainer`` task for detectors and detection distillers (see the module docstring).

    Args:
        coco_gt: COCO ground truth of the validation set (a dict or a JSON path), checked here, before any
            training (:func:`~ckakd.detection.evaluation.load_ground_truth`); default: from the validation
            loader's dataset (``to_coco()``, else ``annotation_file``).
        label_to_cat_id: contiguous label -> COCO category id; default: the dataset's ``label_to_cat_id``.
        gather: under DDP, score the detections of all ranks (their loaders hold disjoint shards); ``False``
            scores this process's loader alone (a full validation set evaluated on one rank).

    Validation returns ``{"AP", "AP50", "AP75", "APs", "APm", "APl"}`` in percent and ``"n"`` (images). Under DDP
    every rank predicts its shard, rank 0 scores the gathered detections and every rank gets the same numbers.
    """

    name = "detection"
    metric = "AP"
    metric_label = "COCO AP (%)"

    def __init__(
        self, coco_gt: Any = None, label_to_cat_id: Mapping[int, int] | None = None, gather: bool = True
    ) -> None:
        self.coco_gt = load_ground_truth(coco_gt) if coco_gt is not None else None
        self.label_to_cat_id = label_to_cat_id
        self.gather = bool(gather)

    def move(self, batch: Any, device: torch.device) -> tuple[Tensor, list[dict[str, Any]], Any]:
        images, targets, sizes = _split(batch)
        return images.to(device, non_blocking=True), _move_targets(targets, device), sizes

    def forward(self, model: nn.Module, batch: Any) -> tuple[dict[str, Tensor], dict[str, Any]]:
        images, targets, sizes = batch
        if callable(getattr(model, "forward_train", None)):
            losses = model.forward_train(images, targets, sizes)
        else:
            if not model.training:
                raise RuntimeError("the detector must be in training mode to return losses")
            losses = model(images, targets, sizes)
        if not isinstance(losses, Mapping) or not all(isinstance(v, Tensor) for v in losses.values()):
            raise TypeError(
                f"{type(model).__name__}'s training forward must return {{name: loss tensor}}, "
                f"got {type(losses).__name__}"
            )
        return dict(losses), {"n": int(images.shape[0])}

    def images(self, batch: Any) -> Tensor:
        return _split(batch)[0]

    def ground_truth(self, dataset: Any) -> tuple[Any, Any]:
        """(COCO ground truth, label -> category id) for ``dataset``: the task's own when given, else the
        dataset's; ``ValueError`` when there is none."""
        gt = self.coco_gt if self.coco_gt is not None else coco_ground_truth(dataset)
        if gt is None:
            raise ValueError(
                f"the validation dataset ({type(dataset).__name__}) has neither to_coco() nor annotation_file: "
                "pass DetectionTask(coco_gt=...)"
            )
        mapping = (
            self.label_to_cat_id if self.label_to_cat_id is not None else getattr(dataset, "label_to_cat_id", None)
        )
        return gt, mapping

    @torch.no_grad()
    def evaluate(
        self,
        model: nn.Module,
        loader: Iterable,
        device: torch.device,
        *,
        amp: bool = False,
        amp_dtype: str = "bfloat16",
    ) -> dict[str, Any]:
        det = detector_of(model)
        was_training = det.training
        det.eval()
        ids: list[int] = []
        preds: list[dict[str, Tensor]] = []
        try:
            for batch in loader:
                images, targets, sizes = self.move(batch, device)
                with autocast(device, amp, amp_dtype):
                    i, p = predict(det, images, targets, sizes)
                ids += i
                preds += p
        finally:
            det.train(was_training)
        if self.gather and dist.is_distributed() and dist.world_size() > 1:
            gathered = dist.all_gather_object((ids, preds))
            ids = [i for part in gathered for i in part[0]]
            preds = [p for part in gathered for p in part[1]]
            result = self._score(loader, ids, preds) if dist.rank() == 0 else None
            return dist.all_gather_object(result)[0]
        return self._score(loader, ids, preds)

    def _score(self, loader: Iterable, ids: list[int], preds: list[dict[str, Tensor]]) -> dict[str, Any]:
        if not ids:
            raise ValueError("detection validation: the loader yielded no images")
        gt, mapping = self.ground_truth(getattr(loader, "dataset", None))
        evaluator = CocoEvaluator(gt, label_to_cat_id=mapping)
        evaluator.update(preds, ids)
        metrics = evaluator.compute()
        out: dict[str, Any] = {k: 100.0 * float(metrics[k]) for k in METRIC_NAMES}
        out["n"] = len(set(ids))
        return out
