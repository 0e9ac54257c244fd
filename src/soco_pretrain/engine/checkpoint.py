"""Checkpoints: atomic writes, checksums, safe loading, RNG capture and retention.

A checkpoint is one ``torch.save`` dict. The training loop fills these keys: ``model`` (online
and target state dicts), ``optimizer``, ``step``, ``epoch``, ``batch_in_epoch``, ``rng``
(:func:`rng_state`), ``scaler``, ``config`` (plain dict), ``world_size``.

Writes go through ``files.atomic_write`` (temporary file, fsync, ``os.replace``), so a crash or
a full disk mid-write leaves the previous checkpoint intact. Before writing, the free space is
checked against :func:`state_bytes` (a save that cannot fit is one WriteError line naming the
folder, the free and the needed bytes; torch.save would fail only after filling the disk).
Each checkpoint ``X.pt`` gets a checksum file ``X.pt.sha256`` (``sha256sum`` format:
``sha256sum -c X.pt.sha256`` checks it by hand), written after the checkpoint;
:func:`load_checkpoint` verifies it when present (files written before checksums existed load
unverified). Loading uses
``torch.load(weights_only=True)`` with the few numpy types that RNG states need allow-listed: a
checkpoint cannot run code when loaded. Weights holding NaN or inf are never written
(:class:`Checkpointer` stops the run) nor loaded (:func:`load_checkpoint`).
"""

from __future__ import annotations

import errno
import hashlib
import importlib
import math
import os
import pickle
import random
import re
import shutil
import sys
import uuid
import zipfile
from pathlib import Path

import numpy as np
import torch

from ..errors import PathError, UserError
from ..files import WriteError, atomic_write, check_free_space, fsync_dir
from .hooks import Hook
from .metrics import stop_non_finite

TMP_PREFIX = ".tmp-"  # temporary files start with this; stale ones are removed by CheckpointManager
LAST = "last.pt"
CHECKSUM_SUFFIX = ".sha256"
_NUMBERED = re.compile(r"^step_(\d+)\.pt$")
_NUMBERED_CHECKSUM = re.compile(r"^step_\d+\.pt\.sha256$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1 << 20
# copy_file_range refusals that mean "not here" (old kernel, other file system, seccomp): copy by hand.
_NO_KERNEL_COPY = {errno.ENOSYS, errno.EXDEV, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EPERM}
# os.link refusals that mean "no hard links on this file system" (FAT, some network mounts, a
# file at its link limit): last.pt becomes a copy. Anything else (EACCES, ENOSPC) is a write error.
_NO_HARD_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.ENOSYS, errno.EXDEV}


class CheckpointError(UserError):
    """A checkpoint that cannot be read, or whose bytes differ from its checksum file; the
    message names the file."""


class NonFiniteWeightsError(CheckpointError):
    """A checkpoint or weights file whose weights hold NaN or inf (a diverged run); one line
    naming the file and the first such tensor. Readers pass it on as it is."""


# Where the networks' state dicts are in what soco saves and reads: the training loops'
# checkpoints ("model"; the linear probe's "classifier"), Detectron2 files ("model") and
# MMDetection files ("state_dict"); a plain state dict holds its tensors at the top.
WEIGHT_KEYS = ("model", "classifier", "state_dict")


def weight_tensors(content) -> dict:
    """{name: tensor or numpy array} of the weights in a saved or loaded checkpoint / weights file
    (WEIGHT_KEYS entries and top-level tensors; optimiser and RNG states are not weights)."""
    if not isinstance(content, dict):
        return {}
    found = {k: v for k, v in content.items() if torch.is_tensor(v) or isinstance(v, np.ndarray)}
    for key in WEIGHT_KEYS:
        entry = content.get(key)
        if isinstance(entry, dict):
            found.update((k, v) for k, v in entry.items() if torch.is_tensor(v) or isinstance(v, np.ndarray))
    return found


def non_finite(tensors: dict) -> tuple[str, int, int] | None:
    """(first name, how many, of how many) of the floating-point tensors in ``tensors`` holding
    NaN or inf; None when all are finite. One fused max-|x| per device (``_foreach_norm`` with
    ord=inf: exact, no overflow, and it propagates NaN), one host read per device."""
    names, values = [], []
    for name, value in tensors.items():
        if isinstance(value, np.ndarray):
            if value.dtype.kind != "f":
                continue
            value = torch.from_numpy(np.ascontiguousarray(value))
        if value.is_floating_point() and value.numel() > 0:
            names.append(str(name))
            values.append(value.detach())
    by_device: dict[torch.device, list[int]] = {}
    for i, value in enumerate(values):
        by_device.setdefault(value.device, []).append(i)
    bad: list[int] = []
    with torch.no_grad():
        for indices in by_device.values():
            peaks = torch._foreach_norm([values[i] for i in indices], ord=math.inf)
            finite = torch.stack(peaks).isfinite().cpu()
            bad += [indices[j] for j in (~finite).nonzero().flatten().tolist()]
    if not bad:
        return None
    return names[min(bad)], len(bad), len(values)


