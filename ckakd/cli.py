"""The ``ckakd`` command.

    ckakd demo                                   the main job on the embedded digits data
    ckakd train-teacher CONFIG [key=value ...]   train a model with cross-entropy
    ckakd distill CONFIG [key=value ...]         distil a teacher into a student
    ckakd eval CONFIG --checkpoint PATH          top-1 / top-5 of a checkpoint
    ckakd interrelation CONFIG                   the WKD class interrelation of a trained teacher
    ckakd study                                  the ensemble-KD diagnostics study (digits by default)
    ckakd configs                                list the shipped configs
    ckakd info                                   versions and active backends
    ckakd detect-demo                            RetinaNet teacher + distilled students, COCO AP table
    ckakd detect-train | detect-distill CONFIG   detection training / distillation (detection/* configs)
    ckakd detect-eval CONFIG --checkpoint PATH   COCO metrics of a detector checkpoint
    ckakd detect-interrelation CONFIG            the WKD-L category interrelation of a trained detector

CONFIG is a YAML file or a shipped config name (``ckakd configs``); ``key=value`` pairs override it
(``optim.lr=0.1 distiller.kwargs.alpha=3``). Every run writes its resolved config next to its outputs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from collections.abc import Sequence

# The shared helpers live in ckakd._cli_common (ckakd.detection.cli imports them from there, not from here);
# re-exported under their old names.
from ckakd._cli_common import (
    add_config_args,
    report,
    resume_command,
    run_guarded,
    run_reporting_missing_extras,
)

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ckakd", description="Knowledge distillation with CKA and Wasserstein losses: reference trainer."
    )
    sub = parser.add_subparsers(dest="command", metavar="command", required=True)

    from ckakd.demo import add_demo_arguments

    demo = sub.add_parser("demo", help="the main job: teacher + students on the embedded digits data")
    add_demo_arguments(demo)

    from ckakd.study import add_study_arguments

    study = sub.add_parser("study", help="the ensemble-KD study of 'Why does KD work?' (T1/T2/S x weak/strong)")
    add_study_arguments(study)

    for name, helptext in (
        ("train-teacher", "train a model with cross-entropy (config section `model`)"),
        ("distill", "distil `teacher` into `model` with `distiller`"),
    ):
        p = sub.add_parser(name, help=helptext)
        add_config_args(p)
        p.add_argument("--resume", action="store_true", help="continue from <out_dir>/<name>/latest.pt if present")

    p = sub.add_parser("eval", help="evaluate a checkpoint of `model` on the validation split")
    add_config_args(p)
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by train-teacher or distill")

    p = sub.add_parser("interrelation", help="compute and save the WKD interrelation of the trained `teacher`")
    add_config_args(p)
    p.add_argument("--kernel", default="cka", choices=["cka", "poly", "rbf", "cosine", "centroid"])
    p.add_argument("--samples-per-class", type=int, default=64, help="training images per class (default 64)")
    p.add_argument("--layer", default=None, help="teacher feature layer (dotted path; default: its last stage)")
    p.add_argument("--out", default=None, help="output file (default: next to the teacher checkpoint)")

    from ckakd.detection.cli import add_detection_commands

    add_detection_commands(sub)

    from ckakd.selftest import add_selftest_arguments

    p = sub.add_parser("selftest", help="check every op on every active backend against ckakd.reference")
    add_selftest_arguments(p)

    sub.add_parser("configs", help="list the shipped configs")
    p = sub.add_parser("info", help="versions, devices and active backends")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def info() -> dict:
    import torch

    import ckakd

    out = {
        "ckakd": getattr(ckakd, "__version__", "unknown"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "cpu_threads": torch.get_num_threads(),
    }
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    out["backends"] = {name: {"active": b.active, "detail": b.detail} for name, b in ckakd.backends().items()}
    return out


def _print_info(as_json: bool) -> None:
    data = info()
    if as_json:
        print(json.dumps(data, indent=2))
        return
    for key in ("ckakd", "python", "torch", "cuda", "triton", "cpu_threads"):
        print(f"{key:12s} {data[key]}")
    print(f"{'devices':12s} {', '.join(data['devices']) or 'none (CPU only)'}")
    print("backends:")
    for name, b in data["backends"].items():
        print(f"  {name:8s} {'active  ' if b['active'] else 'inactive'}  {b['detail']}")


def _summary(result: dict) -> str:
    keys = ("best_top1", "final_top1", "epochs_run", "train_time_s")
    parts = [
        f"{k}={result[k]:.4f}" if isinstance(result.get(k), float) else f"{k}={result.get(k)}"
        for k in keys
        if k in result
    ]
    return " ".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``ckakd`` with ``argv``; the exit status. An optional dependency that is missing (see
    ``ckakd._cli_common.EXTRAS``) ends the command with one line on stderr naming the extra that installs it, status 1.
    """
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # key=value overrides may also follow the options (`ckakd eval cfg --checkpoint x optim.lr=1`)
    args, extra = parser.parse_known_args(argv)
    stray = [e for e in extra if e.startswith("-") or "=" not in e or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return run_reporting_missing_extras(args.command, lambda: _dispatch(args, argv))


def _dispatch(args: argparse.Namespace, argv: list[str]) -> int:
    if args.command == "info":
        _print_info(args.json)
        return 0
    if args.command == "selftest":
        from ckakd.selftest import run_selftest_from_args

        return run_selftest_from_args(args)
    if args.command == "demo":
        from ckakd.demo import run_demo_from_args

        return run_demo_from_args(args)
    if args.command.startswith("detect-"):
        from ckakd.detection.cli import run_detection_command

        return run_detection_command(args, argv)
    if args.command == "study":
        from ckakd.study import run_study_from_args

        return run_study_from_args(args)

    from ckakd.detection.config import DetectionConfig  # registers `task: detection` with the loader
    from ckakd.train import config as C

    if args.command == "configs":
        for name in C.list_configs():
            print(name)
        return 0

    from ckakd.train import runner

    def body() -> None:
        cfg = C.load_config(args.config, args.overrides)
        if isinstance(cfg, DetectionConfig):
            raise ValueError(
                f"{args.config} is a detection config (task: detection): use `ckakd detect-{args.command}`"
                if args.command in ("eval", "interrelation")
                else f"{args.config} is a detection config (task: detection): use `ckakd detect-train` / "
                "`ckakd detect-distill`"
            )
        if args.command == "train-teacher":
            result = runner.train_teacher(cfg, resume=args.resume)
            report(f"train-teacher done: {_summary(result)}\noutputs: {result['out_dir']}")
        elif args.command == "distill":
            result = runner.distill(cfg, resume=args.resume)
            report(f"distill done: {_summary(result)}\noutputs: {result['out_dir']}")
        elif args.command == "eval":
            metrics = runner.evaluate_checkpoint(cfg, args.checkpoint)
            print(json.dumps(metrics, indent=2))
        elif args.command == "interrelation":
            path = runner.compute_interrelation(
                cfg, kernel=args.kernel, samples_per_class=args.samples_per_class, layer=args.layer, out=args.out
            )
            print(f"interrelation ({args.kernel}) written to {os.fspath(path)}")

    hint = resume_command(argv) if args.command in ("train-teacher", "distill") else None
    return run_guarded(args.command, body, resume_hint=hint)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
