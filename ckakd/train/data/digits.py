"""scikit-learn's bundled 8x8 digits with a fixed stratified train / val split."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import TensorDataset


def load_digits_dataset(split: str = "train", val_fraction: float = 0.25, seed: int = 0) -> TensorDataset:
    """scikit-learn's bundled digits as ``TensorDataset(images (N, 1, 8, 8) float in [0, 1], labels (N,) long)``.

    The split is stratified per class with a fixed seed, so it is deterministic and the train and
    val parts are disjoint and together cover all 1,797 images.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32).div_(16.0).unsqueeze(1)  # (N, 1, 8, 8)
    labels = torch.as_tensor(digits.target, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    val_idx: list[Tensor] = []
    train_idx: list[Tensor] = []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c, as_tuple=False).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=gen)]
        n_val = int(round(val_fraction * idx.numel()))
        val_idx.append(idx[:n_val])
        train_idx.append(idx[n_val:])
    chosen = torch.sort(torch.cat(train_idx if split == "train" else val_idx)).values
    return TensorDataset(images[chosen].contiguous(), labels[chosen].contiguous())
