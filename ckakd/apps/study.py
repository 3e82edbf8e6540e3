"""The ensemble-KD study of "Why does Knowledge Distillation Work?" on the embedded digits (by default).

Two teachers T1, T2 (``digits/teacher`` with seeds 0 and 1, cached like the demo's) teach one student
with ensemble KD over the paper's grid: each of T1, T2 and S sees its own weakly (w) or strongly (s)
augmented view of every training image (T1{w,s} × T2{w,s} × S{w,s}), with vanilla and logit-standardized
KD — 16 runs. Every epoch the trainer logs fidelity (top-1 agreement, KL(p_T‖p_S) at τ=1), mutual
information and CAM IoU on the clean validation set (:class:`ckakd.diagnostics.DiagnosticsCallback`);
at the end each setting gets

* **Affinity** of its augmentations: Acc(T1 on augmented val) / Acc(T1 on clean val), averaged over the
  three views' strengths (T1 was trained without augmentation, so it is the clean reference model);
* **IoU(T1, T2)**: pooled CAM-mask IoU of the two teachers, each on its own augmented view of the
  validation images (the attention diversity the augmentation induces);
* the ensemble–student agreement, KL(p_ens‖p_S), Miller–Madow MI, the student's train–val accuracy gap
  and its validation accuracy.

Writes ``study.json``, ``study.md`` and the paper's plots (``iou_fidelity_over_training.png``,
``fidelity_vs_accuracy.png``, ``attention_overlays.png``) under ``--out``.

    ckakd study [--epochs N] [--settings T1wT2wSw,...] [--kd vanilla,standardized] [--out runs/study]
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ckakd import diagnostics as dg
from ckakd.apps.demo import write_report
from ckakd.apps.errors import run_guarded
from ckakd.apps.plots import plot_attention_overlays, plot_fidelity_vs_accuracy, plot_study_history
from ckakd.train import data as D
from ckakd.train.engine import load_checkpoint
from ckakd.train.engine.metrics_log import read_metrics

__all__ = ["add_study_arguments", "run_study", "run_study_from_args", "SETTINGS"]

STRENGTHS = {"w": "weak", "s": "strong"}
# vanilla: KD T=4, CE 0.1 / KD 0.9 (mdistiller); standardized: z-scored logits, T=2, KD weight 9 (the
# logit-standardization paper's CIFAR setting), both over the two teachers' mean KD loss
CONFIGS = {"vanilla": "digits/ensemble_kd", "standardized": "digits/ensemble_lskd"}
SETTINGS = [f"T1{a}T2{b}S{c}" for a, b, c in itertools.product("ws", repeat=3)]


def add_study_arguments(p: argparse.ArgumentParser) -> None:
    """The ``ckakd study`` options."""
    p.add_argument("--vanilla-config", default=CONFIGS["vanilla"], help=f"default {CONFIGS['vanilla']}")
    p.add_argument("--standardized-config", default=CONFIGS["standardized"], help=f"default {CONFIGS['standardized']}")
    p.add_argument("--epochs", type=int, default=8, help="student epochs (default 8)")
    p.add_argument("--teacher-epochs", type=int, default=None, help="teacher epochs (default: the teacher config's)")
    p.add_argument("--settings", default="all", help="comma-separated subset of the grid, e.g. T1wT2wSw,T1sT2sSs")
    p.add_argument("--kd", default="vanilla,standardized", help="vanilla, standardized or both (default)")
    p.add_argument("--out", default="runs/study", help="output folder (default runs/study)")
    p.add_argument("--retrain-teachers", action="store_true", help="ignore cached teachers in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _teacher(out: Path, seed: int, epochs: int | None, retrain: bool, progress: bool) -> tuple[Any, Path, float]:
    """Train (or reuse) ``digits/teacher`` with ``seed``; returns (config, checkpoint, best val top-1 %)."""
    # the config loader needs pyyaml (optional): imported when the study runs, so that a missing one is reported
    from ckakd.train import config as C
    from ckakd.train import runner

    overrides = [f"run.out_dir={out}", f"run.name=teacher_seed{seed}", f"run.seed={seed}"]
    overrides.append(f"run.progress={str(progress).lower()}")
    if epochs is not None:
        overrides.append(f"schedule.epochs={epochs}")
    cfg = C.load_config("digits/teacher", overrides)
    ckpt, best, reused = runner.cached_train_teacher(cfg, retrain=retrain)
    print(f"teacher seed {seed}: {'reused' if reused else 'trained'} {ckpt} (val top-1 {best:.2f} %)")
    return cfg, ckpt, best


def _val_views(bundle: Any, strengths: list[str], seed: int) -> list[torch.Tensor]:
    """The validation images under each strength (same seeded draw per strength), as (N, C, H, W) tensors."""
    from ckakd.train import runner  # pyyaml, as in _teacher

    images = torch.stack([bundle.val[i][0] for i in range(len(bundle.val))])
    out = []
    for strength in strengths:
        t = runner.train_transform(bundle, strength)
        g = torch.Generator().manual_seed(seed)
        out.append(images if t is None else torch.stack([t(x, generator=g) for x in images]))
    return out


def _labels(bundle: Any) -> torch.Tensor:
    return torch.tensor([int(bundle.val[i][1]) for i in range(len(bundle.val))])


def _loader(x: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def _final_metrics(
    setting: str, teachers: list[nn.Module], student: nn.Module, bundle: Any, train_loader_clean: DataLoader
) -> dict[str, float]:
    a1, a2, a_s = (STRENGTHS[c] for c in setting[2] + setting[5] + setting[7])
    clean = torch.stack([bundle.val[i][0] for i in range(len(bundle.val))])
    y = _labels(bundle)
    v1, v2, vs = _val_views(bundle, [a1, a2, a_s], seed=1234)
    t1, t2 = teachers
    acc_clean = dg.accuracy(t1, _loader(clean, y))
    affinities = [dg.accuracy(t1, _loader(v, y)) / acc_clean for v in (v1, v2, vs)]
    maps1 = dg.cam(t1, v1)
    maps2 = dg.cam(t2, v2)
    iou_t = dg.attention_iou(dg.attention_masks(maps1), dg.attention_masks(maps2))["iou"]
    fid = dg.fidelity({"T1": t1, "T2": t2, "S": student}, _loader(clean, y), teachers=["T1", "T2"], students=["S"])
    with torch.no_grad():
        ens = dg.ensemble_logits([t1(clean), t2(clean)])
        s_logits = student(clean)
    mi = dg.mutual_information(ens.argmax(1), s_logits.argmax(1), num_classes=ens.shape[1])
    gap = dg.train_val_gap(student, train_loader_clean, _loader(clean, y))
    return {
        "affinity": float(sum(affinities) / 3),
        "iou_t1_t2": float(iou_t),
        "agree_ens_s": float(fid["agree/ens-S"]),
        "kl_ens_s": float(fid["kl(ens||S)"]),
        "mi_ens_s": float(mi["mi_miller_madow"]),
        "train_val_gap": float(gap["gap"]),
        "student_acc": float(gap["val_acc"]),
    }


def run_study(
    out: str | Path,
    *,
    configs: dict[str, str] | None = None,
    settings: list[str] | None = None,
    kd_kinds: tuple[str, ...] = ("vanilla", "standardized"),
    epochs: int | None = None,
    teacher_epochs: int | None = None,
    retrain_teachers: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the grid; returns ``{"teachers": ..., "rows": [...]}`` (also written to ``study.json``)."""
    # the config loader needs pyyaml (optional): imported when the study runs, so that a missing one is reported
    from ckakd.train import config as C
    from ckakd.train import runner

    configs = {**CONFIGS, **(configs or {})}
    settings = list(settings or SETTINGS)
    bad = [s for s in settings if s not in SETTINGS]
    if bad:
        raise ValueError(f"unknown settings {bad}; the grid is {', '.join(SETTINGS)}")
    bad_kd = [k for k in kd_kinds if k not in ("vanilla", "standardized")]
    if bad_kd or not kd_kinds:
        raise ValueError(f"kd kinds must be 'vanilla' and/or 'standardized', got {list(kd_kinds)}")
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    (tcfg1, ck1, acc1), (tcfg2, ck2, acc2) = (
        _teacher(out, s, teacher_epochs, retrain_teachers, progress) for s in (0, 1)
    )

    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    jobs = [(s, k) for s in settings for k in kd_kinds]
    bar = tqdm(total=len(jobs), desc="study", disable=not progress) if tqdm else None
    rows: list[dict[str, Any]] = []
    for setting, kind in jobs:
        a1, a2, a_s = (STRENGTHS[c] for c in setting[2] + setting[5] + setting[7])
        overrides = [
            f"run.out_dir={out / 'students'}",
            f"run.name={setting}-{kind}",
            "run.progress=false",
            f"teacher.name={tcfg1.model.name}",
            f"teacher.checkpoint={ck1}",
            f"teacher.augment={a1}",
            f"teachers=[{{name: {tcfg2.model.name}, checkpoint: '{ck2}', augment: {a2}}}]",
            f"data.augment={a_s}",
        ]
        if epochs is not None:
            overrides.append(f"schedule.epochs={epochs}")
        cfg = C.load_config(configs[kind], overrides)
        if cfg.distiller.name != "ensemble_kd" or bool(cfg.distiller.kwargs.get("standardize")) != (
            kind == "standardized"
        ):
            raise ValueError(f"{configs[kind]} must be an ensemble_kd config with standardize={kind == 'standardized'}")
        bundle = runner.build_data(cfg)
        teachers = runner.build_teachers(cfg, bundle)
        _, val_loader = runner.build_loaders(cfg, bundle)
        callback = dg.DiagnosticsCallback({"T1": teachers[0], "T2": teachers[1]}, val_loader)
        result = runner.distill(cfg, callbacks=[callback])
        student = runner.build_model(
            cfg.model.name, cfg.model.kwargs, bundle.num_classes, bundle.input_shape[0], section="model"
        )
        load_checkpoint(Path(result["out_dir"]) / "latest.pt", student)
        student.eval()
        train_clean = D.make_loader(bundle.train, 256, False, 0, 0, False, None)
        metrics = _final_metrics(setting, teachers, student, bundle, train_clean)
        history = read_metrics(Path(result["out_dir"]))
        rows.append({"setting": setting, "kd": kind, **metrics, "out_dir": result["out_dir"], "history": history})
        if bar is not None:
            bar.update(1)
            bar.set_postfix(last=f"{setting}/{kind}: {metrics['student_acc']:.3f}")
    if bar is not None:
        bar.close()

    results = {
        "teachers": {
            "T1": {"checkpoint": str(ck1), "val_top1": acc1},
            "T2": {"checkpoint": str(ck2), "val_top1": acc2},
        },
        "rows": rows,
        "total_time_s": time.perf_counter() - t0,
    }
    plots = _plots(results, out)
    write_report(out, "study", results, _table(results), [*plots, "teacher_seed0/", "teacher_seed1/", "students/"])
    return results


