"""The student × teacher layer CKA heatmap: linear CKA (:func:`ckakd.cka`) between every pair of the two
models' layers on the same samples."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from ckakd.diagnostics._common import device_for, eval_mode, get_layer, iter_batches
from ckakd.functional import cka as _cka

__all__ = ["layer_cka_heatmap"]


def _collect_features(
    jobs: Sequence[tuple[nn.Module, list[str], str]], loader: Iterable, max_samples: int, device: Any
) -> list[dict[str, Tensor]]:
    """One pass over ``loader``: for each ``(model, paths, role)`` job, ``{path: (n, D) float64 CPU}`` features
    of the same first ``n <= max_samples`` samples (eval mode, no grad)."""
    stores: list[dict[str, list[Tensor]]] = []
    current: list[dict[str, Tensor]] = []
    handles = []

    def make_hook(cur: dict[str, Tensor], path: str, role: str):
        def hook(mod: nn.Module, args: Any, output: Any) -> None:
            if not isinstance(output, Tensor):
                raise ValueError(f"the {role}'s layer {path!r} must output a tensor, got {type(output).__name__}")
            cur[path] = output.detach()

        return hook

    try:
        for model, paths, role in jobs:
            modules = {p: get_layer(model, p, role) for p in paths}
            stores.append({p: [] for p in paths})
            current.append({})
            handles += [m.register_forward_hook(make_hook(current[-1], p, role)) for p, m in modules.items()]
        n = 0
        with eval_mode(*[job[0] for job in jobs]), torch.no_grad():
            for x, _ in iter_batches(loader, None, "layer_cka_heatmap"):
                x = x[: max_samples - n]
                for (model, paths, role), cur, store in zip(jobs, current, stores, strict=True):
                    cur.clear()
                    model(x.to(device_for(model, device)))
                    for p in paths:
                        if p not in cur:
                            raise ValueError(f"the {role}'s layer {p!r} did not run during the forward")
                        store[p].append(cur[p].reshape(x.shape[0], -1).double().cpu())
                n += x.shape[0]
                if n >= max_samples:
                    break
    finally:
        for h in handles:
            h.remove()
    return [{p: torch.cat(v) for p, v in store.items()} for store in stores]


def layer_cka_heatmap(
    student: nn.Module,
    teacher: nn.Module,
    loader: Iterable,
    student_layers: Sequence[str],
    teacher_layers: Sequence[str],
    *,
    max_samples: int = 512,
    device: str | torch.device | None = None,
    mode: str = "centered",
) -> Tensor:
    """(S, T) float64 matrix ``M[i, j] = ckakd.cka(student layer i, teacher layer j)``.

    Features of the first ``max_samples`` samples of ``loader`` — both models see the same batches in one
    pass, in eval mode — each flattened per sample to (n, C·H·W) in float64; linear CKA with ``mode`` (see
    :func:`ckakd.cka`). ``student is teacher`` with the same layers gives a unit diagonal.
    """
    if isinstance(student_layers, str) or isinstance(teacher_layers, str):
        raise ValueError("student_layers and teacher_layers must be sequences of dotted paths, not one string")
    s_layers, t_layers = [str(p) for p in student_layers], [str(p) for p in teacher_layers]
    if not s_layers or not t_layers:
        raise ValueError("student_layers and teacher_layers must each name at least one module")
    if isinstance(max_samples, bool) or int(max_samples) < 2:
        raise ValueError(f"max_samples must be >= 2 (CKA needs at least 2 samples), got {max_samples!r}")
    max_samples = int(max_samples)
    if teacher is student:
        both = list(dict.fromkeys(s_layers + t_layers))
        (fs,) = _collect_features([(student, both, "student")], loader, max_samples, device)
        ft = fs
    else:
        fs, ft = _collect_features(
            [(student, list(dict.fromkeys(s_layers)), "student"), (teacher, list(dict.fromkeys(t_layers)), "teacher")],
            loader,
            max_samples,
            device,
        )
    n = next(iter(fs.values())).shape[0]
    if n < 2:
        raise ValueError(f"layer_cka_heatmap: CKA needs at least 2 samples, the loader gave {n}")
    out = torch.empty(len(s_layers), len(t_layers), dtype=torch.float64)
    for i, ps in enumerate(s_layers):
        for j, pt in enumerate(t_layers):
            out[i, j] = _cka(fs[ps], ft[pt], mode=mode, backend="torch")
    return out
