"""The one atomic file write of ckakd (stdlib only, so that the loss core can use it without the trainer):
:func:`atomic_write` (temporary file in the same folder, fsync, ``os.replace``) with ordinary file permissions
(:func:`file_mode`). :func:`ckakd.train.fileio.atomic_write_bytes` is this plus the run-output error."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["atomic_write", "file_mode"]


def file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: ``0o666`` minus the process umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temp file in the same (existing) folder, fsync, ``os.replace``; mode as
    :func:`file_mode`. A failure raises its ``OSError`` and leaves no temp file; the previous ``path`` is intact."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), file_mode())
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return path
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)
    return path
