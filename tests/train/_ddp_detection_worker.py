"""torchrun worker for tests/train/test_distributed.py's detection test (gloo, CPU, 2 processes):

    python -m torch.distributed.run --nproc_per_node 2 --standalone tests/train/_ddp_detection_worker.py OUT_BASE

Trains a tiny RetinaNet student with PCKA from a tiny teacher for 2 epochs through :class:`Trainer` with
:class:`~ckakd.detection.task.DetectionTask` (DDP, gloo); each rank starts from a different student seed (DDP
must sync it) and writes into ``OUT_BASE/rank<r>`` (only rank 0 may write). Rank 0 also scores the final student
on the whole validation set in one process, to compare with the DDP-gathered COCO metrics. Writes
``OUT_BASE/weights_rank<r>.pt`` and ``OUT_BASE/info_rank<r>.json``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from ckakd.detection.data import SyntheticDigitsDetection, make_detection_loader
from ckakd.detection.models import RetinaNet
from ckakd.detection.task import DetectionTask
from ckakd.detection.trainer import DetectionDistiller, detection_settings, evaluate_detector
from ckakd.train import distributed as dist
from ckakd.train.engine import Trainer


def tiny(seed: int, width: int) -> RetinaNet:
    torch.manual_seed(seed)
    # score_thresh 0: a 2-epoch student is confident nowhere, and the AP comparison needs detections
    return RetinaNet(10, depth=18, width=width, out_channels=16, num_convs=1, octave_base_scale=2.0, score_thresh=0.0)


def main() -> None:
    base = Path(sys.argv[1])
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    assert dist.init_from_env("gloo")
    kw = {"image_size": 64, "max_objects": 2, "scales": (16, 32)}
    train = SyntheticDigitsDetection(16, split="train", **kw)
    val = SyntheticDigitsDetection(6, split="val", **kw)
    teacher = tiny(7, 16)
    model = DetectionDistiller(tiny(100 + rank, 8), teacher, method="pcka")
    settings = detection_settings(
        epochs=2,
        lr=0.01,
        out_dir=base / f"rank{rank}",
        progress=False,
        warmup_iters=2,
        cka_pairs=[("backbone.fpn_levels.0", "backbone.fpn_levels.0")],
    )
    trainer = Trainer(
        model,
        make_detection_loader(train, 4, True, 0),
        make_detection_loader(val, 4, False, 0),
        settings,
        task=DetectionTask(),
        teacher_for_cka=teacher,
    )
    info = {
        "world_size": trainer.world_size,
        "train_sampler": type(trainer.train_loader.sampler).__name__,
        "val_sampler": type(trainer.val_loader.sampler).__name__,
        "train_batches": len(trainer.train_loader),
    }
    result = trainer.fit()
    info["final_val"] = result["final_val"]
    if rank == 0:
        info["single_process_val"] = {k: 100.0 * v for k, v in evaluate_detector(model, val, batch_size=4).items()}
    torch.save(model.student.state_dict(), base / f"weights_rank{rank}.pt")
    (base / f"info_rank{rank}.json").write_text(json.dumps(info))
    dist.cleanup()


if __name__ == "__main__":
    main()
