"""Stage 1 driver: selective search over a folder of images into a proposals store.

Parallel (``workers`` processes), sharded (``shard=(i, n)`` then :func:`merge`) and resumable:
each finished image is appended by the main process to ``OUT.partial/results.log`` as one
length-prefixed, checksummed record and flushed, so a killed run (even ``kill -9``) loses only
the images in flight, and a rerun with the same parameters skips everything already logged.
The store itself is written once at the end (see store.py), then ``OUT.partial`` is removed.

Each record keeps its file's key (size, mtime_ns) and sha256, read before decoding. A rerun
stats every image: a file whose key differs is hashed, and searched again when its bytes differ
(a photo replaced under the same name); same bytes (a copied dataset, a ``touch``) only update
the key. Images of an older store without keys are checked by their pixel size instead.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import struct
import sys
import time
import warnings
import zlib
from dataclasses import dataclass, field
from hashlib import sha256
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from ..errors import PathError, UserError
from ..images import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, ImageError, list_images, load_rgb_bounded
from ..runfolder import file_digest, locked
from .filters import PRESETS, RULE_FAILED, SearchConfig, filter_boxes
from .selective_search import selective_search
from .store import (
    ARRAY_FILES,
    KEY_FILES,
    UNKNOWN_KEY,
    ProposalStore,
    atomic_write_json,
    digest_hex,
    digest_row,
    load,
    read_manifest,
    write_store,
)

LOG_NAME = "results.log"
PARAMS_NAME = "params.json"
STORE_FILES = (*ARRAY_FILES, *KEY_FILES, "paths.json", "manifest.json")
_HEADER = struct.Struct("<II")  # payload length, crc32 of payload

# Peak memory of one search worker at the default max_side (1000 px), measured as VmHWM of a
# fresh process running process_image (numba kernels cached): 245 MiB for a 1000x750 PNG and for
# 4000x3000 JPEG/PNG searched at 1000 px, 272 MiB for a 1000x1000 PNG (either preset). We budget
# 400 MiB (the README's "under 400 MB" for a 4000x3000 JPEG), room for images that segment
# into more regions; for other max_side values we assume it scales with the searched pixels.
WORKER_PEAK_BYTES = 400 << 20
MEMINFO = "/proc/meminfo"


@dataclass
class GenerateSummary:
    """What a run (or merge) did. ``ok`` is False when any image failed."""

    total: int  # images in this run (this shard)
    processed: int  # searched in this call
    resumed: int  # taken from an interrupted run's log or an existing store
    failed: list  # [(path, reason)]
    rule_counts: dict  # rule name -> images
    boxes: int
    seconds: float
    store: Path
    up_to_date: bool = False  # the store already held exactly this run: nothing was done
    ignored: int = 0  # non-image files skipped in the folder
    unreadable: list = field(default_factory=list)  # [(folder, reason)]: folders that could not be listed
    retried: int = 0  # failed images searched again (retry_failed=True), part of processed
    changed: int = 0  # images whose file changed since the store was made, searched again (part of processed)
    same_bytes: int = 0  # images with a new file size or time but the same bytes: kept, key updated
    by_size: int = 0  # images the store had no key for (older store): checked by pixel size, key recorded

    @property
    def ok(self) -> bool:
        return not self.failed and not self.unreadable

    def format(self) -> str:
        """Multi-line human summary listing every failure by path and reason."""
        n_ok = self.total - len(self.failed)
        folders = f", {len(self.unreadable)} unreadable folder(s)" if self.unreadable else ""
        lines = [f"proposals: {self.total} images ({n_ok} ok, {len(self.failed)} failed{folders}) -> {self.store}"]
        if self.changed:
            lines.append(
                f"  {self.changed} image(s) changed since the store was made (other bytes under the same "
                "name): searched again"
            )
        if self.by_size:
            lines.append(
                f"  {self.by_size} image(s) had no file key in the store (an older version's): checked by "
                "their pixel size, keys recorded now (a rerun with --rehash records their sha256 too)"
            )
        if self.same_bytes:
            lines.append(f"  {self.same_bytes} image(s) have a new file time or size but the same bytes: kept")
        if self.up_to_date:
            lines.append("  store already up to date with these parameters and images: nothing to do")
        else:
            rate = self.processed / self.seconds if self.seconds > 0 else 0.0
            retried = f" ({self.retried} failed ones retried)" if self.retried else ""
            lines.append(
                f"  searched {self.processed} now{retried}, {self.resumed} resumed; "
                f"{self.seconds:.1f} s ({rate:.2f} images/s)"
            )
        per = self.boxes / n_ok if n_ok else 0.0
        rules = ", ".join(f"{k} {v}" for k, v in self.rule_counts.items() if v)
        lines.append(f"  boxes: {self.boxes} ({per:.1f} per readable image); rules: {rules or 'none'}")
        if self.ignored:
            lines.append(f"  skipped {self.ignored} non-image file(s) in the folder")
        if self.unreadable:
            lines.append(f"  {len(self.unreadable)} folder(s) could not be listed (their images are not in the store):")
            lines.extend(f"    {path}: {reason}" for path, reason in self.unreadable)
        if self.failed:
            # A rerun keeps failed images as failed (the store is "up to date"); say how to retry.
            lines.append(
                f"  {len(self.failed)} image(s) failed (kept as failed when rerun; --retry-failed retries them):"
            )
            lines.extend(f"    {path}: {reason}" for path, reason in self.failed)
        return "\n".join(lines)


# ---------------------------------------------------------------- one image


def scale_boxes(boxes: np.ndarray, searched: tuple[int, int], original: tuple[int, int]) -> np.ndarray:
    """Map inclusive-pixel boxes from a resized copy back to original pixels.

    Pixel column c of the copy covers original columns [c*fx, (c+1)*fx): x1 maps its left
    edge, x2 its right edge minus one, so the whole copy maps to the whole original.
    """
    (ws, hs), (w, h) = searched, original
    if (ws, hs) == (w, h) or len(boxes) == 0:
        return boxes.astype(np.int32)
    fx, fy = w / ws, h / hs
    b = boxes.astype(np.float64)
    out = np.empty(b.shape, dtype=np.int64)
    out[:, 0] = np.floor(b[:, 0] * fx + 0.5)
    out[:, 1] = np.floor(b[:, 1] * fy + 0.5)
    out[:, 2] = np.floor((b[:, 2] + 1) * fx + 0.5) - 1
    out[:, 3] = np.floor((b[:, 3] + 1) * fy + 0.5) - 1
    np.clip(out[:, 0::2], 0, w - 1, out=out[:, 0::2])
    np.clip(out[:, 1::2], 0, h - 1, out=out[:, 1::2])
    return out.astype(np.int32)


def process_image(task) -> dict:
    """Search + filter one image; never raises. ``task`` = (rel_path, abs_path, config[, max_pixels])
    where ``max_pixels`` bounds the pixels decoded (default images.DEFAULT_MAX_PIXELS)."""
    rel, abspath, config = task[:3]
    max_pixels = task[3] if len(task) > 3 else DEFAULT_MAX_PIXELS
    record = {"path": rel, "status": RULE_FAILED, "size": [0, 0], "raw": 0, "boxes": [], "reason": None}
    # Before decoding: a file replaced meanwhile then has a key that differs on the next rerun.
    record["file"], record["sha256"] = file_identity(abspath)
    try:
        image, (w, h), _ = load_rgb_bounded(abspath, config.max_side, max_pixels)
    except ImageError as exc:
        record["reason"] = exc.reason
        return record
    except Exception as exc:  # load_rgb_bounded should only raise ImageError; be safe anyway
        record["reason"] = f"cannot read: {exc.__class__.__name__}: {exc}"
        return record
    record["size"] = [w, h]
    try:
        hs, ws = image.shape[:2]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # skimage chatter would break the progress bar
            raw = selective_search(image, config.scale, config.sigma, config.min_size)
        # Filter in original pixels: the released code searched full-size images, so its
        # 32 px minimum side means original pixels (the paper's ratio rules are scale-free).
        kept, rule = filter_boxes(scale_boxes(raw, (ws, hs), (w, h)), w, h, config)
        record.update(status=int(rule), raw=int(len(raw)), boxes=kept.tolist())
    except Exception as exc:  # a search bug must not end a million-image run
        record["reason"] = f"selective search failed: {exc.__class__.__name__}: {exc}"
    return record


# ---------------------------------------------------------------- change keys


def file_identity(path) -> tuple[list[int] | None, str | None]:
    """([bytes, mtime_ns], sha256 hex) of a file, None for what cannot be read. The hash reads the
    file once more (from the page cache, well under 1 % of a search)."""
    try:
        st = os.stat(path)
    except OSError:
        return None, None
    try:
        digest = file_digest(path)
    except OSError:
        digest = None
    return [int(st.st_size), int(st.st_mtime_ns)], digest


def _pixel_size(path) -> list[int] | None:
    """(width, height) from the file's header (what load_rgb decodes: no EXIF rotation)."""
    try:
        with Image.open(path) as im:
            return [int(im.width), int(im.height)]
    except Exception:  # unreadable now: searching it again reports why
        return None


