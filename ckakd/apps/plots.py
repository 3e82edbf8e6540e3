"""The figures of ``ckakd study`` (matplotlib, Agg backend; imported inside each function).

Training curves — a run's ``curves.png`` / ``cka.png``, and several runs over seeds for ``ckakd report`` and
``ckakd demo`` — are drawn by :mod:`ckakd.train.engine.curves`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

__all__ = ["plot_attention_overlays", "plot_fidelity_vs_accuracy", "plot_study_history"]


def _pyplot() -> Any:
    import matplotlib  # optional ([plot] extra)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_study_history(rows: Sequence[dict[str, Any]], path: Path, settings: Sequence[str]) -> None:
    """IoU(T1, S), agreement(ens, S) and MI(ens, S) over training, one line per study row (Figures 1-3 of "Why
    does Knowledge Distillation Work?"): colour = the row's augmentation setting (its index in ``settings``),
    solid = vanilla KD, dashed = standardized."""
    plt = _pyplot()
    keys = [
        ("diag/iou/T1-S", "IoU(T1, S)"),
        ("diag/agree/ens-S", "agreement(ens, S)"),
        ("diag/mi_mm/ens-S", "MI(ens, S)"),
    ]
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4))
    for ax, (key, label) in zip(axes, keys, strict=True):
        colors = plt.get_cmap("tab10")
        for r in rows:
            ys = [float(h[key]) for h in r["history"] if h.get(key) not in (None, "")]
            if ys:  # colour = the augmentation setting, line style = vanilla (solid) / standardized (dashed)
                style = "-" if r["kd"] == "vanilla" else "--"
                color = colors(list(settings).index(r["setting"]) % 10)
                label = f"{r['setting']} {r['kd'][:3]}"
                ax.plot(range(1, len(ys) + 1), ys, style, color=color, marker=".", alpha=0.85, label=label)
        ax.set_xlabel("epoch")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_fidelity_vs_accuracy(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Scatter of each study row's fidelity (top-1 agreement ensemble / student) against the student's accuracy."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for kind, marker in (("vanilla", "o"), ("standardized", "^")):
        rs = [r for r in rows if r["kd"] == kind]
        if rs:
            ax.scatter([r["agree_ens_s"] for r in rs], [r["student_acc"] for r in rs], marker=marker, label=kind)
            for r in rs:
                ax.annotate(r["setting"], (r["agree_ens_s"], r["student_acc"]), fontsize=6)
    ax.set_xlabel("fidelity: top-1 agreement(ensemble, student)")
    ax.set_ylabel("student val accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_attention_overlays(
    panels: Sequence[tuple[str, Tensor, Tensor]], per_image_iou: Tensor, title: str, path: Path
) -> None:
    """One row per ``(name, images (N, C, H, W), CAMs (N, H', W') in [0, 1])`` panel, the first 6 images of each:
    the image in grey under its CAM; the columns are titled with ``per_image_iou`` (N,)."""
    plt = _pyplot()
    fig, axes = plt.subplots(len(panels), 6, figsize=(12, 6.5))
    for j in range(6):
        for i, (name, view, m) in enumerate(panels):
            ax = axes[i, j]
            ax.imshow(view[j].mean(0).numpy(), cmap="gray")
            ax.imshow(m[j].numpy(), cmap="jet", alpha=0.45, vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(name)
        axes[0, j].set_title(f"IoU(T1,T2) {float(per_image_iou[j]):.2f}", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
