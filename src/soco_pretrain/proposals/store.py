"""The proposals store: one small set of memory-mapped arrays for a whole dataset.

A store is a directory::

    boxes.npy       (N, 4) int16 (int32 if a coordinate exceeds 32767): x1, y1, x2, y2 in
                    original-image pixels, x2/y2 inclusive; image i owns rows offsets[i]:offsets[i+1]
    offsets.npy     (n + 1,) int64
    sizes.npy       (n, 2) int32: width, height of the original image (0, 0 if it failed)
    status.npy      (n,) uint8: the filter rule that produced the boxes (filters.RULE_*)
    raw_counts.npy  (n,) int32: selective-search boxes before the filter
    file_keys.npy   (n, 2) int64: each image file's size in bytes and mtime in ns when it was
                    searched (-1, -1: unknown)
    file_sha256.npy (n, 32) uint8: the sha256 of each image file's bytes (zeros: unknown)
    paths.json      list of n image paths (relative to the image root), sorted
    manifest.json   format, parameters, package versions, counts, failures, shard, checksums

Why: the released pipeline loads one JSON of all boxes in every training process (about 110 s
and 5.5 GB each for ImageNet); memory-mapped arrays cost microseconds per image and share pages
between DataLoader workers. Every file is written atomically and the
manifest last, so a directory with a manifest is a complete store.

File keys: a photo replaced by another under the same name must not keep the old one's boxes.
``soco proposals`` reruns compare each file's size and mtime (one stat) with ``file_keys.npy``
and hash only the files whose key differs (a copied dataset has new mtimes but the same bytes:
not searched again). Stores written before file keys existed lack both files: every image's key
is then unknown (``has_file_keys`` is False), the format version is unchanged.

Checksums: the manifest records each file's size and sha256. Opening a store checks the sizes
and a quick checksum: the full sha256 of files up to QUICK_FULL_BYTES, and for bigger files the
sha256 of SAMPLE_BLOCKS evenly spaced blocks recorded at write time (a file overwritten at the
same size is caught; a change confined to the bytes between blocks needs the full check,
``load(..., verify=True)`` or ``soco proposals verify STORE``). A store written before sampled
hashes existed gets the full sha256 on open.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np

from ..errors import PathError
from ..files import atomic_write_bytes, atomic_write_json
from .filters import RULE_FAILED, RULE_NAMES

FORMAT = "soco-proposals"
FORMAT_VERSION = 1
ARRAY_FILES = ("boxes.npy", "offsets.npy", "sizes.npy", "status.npy", "raw_counts.npy")
# Written by this version, absent from older stores (read as unknown keys, see the docstring).
KEY_FILES = ("file_keys.npy", "file_sha256.npy")
UNKNOWN_KEY = -1
INT16_MAX = np.iinfo(np.int16).max
# Quick checksum on open: files up to this size are hashed in full (sha256 runs at several
# hundred MB/s, so at most a few tens of ms per file); bigger ones (boxes.npy of ImageNet is
# hundreds of MB) by 64 blocks of 64 KiB: 4 MiB read whatever the size.
QUICK_FULL_BYTES = 32 << 20
SAMPLE_BLOCK = 64 << 10
SAMPLE_BLOCKS = 64


# ---------------------------------------------------------------- writing


def _sample_spans(size: int, block: int, blocks: int) -> list[tuple[int, int]]:
    """(offset, length) of the sampled blocks of a ``size``-byte file: the first and last block
    and evenly spaced ones between (the whole file when it is not bigger than the blocks)."""
    if size <= block * blocks or blocks < 2:
        return [(0, size)]
    last = size - block
    return [(last * k // (blocks - 1), block) for k in range(blocks)]


def _sample_sha256_bytes(data: bytes, block: int, blocks: int) -> str:
    h = hashlib.sha256()
    view = memoryview(data)
    for start, length in _sample_spans(len(data), block, blocks):
        h.update(view[start : start + length])
    return h.hexdigest()


def _sample_sha256_file(path: Path, block: int, blocks: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for start, length in _sample_spans(path.stat().st_size, block, blocks):
            f.seek(start)
            h.update(f.read(length))
    return h.hexdigest()


def _checksums(data: bytes) -> dict:
    """What the manifest records of one file: size, sha256, and sampled blocks' sha256 if big."""
    entry = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    if len(data) > QUICK_FULL_BYTES:
        entry["sample"] = [SAMPLE_BLOCK, SAMPLE_BLOCKS]
        entry["sample_sha256"] = _sample_sha256_bytes(data, SAMPLE_BLOCK, SAMPLE_BLOCKS)
    return entry


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def box_dtype(boxes: np.ndarray):
    """int16 when every coordinate fits (images up to 32768 px a side), else int32."""
    if boxes.size == 0:
        return np.int16
    lo, hi = int(boxes.min()), int(boxes.max())
    return np.int16 if lo >= -INT16_MAX - 1 and hi <= INT16_MAX else np.int32