def _compare(path, key, digest, size, failed: bool, rehash: bool):
    """What a rerun does with a recorded image: ("same" | "changed" | "same_bytes" | "by_size",
    key to record or None, sha256 to record). ``key``/``digest`` None: not recorded."""
    try:
        st = os.stat(path)
    except OSError:  # gone: a failure to record, unless it was recorded failing without a file
        return ("same", None, None) if failed and key is None else ("changed", None, None)
    now = [int(st.st_size), int(st.st_mtime_ns)]
    if key is not None and list(key) == now and not rehash:
        return "same", None, None
    if digest is not None:
        try:
            current = file_digest(path)
        except OSError:
            return "changed", None, None
        if current != digest:
            return "changed", None, None
        return ("same", None, None) if key is not None and list(key) == now else ("same_bytes", now, digest)
    if failed:  # no bytes recorded (unreadable then): kept failed until --retry-failed, as before
        return "same", None, None
    # An older store: no key, no hash. Its pixel size is what can be checked (a header read).
    if _pixel_size(path) != [int(v) for v in size]:
        return "changed", None, None
    return "by_size", now, file_digest(path) if rehash else None


@dataclass
class _Changes:
    changed: list = field(default_factory=list)  # paths to search again
    updates: dict = field(default_factory=dict)  # path -> (key, sha256): same picture, new key
    same_bytes: int = 0
    by_size: int = 0

    def apply(self, records: dict) -> None:
        for path in self.changed:
            records.pop(path, None)
        for path, (key, digest) in self.updates.items():
            if path in records:
                records[path] = dict(records[path], file=key, sha256=digest)

    def add(self, path: str, verdict) -> None:
        what, key, digest = verdict
        if what == "changed":
            self.changed.append(path)
        elif what != "same":
            self.updates[path] = (key, digest)
            self.same_bytes += what == "same_bytes"
            self.by_size += what == "by_size"


