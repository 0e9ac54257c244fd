"""Which image files a pretraining run saw, by their bytes, and a guard against evaluating on them.

Every ``soco pretrain`` run writes ``RUN/data_manifest.json``: the sha256 of each image file,
by path relative to the image root, and a ``set_hash`` over the sorted digests (so renaming or
moving files keeps it; changing one byte of one image changes it). ``check_no_leak`` hashes the
evaluation images and refuses any whose bytes are in a run's manifest, whatever its file name:
a renamed copy of a validation image in the pretraining folder is still caught. Only
byte-identical files match: a re-encoded (another JPEG quality, PNG), resized or cropped copy of
the same photo has other bytes and is not caught.

Manifest layout (version 1)::

    {"version": 1, "hash": "sha256", "count": N, "set_hash": HEX,
     "files": [[relative_path, digest or null], ...],   # sorted by path
     "unreadable": [relative_path, ...]}                  # digest null: could not be read
"""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from safetensors import safe_open
from tqdm import tqdm

from ..errors import PathError, UserError
from ..files import atomic_write_json
from ..runfolder import file_digest

MANIFEST_FILE = "data_manifest.json"
MANIFEST_VERSION = 1
SIDECAR_SUFFIX = ".manifest.json"  # an exported file X.pth has its manifest in X.pth.manifest.json
_BAR_MIN = 50  # a progress bar only for more files than this


class LeakError(UserError):
    """Evaluation images found in a pretraining set; one line naming the first.

    ``pairs``: (evaluation path, manifest label, pretraining relative path) of every match, for
    a caller of the Python API (the message shows one). A manifest that cannot be read is a
    PathError.
    """

    def __init__(self, message: str, pairs=()):
        super().__init__(message)
        self.pairs = list(pairs)


# ---------------------------------------------------------------- hashing


def _digest_or_none(path) -> str | None:
    try:
        return file_digest(path)
    except OSError:  # missing, permission denied, a directory, a dangling link ...
        return None


def _digests(paths: list[Path], workers: int, progress: bool, desc: str) -> list[str | None]:
    """Digests of ``paths`` in order (None for unreadable files); threads, as hashlib drops the GIL."""
    if not paths:
        return []
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(paths)))) as pool:
        results = pool.map(_digest_or_none, paths)
        if progress and len(paths) > _BAR_MIN:
            results = tqdm(results, total=len(paths), desc=desc, unit="img", dynamic_ncols=True)
        return list(results)


def _relative(path: Path, root: Path | None) -> str:
    if root is not None:
        try:
            return Path(path).relative_to(root).as_posix()
        except ValueError:
            pass
    return Path(path).as_posix()


def set_hash(digests) -> str:
    """sha256 of the sorted digests joined by newlines (unreadable files, None, left out)."""
    return hashlib.sha256("\n".join(sorted(d for d in digests if d is not None)).encode("ascii")).hexdigest()


def build_manifest(paths: list[Path], root: Path | None, workers: int = 8, progress: bool = True) -> dict:
    """Hash every file of ``paths``; names are relative to ``root`` when given and possible.

    Unreadable files are kept, with digest null, and also listed under ``"unreadable"``.
    """
    paths = [Path(p) for p in paths]
    root = Path(root) if root is not None else None
    digests = _digests(paths, workers, progress, "hashing images")
    files = sorted(([_relative(p, root), d] for p, d in zip(paths, digests)), key=lambda row: str(row[0]))
    manifest = {
        "version": MANIFEST_VERSION,
        "hash": "sha256",
        "count": len(files),
        "set_hash": set_hash(d for _, d in files),
        "files": files,
    }
    unreadable = [name for name, d in files if d is None]
    if unreadable:
        manifest["unreadable"] = unreadable
    return manifest


# ---------------------------------------------------------------- reading and writing


def write_manifest(run_dir, manifest: dict) -> Path:
    """Write ``RUN/data_manifest.json`` atomically; returns its path."""
    path = Path(run_dir) / MANIFEST_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, manifest)
    return path


def _manifest_path(where) -> Path | None:
    """The manifest file for a run folder, a checkpoint in RUN/checkpoints/ or a manifest json."""
    path = Path(where)
    if path.is_dir():
        candidate = path / MANIFEST_FILE
    elif path.is_file() and path.suffix.lower() == ".json":
        candidate = path
    elif path.parent.name == "checkpoints":
        candidate = path.parent.parent / MANIFEST_FILE
    else:
        return None
    return candidate if candidate.is_file() else None