def _table(results: dict[str, Any]) -> str:
    t = results["teachers"]
    lines = [
        f"teachers: T1 {t['T1']['val_top1']:.2f} %, T2 {t['T2']['val_top1']:.2f} % val top-1; "
        f"total time {results['total_time_s']:.0f} s; agreement / IoU / accuracy are fractions, KL and MI in nats",
        "",
        "| setting | KD | Affinity | IoU(T1,T2) | agree(ens,S) | KL(ens‖S) | MI(ens,S) | train−val gap | student acc |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        lines.append(
            f"| {r['setting']} | {r['kd']} | {r['affinity']:.3f} | {r['iou_t1_t2']:.3f} | {r['agree_ens_s']:.3f} | "
            f"{r['kl_ens_s']:.4f} | {r['mi_ens_s']:.3f} | {r['train_val_gap']:+.4f} | {r['student_acc']:.4f} |"
        )
    return "\n".join(lines)


def _plots(results: dict[str, Any], out: Path) -> list[str]:
    """The study's three figures under ``out``; their file names."""
    rows = results["rows"]
    plot_study_history(rows, out / "iou_fidelity_over_training.png", SETTINGS)
    plot_fidelity_vs_accuracy(rows, out / "fidelity_vs_accuracy.png")
    written = ["iou_fidelity_over_training.png", "fidelity_vs_accuracy.png"]
    # attention overlays for T1 / T2 / S on a few validation images (strongest setting), per-image IoU
    return written + _overlays(rows, out)


