"""The detection demo: RetinaNet teacher → narrower students on SyntheticDigitsDetection, COCO AP table.

Trains a teacher (ResNet-34 FPN RetinaNet) and students (ResNet-18, half the width) without distillation
(``baseline``), with PCKA, PCKA + mimic and KD w/ patch on the FPN levels; prints the six COCO metrics and the
training time of each run, honestly, whatever they are, and writes ``results.json`` / ``results.md``.

    ckakd detect-demo [--epochs N] [--teacher-epochs N] [--out runs/detect-demo] [--no-progress]

It also holds the ``detect-train`` / ``detect-distill`` / ``detect-eval`` commands (plain argparse flags):

    ckakd detect-train   [--data synthetic|coco --images DIR --annotations JSON] [--depth 18 --width 16] ...
    ckakd detect-distill --teacher-checkpoint T/latest.pt --teacher-depth 34 --teacher-width 32 --method pcka
    ckakd detect-eval    --checkpoint PATH [--depth --width --out-channels]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path
from typing import Any

from ckakd.detection.evaluation import METRIC_NAMES
from ckakd.detection.trainer import DISTILL_METHODS

__all__ = [
    "DEMO_METHODS",
    "add_detect_demo_arguments",
    "add_detection_commands",
    "run_detect_demo",
    "run_detect_demo_from_args",
    "run_detection_command",
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


# ---- detect-train / detect-distill / detect-eval -----------------------------------------------------------


def _add_model_args(p: argparse.ArgumentParser, prefix: str = "", depth: int = 18, width: int = 16) -> None:
    p.add_argument(f"--{prefix}depth", type=int, default=depth, help=f"ResNet depth (default {depth})")
    p.add_argument(f"--{prefix}width", type=int, default=width, help=f"ResNet stem width (default {width})")
    p.add_argument(f"--{prefix}out-channels", type=int, default=32, help="FPN channels (default 32)")
    p.add_argument(f"--{prefix}arch", default="retinanet", choices=["retinanet", "fcos"])


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="synthetic", choices=["synthetic", "coco"])
    p.add_argument("--images", default=None, help="COCO: images folder (training split)")
    p.add_argument("--annotations", default=None, help="COCO: instances JSON (training split)")
    p.add_argument("--val-images", default=None, help="COCO: validation images (default: --images)")
    p.add_argument("--val-annotations", default=None, help="COCO: validation JSON (default: --annotations)")
    p.add_argument("--min-size", type=int, default=512, help="COCO: shorter side after resizing (default 512)")
    p.add_argument("--max-size", type=int, default=853, help="COCO: longer side limit (default 853)")
    p.add_argument("--num-train", type=int, default=256, help="synthetic: training images (default 256)")
    p.add_argument("--num-val", type=int, default=64, help="synthetic: validation images (default 64)")
    p.add_argument("--image-size", type=int, default=64, help="synthetic: image side (default 64)")
    p.add_argument("--batch-size", type=int, default=16)


def add_detection_commands(sub: Any) -> None:
    """Add ``detect-demo``, ``detect-train``, ``detect-distill`` and ``detect-eval`` to ``ckakd``'s subparsers."""
    p = sub.add_parser("detect-demo", help="detection: RetinaNet teacher + distilled students, COCO AP table")
    add_detect_demo_arguments(p)
    for name, helptext in (
        ("detect-train", "train a RetinaNet / FCOS detector"),
        ("detect-distill", "distil a trained teacher detector into a student on the FPN features"),
    ):
        p = sub.add_parser(name, help=helptext)
        _add_model_args(p)
        _add_data_args(p)
        p.add_argument("--epochs", type=int, default=6)
        p.add_argument("--lr", type=float, default=0.02)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--device", default="cpu")
        p.add_argument("--out", default=f"runs/{name}", help=f"output folder (default runs/{name})")
        p.add_argument("--resume", action="store_true", help="continue from <out>/latest.pt if present")
        p.add_argument("--no-progress", action="store_true")
        if name == "detect-distill":
            _add_model_args(p, "teacher-", depth=34, width=32)
            p.add_argument("--teacher-checkpoint", required=True, help="latest.pt written by detect-train")
            p.add_argument("--method", default="pcka", choices=list(DISTILL_METHODS))
            p.add_argument("--weight", type=float, default=None, help="loss weight (default: 10 for PCKA, else 1)")
            p.add_argument("--reduce", default="channel", choices=["channel", "batch", "spatial", "mix"])
            p.add_argument("--patch-size", type=int, default=4)
            p.add_argument("--mimic-weight", type=float, default=1.0)
    p = sub.add_parser("detect-eval", help="COCO AP of a detector checkpoint")
    _add_model_args(p)
    _add_data_args(p)
    p.add_argument("--checkpoint", required=True, help="latest.pt written by detect-train / detect-distill")
    p.add_argument("--device", default="cpu")


