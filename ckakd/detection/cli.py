"""The ``detect-*`` commands of ``ckakd``: ``detect-demo``, ``detect-train``, ``detect-distill``, ``detect-eval``."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ckakd.detection.demo import add_detect_demo_arguments, run_detect_demo_from_args
from ckakd.detection.trainer import DISTILL_METHODS

__all__ = ["add_detection_commands", "run_detection_command"]


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