def _overlays(rows: list[dict[str, Any]], out: Path) -> list[str]:
    from ckakd.train import config as C  # pyyaml, as in _teacher
    from ckakd.train import runner

    if not rows:
        return []
    row = max(rows, key=lambda r: r["setting"].count("s"))
    cfg = C.load_config(Path(row["out_dir"]) / "config.yaml")
    bundle = runner.build_data(cfg)
    teachers = runner.build_teachers(cfg, bundle)
    student = runner.build_model(
        cfg.model.name, cfg.model.kwargs, bundle.num_classes, bundle.input_shape[0], section="model"
    )
    load_checkpoint(Path(row["out_dir"]) / "latest.pt", student)
    student.eval()
    a1, a2, a_s = (STRENGTHS[c] for c in row["setting"][2] + row["setting"][5] + row["setting"][7])
    v1, v2, vs = (v[:6] for v in _val_views(bundle, [a1, a2, a_s], seed=1234))
    maps = [dg.cam(teachers[0], v1), dg.cam(teachers[1], v2), dg.cam(student, vs)]
    masks = [dg.attention_masks(m) for m in maps]
    per_image = dg.attention_iou(masks[0], masks[1])["per_image"]
    panels = [("T1", v1, maps[0]), ("T2", v2, maps[1]), ("S", vs, maps[2])]
    title = f"CAM attention, {row['setting']} ({row['kd']} KD); masks at 0.4"
    plot_attention_overlays(panels, per_image, title, out / "attention_overlays.png")
    return ["attention_overlays.png"]


def run_study_from_args(args: argparse.Namespace) -> int:
    """``ckakd study``: 0 on success, 2 on bad arguments, 1 when an output cannot be written, 130 on Ctrl-C."""
    settings = None if args.settings == "all" else [s.strip() for s in args.settings.split(",") if s.strip()]
    kinds = tuple(k.strip() for k in args.kd.split(",") if k.strip())

    def body() -> None:
        run_study(
            args.out,
            configs={"vanilla": args.vanilla_config, "standardized": args.standardized_config},
            settings=settings,
            kd_kinds=kinds,
            epochs=args.epochs,
            teacher_epochs=args.teacher_epochs,
            retrain_teachers=args.retrain_teachers,
            progress=not args.no_progress,
        )

    return run_guarded("study", body, after_interrupt="run it again to continue (trained teachers are reused)")