def _build(args: argparse.Namespace, prefix: str = "", num_classes: int = 10) -> Any:
    from ckakd.detection.models import FCOS, RetinaNet

    g = {k: getattr(args, f"{prefix}{k}") for k in ("depth", "width", "out_channels", "arch")}
    cls = RetinaNet if g["arch"] == "retinanet" else FCOS
    return cls(num_classes, depth=g["depth"], width=g["width"], out_channels=g["out_channels"], num_convs=2)


def _datasets(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """(train dataset, val dataset, train transform)."""
    from ckakd.detection.data import CocoDetection, ComposeBoxes, RandomHorizontalFlipBoxes, ResizeBoxes

    if args.data == "synthetic":
        from ckakd.detection.data import SyntheticDigitsDetection

        kw = {"image_size": args.image_size, "max_objects": 3, "scales": (16, min(32, args.image_size))}
        return (
            SyntheticDigitsDetection(args.num_train, split="train", **kw),
            SyntheticDigitsDetection(args.num_val, split="val", **kw),
            None,
        )
    if not args.images or not args.annotations:
        raise ValueError("--data coco needs --images and --annotations")
    resize = ResizeBoxes(args.min_size, args.max_size)
    train = CocoDetection(args.images, args.annotations)
    val = CocoDetection(args.val_images or args.images, args.val_annotations or args.annotations, transform=resize)
    return train, val, ComposeBoxes([resize, RandomHorizontalFlipBoxes()])


def _num_classes(dataset: Any) -> int:
    n = getattr(dataset, "num_classes", None)
    return int(n) if n is not None else len(dataset.label_to_cat_id)


def run_detection_command(args: argparse.Namespace) -> int:
    """Run one of the ``detect-*`` commands; 0 on success, 2 on bad input, 1 on a non-finite loss."""
    import sys

    from ckakd.train.engine import NonFiniteLossError

    if args.command == "detect-demo":
        return run_detect_demo_from_args(args)
    try:
        from ckakd.detection.data import make_detection_loader
        from ckakd.detection.trainer import DetectionDistiller, evaluate_detector, train_detector
        from ckakd.train.engine import load_checkpoint

        train, val, transform = _datasets(args)
        model = _build(args, num_classes=_num_classes(train))
        if args.command == "detect-eval":
            load_checkpoint(args.checkpoint, model)
            print(json.dumps(evaluate_detector(model, val, args.batch_size, args.device), indent=2))
            return 0
        if args.command == "detect-distill":
            teacher = _build(args, "teacher_", num_classes=_num_classes(train))
            load_checkpoint(args.teacher_checkpoint, teacher)
            model = DetectionDistiller(
                model,
                teacher,
                method=args.method,
                weight=args.weight,
                reduce=args.reduce,
                patch_size=(args.patch_size, args.patch_size),
                mimic_weight=args.mimic_weight,
            )
        loader = make_detection_loader(train, args.batch_size, True, args.seed, transform=transform)
        r = train_detector(
            model,
            loader,
            val,
            epochs=args.epochs,
            lr=args.lr,
            out_dir=args.out,
            seed=args.seed,
            device=args.device,
            progress=not args.no_progress,
            resume=args.resume,
        )
        metrics = " ".join(f"{k}={100 * v:.1f}" for k, v in r["final"].items())
        print(f"{args.command} done: {metrics} epochs_run={r['epochs_run']} train_time_s={r['train_time_s']:.1f}")
        print(f"outputs: {r['out_dir']}")
    except (ValueError, FileNotFoundError) as exc:
        print(f"ckakd {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except NonFiniteLossError as exc:
        print(f"ckakd {args.command}: stopped: {exc}", file=sys.stderr)
        return 1
    return 0
