"""The ``ckakd`` command: one parser for every classification and detection command.

    ckakd demo                                   the main job on the embedded digits data
    ckakd train-teacher CONFIG [key=value ...]   train a model with cross-entropy
    ckakd distill CONFIG [key=value ...]         distil a teacher into a student
    ckakd eval CONFIG --checkpoint PATH          top-1 / top-5 of a checkpoint
    ckakd interrelation CONFIG                   the WKD class interrelation of a trained teacher
    ckakd study                                  the ensemble-KD diagnostics study (digits by default)
    ckakd report RUN_DIR...                      compare runs: mean ± std over seeds, Welch test, curves
    ckakd configs                                list the shipped configs
    ckakd info                                   versions and active backends
    ckakd selftest                               every op on every active backend against ckakd.reference
    ckakd detect-demo                            RetinaNet teacher + distilled students, COCO AP table
    ckakd detect-train | detect-distill CONFIG   detection training / distillation (detection/* configs)
    ckakd detect-eval CONFIG --checkpoint PATH   COCO metrics of a detector checkpoint
    ckakd detect-interrelation CONFIG            the WKD-L category interrelation of a trained detector

``ckakd --plugin MODULE [--plugin ...] <command>`` imports user modules first (their ``@register_distiller`` /
``@register_model`` / ``@register_dataset`` names can then be used in configs).

CONFIG is a YAML file or a shipped config name (``ckakd configs``); ``key=value`` pairs override it
(``optim.lr=0.1 distiller.kwargs.alpha=3``). Every run writes its resolved config next to its outputs.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import platform
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

import ckakd
from ckakd.apps.demo import add_demo_arguments, run_demo_from_args
from ckakd.apps.detect_demo import add_detect_demo_arguments, run_detect_demo_from_args
from ckakd.apps.errors import run_guarded, run_reporting_missing_extras
from ckakd.apps.report import add_report_arguments, run_report_from_args
from ckakd.apps.selftest import add_selftest_arguments, run_selftest_from_args
from ckakd.apps.study import add_study_arguments, run_study_from_args

__all__ = ["PluginError", "add_config_args", "load_plugins", "build_parser", "info", "main", "report", "resume_command"]

_DETECTION_CONFIG_HELP = "a detection YAML config or a shipped name, e.g. detection/retinanet_teacher"


def add_config_args(
    p: argparse.ArgumentParser, config_help: str = "a YAML config file or a shipped config name (see `ckakd configs`)"
) -> None:
    """The ``CONFIG [key=value ...]`` positionals of the config-driven commands."""
    p.add_argument("config", help=config_help)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. optim.lr=0.1")


def report(text: str) -> None:
    """Print once: on rank 0 under torchrun."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(text)


def resume_command(argv: Sequence[str]) -> str:
    """The command line that continues the run ``argv`` started (``--resume`` added once)."""
    args = list(argv)
    return "ckakd " + shlex.join(args if "--resume" in args else [*args, "--resume"])


