"""Atomic file writes: the one writer every stage uses (proposal stores, checkpoints, exports,
metrics and reports).

A file is written to a temporary file in the same folder, flushed and fsynced, given the usual
permissions (``0666 & ~umask``; ``mkstemp`` alone makes 0600, which ``os.replace`` would keep),
then renamed over the target (``os.replace`` is atomic on POSIX and Windows). A crash, a full
disk or Ctrl-C mid-write leaves the old file (or none) and never a half-written one; the
temporary file is removed on any error. The folder is created if needed.

An ``OSError`` on the way (disk full, permission denied, read-only file system) becomes one
:class:`WriteError` line naming the file; the error itself stays as ``__cause__``.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from .errors import PathError


def _read_umask() -> int:
    # os.umask can only be read by setting it, so it is read once, at import, never per write: a
    # file another thread creates in that instant gets 0o077's private mode, not a world-writable one.
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


UMASK = _read_umask()
FILE_MODE = 0o666 & ~UMASK  # what open() would give a new file in this process


class WriteError(PathError):
    """A file that could not be written (``PATH: cannot write (REASON)``); the previous file, if
    any, is intact and no temporary file is left."""

    def __init__(self, path, reason: str):
        super().__init__(path, reason if reason.startswith("cannot write") else f"cannot write ({reason})")


def _reason(exc: OSError) -> str:
    text = exc.strerror or str(exc) or type(exc).__name__
    name = errno.errorcode.get(exc.errno, "") if exc.errno else ""  # ENOSPC, EACCES, EROFS: searchable
    return f"{name}: {text}" if name else text


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
    loss (checkpoints). Raises :class:`WriteError` for an ``OSError`` (also one raised inside
    ``write``, e.g. a full disk under ``torch.save``); other exceptions pass through unchanged.
    """
    path = Path(path)
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=prefix or f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            _set_mode(f.fileno(), tmp)
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        if durable:
            fsync_dir(path.parent)
    except BaseException as exc:  # Ctrl-C included: never leave a half-written temporary file behind
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass  # gone already, or the folder became unwritable: nothing more to do
        if isinstance(exc, OSError):
            raise WriteError(path, _reason(exc)) from exc
        raise
    return path


def _set_mode(fd: int, name: str) -> None:
    if hasattr(os, "fchmod"):
        os.fchmod(fd, FILE_MODE)
    else:  # Windows: only the read-only bit exists
        os.chmod(name, FILE_MODE)


def atomic_write_bytes(path, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=False) + "\n")