def refuse_non_finite(path, content, error: type[Exception] = NonFiniteWeightsError) -> None:
    """Raise ``error`` (one line naming ``path`` and the first non-finite weight of ``content``)
    when some weight holds NaN or inf."""
    found = non_finite(weight_tensors(content))
    if found is not None:
        name, count, total = found
        raise error(
            f"{path}: {count} of {total} weight tensors hold NaN or inf (first: {name}); the run that "
            "wrote it diverged: use an earlier checkpoint"
        )


def checksum_path(path) -> Path:
    """The checksum file of checkpoint ``path``: ``PATH.sha256``."""
    path = Path(path)
    return path.with_name(path.name + CHECKSUM_SUFFIX)


# What torch.save writes besides the tensors' bytes, over-estimated: per tensor a zip local
# header and central-directory entry with the record name and padding to 64 bytes, plus its
# entry in the pickle (~300 bytes measured); then the pickle of the rest (config, RNG states) and
# the file system's own rounding.
_PER_TENSOR_BYTES = 512
_SAVE_MARGIN_BYTES = 256 << 10


def state_bytes(state) -> int:
    """About how many bytes ``torch.save(state)`` writes, a little more rather than less: every
    tensor storage once (torch.save shares them too) and numpy array, plus the overheads above."""
    storages: dict[tuple, int] = {}
    arrays, tensors = 0, 0
    stack, seen = [state], set()
    while stack:
        value = stack.pop()
        if torch.is_tensor(value):
            tensors += 1
            try:
                storage = value.untyped_storage()
                storages[(str(value.device), storage.data_ptr())] = storage.nbytes()
            except (RuntimeError, NotImplementedError):  # sparse and other storage-less layouts
                storages[("other", id(value), 0)] = value.nelement() * value.element_size()
        elif isinstance(value, np.ndarray):
            arrays += value.nbytes + _PER_TENSOR_BYTES
        elif isinstance(value, (dict, list, tuple)) and id(value) not in seen:
            seen.add(id(value))
            stack.extend(value.values() if isinstance(value, dict) else value)
    return sum(storages.values()) + arrays + tensors * _PER_TENSOR_BYTES + _SAVE_MARGIN_BYTES


def save_checkpoint(path, state: dict) -> Path:
    """Write ``state`` to ``path`` atomically, then its checksum file; returns the path. A file
    system without room for it is refused first (WriteError, see :func:`state_bytes`)."""
    path = Path(path)
    check_free_space(path.parent, state_bytes(state), path.name)
    _write_with_checksum(path, lambda f: torch.save(state, f))
    return path


