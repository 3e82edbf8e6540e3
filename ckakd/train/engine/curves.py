"""Training curves from ``metrics.csv`` rows: one run's ``curves.png`` / ``cka.png`` (:func:`plot_curves`, drawn by
the trainer) and several runs in one figure, mean ± std over seeds per group (:func:`plot_run_groups`, drawn by
``ckakd report`` and ``ckakd demo``). One look for both: a titled panel per column (the validation metric, the
validation loss, the total training loss and every loss term the run logged), integer epoch ticks, the y-range
on the informative part (the first epoch's outlier is left out of it), 150 dpi PNG, optional SVG / PDF copies.
matplotlib is imported inside the drawing functions only (the [plot] extra)."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..fileio import OutputError

__all__ = [
    "DPI",
    "VECTOR_FORMATS",
    "curve_columns",
    "mean_std_curve",
    "plot_curves",
    "plot_run_groups",
    "run_curves_figure",
    "run_groups_figure",
    "savefig",
    "y_limits",
]

DPI = 150
VECTOR_FORMATS = ("svg", "pdf")

# train/* columns that are not loss terms
_NOT_LOSSES = ("train/top1", "train/grad_norm")
_LABELS = {"top1": "top-1 %", "top5": "top-5 %", "AP": "AP", "loss": "loss"}

Row = Mapping[str, Any]


def _value(row: Row, key: str) -> float | None:
    v = row.get(key)
    if v is None or v == "":
        return None
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def curve_columns(rows: Sequence[Row], metric: str) -> list[tuple[str, str]]:
    """``(column, panel title)`` of every curve in ``rows`` (metrics.csv rows), in panel order: ``val/<metric>``,
    ``val/loss``, ``train/loss``, then each other ``train/<term>`` loss column in order of first appearance
    (``train/top1`` and ``train/grad_norm`` are not losses). Columns with no value are left out."""
    seen: list[str] = []
    for r in rows:
        seen += [k for k in r if k not in seen]
    out: list[tuple[str, str]] = []

    def add(key: str, title: str) -> None:
        if key in seen and any(_value(r, key) is not None for r in rows):
            out.append((key, title))

    add(f"val/{metric}", f"validation {_LABELS.get(metric, metric)}")
    add("val/loss", "validation loss")
    add("train/loss", "training loss (total)")
    for key in seen:
        if key.startswith("train/") and key != "train/loss" and key not in _NOT_LOSSES:
            if not key.endswith("_per_s"):
                add(key, f"training loss term: {key[6:]}")
    return out


def mean_std_curve(runs: Sequence[Sequence[Row]], key: str) -> list[tuple[int, float, float, int]]:
    """``(epoch, mean, sample std, n)`` of column ``key`` at each epoch that any of ``runs`` logged it (std 0 when
    one run has it)."""
    by_epoch: dict[int, list[float]] = {}
    for rows in runs:
        for i, r in enumerate(rows):
            v = _value(r, key)
            if v is not None:
                epoch = int(float(r.get("epoch") or i + 1))
                by_epoch.setdefault(epoch, []).append(v)
    out = []
    for epoch in sorted(by_epoch):
        vs = by_epoch[epoch]
        m = sum(vs) / len(vs)
        s = math.sqrt(sum((v - m) ** 2 for v in vs) / (len(vs) - 1)) if len(vs) > 1 else 0.0
        out.append((epoch, m, s, len(vs)))
    return out


def y_limits(
    curves: Sequence[Sequence[tuple[int, float, float, int]]], reference: float | None = None
) -> tuple[float, float] | None:
    """The y-range that shows what matters: from the lowest ``mean - std`` to the highest ``mean + std`` over
    the epochs after the first (the first epoch's outlier would squash the rest; all epochs when a curve has
    fewer than 3), ``reference`` included, 6 % margin; ``None`` when there is nothing to show."""
    lo, hi = math.inf, -math.inf
    for c in curves:
        pts = list(c[1:]) if len(c) >= 3 else list(c)
        for _, m, s, _ in pts:
            lo, hi = min(lo, m - s), max(hi, m + s)
    if reference is not None and math.isfinite(reference) and math.isfinite(lo):
        lo, hi = min(lo, reference), max(hi, reference)
    if not math.isfinite(lo):
        return None
    pad = 0.06 * (hi - lo) if hi > lo else max(abs(hi) * 0.05, 1e-3)
    return lo - pad, hi + pad


def savefig(fig: Any, path: Path, formats: Sequence[str] = ()) -> list[Path]:
    """``fig`` as a 150 dpi PNG at ``path`` plus one copy per ``formats`` entry (``"svg"`` / ``"pdf"``, same stem);
    the paths written. An unwritable path is an :class:`~ckakd.train.fileio.OutputError`."""
    bad = [f for f in formats if f not in VECTOR_FORMATS]
    if bad:
        raise ValueError(f"plot format {bad[0]!r}: choose from {', '.join(VECTOR_FORMATS)} (PNG is always written)")
    written = []
    for p in [path, *(path.with_suffix(f".{f}") for f in formats)]:
        try:
            fig.savefig(p, dpi=DPI)
        except OSError as exc:
            raise OutputError(p, exc) from exc
        written.append(p)
    return written


def _figure(n_panels: int) -> tuple[Any, list[Any]]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # optional ([plot] extra)
    from matplotlib.figure import Figure

    ncols = min(3, max(1, n_panels))
    nrows = math.ceil(max(1, n_panels) / ncols)
    fig = Figure(figsize=(4.3 * ncols, 3.3 * nrows + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel().tolist()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes[:n_panels]


def _panel(
    ax: Any,
    title: str,
    series: Sequence[tuple[str, list[tuple[int, float, float, int]]]],
    reference: tuple[str, float] | None = None,
) -> None:
    from matplotlib.ticker import MaxNLocator  # optional ([plot] extra)

    for i, (label, curve) in enumerate(series):
        if not curve:
            continue
        color = f"C{i % 10}"
        xs = [p[0] for p in curve]
        ms = [p[1] for p in curve]
        ax.plot(xs, ms, marker="." if len(xs) < 40 else None, color=color, label=label)
        if any(p[3] > 1 for p in curve):
            lo = [m - p[2] for m, p in zip(ms, curve, strict=True)]
            hi = [m + p[2] for m, p in zip(ms, curve, strict=True)]
            ax.fill_between(xs, lo, hi, color=color, alpha=0.2, linewidth=0)
    if reference is not None:
        ax.axhline(reference[1], color="0.3", linestyle="--", linewidth=1, label=reference[0])
    limits = y_limits([c for _, c in series if c], None if reference is None else reference[1])
    if limits is not None:
        ax.set_ylim(*limits)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)


def _suptitle(fig: Any, text: str) -> None:
    fig.suptitle("\n".join(textwrap.wrap(text, 150)), fontsize=10)


def run_curves_figure(history: Sequence[Row], metric: str, metric_label: str, title: str | None = None) -> Any:
    """The figure of one run's ``curves.png``: a titled panel per :func:`curve_columns` entry (the train metric
    drawn beside the validation one), ``title`` above (e.g. the run's method and seed)."""
    columns = curve_columns(history, metric)
    fig, axes = _figure(len(columns))
    for ax, (key, panel_title) in zip(axes, columns, strict=True):
        series = [("val" if key.startswith("val/") else "train", mean_std_curve([history], key))]
        if key == f"val/{metric}":
            panel_title = f"{metric_label}: validation and train"
            train = mean_std_curve([history], f"train/{metric}")
            if train:
                series.append(("train", train))
        _panel(ax, panel_title, series)
        if len(series) > 1:
            ax.legend(fontsize=8)
    if title:
        _suptitle(fig, title)
    return fig


def plot_curves(
    out_dir: Path,
    history: Sequence[Row],
    metric: str,
    metric_label: str,
    cka_keys: Sequence[str] = (),
    title: str | None = None,
) -> None:
    """One run's ``curves.png`` (:func:`run_curves_figure`) and, with ``cka_keys``, ``cka.png`` (the
    teacher–student CKA per pair), 150 dpi."""
    savefig(run_curves_figure(history, metric, metric_label, title), out_dir / "curves.png")
    if cka_keys:
        fig, (ax,) = _figure(1)
        series = [(k[4:], mean_std_curve([history], k)) for k in cka_keys]
        _panel(ax, "teacher–student linear CKA", [s for s in series if s[1]])
        ax.legend(fontsize=8)
        if title:
            _suptitle(fig, title)
        savefig(fig, out_dir / "cka.png")


def run_groups_figure(
    groups: Sequence[tuple[str, Sequence[Sequence[Row]]]],
    *,
    metric: str,
    metric_label: str | None = None,
    reference: tuple[str, float] | None = None,
    title: str = "",
) -> Any:
    """Several runs in one figure: for each ``(label, [metrics rows of each run])`` group the mean curve with a
    ±std band over its runs, one titled panel per column any run logged (:func:`curve_columns`: validation metric,
    validation loss, training loss and each loss term, then each ``cka/*`` column), ``reference`` (e.g.
    ``("teacher 96.9", 96.9)``) as a dashed line on the metric panel. Labels should name the method and seeds.
    ``ValueError`` when no run logged anything to draw."""
    all_rows = [r for _, runs in groups for rows in runs for r in rows]
    columns = curve_columns(all_rows, metric)
    seen: list[str] = []
    for r in all_rows:
        seen += [k for k in r if k.startswith("cka/") and k not in seen]
    columns += [(k, f"CKA to teacher: {k[4:]}") for k in seen if any(_value(r, k) is not None for r in all_rows)]
    if not columns:
        raise ValueError(f"no curves to draw: no run logged val/{metric}, val/loss or a training loss")
    fig, axes = _figure(len(columns))
    for ax, (key, panel_title) in zip(axes, columns, strict=True):
        if key == f"val/{metric}" and metric_label:
            panel_title = f"validation {metric_label}"
        series = [(label, mean_std_curve(runs, key)) for label, runs in groups]
        _panel(ax, panel_title, series, reference if key == f"val/{metric}" else None)
    axes[0].legend(fontsize=8)
    if title:
        _suptitle(fig, title)
    return fig


def plot_run_groups(
    groups: Sequence[tuple[str, Sequence[Sequence[Row]]]],
    path: Path,
    *,
    metric: str,
    metric_label: str | None = None,
    reference: tuple[str, float] | None = None,
    title: str = "",
    formats: Sequence[str] = (),
) -> list[Path]:
    """:func:`run_groups_figure` as a 150 dpi PNG at ``path`` plus one copy per ``formats`` entry (svg / pdf);
    returns the paths written."""
    fig = run_groups_figure(groups, metric=metric, metric_label=metric_label, reference=reference, title=title)
    return savefig(fig, Path(path), formats)
