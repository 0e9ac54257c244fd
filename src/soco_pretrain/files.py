"""Atomic file writes: the one writer every stage uses (proposal stores, checkpoints, exports,
metrics and reports).

A file is written to a temporary file in the same folder, flushed and fsynced, given the usual
permissions (``0666 & ~umask``; ``mkstemp`` alone makes 0600, which ``os.replace`` would keep),
then renamed over the target (``os.replace`` is atomic on POSIX and Windows). A crash, a full
disk or Ctrl-C mid-write leaves the old file (or none) and never a half-written one; the
temporary file is removed on any error. The folder is created if needed.

An ``OSError`` on the way (disk full, permission denied, read-only file system) becomes one
:class:`WriteError` line naming the file; the error itself stays as ``__cause__``. So does the
``RuntimeError`` torch's zip writer raises when its file fails under ``torch.save`` ("unexpected
pos ..."; the ``OSError`` is only its ``__context__``). :func:`check_free_space` refuses a write
the file system has no room for before any byte is written (checkpoints: hundreds of MB).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
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


def _write_failure(exc: BaseException) -> tuple[str, BaseException] | None:
    """(reason, cause) when ``exc`` means the file could not be written, else None (a bug: it
    passes through). An OSError; or torch.save's zip writer failing: its Python file's OSError
    (ENOSPC) raised inside ``write_record``, then the writer's own ``__exit__`` raises
    ``RuntimeError: [enforce fail at inline_container.cc] ... unexpected pos`` over it, so the
    OSError is only that error's ``__context__``."""
    if isinstance(exc, OSError):
        return _reason(exc), exc
    if not isinstance(exc, RuntimeError):
        return None
    seen, link = set(), exc.__cause__ or exc.__context__
    while link is not None and id(link) not in seen:
        if isinstance(link, OSError):
            return _reason(link), link
        seen.add(id(link))
        link = link.__cause__ or link.__context__
    text = str(exc)
    if "PytorchStreamWriter" in text or "inline_container" in text:  # the C++ writer's own write failed
        first = " ".join(text.strip().splitlines()[0].split()) if text.strip() else "RuntimeError"
        return f"torch.save's writer failed: {first}", exc
    return None


def free_bytes(folder) -> int | None:
    """Bytes free for this user on the file system of ``folder`` (or of its nearest existing
    parent: a run folder may not exist yet); None when it cannot be told."""
    here = Path(folder).absolute()
    while not here.exists() and here.parent != here:
        here = here.parent
    try:
        return shutil.disk_usage(here).free
    except OSError:
        return None


def human_bytes(n: int) -> str:
    """``n`` bytes for a message: "512 bytes", "830.0 KiB", "1.9 MiB", "12.3 GiB"."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f} {unit}"
    return f"{n} bytes"


def check_free_space(folder, needed: int, what: str) -> None:
    """Raise :class:`WriteError` naming ``folder``, the free and the ``needed`` bytes when its file
    system has less than ``needed`` bytes free: a write that cannot fit is refused before it
    starts (no temporary file to fill the disk, the previous files untouched). ``what`` names
    the files meant ("step_00000100.pt and last.pt"). Nothing is checked where the free space
    cannot be read (the write itself then reports a full disk)."""
    free = free_bytes(folder)
    if free is not None and free < needed:
        raise WriteError(
            folder,
            f"cannot write {what}: {human_bytes(free)} free, about {human_bytes(needed)} needed "
            "(ENOSPC: free some space or write elsewhere)",
        )


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
    ``write``) and for torch.save's writer failing on its file (a full disk under ``torch.save``
    is a RuntimeError, see :func:`_write_failure`); other exceptions pass through unchanged.
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
        failure = _write_failure(exc)
        if failure is None:
            raise
        reason, cause = failure
        if not isinstance(cause, OSError):  # torch's C++ writer failed on its own: a full disk, usually
            free = free_bytes(path.parent)
            reason += f"; {human_bytes(free)} free there" if free is not None else ""
        raise WriteError(path, reason) from cause
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
