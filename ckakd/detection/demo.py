"""The detection demo: RetinaNet teacher → narrower students on SyntheticDigitsDetection, COCO AP table.

Trains a teacher (ResNet-34 FPN RetinaNet) and students (ResNet-18, half the width) without distillation
(``baseline``), with PCKA, PCKA + mimic and KD w/ patch on the FPN levels; prints the six COCO metrics and the
training time of each run, honestly, whatever they are, and writes ``results.json`` / ``results.md``.

    ckakd detect-demo [--epochs N] [--teacher-epochs N] [--out runs/detect-demo] [--no-progress]

"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path
from typing import Any

from ckakd.detection.evaluation import METRIC_NAMES

__all__ = [
    "DEMO_METHODS",
    "add_detect_demo_arguments",
    "run_detect_demo",
    "run_detect_demo_from_args",
]

DEMO_METHODS = ("baseline", "pcka", "pcka_mimic", "kd_patch")


def add_detect_demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--epochs", type=int, default=12, help="student epochs (default 12)")
    p.add_argument("--teacher-epochs", type=int, default=None, help="teacher epochs (default: 2 x --epochs)")
    p.add_argument("--methods", default=",".join(DEMO_METHODS), help=f"comma-separated subset of {DEMO_METHODS}")
    p.add_argument("--num-train", type=int, default=512, help="training images (default 512)")
    p.add_argument("--num-val", type=int, default=64, help="validation images (default 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (default 1: faster for these small convs)"
    )
    p.add_argument("--out", default="runs/detect-demo", help="output folder (default runs/detect-demo)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _table(results: dict[str, Any]) -> str:
    head = "| run | " + " | ".join(METRIC_NAMES) + " | train time (s) |"
    sep = "|---" * (len(METRIC_NAMES) + 2) + "|"
    lines = [head, sep]
    for name, r in results["runs"].items():
        vals = " | ".join(f"{100 * r['metrics'][k]:.1f}" for k in METRIC_NAMES)
        lines.append(f"| {name} | {vals} | {r['train_time_s']:.1f} |")
    return "\n".join(lines)


@contextlib.contextmanager
def _torch_threads(threads: int | None):
    """Set torch's intra-op threads for the block (``None``: leave them), restoring them afterwards."""
    import torch

    prev = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def run_detect_demo(
    *,
    epochs: int = 12,
    teacher_epochs: int | None = None,
    methods: tuple[str, ...] | list[str] = DEMO_METHODS,
    out: str | Path = "runs/detect-demo",
    progress: bool = True,
    num_train: int = 512,
    num_val: int = 64,
    image_size: int = 64,
    scales: tuple[int, int] = (16, 32),
    batch_size: int = 16,
    lr: float = 0.02,
    teacher_depth: int = 34,
    teacher_width: int = 32,
    student_depth: int = 18,
    student_width: int = 16,
    out_channels: int = 32,
    num_convs: int = 2,
    anchor_scale: float = 2.0,
    seed: int = 0,
    threads: int | None = 1,
) -> dict[str, Any]:
    """Train the teacher and the students; return (and write to ``out/results.json``) their COCO metrics.
    ``threads``: torch intra-op threads during the run (restored after; ``None`` leaves them)."""
    unknown = [m for m in methods if m not in DEMO_METHODS]
    if unknown:
        raise ValueError(f"unknown demo methods {unknown}; choose from {DEMO_METHODS}")
    teacher_epochs = int(teacher_epochs if teacher_epochs is not None else 2 * epochs)
    out = Path(out)
    with _torch_threads(threads):
        import torch

        from ckakd.detection.data import SyntheticDigitsDetection, make_detection_loader
        from ckakd.detection.models import RetinaNet
        from ckakd.detection.trainer import DetectionDistiller, train_detector

        out.mkdir(parents=True, exist_ok=True)
        data_kw = {"image_size": image_size, "max_objects": 3, "scales": scales, "seed": seed}
        train = SyntheticDigitsDetection(num_train, split="train", **data_kw)
        val = SyntheticDigitsDetection(num_val, split="val", **data_kw)

        def detector(depth: int, width: int, model_seed: int) -> RetinaNet:
            torch.manual_seed(model_seed)
            # anchors of 16..50 px on P3/P4 (octave base 2, not 4) to fit the 16..32 px digits
            return RetinaNet(
                train.num_classes,
                depth=depth,
                width=width,
                out_channels=out_channels,
                num_convs=num_convs,
                octave_base_scale=anchor_scale,
            )

        def loader():
            return make_detection_loader(train, batch_size, True, seed)

        t_start = time.perf_counter()
        settings = {
            k: v for k, v in locals().items() if isinstance(v, int | float | str | tuple | list) and k != "t_start"
        }
        results: dict[str, Any] = {
            "settings": {k: (str(v) if k == "out" else v) for k, v in settings.items()},
            "runs": {},
        }
        print(f"teacher: RetinaNet R{teacher_depth} width {teacher_width}, {teacher_epochs} epochs, {num_train} images")
        teacher = detector(teacher_depth, teacher_width, seed)
        r = train_detector(
            teacher,
            loader(),
            val,
            epochs=teacher_epochs,
            lr=lr,
            out_dir=out / "teacher",
            seed=seed,
            progress=progress,
            eval_every=teacher_epochs,
        )
        results["runs"]["teacher"] = {"metrics": r["final"], "train_time_s": r["train_time_s"]}
        print(f"teacher AP {100 * r['final']['AP']:.1f} ({r['train_time_s']:.0f} s)")
        for method in methods:
            student = detector(student_depth, student_width, seed + 1)
            name = f"student_{method}"
            if method == "baseline":
                model: torch.nn.Module = student
            else:
                model = DetectionDistiller(student, teacher, method=method)
            print(f"{name}: RetinaNet R{student_depth} width {student_width}, {epochs} epochs")
            r = train_detector(
                model,
                loader(),
                val,
                epochs=epochs,
                lr=lr,
                out_dir=out / name,
                seed=seed,
                progress=progress,
                eval_every=epochs,
            )
            results["runs"][name] = {"metrics": r["final"], "train_time_s": r["train_time_s"]}
            print(f"{name} AP {100 * r['final']['AP']:.1f} ({r['train_time_s']:.0f} s)")
        results["total_time_s"] = time.perf_counter() - t_start
        table = _table(results)
        (out / "results.json").write_text(json.dumps(results, indent=2, default=float))
        (out / "results.md").write_text(table + "\n")
        print()
        print(table)
        print(f"\nCOCO metrics in %; total {results['total_time_s']:.0f} s; outputs: {out}/ (results.json, results.md)")
        return results


def run_detect_demo_from_args(args: argparse.Namespace) -> int:
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    try:
        run_detect_demo(
            epochs=args.epochs,
            teacher_epochs=args.teacher_epochs,
            methods=methods,
            out=args.out,
            progress=not args.no_progress,
            num_train=args.num_train,
            num_val=args.num_val,
            seed=args.seed,
        )
    except ValueError as exc:
        print(f"ckakd detect-demo: error: {exc}")
        return 2
    return 0