def _store_changes(store: ProposalStore, selected, root: Path, rehash: bool) -> _Changes:
    """Which of ``selected`` (those in ``store``) changed since the store was made: one stat each,
    a hash only where the key differs (every file with ``rehash``)."""
    where = {p: k for k, p in enumerate(store.paths)}
    keys, digests = store.file_keys(), store.file_digests()
    sizes, status = store.sizes(), store.statuses()
    changes = _Changes()
    for p in selected:
        k = where.get(p)
        if k is None:
            continue
        key = None if keys[k][0] == UNKNOWN_KEY else keys[k].tolist()
        verdict = _compare(root / p, key, digest_hex(digests[k]), sizes[k], status[k] == RULE_FAILED, rehash)
        changes.add(p, verdict)
    return changes


def _record_changes(records: list[dict], root: Path) -> _Changes:
    """As :func:`_store_changes` for the records of an interrupted run's log."""
    changes = _Changes()
    for r in records:
        verdict = _compare(
            root / r["path"], r.get("file"), r.get("sha256"), r["size"], r["status"] == RULE_FAILED, False
        )
        changes.add(r["path"], verdict)
    return changes


# ---------------------------------------------------------------- resume log


def encode_record(record: dict) -> bytes:
    payload = json.dumps(record, separators=(",", ":")).encode("utf-8")
    return _HEADER.pack(len(payload), zlib.crc32(payload)) + payload


