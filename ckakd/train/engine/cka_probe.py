"""The teacher–student CKA log: a fixed subset of validation images (:func:`collect_images`, at most
:data:`CKA_MAX_IMAGES`) and the linear CKA of each ``(student path, teacher path)`` pair on it (:func:`measure_cka`)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from ckakd.functional import cka

from ..hooks import FeatureHooks

__all__ = ["CKA_MAX_IMAGES", "check_cka_paths", "collect_images", "measure_cka"]

CKA_MAX_IMAGES = 512


def check_cka_paths(student: nn.Module, teacher: nn.Module, pairs: Sequence[tuple[str, str]]) -> None:
    """Raise now (not after an epoch) when a path of ``pairs`` does not name a submodule."""
    FeatureHooks(student, [p for p, _ in pairs]).remove()
    FeatureHooks(teacher, [p for _, p in pairs]).remove()


def collect_images(loader: Iterable, limit: int, task: Any) -> Tensor:
    """The first ``limit`` inputs of ``loader`` (through ``task.images``), on the CPU."""
    xs, n = [], 0
    for batch in loader:
        x = task.images(batch)
        xs.append(x[: limit - n].detach().cpu())
        n += xs[-1].shape[0]
        if n >= limit:
            break
    if n == 0:
        raise ValueError("the validation loader yielded no images (needed for the CKA log)")
    return torch.cat(xs)


@torch.no_grad()
def measure_cka(
    student: nn.Module,
    teacher: nn.Module,
    images: Tensor,
    pairs: Sequence[tuple[str, str]],
    device: torch.device,
) -> dict[str, float]:
    """``{"cka/<student path>~<teacher path>": CKA}`` of ``student`` and ``teacher`` on ``images`` (in chunks of 128;
    the student's train/eval mode is restored)."""
    was_training = student.training
    student.eval()
    hs = FeatureHooks(student, [p for p, _ in pairs], detach=True)
    ht = FeatureHooks(teacher, [p for _, p in pairs], detach=True)
    feats_s: dict[str, list[Tensor]] = {p: [] for p, _ in pairs}
    feats_t: dict[str, list[Tensor]] = {p: [] for _, p in pairs}
    try:
        for chunk in images.split(128):
            chunk = chunk.to(device)
            student(chunk)
            teacher(chunk)
            for store, hooks in ((feats_s, hs), (feats_t, ht)):
                for p in hooks.paths:
                    f = hooks.features.get(p)
                    if not isinstance(f, Tensor):
                        raise TypeError(f"CKA path {p!r} did not produce a tensor output")
                    store[p].append(f.reshape(f.shape[0], -1).double().cpu())
    finally:
        hs.remove()
        ht.remove()
        student.train(was_training)
    out = {}
    for ps, pt in pairs:
        out[f"cka/{ps}~{pt}"] = float(cka(torch.cat(feats_s[ps]), torch.cat(feats_t[pt]), backend="torch"))
    return out
