"""torchrun worker for tests/train/test_optim.py (gloo, CPU, 2 processes): a BatchNorm-free MLP trained with SGD
(no momentum) under DDP with ``train.accumulate=2``, per-rank batch 4, unshuffled; writes the final state_dict of
each rank to ``OUT/weights_rank<r>.pt``.

    python -m torch.distributed.run --nproc_per_node 2 --standalone tests/train/_ddp_accumulate_worker.py OUT
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from ckakd.train.engine import Trainer, TrainSettings


def dataset() -> TensorDataset:
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(32, 1, 8, 8, generator=gen)
    return TensorDataset(images, (images.flatten(1) @ torch.randn(64, 10, generator=gen)).argmax(1))


def mlp() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))


def main() -> None:
    base = Path(sys.argv[1])
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    model = mlp()
    settings = TrainSettings.create(
        epochs=2, out_dir=base / f"rank{rank}", lr=0.1, momentum=0.0, weight_decay=0.0, schedule="constant",
        progress=False, accumulate=2, device="cpu",
    )  # fmt: skip
    Trainer(model, DataLoader(dataset(), batch_size=4), DataLoader(dataset(), batch_size=8), settings).fit()
    torch.save(model.state_dict(), base / f"weights_rank{rank}.pt")


if __name__ == "__main__":
    main()