def store_counts(status: np.ndarray, n_boxes: int) -> dict:
    """Counts recorded in the manifest: images, ok, failed, boxes and images per rule."""
    status = np.asarray(status)
    per_rule = {name: int((status == code).sum()) for code, name in RULE_NAMES.items()}
    failed = per_rule["failed"]
    return {
        "images": int(len(status)),
        "ok": int(len(status) - failed),
        "failed": failed,
        "boxes": int(n_boxes),
        "rules": per_rule,
    }


def digest_row(hexdigest: str | None) -> np.ndarray:
    """A sha256 hex digest as the 32 bytes ``file_sha256.npy`` keeps (zeros for None)."""
    return np.frombuffer(bytes.fromhex(hexdigest), dtype=np.uint8) if hexdigest else np.zeros(32, np.uint8)


def digest_hex(row) -> str | None:
    """The hex digest of a ``file_sha256.npy`` row, None for an unknown (all-zero) one."""
    data = bytes(np.asarray(row, dtype=np.uint8))
    return data.hex() if any(data) else None


def write_store(
    out, paths, boxes, offsets, sizes, status, raw_counts, manifest: dict, file_keys=None, file_sha256=None
) -> Path:
    """Write a complete store into directory ``out`` (created if needed) and return its path.

    ``manifest`` holds the caller's fields (preset, config, failures, shard, ...); counts,
    format, checksums are added here. ``file_keys`` ((n, 2): file bytes, mtime_ns; -1 unknown)
    and ``file_sha256`` ((n, 32) uint8, zeros unknown) are each image file's change key; given
    together or not at all (a store without them reads as one of an older version). An existing
    store in ``out`` is replaced: its manifest is removed first, so a crash midway leaves a
    directory that ``load`` rejects, never a mix.
    """
    out = Path(out)
    n = len(paths)
    boxes = np.asarray(boxes).reshape(-1, 4)
    offsets = np.asarray(offsets, dtype=np.int64)
    status = np.asarray(status, dtype=np.uint8)
    arrays = {
        "boxes.npy": boxes.astype(box_dtype(boxes)),
        "offsets.npy": offsets,
        "sizes.npy": np.asarray(sizes, dtype=np.int32).reshape(n, 2),
        "status.npy": status,
        "raw_counts.npy": np.asarray(raw_counts, dtype=np.int32),
    }
    if (file_keys is None) != (file_sha256 is None):
        raise PathError(out, "file_keys and file_sha256 go together (internal error)")
    if file_keys is not None:
        arrays["file_keys.npy"] = np.asarray(file_keys, dtype=np.int64).reshape(n, 2)
        arrays["file_sha256.npy"] = np.asarray(file_sha256, dtype=np.uint8).reshape(n, 32)
    if len(offsets) != n + 1 or offsets[0] != 0 or offsets[-1] != len(boxes) or len(status) != n:
        raise PathError(out, f"inconsistent arrays for {n} images (internal error)")
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").unlink(missing_ok=True)
    for name in KEY_FILES:  # a rewrite without keys must not leave the old store's behind
        if name not in arrays:
            (out / name).unlink(missing_ok=True)
    files = {}
    for name, arr in arrays.items():
        data = _npy_bytes(arr)
        atomic_write_bytes(out / name, data)
        files[name] = _checksums(data)
    data = (json.dumps(list(paths)) + "\n").encode("utf-8")
    atomic_write_bytes(out / "paths.json", data)
    files["paths.json"] = _checksums(data)
    full = {"format": FORMAT, "format_version": FORMAT_VERSION}
    full.update(manifest)
    full["counts"] = store_counts(status, len(boxes))
    full["box_dtype"] = str(arrays["boxes.npy"].dtype)
    full["files"] = files
    atomic_write_json(out / "manifest.json", full)
    return out