def build_parser() -> argparse.ArgumentParser:
    """The ``ckakd`` parser with every command (building it loads neither pyyaml nor the detection stack)."""
    parser = argparse.ArgumentParser(
        prog="ckakd", description="Knowledge distillation with CKA and Wasserstein losses: reference trainer."
    )
    parser.add_argument(
        "--plugin",
        action="append",
        default=[],
        metavar="MODULE",
        help="import MODULE (a module name, the current folder on the path, or a .py file) before the command, so "
        "that the distillers / models / datasets it registers can be named in configs; repeatable",
    )
    sub = parser.add_subparsers(dest="command", metavar="command", required=True)

    demo = sub.add_parser("demo", help="the main job: teacher + students on the embedded digits data")
    add_demo_arguments(demo)

    study = sub.add_parser("study", help="the ensemble-KD study of 'Why does KD work?' (T1/T2/S x weak/strong)")
    add_study_arguments(study)

    rep = sub.add_parser("report", help="compare runs: best/last metric over seeds, Welch test, CKA, curves")
    add_report_arguments(rep)

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

    _add_detection_commands(sub)

    p = sub.add_parser("selftest", help="check every op on every active backend against ckakd.reference")
    add_selftest_arguments(p)

    sub.add_parser("configs", help="list the shipped configs")
    p = sub.add_parser("info", help="versions, devices and active backends")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def _add_detection_commands(sub: Any) -> None:
    """The ``detect-*`` commands, on the same YAML configs and trainer as classification."""
    p = sub.add_parser("detect-demo", help="detection: teacher + distilled students on synthetic digits, COCO table")
    add_detect_demo_arguments(p)
    for name, helptext in (
        ("detect-train", "train a detector (RetinaNet / FCOS / torchvision) from a detection config"),
        ("detect-distill", "distil a trained teacher detector into a student on the FPN features / cls branch"),
    ):
        p = sub.add_parser(name, help=helptext)
        add_config_args(p, _DETECTION_CONFIG_HELP)
        p.add_argument("--resume", action="store_true", help="continue from <out_dir>/<name>/latest.pt if present")
    p = sub.add_parser("detect-eval", help="COCO metrics of a detector checkpoint on the validation split")
    add_config_args(p, _DETECTION_CONFIG_HELP)
    p.add_argument("--checkpoint", required=True, help="latest.pt / best.pt written by detect-train / detect-distill")
    p.add_argument("--plot", default=None, metavar="PNG", help="also draw ground truth and detections to this PNG")
    p = sub.add_parser("detect-interrelation", help="the WKD-L category interrelation of the trained `teacher`")
    add_config_args(p, _DETECTION_CONFIG_HELP)
    p.add_argument("--kernel", default="cka", choices=["cka", "poly", "rbf", "cosine", "centroid"])
    p.add_argument(
        "--source", default="cls_tower", choices=["cls_tower", "fpn"], help="features pooled in the GT boxes"
    )
    p.add_argument("--samples-per-class", type=int, default=32, help="boxes per class (default 32)")
    p.add_argument("--out", default=None, help="output file (default: next to the teacher checkpoint)")


