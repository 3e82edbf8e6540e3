"""How every ``ckakd`` command ends: the error-to-exit-status mapping and the missing-extra message.

* :func:`run_guarded` runs a command's body: 0 on success, 2 on bad input, 1 when training or writing stopped,
  130 on Ctrl-C, with one line on stderr for each failure.
* :func:`run_reporting_missing_extras` turns the import failure of an optional dependency (:data:`EXTRAS`) into one
  line naming the setup.py extra that installs it, status 1.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from ckakd.train.engine import NonFiniteLossError
from ckakd.train.fileio import OutputError

__all__ = [
    "EXTRAS",
    "PIP_NAMES",
    "missing_extra",
    "missing_extra_message",
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
    "tensorboard": "tensorboard",
    "wandb": "wandb",
}
# The pip names of the modules whose import name differs.
PIP_NAMES: dict[str, str] = {"yaml": "pyyaml", "PIL": "pillow", "sklearn": "scikit-learn"}


def run_guarded(command: str, body: Callable[[], object], *, after_interrupt: str | None = None) -> int:
    """Run ``ckakd <command>``'s ``body``: 0 on success, 2 on bad input (``ValueError`` / ``FileNotFoundError``,
    one message on stderr), 1 when training stopped (a non-finite loss: the last good epoch is in latest.pt; an
    output that could not be written: disk full, read-only), 130 on Ctrl-C (one line on rank 0, ending with
    ``after_interrupt``: what continues the run, e.g. ``"continue with: ckakd ... --resume"``)."""
    try:
        body()
    except KeyboardInterrupt:
        then = f"; {after_interrupt}" if after_interrupt else ""
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
    pip_name = PIP_NAMES.get(module, module)
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