def read_log(path: Path) -> tuple[list[dict], int]:
    """Records of a results log and the byte offset where the valid part ends.

    A torn last record (process killed mid-write) or any damaged tail is ignored.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return [], 0
    records, pos = [], 0
    while pos + _HEADER.size <= len(data):
        length, crc = _HEADER.unpack_from(data, pos)
        start, end = pos + _HEADER.size, pos + _HEADER.size + length
        if end > len(data) or zlib.crc32(data[start:end]) != crc:
            break
        try:
            records.append(json.loads(data[start:end]))
        except ValueError:
            break
        pos = end
    return records, pos


# ---------------------------------------------------------------- helpers


def package_versions() -> dict:
    out = {}
    for name in ("soco-pretrain", "numpy", "scikit-image", "numba", "pillow"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def _mem_available(meminfo) -> int | None:
    """MemAvailable of /proc/meminfo in bytes (None where it cannot be read: not Linux)."""
    try:
        with open(meminfo) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def memory_capped_workers(workers: int, max_side: int | None, meminfo=None) -> tuple[int, str | None]:
    """``workers`` capped so their peaks fit in MemAvailable: (count, one-line note or None).

    Per worker WORKER_PEAK_BYTES at max_side 1000, scaled by the searched pixels for other
    max_side values (no max_side: budgeted as a 4000 px long side). Never below 1.
    """
    available = _mem_available(MEMINFO if meminfo is None else meminfo)
    if available is None:
        return workers, None
    side = max_side or 4000
    per_worker = int(WORKER_PEAK_BYTES * max(1.0, (side / 1000) ** 2))
    fit = max(1, available // per_worker)
    if fit >= workers:
        return workers, None
    return fit, (
        f"workers: {fit} instead of {workers} (one per core): {available / 2**30:.1f} GiB available "
        f"memory / about {per_worker >> 20} MiB per worker at max_side {max_side}; --workers N overrides"
    )


def _no_images_message(source, images) -> str:
    source = Path(source)
    if images.unreadable:
        folder, reason = images.unreadable[0]
        return f"{source}: no images found ({folder}: {reason})"
    if source.is_file():
        return f"{source}: no images found (the list file names no image path)"
    skipped = f"{len(images.ignored)} non-image file(s) skipped; " if images.ignored else ""
    return f"{source}: no images found ({skipped}image extensions: {' '.join(sorted(IMAGE_EXTENSIONS))})"


def _list_sha256(paths) -> str:
    return sha256("\n".join(paths).encode("utf-8")).hexdigest()


def _run_params(preset: str, config: SearchConfig, shard) -> dict:
    """What must match for a log (or store) to be reused."""
    return {
        "preset": preset,
        "config": config.to_dict(),
        "shard": None if shard is None else {"index": shard[0], "count": shard[1]},
    }


def _param_diff(old: dict, new: dict) -> str:
    """'' if the run parameters agree, else a short 'name old -> new' list."""
    diffs = [f"{k} {old.get(k)} -> {new.get(k)}" for k in ("preset", "shard") if old.get(k) != new.get(k)]
    try:
        a, b = SearchConfig.from_dict(old["config"]).to_dict(), SearchConfig.from_dict(new["config"]).to_dict()
    except (KeyError, TypeError, ValueError):
        return "; ".join(diffs + ["unreadable config"])
    diffs += [f"{k} {a[k]} -> {b[k]}" for k in a if a[k] != b[k]]
    return "; ".join(diffs)


def _is_store_leftover(out: Path) -> bool:
    """An empty folder, or one holding only store files (a store write cut short)."""
    allowed = set(STORE_FILES)
    return out.is_dir() and all(e.name in allowed or e.name.startswith(".") for e in out.iterdir())


def _records_from_store(st: ProposalStore) -> dict:
    a = st.arrays()
    keys, digests = st.file_keys(), st.file_digests()
    failures = {f["path"]: f["reason"] for f in st.manifest.get("failures", [])}
    out = {}
    for i, p in enumerate(st.paths):
        lo, hi = a["offsets"][i], a["offsets"][i + 1]
        out[p] = {
            "path": p,
            "status": int(a["status"][i]),
            "size": a["sizes"][i].tolist(),
            "raw": int(a["raw_counts"][i]),
            "boxes": a["boxes"][lo:hi].tolist(),
            "reason": failures.get(p),
            "file": None if keys[i][0] == UNKNOWN_KEY else keys[i].tolist(),
            "sha256": digest_hex(digests[i]),
        }
    return out


def _arrays_from_records(records: list[dict]):
    counts = np.array([len(r["boxes"]) for r in records], dtype=np.int64)
    offsets = np.zeros(len(records) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    boxes = [np.asarray(r["boxes"], dtype=np.int64).reshape(-1, 4) for r in records]
    boxes = np.concatenate(boxes) if boxes else np.zeros((0, 4), np.int64)
    sizes = np.array([r["size"] for r in records], dtype=np.int32).reshape(-1, 2)
    status = np.array([r["status"] for r in records], dtype=np.uint8)
    raw = np.array([r["raw"] for r in records], dtype=np.int32)
    return boxes, offsets, sizes, status, raw


def _keys_from_records(records: list[dict]) -> dict:
    """write_store's file_keys and file_sha256 of ``records`` (unknown where a record has none)."""
    keys = np.array([r.get("file") or [UNKNOWN_KEY, UNKNOWN_KEY] for r in records], dtype=np.int64).reshape(-1, 2)
    digests = np.stack([digest_row(r.get("sha256")) for r in records]) if records else np.zeros((0, 32), np.uint8)
    return {"file_keys": keys, "file_sha256": digests}


