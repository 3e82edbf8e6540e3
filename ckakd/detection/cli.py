"""The ``detect-*`` commands of ``ckakd``, on the same YAML configs and trainer as classification.

    ckakd detect-train CONFIG [key=value ...]        train a detector (config section `model`)
    ckakd detect-distill CONFIG [key=value ...]      distil `teacher` into `model` with `distiller` on the FPN
    ckakd detect-eval CONFIG --checkpoint PATH       COCO metrics of a checkpoint on the validation split
    ckakd detect-interrelation CONFIG                the WKD-L category interrelation of the trained teacher
    ckakd detect-demo                                teacher + distilled students on synthetic data, COCO table

CONFIG is a detection YAML (``task: detection``) or a shipped name (``ckakd configs``: ``detection/...``).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from typing import Any

from ckakd._cli_common import add_config_args, report, resume_command, run_guarded
from ckakd.detection.demo import add_detect_demo_arguments, run_detect_demo_from_args

__all__ = ["add_detection_commands", "run_detection_command"]


_CONFIG_HELP = "a detection YAML config or a shipped name, e.g. detection/retinanet_teacher"


def add_detection_commands(sub: Any) -> None:
    """Add the ``detect-*`` commands to ``ckakd``'s subparsers."""
    p = sub.add_parser("detect-demo", help="detection: teacher + distilled students on synthetic digits, COCO table")
    add_detect_demo_arguments(p)
    for name, helptext in (
        ("detect-train", "train a detector (RetinaNet / FCOS / torchvision) from a detection config"),
        ("detect-distill", "distil a trained teacher detector into a student on the FPN features / cls branch"),
    ):
        p = sub.add_parser(name, help=helptext)
        add_config_args(p, _CONFIG_HELP)
        p.add_argument("--resume", action="store_true", help="continue from <out_dir>/<name>/latest.pt if present")
    p = sub.add_parser("detect-eval", help="COCO metrics of a detector checkpoint on the validation split")
    add_config_args(p, _CONFIG_HELP)
    p.add_argument("--checkpoint", required=True, help="latest.pt / best.pt written by detect-train / detect-distill")
    p.add_argument("--plot", default=None, metavar="PNG", help="also draw ground truth and detections to this PNG")
    p = sub.add_parser("detect-interrelation", help="the WKD-L category interrelation of the trained `teacher`")
    add_config_args(p, _CONFIG_HELP)
    p.add_argument("--kernel", default="cka", choices=["cka", "poly", "rbf", "cosine", "centroid"])
    p.add_argument(
        "--source", default="cls_tower", choices=["cls_tower", "fpn"], help="features pooled in the GT boxes"
    )
    p.add_argument("--samples-per-class", type=int, default=32, help="boxes per class (default 32)")
    p.add_argument("--out", default=None, help="output file (default: next to the teacher checkpoint)")


def _summary(result: dict[str, Any]) -> str:
    final = result.get("final_val") or {}
    parts = [f"{k}={final[k]:.2f}" for k in ("AP", "AP50", "AP75", "APs", "APm", "APl") if final.get(k) is not None]
    best = result.get("best_value")
    if best is not None:
        parts.append(f"best_AP={best:.2f}@{result.get('best_epoch')}")
    parts.append(f"epochs_run={result.get('epochs_run')} train_time_s={result.get('train_time_s', 0.0):.1f}")
    return " ".join(parts)


def run_detection_command(args: argparse.Namespace, argv: Sequence[str] = ()) -> int:
    """Run one of the ``detect-*`` commands (``argv``: the command line, for the resume hint after Ctrl-C); 0 on
    success, 2 on bad input, 1 when training stopped (non-finite loss, unwritable output), 130 on Ctrl-C."""
    if args.command == "detect-demo":
        return run_detect_demo_from_args(args)
    from ckakd.detection import runner
    from ckakd.train import config as C

    def body() -> None:
        cfg = C.load_config(args.config, args.overrides)
        if args.command == "detect-train":
            result = runner.train_detection(cfg, resume=args.resume)
            report(f"detect-train done: {_summary(result)}\noutputs: {result['out_dir']}")
        elif args.command == "detect-distill":
            result = runner.distill_detection(cfg, resume=args.resume)
            report(f"detect-distill done: {_summary(result)}\noutputs: {result['out_dir']}")
        elif args.command == "detect-eval":
            print(json.dumps(runner.evaluate_detection_checkpoint(cfg, args.checkpoint, plot=args.plot), indent=2))
        elif args.command == "detect-interrelation":
            path = runner.compute_detection_interrelation(
                cfg, kernel=args.kernel, source=args.source, samples_per_class=args.samples_per_class, out=args.out
            )
            print(f"interrelation ({args.kernel}, {args.source}) written to {os.fspath(path)}")

    hint = resume_command(argv) if argv and args.command in ("detect-train", "detect-distill") else None
    return run_guarded(args.command, body, resume_hint=hint)