# ---------------------------------------------------------------- reading


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(directory) -> dict:
    """The manifest of the store in ``directory``; PathError if it is not a complete store."""
    directory = Path(directory)
    if not directory.is_dir():
        raise PathError(directory, "no such proposals store (not a directory)")
    mpath = directory / "manifest.json"
    if not mpath.is_file():
        raise PathError(directory, "not a complete proposals store (no manifest.json)")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise PathError(directory, f"unreadable manifest.json ({exc.__class__.__name__}: {exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise PathError(directory, f"manifest.json is not a {FORMAT} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise PathError(
            directory,
            f"store format version {manifest.get('format_version')} "
            f"is not supported (this version reads {FORMAT_VERSION})",
        )
    return manifest


def _quick_check(path: Path, want: dict) -> bool:
    """The open-time checksum of one file (see the module docstring); True if it matches or the
    manifest records none."""
    if "sample_sha256" in want:
        try:
            block, blocks = (int(v) for v in want["sample"])
        except (KeyError, TypeError, ValueError):
            return False
        return _sample_sha256_file(path, block, blocks) == want["sample_sha256"]
    if "sha256" in want:
        return _sha256_file(path) == want["sha256"]
    return True


class ProposalStore:
    """Read-only view of a store. Arrays are memory-mapped and opened lazily, so the object is
    cheap to create and pickles by directory (each DataLoader worker reopens its own maps).

    Opening checks each file's size and quick checksum against the manifest (``verify``: the
    full sha256 of every file); a mismatch is a PathError naming the file."""

    def __init__(self, directory, verify: bool = False):
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory)
        files = self.manifest.get("files", {})
        # The key files are checked when the manifest lists them (older stores have none).
        self._key_files = all(name in files for name in KEY_FILES)
        for name in (*ARRAY_FILES, *(KEY_FILES if self._key_files else ()), "paths.json"):
            p = self.directory / name
            if not p.is_file():
                raise PathError(self.directory, f"{name} is missing")
            want = files.get(name, {})
            if "bytes" in want and p.stat().st_size != want["bytes"]:
                raise PathError(
                    self.directory,
                    f"{name} has {p.stat().st_size} bytes, manifest says {want['bytes']} (truncated or replaced)",
                )
            if verify and want.get("sha256") != _sha256_file(p):
                raise PathError(self.directory, f"{name} does not match its sha256 in manifest.json")
            if not verify and not _quick_check(p, want):
                raise PathError(
                    self.directory,
                    f"{name} does not match its checksum in manifest.json "
                    "(changed after the store was written; make the store again)",
                )
        try:
            self.paths = json.loads((self.directory / "paths.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise PathError(self.directory, f"unreadable paths.json ({exc})") from exc
        self._arrays: dict | None = None
        self._index: dict[str, int] | None = None
        self._check()

    def _check(self):
        a = self._maps()
        n = len(self.paths)
        off = a["offsets.npy"]
        problems = []
        if a["boxes.npy"].ndim != 2 or a["boxes.npy"].shape[1:] != (4,):
            problems.append(f"boxes.npy has shape {a['boxes.npy'].shape}")
        if off.shape != (n + 1,) or off[0] != 0 or off[-1] != len(a["boxes.npy"]):
            problems.append("offsets.npy does not match boxes.npy / paths.json")
        elif n and np.any(np.diff(off) < 0):
            problems.append("offsets.npy is not non-decreasing")
        shapes = [("sizes.npy", (n, 2)), ("status.npy", (n,)), ("raw_counts.npy", (n,))]
        if self._key_files:
            shapes += [("file_keys.npy", (n, 2)), ("file_sha256.npy", (n, 32))]
        for name, shape in shapes:
            if a[name].shape != shape:
                problems.append(f"{name} has shape {a[name].shape}, expected {shape}")
        if problems:
            raise PathError(self.directory, "corrupt store: " + "; ".join(problems))

    def _maps(self) -> dict:
        if self._arrays is None:
            arrays = {}
            for name in (*ARRAY_FILES, *(KEY_FILES if self._key_files else ())):
                try:
                    arrays[name] = np.load(self.directory / name, mmap_mode="r", allow_pickle=False)
                except (OSError, ValueError, EOFError) as exc:  # what np.load raises for a bad .npy
                    raise PathError(self.directory, f"cannot read {name} ({exc.__class__.__name__}: {exc})") from exc
            self._arrays = arrays
        return self._arrays

    # Pickle by directory: memory maps are reopened lazily in the receiving process.
    def __getstate__(self):
        return {"directory": str(self.directory), "manifest": self.manifest, "paths": self.paths}

    def __setstate__(self, state):
        self.directory = Path(state["directory"])
        self.manifest = state["manifest"]
        self.paths = state["paths"]
        files = self.manifest.get("files", {})
        self._key_files = all(name in files for name in KEY_FILES)
        self._arrays = None
        self._index = None

    def __len__(self) -> int:
        return len(self.paths)

    def __repr__(self) -> str:
        return f"ProposalStore({str(self.directory)!r}, images={len(self)})"

    def _i(self, i: int) -> int:
        n = len(self.paths)
        i = int(i)
        if not -n <= i < n:
            raise IndexError(f"image index {i} out of range for {n} images in {self.directory}")
        return i % n if n else i

    def boxes(self, i: int) -> np.ndarray:
        """Boxes of image ``i``: an (n, 4) int32 array x1, y1, x2, y2 in original pixels.

        A private copy, widened from the stored int16 so that arithmetic such as w * h cannot
        silently overflow in user code.
        """
        i = self._i(i)
        a = self._maps()
        lo, hi = a["offsets.npy"][i], a["offsets.npy"][i + 1]
        return np.array(a["boxes.npy"][lo:hi], dtype=np.int32)

    def image_size(self, i: int) -> tuple[int, int]:
        """(width, height) of the original image ``i``; (0, 0) if it failed."""
        w, h = self._maps()["sizes.npy"][self._i(i)]
        return int(w), int(h)

    def status(self, i: int) -> int:
        """Rule code (filters.RULE_*) that produced image ``i``'s boxes."""
        return int(self._maps()["status.npy"][self._i(i)])

    def rule(self, i: int) -> str:
        """Name of the rule that produced image ``i``'s boxes (e.g. "paper", "failed")."""
        return RULE_NAMES.get(self.status(i), "unknown")

    def raw_count(self, i: int) -> int:
        """Number of selective-search boxes of image ``i`` before filtering."""
        return int(self._maps()["raw_counts.npy"][self._i(i)])

    def failed(self, i: int) -> bool:
        return self.status(i) == RULE_FAILED

    def count(self, i: int) -> int:
        """Number of (filtered) boxes of image ``i``."""
        i = self._i(i)
        off = self._maps()["offsets.npy"]
        return int(off[i + 1] - off[i])

    # Whole-store arrays (vectorised joins and statistics; each a small in-memory copy).

    @property
    def num_boxes(self) -> int:
        """Boxes of all images together (rows of boxes.npy)."""
        return int(len(self._maps()["boxes.npy"]))

    def counts(self) -> np.ndarray:
        """Boxes per image: (n,) int64, ``counts()[i] == count(i)``."""
        return np.diff(np.asarray(self._maps()["offsets.npy"], dtype=np.int64))

    def statuses(self) -> np.ndarray:
        """Rule code per image: (n,) uint8, ``statuses()[i] == status(i)``."""
        return np.array(self._maps()["status.npy"], dtype=np.uint8)

    def sizes(self) -> np.ndarray:
        """(width, height) per image: (n, 2) int32, (0, 0) for failed images."""
        return np.array(self._maps()["sizes.npy"], dtype=np.int32)

    @property
    def has_file_keys(self) -> bool:
        """False for a store written before file keys existed (every key unknown)."""
        return self._key_files

    def file_key(self, i: int) -> tuple[int, int] | None:
        """(bytes, mtime_ns) of image ``i``'s file when it was searched; None when unknown."""
        i = self._i(i)
        if not self._key_files:
            return None
        size, mtime = (int(v) for v in self._maps()["file_keys.npy"][i])
        return None if size == UNKNOWN_KEY else (size, mtime)

    def file_sha256(self, i: int) -> str | None:
        """The sha256 (hex) of image ``i``'s file when it was searched; None when unknown."""
        i = self._i(i)
        return digest_hex(self._maps()["file_sha256.npy"][i]) if self._key_files else None

    def file_keys(self) -> np.ndarray:
        """(bytes, mtime_ns) per image: (n, 2) int64, -1 where unknown (all of an older store)."""
        if not self._key_files:
            return np.full((len(self.paths), 2), UNKNOWN_KEY, dtype=np.int64)
        return np.array(self._maps()["file_keys.npy"], dtype=np.int64)

    def file_digests(self) -> np.ndarray:
        """sha256 per image: (n, 32) uint8, zeros where unknown (all of an older store)."""
        if not self._key_files:
            return np.zeros((len(self.paths), 32), dtype=np.uint8)
        return np.array(self._maps()["file_sha256.npy"], dtype=np.uint8)

    def box_chunks(self, rows: int):
        """The boxes of all images in store order, ``rows`` at a time: int32 (<= rows, 4) copies.

        For store-wide statistics in bounded memory; image ``i``'s boxes are the rows
        ``offsets[i]:offsets[i + 1]`` of their concatenation (see :meth:`counts`).
        """
        if rows < 1:
            raise ValueError(f"rows must be >= 1, got {rows}")
        boxes = self._maps()["boxes.npy"]
        for start in range(0, len(boxes), rows):
            yield np.array(boxes[start : start + rows], dtype=np.int32)

    def index(self, path) -> int:
        """Position of ``path`` (as stored: relative POSIX path) in the store."""
        if self._index is None:
            self._index = {p: k for k, p in enumerate(self.paths)}
        key = path.as_posix() if isinstance(path, Path) else str(path)
        try:
            return self._index[key]
        except KeyError:
            raise KeyError(
                f"{key!r} is not in proposals store {self.directory} "
                f"({len(self.paths)} images; paths are relative to the image root)"
            ) from None

    def arrays(self) -> dict:
        """All arrays loaded into memory (for merging and tests): name (without .npy) -> array
        (``file_keys`` and ``file_sha256`` only when the store has them)."""
        return {name[:-4]: np.array(arr) for name, arr in self._maps().items()}


def load(store_dir, verify: bool = False) -> ProposalStore:
    """Open the store in ``store_dir`` (memory-mapped). Sizes and quick checksums are always
    checked; ``verify`` checks the full sha256 of every file instead."""
    return ProposalStore(store_dir, verify=verify)


def verify_store(store_dir) -> int:
    """Full check of a store: every file's sha256 and the arrays' shapes. Returns the number of
    files verified; PathError (one line, naming the file) on the first problem."""
    store = ProposalStore(store_dir, verify=True)
    return len(store.manifest.get("files", {}))
