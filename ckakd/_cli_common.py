"""Helpers shared by the ``ckakd`` command (``ckakd.cli``) and its ``detect-*`` commands (``ckakd.detection.cli``).

Both import this module and neither imports the other at module level: ``ckakd.cli`` builds the parser and calls
``ckakd.detection.cli.add_detection_commands`` / ``run_detection_command`` from inside its functions.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

__all__ = [
    "EXTRAS",
    "add_config_args",
    "missing_extra",
    "missing_extra_message",
    "report",
    "resume_command",
    "run_guarded",
    "run_reporting_missing_extras",
]

# Optional dependencies -> the setup.py extra that installs them (``pip install "ckakd[<extra>]"``).
EXTRAS: dict[str, str] = {
    "yaml": "train",
    "tqdm": "train",
    "matplotlib": "plot",
    "pycocotools": "detection",
    "PIL": "detection",
    "sklearn": "demo",
}
# The pip names of the modules whose import name differs.
_PIP_NAMES = {"yaml": "pyyaml", "PIL": "pillow", "sklearn": "scikit-learn"}


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
    import shlex

    args = list(argv)
    return "ckakd " + shlex.join(args if "--resume" in args else [*args, "--resume"])


def run_guarded(command: str, body: Callable[[], None], *, resume_hint: str | None = None) -> int:
    """Run a command's ``body``: 0 on success, 2 on bad input (``ValueError`` / ``FileNotFoundError``, one
    message on stderr), 1 when training stopped (a non-finite loss: the last good epoch is in latest.pt; an output
    that could not be written: disk full, read-only), 130 on Ctrl-C (one line, with ``resume_hint``: the command
    that continues the run)."""
    from ckakd.train.engine import NonFiniteLossError
    from ckakd.train.fileio import OutputError

    try:
        body()
    except KeyboardInterrupt:
        then = f"; continue with: {resume_hint}" if resume_hint else ""
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"ckakd {command}: interrupted (Ctrl-C){then}", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError) as exc:
        print(f"ckakd {command}: error: {exc}", file=sys.stderr)
        return 2
    except (NonFiniteLossError, OutputError) as exc:
        print(f"ckakd {command}: stopped: {exc}", file=sys.stderr)
        return 1
    return 0


def missing_extra(exc: BaseException) -> tuple[str, str] | None:
    """``(module, extra)`` when ``exc`` (or an ``ImportError`` it was raised from) is the import failure of an
    optional dependency in ``EXTRAS``; otherwise None."""
    seen: set[int] = set()
    while isinstance(exc, BaseException) and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, ImportError) and exc.name:
            top = exc.name.split(".", 1)[0]
            if top in EXTRAS:
                return top, EXTRAS[top]
        exc = exc.__cause__ or exc.__context__
    return None


def missing_extra_message(command: str, module: str, extra: str) -> str:
    """The one-line error for a missing optional dependency."""
    pip_name = _PIP_NAMES.get(module, module)
    return (
        f"ckakd {command}: error: {pip_name} is not installed; install the [{extra}] extra: "
        f'pip install "ckakd[{extra}]" (from a checkout: pip install -e ".[{extra}]")'
    )


def run_reporting_missing_extras(command: str, body: Callable[[], int]) -> int:
    """``body()``; when it fails to import an optional dependency (see ``EXTRAS``), one line on stderr naming the
    extra that installs it (``missing_extra_message``) and status 1 instead of a traceback. Other errors pass."""
    try:
        return body()
    except ImportError as exc:
        missing = missing_extra(exc)
        if missing is None:
            raise
        print(missing_extra_message(command, *missing), file=sys.stderr)
        return 1
