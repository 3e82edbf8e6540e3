"""Training curves (``ckakd.train.engine.curves``): columns, mean ± std over runs, y-range, the figures' panels."""

from __future__ import annotations

import math
import struct
from pathlib import Path

import pytest

from ckakd.train.engine import curves as C

pytest.importorskip("matplotlib")


def rows(final: float, seed: int = 0, epochs: int = 5, terms: tuple[str, ...] = ("ce", "kd")) -> list[dict]:
    out = []
    for e in range(1, epochs + 1):
        r = {"epoch": e, "lr": 0.1, "train/loss": 5.0 / e}
        r.update({f"train/{t}": 2.5 / e for t in terms})
        r.update({"train/top1": 50 + 9 * e, "train/grad_norm": 1.0, "train/images_per_s": 900.0})
        # epoch 1 is far below the rest: the y-range must not be squashed by it
        r.update({"val/top1": 10.0 if e == 1 else final - 5 + e + 0.1 * seed, "val/loss": 3.0 / e, "val/n": 450})
        r.update({"cka/layer3~layer3": 0.9 + 0.01 * e, "epoch_time_s": 1.0})
        out.append({k: str(v) for k, v in r.items()})  # as read back from metrics.csv
    return out


def png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def test_curve_columns_every_loss_term_and_val_loss():
    history = rows(90.0, terms=("ce", "kd", "wkd_f"))
    history[2]["train/extra"] = "0.5"  # a term first seen later is still drawn
    cols = [k for k, _ in C.curve_columns(history, "top1")]
    assert cols == ["val/top1", "val/loss", "train/loss", "train/ce", "train/kd", "train/wkd_f", "train/extra"]
    titles = dict(C.curve_columns(history, "top1"))
    assert titles["val/loss"] == "validation loss" and titles["train/kd"] == "training loss term: kd"
    assert [k for k, _ in C.curve_columns([{"epoch": "1", "train/loss": "1", "val/AP": ""}], "AP")] == ["train/loss"]


def test_mean_std_curve_over_runs():
    a, b = rows(90.0, seed=0), rows(90.0, seed=2, epochs=3)
    curve = C.mean_std_curve([a, b], "val/top1")
    assert [p[0] for p in curve] == [1, 2, 3, 4, 5] and [p[3] for p in curve] == [2, 2, 2, 1, 1]
    e2 = [87.0, 87.2]
    assert curve[1][1] == pytest.approx(sum(e2) / 2) and curve[1][2] == pytest.approx(math.sqrt(0.02))
    assert curve[4][2] == 0.0


def test_y_limits_leave_out_the_first_epoch():
    curve = C.mean_std_curve([rows(90.0)], "val/top1")
    lo, hi = C.y_limits([curve])
    assert 86.0 < lo < 87.0 and 90.0 < hi < 91.0  # 87 .. 90 plus margin, not down to epoch 1's 10 %
    lo, hi = C.y_limits([curve], reference=95.0)
    assert hi > 95.0
    short = C.mean_std_curve([rows(90.0, epochs=2)], "val/top1")
    assert C.y_limits([short])[0] < 10.0  # two epochs: both shown
    assert C.y_limits([]) is None


def test_groups_figure_panels_bands_teacher_and_ticks():
    from matplotlib.collections import PolyCollection
    from matplotlib.ticker import MaxNLocator

    groups = [("ce (seeds 0,1)", [rows(88.0, 0, terms=("ce",)), rows(88.0, 1, terms=("ce",))]),
              ("kd (seeds 0)", [rows(90.0, 0)])]  # fmt: skip
    fig = C.run_groups_figure(groups, metric="top1", metric_label="top-1 %", reference=("teacher 95.00", 95.0),
                              title="ce vs kd over seeds")  # fmt: skip
    axes = [ax for ax in fig.axes if ax.get_visible()]
    titles = [ax.get_title() for ax in axes]
    assert titles == ["validation top-1 %", "validation loss", "training loss (total)", "training loss term: ce",
                      "training loss term: kd", "CKA to teacher: layer3~layer3"]  # fmt: skip
    assert fig.get_suptitle() == "ce vs kd over seeds"
    top = axes[0]
    labels = top.get_legend_handles_labels()[1]
    assert labels == ["ce (seeds 0,1)", "kd (seeds 0)", "teacher 95.00"]
    assert [line.get_ydata()[0] for line in top.get_lines() if line.get_linestyle() == "--"] == [95.0]
    # a band for the 2-seed group only
    assert sum(isinstance(c, PolyCollection) for c in top.collections) == 1
    lo, hi = top.get_ylim()
    assert 80.0 < lo < 87.0 and hi > 95.0
    for ax in axes:
        assert isinstance(ax.xaxis.get_major_locator(), MaxNLocator)
        assert all(float(t).is_integer() for t in ax.get_xticks())
    with pytest.raises(ValueError, match="no curves to draw"):
        C.run_groups_figure([("x", [[{"epoch": "1"}]])], metric="top1")


def test_plot_run_groups_files_at_150_dpi(tmp_path):
    groups = [("kd (seeds 0)", [rows(90.0)])]
    written = C.plot_run_groups(groups, tmp_path / "c.png", metric="top1", formats=("svg", "pdf"))
    assert [p.name for p in written] == ["c.png", "c.svg", "c.pdf"]
    assert png_size(tmp_path / "c.png") == (round(4.3 * 3 * 150), round((3.3 * 2 + 0.6) * 150))
    assert (tmp_path / "c.pdf").read_bytes()[:5] == b"%PDF-"
    with pytest.raises(ValueError, match="plot format 'eps'"):
        C.plot_run_groups(groups, tmp_path / "d.png", metric="top1", formats=("eps",))


def test_plot_curves_of_one_run(tmp_path):
    history = rows(90.0)
    fig = C.run_curves_figure(history, "top1", "top-1 (%)", "kd-seed0: KD, seed 0")
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes][:2] == ["top-1 (%): validation and train", "validation loss"]
    assert axes[0].get_legend_handles_labels()[1] == ["val", "train"]
    assert fig.get_suptitle() == "kd-seed0: KD, seed 0"
    C.plot_curves(tmp_path, history, "top1", "top-1 (%)", ["cka/layer3~layer3"], "kd-seed0: KD, seed 0")
    assert png_size(tmp_path / "curves.png") == (1935, 1080)  # 5 panels, 3 columns, 150 dpi
    assert png_size(tmp_path / "cka.png") == (round(4.3 * 150), round(3.9 * 150))
