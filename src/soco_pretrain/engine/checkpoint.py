"""Checkpoints: atomic writes, safe loading, RNG capture and retention.

A checkpoint is one ``torch.save`` dict. The training loop fills these keys: ``model`` (online
and target state dicts), ``optimizer``, ``step``, ``epoch``, ``batch_in_epoch``, ``rng``
(:func:`rng_state`), ``scaler``, ``config`` (plain dict), ``world_size``.

Writes go to a temporary file in the same folder, are fsynced, then renamed over the target
(``os.replace`` is atomic on POSIX and Windows), so a crash or a full disk mid-write leaves the
previous checkpoint intact. Loading uses ``torch.load(weights_only=True)`` with the few numpy
types that RNG states need allow-listed: a checkpoint cannot run code when loaded.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..files import atomic_write, fsync_dir

TMP_PREFIX = ".tmp-"  # temporary files start with this; stale ones are removed by CheckpointManager
LAST = "last.pt"
_NUMBERED = re.compile(r"^step_(\d+)\.pt$")


class CheckpointError(UserError):
    """A checkpoint that cannot be read; the message names the file."""


def save_checkpoint(path, state: dict) -> Path:
    """Write ``state`` to ``path`` atomically (temp file + fsync + ``os.replace``); returns the path."""
    path = Path(path)
    return atomic_write(path, lambda f: torch.save(state, f), prefix=f"{TMP_PREFIX}{path.name}.", durable=True)


def _numpy_safe_globals() -> list:
    # What np.random.get_state() and numpy scalars pickle as (numpy 1.x: numpy.core, 2.x: numpy._core).
    core = getattr(np, "_core", None) or np.core
    found = [np.ndarray, np.dtype, core.multiarray._reconstruct, core.multiarray.scalar]
    dtypes = getattr(np, "dtypes", None)  # numpy >= 1.25 pickles dtypes by their class
    if dtypes is not None:
        found += [getattr(dtypes, name) for name in dir(dtypes) if name.endswith("DType")]
    return found


def load_checkpoint(path, map_location="cpu") -> dict:
    """Load a checkpoint written by :func:`save_checkpoint` (tensors on ``map_location``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # any unreadable file becomes one clear line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint ({first})") from exc


# ---------------------------------------------------------------- RNG states


def rng_state() -> dict:
    """Python, numpy, torch (CPU) and, if initialised, every CUDA device's RNG state."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` captured (a missing or extra CUDA entry is skipped)."""
    random.setstate(_as_tuples(state["python"]))
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])


def _as_tuples(value):
    # random.setstate needs tuples; be lenient if a state went through JSON/YAML as lists.
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


# ---------------------------------------------------------------- retention


class CheckpointManager:
    """Checkpoints of one run in ``RUN/checkpoints``: ``last.pt`` plus ``keep`` numbered ones.

    ``save(state)`` writes ``step_{N:08d}.pt`` (N = ``state["step"]``) and makes ``last.pt`` the
    same file (a hard link, or a copy where links are unsupported), then deletes the oldest
    numbered files beyond ``keep``. With ``keep=0`` only ``last.pt`` is written. Default
    ``keep=3`` comes from TrainConfig.keep_checkpoints (our choice). Only rank 0 should save.
    """

    def __init__(self, run_dir, keep: int = 3):
        if keep < 0:
            raise ValueError(f"keep must be >= 0, got {keep}")
        self.directory = Path(run_dir) / "checkpoints"
        self.keep = keep
        # Stale temporary files are removed by the writer's first save, not here: readers (export,
        # knn, finetune --weights RUN) also build a manager, and the run may still be training.
        self._cleaned = False

    @property
    def last(self) -> Path:
        return self.directory / LAST

    def numbered(self) -> list[Path]:
        """Numbered checkpoints, oldest (lowest step) first."""
        if not self.directory.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.directory.iterdir() if (m := _NUMBERED.match(p.name))]
        return [p for _, p in sorted(found)]

    def latest(self) -> Path | None:
        """``last.pt`` if present, else the highest numbered checkpoint, else None."""
        if self.last.is_file():
            return self.last
        numbered = self.numbered()
        return numbered[-1] if numbered else None

    def resume_from(self, resume) -> Path | None:
        """The checkpoint a ``--resume`` value names: None/"none" -> None (start fresh), "auto" ->
        :meth:`latest` (None when there is none), else that file (CheckpointError if missing)."""
        if resume in (None, "none"):
            return None
        if resume == "auto":
            return self.latest()
        path = Path(resume)
        if not path.is_file():
            raise CheckpointError(f"--resume {resume}: no such checkpoint file")
        return path

    def save(self, state: dict, step: int | None = None) -> Path:
        """Write ``state`` for ``step`` (default ``state["step"]``); returns ``last.pt``'s path."""
        if not self._cleaned:
            self._remove_stale_temps()
            self._cleaned = True
        if self.keep == 0:
            return save_checkpoint(self.last, state)
        step = int(state["step"] if step is None else step)
        target = save_checkpoint(self.directory / f"step_{step:08d}.pt", state)
        self._point_last_at(target)
        for old in self.numbered()[: -self.keep]:
            old.unlink(missing_ok=True)
        return self.last

    def _point_last_at(self, target: Path) -> None:
        # last.pt becomes the same bytes as the numbered file without writing them twice.
        fd, tmp_name = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{LAST}.", dir=self.directory)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            tmp.unlink()
            try:
                os.link(target, tmp)
            except OSError:  # file systems without hard links
                shutil.copyfile(target, tmp)
            os.replace(tmp, self.last)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(self.directory)

    def _remove_stale_temps(self) -> None:
        # Left by a process killed mid-write (SIGKILL, power loss); never a valid checkpoint.
        if self.directory.is_dir():
            for p in self.directory.glob(f"{TMP_PREFIX}*"):
                p.unlink(missing_ok=True)


class Checkpointer:
    """Saves a run's checkpoint when due: rank 0 writes through ``manager``, every process then
    waits (nobody races ahead of a checkpoint another process may resume from).

    ``state()`` assembles what a resumed run needs; ``due(trainer)`` says when (the trainer asks
    after the step's record is written, so a crash between the two only repeats a record).
    """

    def __init__(self, manager: CheckpointManager, state, due, is_main: bool = True, barrier=None):
        self.manager, self.state, self.due, self.is_main = manager, state, due, is_main
        self.barrier = barrier

    def after_step(self, trainer) -> None:
        if not self.due(trainer):
            return
        with trainer.side_work():
            if self.is_main:
                trainer.last_checkpoint = self.manager.save(self.state(), step=trainer.step)
            if self.barrier is not None:
                self.barrier()