def _summary_from_manifest(manifest: dict, store: Path, seconds: float, **kw) -> GenerateSummary:
    counts = manifest["counts"]
    return GenerateSummary(
        total=counts["images"],
        failed=[(f["path"], f["reason"]) for f in manifest.get("failures", [])],
        rule_counts=dict(counts["rules"]),
        boxes=counts["boxes"],
        seconds=seconds,
        store=Path(store),
        **kw,
    )


# ---------------------------------------------------------------- generate


def generate(
    source,
    out,
    preset: str = "paper",
    config_overrides: dict | None = None,
    workers: int = 1,
    shard=None,
    progress: bool = True,
    retry_failed: bool = False,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    rehash: bool = False,
) -> GenerateSummary:
    """Selective search over every image of ``source`` into the proposals store ``out``.

    ``source``: a folder (recursive) or a list file (see images.list_images). ``preset``:
    "paper" or "released" (filters.PRESETS), ``config_overrides`` replaces SearchConfig fields.
    ``shard=(i, n)`` takes every n-th image from i (0-based) of the sorted list; merge the
    shard stores with :func:`merge`. Unreadable images are recorded as failures, never raised;
    a rerun keeps them as failed unless ``retry_failed`` (then they are searched again).
    Folders that cannot be listed are warned about (one line each) and reported in the summary.
    ``max_pixels``: images decoding to more pixels fail (decompression bombs; None/0: no bound).
    A rerun searches again the images whose file changed (module docstring): those whose size or
    mtime differs are hashed; ``rehash`` hashes every one (a replacement that kept both).
    A source without any image is a UserError.
    """
    t0 = time.perf_counter()
    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    try:
        config = PRESETS[preset].with_overrides(config_overrides)
    except (TypeError, ValueError) as exc:
        raise UserError(str(exc)) from exc
    if shard is not None:
        i, n = (int(v) for v in shard)
        if n < 1 or not 0 <= i < n:
            raise UserError(f"invalid shard {shard!r}: need 0 <= i < n")
        shard = (i, n)
    if int(workers) < 1:
        raise UserError(f"workers must be >= 1, got {workers}")
    out = Path(out)
    images = list_images(source)  # raises ImageError for a missing source
    if not images.paths:
        raise UserError(_no_images_message(source, images))
    for folder, reason in images.unreadable:
        print(f"warning: {images.root / folder}: {reason}; its images are skipped", file=sys.stderr, flush=True)
    selected = images.paths if shard is None else images.paths[shard[0] :: shard[1]]
    params = _run_params(preset, config, shard)
    extra = {"ignored": len(images.ignored), "unreadable": list(images.unreadable)}

    # Records already known: an existing store made with the same parameters, then the log.
    known: dict = {}
    changes = _Changes()
    if (out / "manifest.json").exists():
        manifest = read_manifest(out)
        diff = _param_diff(manifest, params)
        if diff:
            raise PathError(
                out,
                f"already holds a proposals store made with other parameters "
                f"({diff}); choose another output or delete it",
            )
        existing = load(out)
        if not existing.has_file_keys:  # a header read per image: say why this rerun takes a while
            print(
                f"{out}: made by an older soco-pretrain without file keys: checking each image's pixel size "
                "against the store (once; the keys are recorded)",
                flush=True,
            )
        # Photos replaced under the same names: their boxes are another picture's.
        changes = _store_changes(existing, selected, images.root, rehash)
        unchanged = not changes.changed and not changes.updates
        if existing.paths == selected and unchanged and not (retry_failed and manifest["counts"]["failed"]):
            return _summary_from_manifest(
                manifest, out, time.perf_counter() - t0, processed=0, resumed=len(selected), up_to_date=True, **extra
            )
        known = _records_from_store(existing)  # same parameters, other images (or retries): reuse what we can
        changes.apply(known)
    elif out.exists() and not _is_store_leftover(out):
        raise PathError(out, "exists and is not a proposals store; choose another output")

    partial = Path(str(out) + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    with locked(partial, "proposals", lock_name="lock"):  # two runs never append to one log
        ppath = partial / PARAMS_NAME
        if ppath.exists():
            try:
                diff = _param_diff(json.loads(ppath.read_text()), params)
            except ValueError:
                diff = "unreadable params.json"
            if diff:
                raise PathError(
                    partial,
                    f"holds an interrupted run with other parameters "
                    f"({diff}); delete it to start over, or rerun with its parameters",
                )
        else:
            atomic_write_json(ppath, params)
        log_path = partial / LOG_NAME
        logged, valid_end = read_log(log_path)
        logged_changes = _record_changes(logged, images.root)  # changed after that run searched them
        known.update((r["path"], r) for r in logged)
        logged_changes.apply(known)
        already = set(changes.changed)
        changes.changed += [p for p in logged_changes.changed if p not in already]
        retried = 0
        if retry_failed:  # failed images (e.g. a folder missing during the run) are searched again
            again = [p for p in selected if p in known and known[p]["status"] == RULE_FAILED]
            for p in again:
                del known[p]
            retried = len(again)
        wanted = set(selected)
        resumed = sum(1 for p in known if p in wanted)
        todo = [p for p in selected if p not in known]

        with open(log_path, "ab") as log:
            log.truncate(valid_end)  # drop a torn tail before appending after it
            tasks = [(p, str(images.root / p), config, max_pixels) for p in todo]
            _run_tasks(tasks, workers, progress, log, known, total=len(selected), done=resumed)

        records = [known[p] for p in selected]
        failures = [
            {"path": r["path"], "reason": r["reason"] or "failed"} for r in records if r["status"] == RULE_FAILED
        ]
        manifest = dict(params)
        manifest.update(
            source={
                "root": str(images.root),
                "listed": len(images.paths),
                "list_sha256": _list_sha256(images.paths),
                "ignored": len(images.ignored),
                "unreadable": [{"path": p, "reason": r} for p, r in images.unreadable],
            },
            versions=package_versions(),
            failures=failures,
            merged_from=None,
            created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        )
        write_store(out, selected, *_arrays_from_records(records), manifest=manifest, **_keys_from_records(records))
    shutil.rmtree(partial, ignore_errors=True)
    manifest = read_manifest(out)
    searched_again = sum(1 for p in changes.changed if p in wanted)
    return _summary_from_manifest(
        manifest,
        out,
        time.perf_counter() - t0,
        processed=len(todo),
        resumed=resumed,
        retried=retried,
        changed=searched_again,
        same_bytes=changes.same_bytes + logged_changes.same_bytes,
        by_size=changes.by_size + logged_changes.by_size,
        **extra,
    )


def _run_tasks(tasks, workers, progress, log, known, total, done):
    """Process tasks (in this process or a pool), appending each result to the log."""
    bar = tqdm(
        total=total,
        initial=done,
        unit="img",
        disable=not progress,
        dynamic_ncols=True,
        desc="selective search",
        smoothing=0.1,
    )

    def record(r):
        log.write(encode_record(r))
        log.flush()  # in the kernel now: survives kill -9 of this process
        known[r["path"]] = r
        bar.update(1)

    # here, not at the top: looked up per call, so tests can patch selective_search.kernels_cached
    from .selective_search import kernels_cached

    if tasks and not kernels_cached():
        bar.write("compiling selective search (first run only, 15-45 s; cached for later runs)")
    try:
        if workers == 1 or len(tasks) <= 1:
            for t in tasks:
                record(process_image(t))
        else:
            # spawn: safe with threads (torch, numba) in the parent and identical on every OS.
            ctx = multiprocessing.get_context("spawn")
            with ctx.Pool(min(workers, len(tasks))) as pool:
                for r in pool.imap_unordered(process_image, tasks, chunksize=1):
                    record(r)
    finally:
        bar.close()


# ---------------------------------------------------------------- merge


def merge(shard_dirs, out) -> GenerateSummary:
    """Concatenate shard stores into one store at ``out``, ordered by path.

    Checks that every shard was made with the same preset and parameters, that no path appears
    twice, and, for stores made with ``shard=(i, n)``, that all n shards of one image list are
    present. The result equals a single run over all images, array for array.
    """
    t0 = time.perf_counter()
    shard_dirs = [Path(d) for d in shard_dirs]
    if not shard_dirs:
        raise UserError("merge: no shard stores given")
    out = Path(out)
    if any(out.resolve() == d.resolve() for d in shard_dirs):
        raise PathError(out, "the merge output must not be one of the shards")
    # As generate: never write into a folder of other files (an existing store is replaced).
    if out.exists() and not (out / "manifest.json").is_file() and not _is_store_leftover(out):
        raise PathError(out, "exists and is not a proposals store; choose another merge output")
    stores = [load(d) for d in shard_dirs]
    first = stores[0].manifest
    for st in stores[1:]:
        m = st.manifest
        if not (
            m.get("preset") == first.get("preset")
            and SearchConfig.from_dict(m["config"]) == SearchConfig.from_dict(first["config"])
        ):
            raise PathError(
                st.directory,
                f"made with other parameters than {stores[0].directory} "
                f"(preset {m.get('preset')!r} {m['config']} vs "
                f"{first.get('preset')!r} {first['config']})",
            )
    shards = [st.manifest.get("shard") for st in stores]
    if all(shards):
        counts = {s["count"] for s in shards}
        lists = {st.manifest.get("source", {}).get("list_sha256") for st in stores}
        if len(counts) > 1:
            raise UserError(f"merge: shards of different splits (of {sorted(counts)}) cannot be merged")
        if len(lists) > 1:
            raise UserError("merge: shards were made from different image lists")
        n = counts.pop()
        missing = sorted(set(range(n)) - {s["index"] for s in shards})
        if missing:
            raise UserError(f"merge: shard(s) {', '.join(f'{i}/{n}' for i in missing)} missing")

    owner = {}
    for st in stores:
        for p in st.paths:
            if p in owner:
                raise UserError(f"merge: {p!r} appears in both {owner[p]} and {st.directory}")
            owner[p] = st.directory

    parts = [st.arrays() for st in stores]
    paths = [p for st in stores for p in st.paths]
    order = np.array(sorted(range(len(paths)), key=paths.__getitem__), dtype=np.int64)
    cat = {k: np.concatenate([a[k] for a in parts]) for k in ("sizes", "status", "raw_counts")}
    keys = np.concatenate([st.file_keys() for st in stores])  # unknown for shards of an older version
    digests = np.concatenate([st.file_digests() for st in stores])
    counts = np.concatenate([np.diff(a["offsets"]) for a in parts])
    starts = np.concatenate(
        [a["offsets"][:-1] + base for a, base in zip(parts, np.cumsum([0] + [len(a["boxes"]) for a in parts[:-1]]))]
    )
    all_boxes = np.concatenate([a["boxes"].astype(np.int32) for a in parts])
    offsets = np.zeros(len(paths) + 1, dtype=np.int64)
    np.cumsum(counts[order], out=offsets[1:])
    # Row r of the merged image j comes from starts[order[j]] + (r - offsets[j]).
    rows = np.repeat(starts[order] - offsets[:-1], counts[order]) + np.arange(offsets[-1])
    failures = sorted((f for st in stores for f in st.manifest.get("failures", [])), key=lambda f: f["path"])
    manifest = {
        "preset": first.get("preset"),
        "config": first["config"],
        "shard": None,
        "source": {k: v for k, v in first.get("source", {}).items() if k != "ignored"},
        "versions": package_versions(),
        "failures": failures,
        "merged_from": [
            {"store": str(st.directory), "shard": st.manifest.get("shard"), "images": len(st)} for st in stores
        ],
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_store(
        out,
        [paths[k] for k in order],
        all_boxes[rows],
        offsets,
        cat["sizes"][order],
        cat["status"][order],
        cat["raw_counts"][order],
        manifest=manifest,
        file_keys=keys[order],
        file_sha256=digests[order],
    )
    manifest = read_manifest(out)
    return _summary_from_manifest(manifest, out, time.perf_counter() - t0, processed=0, resumed=0)
