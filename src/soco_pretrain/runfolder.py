"""Run folders of the training commands (``soco pretrain``, ``finetune``, ``linear``): one run at a
time in a folder, and never two runs mixed in one.

- :func:`locked`: an exclusive lock on ``RUN/.lock`` for the run's life (``flock``, released by
  the kernel if the process dies); a second command on the same folder stops with one line
  (``soco proposals`` holds the same lock on ``OUT.partial``). A command refused before it
  wrote anything leaves no folder it made (not even one holding only the lock).
- :func:`start_fresh`: ``--resume none`` on a folder that holds checkpoints refuses unless
  ``overwrite``; then the old run is moved aside to ``RUN.old-N`` (never deleted) and a line says
  where.
- :func:`file_digest`: the sha256 of a weights file (or of a run folder's newest checkpoint), so a
  resumed fine-tune can check it starts from the same weights.
- :func:`default_workers`: how many processes a run starts when not told (the usable cores).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path

from .errors import UserError

LOCK_FILE = ".lock"


@contextlib.contextmanager
def locked(run_dir, command: str, enabled: bool = True, lock_name: str = LOCK_FILE):
    """Hold ``RUN/.lock`` (``lock_name``) exclusively while the block runs (``enabled=False``:
    other ranks). Also the proposals' lock on ``OUT.partial``. A block that raises (a refused
    command) and leaves nothing but the lock removes the lock it made and the folders it made."""
    if not enabled:
        yield
        return
    run_dir = Path(run_dir)
    created = _missing_folders(run_dir)  # outermost first
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / lock_name
    made_lock = not lock.exists()
    handle = _acquire(lock, run_dir)
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(f"soco {command}, pid {os.getpid()}\n")
        handle.flush()
        try:
            yield
        except BaseException:
            if made_lock:
                _remove_if_only_the_lock(run_dir, lock, created)
            raise
    finally:
        handle.close()


def _remove_if_only_the_lock(run_dir: Path, lock: Path, created: list[Path]) -> None:
    """After a refusal: a folder holding nothing but our lock file loses it, and the folders we
    made go (an empty OUT reads as a run that happened; the rerun starts clean either way)."""
    try:
        if [entry.name for entry in run_dir.iterdir()] != [lock.name]:
            return  # the run wrote something: all of it stays
        lock.unlink()  # while still locked: nobody takes a lock on a file about to go
    except OSError:  # the folder or the lock already gone or unreadable: nothing to tidy
        return
    for folder in reversed(created):
        try:
            folder.rmdir()
        except OSError:  # not empty (another process wrote there): kept, as are its parents
            return


def _missing_folders(path: Path) -> list[Path]:
    """``path`` and its ancestors that do not exist yet, outermost first."""
    missing = []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing[::-1]


def _acquire(lock: Path, run_dir: Path):
    """The open lock file, flock'ed. A lock file removed (by a refused run, see :func:`locked`)
    between our open and our flock is opened again: a lock on a deleted file would lock nothing."""
    for _ in range(10):
        handle = open(lock, "a+")  # noqa: SIM115 - held for the whole run
        try:
            import fcntl  # here, not at the top: POSIX only (elsewhere: no lock, below)

            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # pragma: no cover - not POSIX: no lock
            return handle
        except OSError as exc:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise UserError(
                f"{run_dir}: another soco run is using this folder now ({holder}); wait for it to finish "
                "or give another --out"
            ) from exc
        try:
            same = os.path.samestat(os.fstat(handle.fileno()), os.stat(lock))
        except FileNotFoundError:
            same = False
        if same:
            return handle
        handle.close()
    raise UserError(f"{run_dir}: its lock file {lock.name} keeps being replaced; try again")


def holds_checkpoints(run_dir) -> bool:
    folder = Path(run_dir) / "checkpoints"
    return folder.is_dir() and any(p.suffix == ".pt" for p in folder.iterdir())


def start_fresh(run_dir, overwrite: bool, command: str) -> Path | None:
    """Before a run that starts over (``--resume none``): refuse a folder holding another run's
    checkpoints unless ``overwrite``; with it, move that run aside and return where it went."""
    run_dir = Path(run_dir)
    if not holds_checkpoints(run_dir):
        return None
    if not overwrite:
        raise UserError(
            f"{run_dir}: holds a {command} run's checkpoints; --resume none would mix two runs. Resume it "
            "(--resume auto), give another --out, or add --overwrite to move the old run aside"
        )
    n = 1
    while (aside := run_dir.with_name(f"{run_dir.name}.old-{n}")).exists():
        n += 1
    aside.mkdir()
    for entry in run_dir.iterdir():
        if entry.name != LOCK_FILE:  # the lock stays with the folder this run holds
            entry.rename(aside / entry.name)
    print(f"moved the previous run in {run_dir} aside to {aside} (--overwrite)", flush=True)
    return aside


def file_digest(path, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def usable_cores() -> int:
    """The cores this process may run on (a container or taskset can allow fewer than
    ``cpu_count``)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_workers(cap: int | None = None) -> int:
    """Parallel processes when not given: the usable cores, at most ``cap``."""
    cores = usable_cores()
    return cores if cap is None else min(cap, cores)