def info() -> dict[str, Any]:
    """Versions (ckakd, python, torch, CUDA, triton), devices, CPU threads and ``ckakd.backends()``."""
    out: dict[str, Any] = {
        "ckakd": getattr(ckakd, "__version__", "unknown"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "cpu_threads": torch.get_num_threads(),
    }
    try:
        import triton  # optional: only its version is reported

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


def _summary(result: dict[str, Any]) -> str:
    keys = ("best_top1", "final_top1", "epochs_run", "train_time_s")
    parts = [
        f"{k}={result[k]:.4f}" if isinstance(result.get(k), float) else f"{k}={result.get(k)}"
        for k in keys
        if k in result
    ]
    return " ".join(parts)


def _detection_summary(result: dict[str, Any]) -> str:
    final = result.get("final_val") or {}
    parts = [f"{k}={final[k]:.2f}" for k in ("AP", "AP50", "AP75", "APs", "APm", "APl") if final.get(k) is not None]
    best = result.get("best_value")
    if best is not None:
        parts.append(f"best_AP={best:.2f}@{result.get('best_epoch')}")
    parts.append(f"epochs_run={result.get('epochs_run')} train_time_s={result.get('train_time_s', 0.0):.1f}")
    return " ".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``ckakd`` with ``argv``; the exit status. An optional dependency that is missing (see
    ``ckakd.apps.errors.EXTRAS``) ends the command with one line on stderr naming the extra that installs it,
    status 1."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # key=value overrides may also follow the options (`ckakd eval cfg --checkpoint x optim.lr=1`)
    args, extra = parser.parse_known_args(argv)
    stray = [e for e in extra if e.startswith("-") or "=" not in e or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        load_plugins(args.plugin)
    except PluginError as exc:
        print(f"ckakd {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return run_reporting_missing_extras(args.command, lambda: dispatch(args, argv))


class PluginError(Exception):
    """A ``--plugin`` module that could not be found or raised while it was imported."""


def load_plugins(plugins: Sequence[str]) -> list[ModuleType]:
    """Import each ``--plugin``: a module name (found on ``sys.path``, the current folder included) or a ``.py``
    file. :class:`PluginError` naming the plugin when it is missing or its import raises."""
    loaded: list[ModuleType] = []
    if plugins and os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())  # `ckakd --plugin my_module` finds ./my_module.py, as `python -m` would
    for plugin in plugins:
        try:
            if plugin.endswith(".py"):
                path = Path(plugin).expanduser()
                if not path.is_file():
                    raise PluginError(f"--plugin {plugin}: no such file")
                spec = importlib.util.spec_from_file_location(path.stem, path)
                assert spec is not None and spec.loader is not None
                module = importlib.util.module_from_spec(spec)
                sys.modules[path.stem] = module
                spec.loader.exec_module(module)
            else:
                module = importlib.import_module(plugin)
        except PluginError:
            raise
        except ModuleNotFoundError as exc:
            if exc.name is not None and plugin.split(".")[0] == exc.name.split(".")[0]:
                raise PluginError(
                    f"--plugin {plugin}: no module named {exc.name!r} (not on sys.path nor in the current folder)"
                ) from exc
            raise PluginError(f"--plugin {plugin} failed to import: {type(exc).__name__}: {exc}") from exc
        except Exception as exc:
            raise PluginError(f"--plugin {plugin} failed to import: {type(exc).__name__}: {exc}") from exc
        loaded.append(module)
    return loaded


def dispatch(args: argparse.Namespace, argv: list[str]) -> int:
    """Run the parsed command ``args`` (``argv``: the command line, for the resume hint after Ctrl-C)."""
    if args.command == "info":
        _print_info(args.json)
        return 0
    if args.command == "selftest":
        return run_selftest_from_args(args)
    if args.command == "demo":
        return run_demo_from_args(args)
    if args.command == "detect-demo":
        return run_detect_demo_from_args(args)
    if args.command.startswith("detect-"):
        return run_detection_command(args, argv)
    if args.command == "study":
        return run_study_from_args(args)
    if args.command == "report":
        return run_report_from_args(args)

    # Imported here: the config loader needs pyyaml (an optional dependency: a missing one is reported by
    # run_reporting_missing_extras, not raised at import), and `ckakd --help` should not load the detection stack.
    from ckakd.detection.config import DetectionConfig  # registers `task: detection` with the loader
    from ckakd.train import config as C
    from ckakd.train import runner

    if args.command == "configs":
        for name in C.list_configs():
            print(name)
        return 0

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

    hint = f"continue with: {resume_command(argv)}" if args.command in ("train-teacher", "distill") else None
    return run_guarded(args.command, body, after_interrupt=hint)


def run_detection_command(args: argparse.Namespace, argv: Sequence[str] = ()) -> int:
    """Run ``detect-train`` / ``detect-distill`` / ``detect-eval`` / ``detect-interrelation``; 0 on success, 2 on
    bad input, 1 when training stopped (non-finite loss, unwritable output), 130 on Ctrl-C."""
    # Imported here: the detection stack (detectors, pycocotools evaluation, the trainer task) loads only for a
    # detection command, so that `ckakd --help` and the classification commands do not import it.
    from ckakd.detection import runner
    from ckakd.train import config as C

    def body() -> None:
        cfg = C.load_config(args.config, args.overrides)
        if args.command == "detect-train":
            result = runner.train_detection(cfg, resume=args.resume)
            report(f"detect-train done: {_detection_summary(result)}\noutputs: {result['out_dir']}")
        elif args.command == "detect-distill":
            result = runner.distill_detection(cfg, resume=args.resume)
            report(f"detect-distill done: {_detection_summary(result)}\noutputs: {result['out_dir']}")
        elif args.command == "detect-eval":
            print(json.dumps(runner.evaluate_detection_checkpoint(cfg, args.checkpoint, plot=args.plot), indent=2))
        elif args.command == "detect-interrelation":
            path = runner.compute_detection_interrelation(
                cfg, kernel=args.kernel, source=args.source, samples_per_class=args.samples_per_class, out=args.out
            )
            print(f"interrelation ({args.kernel}, {args.source}) written to {os.fspath(path)}")

    resumable = argv and args.command in ("detect-train", "detect-distill")
    hint = f"continue with: {resume_command(argv)}" if resumable else None
    return run_guarded(args.command, body, after_interrupt=hint)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
