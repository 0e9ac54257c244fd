"""Atomic file writes: the one writer every stage uses (proposal stores, checkpoints, exports,
metrics and reports).

A file is written to a temporary file in the same folder, flushed and fsynced, given the usual
permissions (``0666 & ~umask``; ``mkstemp`` alone makes 0600), then renamed over the target
(``os.replace`` is atomic on POSIX and Windows). A crash, a full disk or Ctrl-C mid-write leaves
the old file (or none) and never a half-written one; the temporary file is removed on any
error. The folder is created if needed.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(directory) -> None:
    """Make a rename in ``directory`` durable (POSIX; not possible nor needed on Windows)."""
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path, write: Callable, prefix: str | None = None, durable: bool = False) -> Path:
    """Write ``path`` atomically: ``write(f)`` fills a binary file object; returns the path.

    ``prefix``: the temporary file's name start (default ``.NAME.``; checkpoints use theirs so
    stale ones can be found). ``durable``: also fsync the folder so the rename survives a power
    loss (checkpoints).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=prefix or f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:  # Ctrl-C included: never leave a half-written temporary file behind
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)
    return path


def atomic_write_bytes(path, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=False) + "\n")
