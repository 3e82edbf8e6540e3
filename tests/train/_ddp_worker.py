"""torchrun worker for tests/train/test_distributed.py (gloo, CPU, 2 processes):

    python -m torch.distributed.run --nproc_per_node 2 --standalone tests/train/_ddp_worker.py OUT_BASE

1. Initializes the process group (``init_from_env``) and checks ``gather_batch``: CKA over the gathered global
   batch, backward; writes ``OUT_BASE/gather_rank<r>.pt`` (the value and the gradients of the rank's slices).
2. Trains a tiny KD distiller for 2 epochs with :class:`Trainer` (DDP, gloo). Each rank's ``out_dir`` is
   ``OUT_BASE/rank<r>`` so the test can check that only rank 0 writes files; each rank builds its student
   from a different seed (DDP must sync it). Writes ``OUT_BASE/weights_rank<r>.pt`` (final student
   state_dict) and ``OUT_BASE/info_rank<r>.json``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.data import TensorDataset

import ckakd
from ckakd.train import distributed as dist
from ckakd.train.data import make_loader
from ckakd.train.distillers import KD
from ckakd.train.engine import Trainer, TrainSettings

GLOBAL_BATCH, DX, DY = 8, 5, 3


def tiny_net(width: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, width), nn.BatchNorm1d(width), nn.ReLU(), nn.Linear(width, 10))


def gather_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(11)
    return torch.randn(GLOBAL_BATCH, DX, generator=gen, dtype=torch.float64), torch.randn(
        GLOBAL_BATCH, DY, generator=gen, dtype=torch.float64
    )


def main() -> None:
    base = Path(sys.argv[1])
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    assert dist.init_from_env("gloo") and dist.init_from_env()  # idempotent
    n = GLOBAL_BATCH // dist.world_size()
    x, y = gather_inputs()
    xs = x[rank * n : (rank + 1) * n].clone().requires_grad_(True)
    ys = y[rank * n : (rank + 1) * n].clone().requires_grad_(True)
    gx, gy = dist.gather_batch(xs), dist.gather_batch(ys)
    value = ckakd.cka(gx, gy, backend="torch")
    value.backward()
    torch.save(
        {"cka": value.detach(), "gx": gx.detach(), "grad_x": xs.grad, "grad_y": ys.grad, "world": dist.world_size()},
        base / f"gather_rank{rank}.pt",
    )

    gen = torch.Generator().manual_seed(0)
    images = torch.rand(109, 1, 8, 8, generator=gen)
    labels = (images.flatten(1) @ torch.randn(64, 10, generator=gen)).argmax(1)
    train, val = TensorDataset(images[:64], labels[:64]), TensorDataset(images[64:], labels[64:])  # 45 val images

    torch.manual_seed(7)
    teacher = tiny_net(32)
    torch.manual_seed(100 + rank)  # different initial students: DDP must broadcast rank 0's
    student = tiny_net(16)
    model = KD(student, teacher, ce_weight=1.0)
    settings = TrainSettings.create(
        epochs=2, out_dir=base / f"rank{rank}", lr=0.1, schedule="constant", progress=False, cka_pairs=[("3", "3")]
    )
    trainer = Trainer(model, make_loader(train, 8, True, 0), make_loader(val, 16, False, 0), settings)
    info = {
        "world_size": trainer.world_size,
        "distributed": trainer.distributed,
        "train_sampler": type(trainer.train_loader.sampler).__name__,
        "val_sampler": type(trainer.val_loader.sampler).__name__,
        "train_batches": len(trainer.train_loader),
    }
    result = trainer.fit()
    info["group_kept"] = dist.is_distributed()  # the Trainer did not create it, so it must not destroy it
    info["final_top1"] = result["final_top1"]
    torch.save(student.state_dict(), base / f"weights_rank{rank}.pt")
    (base / f"info_rank{rank}.json").write_text(json.dumps(info))

    dist.cleanup()


if __name__ == "__main__":
    main()
