"""Run outputs on disk: atomic writes with ordinary file permissions, and one clear error when a write fails.

Every file the trainer writes (checkpoints, metrics, the resolved config) goes through :func:`atomic_write_bytes`
(temporary file in the same folder, fsync, ``os.replace``), so a crash or a full disk never leaves a half-written
file behind; the previous version stays intact. Files get the mode a plain ``open()`` would give them
(``0o666`` minus the umask, typically ``0644``), not the ``0600`` of :func:`tempfile.mkstemp`.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

from .._fileio import atomic_write, file_mode

__all__ = ["OutputError", "atomic_write_bytes", "append_text", "file_mode", "probe_writable"]


class OutputError(RuntimeError):
    """A run output could not be written (disk full, read-only file system, a folder in the way, ...)."""

    def __init__(self, path: str | os.PathLike, exc: OSError) -> None:
        self.path = Path(path)
        self.errno = exc.errno
        code = errno.errorcode.get(exc.errno or 0)
        reason = exc.strerror or str(exc)
        super().__init__(
            f"cannot write {self.path}: {reason}{f' [{code}]' if code else ''} (the previous {self.path.name}, "
            "if any, is unchanged)"
        )


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (:func:`ckakd._fileio.atomic_write`: a temp file in the same folder,
    fsync, ``os.replace``; mode as :func:`file_mode`), creating the folder. Raises :class:`OutputError` (naming
    ``path``) on any ``OSError``."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return atomic_write(path, data)
    except OSError as exc:
        raise OutputError(path, exc) from exc


def append_text(path: str | os.PathLike, text: str) -> None:
    """Append ``text`` to ``path`` and fsync; :class:`OutputError` on failure."""
    path = Path(path)
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        raise OutputError(path, exc) from exc


def probe_writable(folder: str | os.PathLike) -> str | None:
    """Why files cannot be created in ``folder`` (or in the folder that would hold it, when it does not exist
    yet), or ``None`` when they can. Creates nothing that stays: a temporary folder is made and removed."""
    folder = Path(folder)
    probe = folder
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        where = "" if probe == folder else f" (needed for {folder})"
        return f"{probe} is a file, not a folder{where}"
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".ckakd-write-test.", dir=probe))
    except OSError as exc:
        code = errno.errorcode.get(exc.errno or 0)
        return f"cannot create files in {probe}: {exc.strerror or exc}{f' [{code}]' if code else ''}"
    return None