class _Hashing:
    """A write-only file object that hashes what passes through (``torch.save`` needs only
    ``write`` and ``flush``): the checksum costs no second read of the checkpoint."""

    def __init__(self, f, digest):
        self.f, self.digest = f, digest

    def write(self, data) -> int:
        self.digest.update(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def _write_with_checksum(path: Path, write) -> str:
    # The old checksum file goes first: a crash before the new one is written leaves a checkpoint
    # that loads unverified, never a good checkpoint next to a stale checksum.
    _drop_checksum(path)
    digest = hashlib.sha256()
    atomic_write(path, lambda f: write(_Hashing(f, digest)), prefix=f"{TMP_PREFIX}{path.name}.", durable=True)
    _write_checksum(path, digest.hexdigest())
    return digest.hexdigest()


def _drop_checksum(path: Path) -> None:
    try:
        checksum_path(path).unlink(missing_ok=True)
    except OSError as exc:
        raise WriteError(checksum_path(path), exc.strerror or str(exc)) from exc


def _write_checksum(path: Path, hexdigest: str) -> None:
    side = checksum_path(path)
    line = f"{hexdigest}  {path.name}\n".encode("ascii")
    atomic_write(side, lambda f: f.write(line), prefix=f"{TMP_PREFIX}{side.name}.", durable=True)


def _recorded_digest(path: Path) -> str | None:
    """The digest ``PATH.sha256`` records, None when there is no checksum file."""
    side = checksum_path(path)
    try:
        words = side.read_bytes().split()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise CheckpointError(f"{side}: unreadable checksum file ({exc.strerror or exc})") from exc
    token = words[0].decode("ascii", "replace").lower() if words else ""
    if not _SHA256.match(token):
        raise CheckpointError(f"{side}: not a sha256 checksum file (expected '<64 hex digits>  {path.name}')")
    return token


def _sha256_of(f) -> str:
    digest, buffer = hashlib.sha256(), bytearray(_CHUNK)
    view = memoryview(buffer)
    while n := f.readinto(buffer):
        digest.update(view[:n])
    return digest.hexdigest()


# Files verified in this process: (device, inode, size, mtime) -> digest. latest() verifies the
# file it picks and load_checkpoint then finds it here, so a checkpoint is hashed once, not twice.
_verified: dict[str, tuple[tuple[int, int, int, int], str]] = {}


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _open_verified(path: Path):
    """``path`` opened for reading (offset 0) after checking it against its checksum file.

    Raises CheckpointError on a mismatch, OSError if it cannot be opened. The file is opened
    before the checksum is read and kept open for loading: a writer replacing ``path`` meanwhile
    (``soco export`` while the run trains) cannot mix one version's bytes with another's
    checksum, and a mismatch caused by such a replacement is retried on the new file.
    """
    for attempt in range(3):
        f = open(path, "rb")
        try:
            st = os.fstat(f.fileno())
            expected = _recorded_digest(path)
            if expected is None or _verified.get(os.path.abspath(path)) == (_identity(st), expected):
                return f
            actual = _sha256_of(f)
            if actual == expected:
                _verified[os.path.abspath(path)] = (_identity(st), expected)
                f.seek(0)
                return f
            if attempt < 2 and _replaced(path, st):
                f.close()
                continue
            raise CheckpointError(
                f"{path}: damaged (its sha256 is {actual[:16]}..., {checksum_path(path).name} recorded "
                f"{expected[:16]}... when it was written)"
            )
        except BaseException:
            f.close()
            raise
    raise AssertionError("unreachable")


def _replaced(path: Path, st: os.stat_result) -> bool:
    try:
        now = os.stat(path)
    except OSError:
        return False
    return (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino)


def verify_checkpoint(path) -> None:
    """Cheap integrity check of a checkpoint file: its checksum when it has one (one read), else
    that it is a complete zip archive (what ``torch.save`` writes; a truncated file is not).

    Raises CheckpointError (one line naming the file) or OSError (cannot open it).
    """
    path = Path(path)
    with _open_verified(path) as f:
        if _recorded_digest(path) is not None:
            return
        try:
            with zipfile.ZipFile(f) as archive:
                archive.infolist()
        except (zipfile.BadZipFile, EOFError, ValueError) as exc:
            raise CheckpointError(f"{path}: not a readable checkpoint (truncated or not a torch.save file)") from exc


# What numpy arrays, scalars and dtypes pickle as (numpy 1.x: numpy.core, 2.x: numpy._core;
# arrays of pickle protocol 5 through _frombuffer; dtypes by their class on numpy >= 1.25): the one
# allowlist of both restricted readers, torch.load of our checkpoints (np.random.get_state() in the
# RNG state) and the plain-pickle weights reader (Detectron2 .pkl, weights/read.py).
NUMPY_PICKLE_GLOBALS = frozenset(
    [(f"{core}.multiarray", name) for core in ("numpy.core", "numpy._core") for name in ("_reconstruct", "scalar")]
    + [("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer")]
    + [("numpy", "ndarray"), ("numpy", "dtype")]
)


def numpy_pickle_allowed(module: str, name: str) -> bool:
    """True for a global a pickle of numpy arrays may name (NUMPY_PICKLE_GLOBALS, numpy's DType classes)."""
    return (module, name) in NUMPY_PICKLE_GLOBALS or (module.startswith("numpy") and name.endswith("DType"))


def _numpy_safe_globals() -> list:
    """NUMPY_PICKLE_GLOBALS as the objects torch.serialization.safe_globals takes (this numpy's path only:
    importing numpy.core warns on numpy 2), with numpy's DType classes."""
    core = "numpy._core" if hasattr(np, "_core") else "numpy.core"
    found = [
        getattr(importlib.import_module(module), name)
        for module, name in sorted(NUMPY_PICKLE_GLOBALS)
        if not module.startswith("numpy.") or module.startswith(core + ".")
    ]
    dtypes = getattr(np, "dtypes", None)  # numpy >= 1.25 pickles dtypes by their class
    if dtypes is not None:
        found += [getattr(dtypes, name) for name in dir(dtypes) if name.endswith("DType")]
    return found


def load_checkpoint(path, map_location="cpu", refuse_nan: bool = True) -> dict:
    """Load a checkpoint written by :func:`save_checkpoint` (tensors on ``map_location``).

    Its checksum file, if any, is verified first (CheckpointError naming the file on a mismatch);
    weights holding NaN or inf are refused (NonFiniteWeightsError naming the file and tensor)
    unless ``refuse_nan`` is off (a caller that checks them itself).
    """
    path = Path(path)
    if not path.is_file():
        raise PathError(path, "no such checkpoint")
    try:
        f = _open_verified(path)
    except OSError as exc:
        raise CheckpointError(f"{path}: not a readable checkpoint ({exc.strerror or exc})") from exc
    with f:
        try:
            with torch.serialization.safe_globals(_numpy_safe_globals()):
                state = torch.load(f, map_location=map_location, weights_only=True)
        except Exception as exc:  # any unreadable file becomes one clear line
            if isinstance(exc, (IndexError, EOFError, pickle.UnpicklingError, KeyError)):
                # the unpickler's own words ("list index out of range") say nothing to a user
                first = "not a torch.save file, or its pickle is truncated or malformed"
            else:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(f"{path}: not a readable checkpoint ({first})") from exc
    # A resume, an export, kNN, a fine-tune's or the linear probe's weights: none may start from
    # NaN (a file saved before the writer refused them, or written by another tool).
    if refuse_nan:
        refuse_non_finite(path, state)
    return state


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


# Checkpoints a run resumed from (real paths), for the rest of this process: the loops build one
# manager to resume and another to save, and retention must spare the file either way.
_protected: set[str] = set()


def _step_of(path: Path) -> int:
    m = _NUMBERED.match(path.name)
    return int(m.group(1)) if m else -1


def _stat(path: Path) -> os.stat_result | None:
    try:
        return os.stat(path)
    except OSError:
        return None


def _content_key(path: Path) -> tuple | None:
    """What decides :func:`verify_checkpoint`'s verdict on ``path``: the file (identity) and the
    digest its checksum file records; two names with the same key get the same verdict. None
    when either cannot be read (the check itself then says why)."""
    st = _stat(path)
    if st is None:
        return None
    try:
        return (_identity(st), _recorded_digest(path))
    except CheckpointError:
        return None


_said_no_links = False  # the note that last.pt is a copy (no hard links) is said once per process


class CheckpointManager:
    """Checkpoints of one run in ``RUN/checkpoints``: ``last.pt`` plus ``keep`` numbered ones.

    ``save(state)`` writes ``step_{N:08d}.pt`` (N = ``state["step"]``), then makes ``last.pt`` a
    hard link to it (a copy where the file system has no hard links), each name with its
    ``.sha256`` checksum file, then deletes the oldest numbered files beyond ``keep``: the bytes
    are on disk once per kept checkpoint, not twice. Damage to the newest file (both names) is
    survived by the previous numbered one, which :meth:`latest` falls back to. With ``keep=0``
    only ``last.pt`` is written, as a file of its own. Default ``keep=3`` comes from
    TrainConfig.keep_checkpoints (our choice). Only rank 0 should save.

    Retention never deletes a protected checkpoint (:meth:`protect`; :meth:`resume_from`
    protects the file it returns), and counts only numbered files up to the step being saved:
    after resuming from an older checkpoint, the later ones of the abandoned run stay until the
    run passes their step, and never push out the files the resumed run writes.
    """

    def __init__(self, run_dir, keep: int = 3, protect=None):
        if keep < 0:
            raise ValueError(f"keep must be >= 0, got {keep}")
        self.directory = Path(run_dir) / "checkpoints"
        self.keep = keep
        if protect is not None:
            self.protect(protect)
        # Stale temporary files are removed by the writer's first save, not here: readers (export,
        # knn, finetune --weights RUN) also build a manager, and the run may still be training.
        self._cleaned = False

    @property
    def last(self) -> Path:
        return self.directory / LAST

    @staticmethod
    def protect(path) -> None:
        """Never delete checkpoint ``path`` in retention, by any manager of this process (a run
        protects the file it resumed from; :meth:`resume_from` does so itself)."""
        _protected.add(os.path.realpath(path))

    def numbered(self) -> list[Path]:
        """Numbered checkpoints, oldest (lowest step) first."""
        if not self.directory.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.directory.iterdir() if (m := _NUMBERED.match(p.name))]
        return [p for _, p in sorted(found)]

    def latest(self) -> Path | None:
        """The newest intact checkpoint, None when there is none.

        Candidates, newest first: numbered files written after ``last.pt`` (a crash between the two
        writes of a save), ``last.pt``, the numbered file it copies, then the others by step. Each
        is checked by :func:`verify_checkpoint` (its checksum: one read, not repeated by the load
        that follows); a damaged one is skipped with a one-line warning naming it and the file
        used instead (``last.pt`` and the numbered file it is a hard link to are one file: one
        line, one read). A missing ``last.pt`` beside numbered files is said in one line too.
        When none is intact the newest is returned: loading it raises the error.
        """
        candidates = self._candidates()
        skipped: list[str] = []
        if candidates and self.last not in candidates:
            skipped.append(f"{self.last}: missing")
        failed: dict[tuple, int] = {}  # (file identity, recorded digest) of a damaged file -> its line
        for path in candidates:
            key = _content_key(path)
            if key is not None and key in failed:  # a second name of a file found damaged
                skipped[failed[key]] += f", as is {path.name} (the same file)"
                continue
            try:
                verify_checkpoint(path)
            except CheckpointError as exc:
                if key is not None:
                    failed[key] = len(skipped)
                skipped.append(str(exc))
                continue
            except OSError as exc:  # vanished or unreadable since it was listed
                skipped.append(f"{path}: {exc.strerror or exc}")
                continue
            for problem in skipped:
                print(f"soco: warning: {problem}; using {path} instead", file=sys.stderr, flush=True)
            return path
        return candidates[0] if candidates else None

    def _candidates(self) -> list[Path]:
        newest_first = self.numbered()[::-1]
        last_stat = _stat(self.last)
        if last_stat is None:
            return newest_first
        twin = self._copy_of_last(newest_first, last_stat)
        # Written after last.pt: a save stopped between its numbered file and last.pt. With a twin,
        # only higher steps count (mtimes of a folder copied without -p say nothing).
        newer = []
        for path in newest_first:
            st = _stat(path)
            later = st is not None and st.st_mtime_ns > last_stat.st_mtime_ns
            if later and (twin is None or _step_of(path) > _step_of(twin)):
                newer.append(path)
        rest = [p for p in newest_first if p not in newer and p != twin]
        return newer + [self.last] + ([twin] if twin is not None else []) + rest

    def _copy_of_last(self, numbered: list[Path], last_stat: os.stat_result) -> Path | None:
        """The numbered file ``last.pt`` is a hard link to or a copy of (same checksum: file systems
        without hard links, and runs written when last.pt was always a copy), None if neither."""
        try:
            digest = _recorded_digest(self.last)
        except CheckpointError:
            digest = None
        for path in numbered:
            st = _stat(path)
            if st is not None and os.path.samestat(st, last_stat):
                return path
            if digest is not None:
                try:
                    if _recorded_digest(path) == digest:
                        return path
                except CheckpointError:
                    pass
        return None

    def resume_from(self, resume) -> Path | None:
        """The checkpoint a ``--resume`` value names: None/"none" -> None (start fresh), "auto" ->
        :meth:`latest` (None when there is none), else that file (CheckpointError if missing).
        The file returned is protected from retention (:meth:`protect`)."""
        if resume in (None, "none"):
            return None
        if resume == "auto":
            found = self.latest()
        else:
            found = Path(resume)
            if not found.is_file():
                raise CheckpointError(f"--resume {resume}: no such checkpoint file")
        if found is not None:
            self.protect(found)
        return found

    def save(self, state: dict, step: int | None = None) -> Path:
        """Write ``state`` for ``step`` (default ``state["step"]``); returns ``last.pt``'s path."""
        if not self._cleaned:
            self._remove_stale_temps()
            self._cleaned = True
        if self.keep == 0:
            return save_checkpoint(self.last, state)
        step = int(state["step"] if step is None else step)
        target = self.directory / f"step_{step:08d}.pt"
        # One copy of the bytes: last.pt becomes a hard link to the numbered file (a copy where
        # links fail, which the write then reports if the disk cannot hold it).
        check_free_space(self.directory, state_bytes(state), f"{target.name} and {LAST}")
        digest = _write_with_checksum(target, lambda f: torch.save(state, f))
        _drop_checksum(self.last)
        self._point_last_at(target)
        _write_checksum(self.last, digest)  # same bytes, same checksum (a bad copy fails it)
        self._prune(step)
        return self.last

    def _point_last_at(self, target: Path) -> None:
        """Replace ``last.pt`` by a hard link to ``target`` atomically (link under a temporary
        name, then ``os.replace``): a reader sees the old or the new file, never none. Where the
        file system refuses hard links (FAT, some network mounts), an atomic copy, said once."""
        global _said_no_links
        tmp = self.directory / f"{TMP_PREFIX}{LAST}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            os.link(target, tmp)
        except OSError as exc:
            if exc.errno not in _NO_HARD_LINKS:
                raise WriteError(self.last, exc.strerror or str(exc)) from exc
            if not _said_no_links:
                _said_no_links = True
                print(
                    f"soco: note: {self.directory}: no hard links here ({exc.strerror or exc}); last.pt is a copy "
                    "of the newest checkpoint (twice its disk space)",
                    file=sys.stderr,
                    flush=True,
                )
            atomic_write(self.last, lambda f: _copy_into(target, f), prefix=f"{TMP_PREFIX}{LAST}.", durable=True)
            return
        try:
            os.replace(tmp, self.last)
            fsync_dir(self.directory)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise WriteError(self.last, exc.strerror or str(exc)) from exc
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def _prune(self, step: int) -> None:
        kept = [p for p in self.numbered() if _step_of(p) <= step and os.path.realpath(p) not in _protected]
        for old in kept[: -self.keep]:
            old.unlink(missing_ok=True)
            checksum_path(old).unlink(missing_ok=True)
        # A checksum file whose checkpoint is gone (a crash between the two unlinks above).
        for side in self.directory.iterdir():
            if _NUMBERED_CHECKSUM.match(side.name) and not side.with_name(side.name[: -len(CHECKSUM_SUFFIX)]).exists():
                side.unlink(missing_ok=True)

    def _remove_stale_temps(self) -> None:
        # Left by a process killed mid-write (SIGKILL, power loss); never a valid checkpoint.
        if self.directory.is_dir():
            for p in self.directory.glob(f"{TMP_PREFIX}*"):
                p.unlink(missing_ok=True)