def _load(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise PathError(path, f"cannot read the data manifest ({exc.__class__.__name__}: {exc})") from exc
    if not (isinstance(data, dict) and data.get("hash") == "sha256" and isinstance(data.get("files"), list)):
        raise PathError(path, "not a data manifest (no sha256 'files' list)")
    return data


def read_manifest(where) -> dict | None:
    """The manifest of a run folder, of a checkpoint file inside RUN/checkpoints/, or the
    manifest json itself; None when there is none. PathError (one line) for a broken file."""
    path = _manifest_path(where)
    return None if path is None else _load(path)


def sidecar_path(exported) -> Path:
    """Where the manifest of an exported weights file ``X`` lives: ``X.manifest.json``."""
    exported = Path(exported)
    return exported.with_name(exported.name + SIDECAR_SUFFIX)


def manifest_for_weights(weights) -> tuple[str, dict] | None:
    """(label, manifest) of a ``--weights`` value, or None when it has no manifest.

    A run folder or a checkpoint ``RUN/checkpoints/x.pt`` -> ``RUN/data_manifest.json`` (label:
    the run folder); an exported file ``X`` -> its sidecar ``X.manifest.json`` (label: ``X``);
    ``None``/"none" (random init) and anything else -> None.
    """
    if weights is None or str(weights) == "none":
        return None
    path = Path(weights)
    if path.is_dir():
        manifest = read_manifest(path)
        return None if manifest is None else (str(path), manifest)
    if path.parent.name == "checkpoints" and (path.parent.parent / MANIFEST_FILE).is_file():
        return str(path.parent.parent), _load(path.parent.parent / MANIFEST_FILE)
    sidecar = sidecar_path(path)
    if path.is_file() and sidecar.is_file():
        return str(path), _load(sidecar)
    return None


def record_run_manifest(run_dir, image_paths, root, progress: bool = True) -> dict:
    """Write (or reuse) ``RUN/data_manifest.json`` for the images a run trains on.

    An existing manifest listing exactly the same relative paths is reused without rehashing
    (a resumed run); otherwise every file is hashed and one line is printed.
    """
    run_dir = Path(run_dir)
    root = Path(root) if root is not None else None
    names = sorted(_relative(Path(p), root) for p in image_paths)
    try:
        existing = read_manifest(run_dir)
    except PathError:  # a broken file is rebuilt
        existing = None
    if existing is not None and [row[0] for row in existing["files"]] == names:
        return existing
    manifest = build_manifest(list(image_paths), root, progress=progress)
    path = write_manifest(run_dir, manifest)
    unreadable = len(manifest.get("unreadable", []))
    note = f", {unreadable} unreadable" if unreadable else ""
    print(f"data manifest: {manifest['count']} images, set hash {manifest['set_hash'][:12]}{note} ({path})", flush=True)
    return manifest


# ---------------------------------------------------------------- the leak guard


def check_no_leak(
    eval_paths: list[Path],
    manifests: dict[str, dict],
    what: str = "evaluation",
    workers: int = 8,
    progress: bool = False,
) -> None:
    """Raise LeakError if the bytes of any of ``eval_paths`` are in any of ``manifests``
    (label -> manifest, e.g. run folder -> its manifest). Unreadable evaluation files are
    skipped (whoever decodes them reports them)."""
    index: dict[str, tuple[str, str]] = {}  # digest -> (label, pretraining path)
    for label, manifest in manifests.items():
        for name, digest in manifest.get("files", []):
            if digest is not None:
                index.setdefault(digest, (label, name))
    if not index:
        return
    eval_paths = [Path(p) for p in eval_paths]
    digests = _digests(eval_paths, workers, progress, f"hashing {what} images")
    pairs = [(str(p), *index[d]) for p, d in zip(eval_paths, digests) if d is not None and d in index]
    if not pairs:
        return
    labels = list(dict.fromkeys(label for _, label, _ in pairs))
    where = labels[0] if len(labels) == 1 else ", ".join(labels[:-1]) + f" and {labels[-1]}"
    n = len(pairs)
    first_eval, _, first_train = pairs[0]
    verb = "image was" if n == 1 else "images were"
    raise LeakError(
        f"{n} {what} {verb} in the pretraining set of {where} (a byte-identical file), "
        f"e.g. {first_eval} = {first_train}; pretrain without them or pass --allow-leak",
        pairs,
    )


def stamped_manifest(weights) -> tuple[str, str | None] | None:
    """(set hash, count) a safetensors export carries in its metadata (``data_manifest_hash`` /
    ``_count``, soco export), or None: not such a file, or nothing recorded. Only the header is read."""
    path = Path(weights)
    if path.suffix != ".safetensors" or not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception:  # noqa: BLE001 - unreadable here: the weights reader says why, in one line
        return None
    digest = meta.get("data_manifest_hash")
    return None if not digest else (digest, meta.get("data_manifest_count"))


def _why_no_manifest(weights) -> str:
    """The rest of the line for weights without a manifest file: what is known of their data."""
    stamp = stamped_manifest(weights)
    if stamp is None:
        return "has no data manifest: the leak check could not be done for it"
    digest, count = stamp
    images = f"{count} images" if count else "image count not recorded"
    sidecar = sidecar_path(weights).name
    return (
        f"has no {sidecar} beside it: its metadata gives the pretraining data's set hash {digest[:12]} ({images}) "
        f"but not the per-file hashes, so the check for byte-identical val images could not be done "
        f"(copy {sidecar} beside it)"
    )


def check_weights_no_leak(
    named_weights, eval_paths, what: str = "validation", log=print, progress: bool = False
) -> None:
    """The leak guard of ``soco knn`` and ``soco compare``: refuse (LeakError) when an evaluation
    image's bytes are in the data manifest of any weights in ``named_weights`` ((name, path)
    pairs; path None / "none" skipped); one line for weights without a manifest, and one when the
    check passed."""
    manifests: dict[str, dict] = {}
    for name, weights in named_weights:
        if weights is None or str(weights).lower() == "none":
            continue
        found = manifest_for_weights(weights)
        if found is None:
            log(f"note: {name} ({weights}) {_why_no_manifest(weights)}")
            continue
        manifests.setdefault(*found)
    if not manifests:
        return
    eval_paths = [Path(p) for p in eval_paths]
    check_no_leak(eval_paths, manifests, what=what, progress=progress)
    log(
        f"leak check: none of the {len(eval_paths)} {what} images is in the pretraining data of the "
        f"{len(manifests)} run(s) with a data manifest (compared as files: byte-identical copies are caught, "
        "re-encoded, resized or cropped ones are not)"
    )
