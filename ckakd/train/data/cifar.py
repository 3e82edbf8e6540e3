"""CIFAR-100 read from the python-pickle release folder (never downloads)."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ckakd.train.data.transforms import Transform


class Cifar100Dataset(Dataset):
    """CIFAR-100 from the standard python-pickle folder ``root/cifar-100-python/{train,test}``.

    Items are ``(image (3, 32, 32) float in [0, 1], fine label int)``; ``transform`` is applied to the
    float tensor. ``root`` may also point at the ``cifar-100-python`` folder itself. Never downloads.
    """

    base_folder = "cifar-100-python"

    def __init__(self, root: str | Path, train: bool = True, transform: Transform | None = None) -> None:
        root = Path(root)
        folder = root if root.name == self.base_folder else root / self.base_folder
        path = folder / ("train" if train else "test")
        if not path.is_file():
            raise FileNotFoundError(
                f"CIFAR-100 file not found: expected {path} (the python-pickle release extracted under {root}); "
                "this loader never downloads"
            )
        with open(path, "rb") as f:
            entry: dict[bytes, Any] = pickle.load(f, encoding="bytes")
        data = np.asarray(entry[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        self.data = torch.from_numpy(data.copy())  # (N, 3, 32, 32) uint8
        self.targets: list[int] = [int(t) for t in entry[b"fine_labels"]]
        if len(self.targets) != self.data.shape[0]:
            raise ValueError(f"{path}: {self.data.shape[0]} images but {len(self.targets)} labels")
        self.classes: list[str] = []
        meta = folder / "meta"
        if meta.is_file():
            with open(meta, "rb") as f:
                names = pickle.load(f, encoding="bytes").get(b"fine_label_names", [])
            self.classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
        self.transform = transform

    def __len__(self) -> int:
        return self.data.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        x = self.data[index].float().div_(255.0)
        if self.transform is not None:
            x = self.transform(x)
        return x, self.targets[index]