def _copy_into(source: Path, f) -> None:
    """Append ``source``'s bytes to the open file ``f`` (empty so far): in the kernel where it
    can (``copy_file_range``; a reflink on btrfs/XFS), else by reads and writes."""
    with open(source, "rb") as src:
        size, done = os.fstat(src.fileno()).st_size, 0
        copy_range = getattr(os, "copy_file_range", None)
        if copy_range is not None:
            try:
                while done < size and (n := copy_range(src.fileno(), f.fileno(), size - done)) > 0:
                    done += n
            except OSError as exc:
                if done or exc.errno not in _NO_KERNEL_COPY:
                    raise
        if done == 0:
            shutil.copyfileobj(src, f, _CHUNK)
        elif done < size:
            raise OSError(errno.EIO, f"{source} shrank while being copied")


class Checkpointer(Hook):
    """Saves a run's checkpoint when due: rank 0 writes through ``manager``, every process then
    waits (nobody races ahead of a checkpoint another process may resume from).

    ``state()`` assembles what a resumed run needs; ``due(trainer)`` says when (the trainer asks
    after the step's record is written, so a crash between the two only repeats a record).
    """

    def __init__(self, manager: CheckpointManager, state, due, is_main: bool = True, barrier=None):
        self.manager, self.state, self.due, self.is_main = manager, state, due, is_main
        self.barrier = barrier

    def after_step(self, trainer) -> None:
        if self.due(trainer):
            self.save(trainer)

    def save(self, trainer) -> None:
        """Save now (every process calls it: the weights check and the barrier are collective)."""
        with trainer.side_work():
            state = self.state()
            # The loss guard reads the loss of the forward pass, before the update: an update that
            # made the weights NaN passes it. Checked on every process (DDP keeps the weights
            # equal, so all stop together and none waits at the barrier for rank 0).
            bad = non_finite(weight_tensors(state))
            if bad is not None:
                name, count, total = bad
                stop_non_finite(trainer, f"non-finite weights ({count} of {total} tensors, first {name})")
            if self.is_main:
                trainer.last_checkpoint = self.manager.save(state, step=trainer.step)
            if self.barrier is not None:
                self.barrier()
