"""Class-per-subfolder image datasets (the ImageNet layout), read with PIL on use."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ckakd.train.data.transforms import Transform


class ImageFolderDataset(Dataset):
    """Class-per-subfolder images (``root/<class>/**/<file>``) loaded with PIL.

    Class names are sorted and mapped to indices 0..K-1. Items are ``(image (C, H, W) float in
    [0, 1], class index)``, with C = 3 for ``mode="RGB"`` (default) or 1 for ``mode="L"``.
    """

    def __init__(
        self,
        root: str | Path,
        transform: Transform | None = None,
        extensions: Sequence[str] = (".png", ".jpg", ".jpeg"),
        mode: str = "RGB",
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.root}")
        exts = tuple(e.lower() for e in extensions)
        self.classes: list[str] = sorted(p.name for p in self.root.iterdir() if p.is_dir())
        self.class_to_idx: dict[str, int] = {c: i for i, c in enumerate(self.classes)}
        self.samples: list[tuple[Path, int]] = []
        for c in self.classes:
            files = sorted(p for p in (self.root / c).rglob("*") if p.is_file() and p.suffix.lower() in exts)
            self.samples.extend((p, self.class_to_idx[c]) for p in files)
        if not self.samples:
            raise ValueError(f"no images with extensions {exts} found in class subfolders of {self.root}")
        self.targets: list[int] = [t for _, t in self.samples]
        self.transform = transform
        self.mode = mode

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        from PIL import Image

        path, target = self.samples[index]
        with Image.open(path) as img:
            arr = np.asarray(img.convert(self.mode), dtype=np.uint8)
        x = torch.from_numpy(arr.copy())
        x = x.unsqueeze(0) if x.ndim == 2 else x.permute(2, 0, 1)
        x = x.float().div_(255.0)
        if self.transform is not None:
            x = self.transform(x)
        return x, target
