"""Plots of diagnostics results. matplotlib is imported inside the plotting functions only, so importing
``ckakd.diagnostics`` does not load it."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["plot_cka_heatmap"]


def plot_cka_heatmap(
    matrix: Tensor,
    s_names: Sequence[str],
    t_names: Sequence[str],
    path: str | os.PathLike,
    *,
    title: str | None = "student × teacher layer CKA",
) -> Path:
    """Save the (S, T) ``matrix`` as an annotated heatmap (rows: student layers, columns: teacher layers) to
    ``path`` with matplotlib's Agg canvas (no pyplot state, no display). Returns the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    m = torch.as_tensor(matrix).detach().double().cpu()
    if m.dim() != 2:
        raise ValueError(f"matrix must be (S, T), got shape {tuple(m.shape)}")
    if m.shape != (len(s_names), len(t_names)):
        raise ValueError(
            f"matrix shape {tuple(m.shape)} does not match {len(s_names)} student and {len(t_names)} teacher names"
        )
    s, t = m.shape
    fig = Figure(figsize=(1.2 + 0.9 * t, 1.0 + 0.6 * s))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(m.numpy(), vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    ax.set_xticks(range(t), [str(n) for n in t_names], rotation=45, ha="right")
    ax.set_yticks(range(s), [str(n) for n in s_names])
    ax.set_xlabel("teacher layer")
    ax.set_ylabel("student layer")
    for i in range(s):
        for j in range(t):
            v = float(m[i, j])
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="black" if v > 0.6 else "white", fontsize=8)
    fig.colorbar(im, ax=ax)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    return out
