"""The training dataset: image source + proposal store -> views, boxes and levels per image.

``SoCoDataset(images, proposals, config)[i]`` is one sample (a dict):

======== ==================================================================================
views    list of tensors, one per view (V1, V2, V3[, V4]): float32 3xHxW, photometrically
         augmented and ImageNet-normalised; uint8 3xHxW when ``config.augment.device`` is
         "gpu" (the batch is then augmented on the device, see loader.augment_batch)
boxes    list of float32 (K, 4) tensors, x1, y1, x2, y2 in that view's pixels, continuous
         edge coordinates (a box covers [x1, x2) x [y1, y2); the view spans [0, W] x [0, H])
levels   list of int64 (K,) tensors: FPN level 0..3 (P2..P5) of each box in that view
valid    bool (K,) tensor: False for padded slots (never in the loss)
proposal_ids  int64 (K,) tensor: row of each slot in the image's proposal list, -1 = padding
index    int: dataset index of the image actually used (differs from the requested index
         when that image failed to decode and was replaced)
path     str: that image's path relative to the image root (as in the proposal store)
skipped  list of (absolute path, reason) of images that failed to decode and were replaced
rerouted list of (absolute path, reason): the image decoded to another size than the store
         records (a photo replaced under the same name) and, with
         ``views.no_proposals="whole_image"``, was served with the whole image as its proposal
         (with "error" it is skipped and replaced instead, as an undecodable one)
======== ==================================================================================

With ``config.decode == "device"`` the workers decode nothing they can leave to the training
device: a sample has, instead of ``views``, the image to render there (``decode.render_batch``):

========== ================================================================================
encoded    uint8 1-D tensor: the JPEG file's bytes (None when ``pixels`` is given)
pixels     uint8 HxWx3 tensor: an image the device cannot decode (PNG, CMYK JPEG, ...),
           decoded here as in "worker" mode (None when ``encoded`` is given)
plan       int32 (V, 8) tensor: the views' render plan (``views.ViewPlan`` rows)
image_size int64 (2,) tensor: the image's width and height (from its header)
file       str: the image's absolute path (decode failures on the device name it)
========== ================================================================================

and the other fields as above (the geometry is drawn from the header, with the same draws).

Images come from a folder (recursive), a list file or a COCO-style JSON (its ``images``
entries only) and are joined with the proposal store by relative path. Boxes come from that
store (``views.proposal_source="selective_search"``, the default) or, for the paper's ablations,
from the whole image, random boxes drawn per sample, or a COCO JSON's annotations
(``proposal_sources.py``); those need no store. Randomness is per
sample: ``np.random.default_rng([seed, epoch, index])`` drives the geometry and a
``torch.Generator`` seeded from it the photometric augmentation, so the same seed gives the
same samples whatever the number of loader workers or the order they run in.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ..coco_json import IGNORED, normalised_file_name, read_coco_json
from ..config import DataConfig
from ..errors import PathError, UserError, one_line
from ..images import ImageError, ImageList, list_images, load_encoded, load_rgb
from ..proposals.filters import RULE_FAILED
from ..proposals.store import ProposalStore
from ..proposals.store import load as load_store
from .augment import augment_cpu
from .boxes import from_store
from .proposal_sources import random_boxes, read_coco_boxes
from .views import build_views, plan_array, plan_views

log = logging.getLogger("soco_pretrain.data")

# How many paths the one-line "no proposals" error names before "... and N more".
MAX_NAMED = 5
# Stores without file keys (an older version's) already warned about in this process.
_warned_keyless: set[str] = set()


class DatasetError(UserError):
    """Images without proposals (one line naming the first few); ``paths`` lists all of them,
    for a caller of the Python API that wants the whole list. Other dataset errors are plain
    UserError / PathError."""

    def __init__(self, message: str, paths=()):
        super().__init__(message)
        self.paths = list(paths)


# ---------------------------------------------------------------- image sources


def read_coco_images(json_path, image_root=None) -> ImageList:
    """The images of a COCO-style JSON (its ``images`` entries' ``file_name``; annotations are
    ignored), relative to ``image_root`` (default: the JSON's folder). The file is read by
    :func:`soco_pretrain.coco_json.read_coco_json`; a bad one is a PathError naming it."""
    json_path = Path(json_path)
    parsed = read_coco_json(json_path, annotations=IGNORED, categories=False, sizes=IGNORED)
    root = Path(image_root).resolve() if image_root is not None else json_path.parent.resolve()
    # Normalised: "./a.jpg" and "a.jpg" are the same image, as in list files.
    paths = {normalised_file_name(entry["file_name"]) for entry in parsed.images}
    return ImageList(root=root, paths=sorted(paths), ignored=[])


def image_source(images, image_root=None) -> ImageList:
    """An ImageList from a folder, a list file, a COCO-style ``.json`` or an ImageList.

    ``image_root`` is the folder a COCO JSON's file names are relative to; other sources carry
    their own root (a folder, or a list file's folder), so giving it there is an error.
    """
    if isinstance(images, ImageList):
        source = images
    else:
        path = Path(images)
        if path.is_file() and path.suffix.lower() == ".json":
            return read_coco_images(path, image_root)
        source = list_images(path)  # ImageError for a missing source
    if image_root is not None:
        raise UserError(
            f"{images}: image_root applies to COCO JSON sources only (a folder or list file is its own root)"
        )
    return source


# ---------------------------------------------------------------- joining with the store


@dataclass
class Join:
    """Source images matched to store rows. ``rows[i]`` is the store row of image ``i``
    (-1 if not in the store); ``missing`` lists the images without usable proposals."""

    rows: np.ndarray
    missing: np.ndarray  # bool per image
    reasons: dict = field(default_factory=dict)  # reason -> count

    @property
    def without_proposals(self) -> np.ndarray:
        return np.flatnonzero(self.missing)


def join_store(images: ImageList, store: ProposalStore) -> Join:
    """Match every source image with its store row by relative path.

    An image has no usable proposals when it is not in the store, failed during generation,
    or has 0 boxes. Vectorised over the store's arrays: cheap for a million images.
    """
    n = len(images)
    if images.paths == store.paths:  # the usual case: store made from this very source
        rows = np.arange(n, dtype=np.int64)
    else:
        where = {p: k for k, p in enumerate(store.paths)}
        rows = np.fromiter((where.get(p, -1) for p in images.paths), dtype=np.int64, count=n)
    # Per-image status and box counts of the whole store, read once (small arrays).
    status = store.statuses()
    counts = store.counts()
    present = rows >= 0
    safe = np.where(present, rows, 0)
    failed = present & (status[safe] == RULE_FAILED)
    empty = present & ~failed & (counts[safe] == 0)
    missing = ~present | failed | empty
    reasons = {"not in the store": int((~present).sum()), "failed": int(failed.sum()), "0 boxes": int(empty.sum())}
    return Join(rows=rows, missing=missing, reasons={k: v for k, v in reasons.items() if v})


def _warn_keyless(store: ProposalStore) -> None:
    """One line, once per store and process, for a store of an older version (no file keys)."""
    key = str(store.directory.resolve())
    if store.has_file_keys or key in _warned_keyless or not _is_rank_zero():
        return
    _warned_keyless.add(key)
    print(
        f"soco: warning: {store.directory}: made by an older soco-pretrain without file keys: a photo replaced "
        "since is caught only when its pixel size differs; rerun soco proposals IMAGES -o "
        f"{store.directory} to check every image and record them",
        file=sys.stderr,
        flush=True,
    )


def _is_rank_zero() -> bool:
    """One process says it (every rank builds the same dataset under DDP)."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _no_proposals_count(images: ImageList, join: Join) -> str:
    """'N of M images have no proposals (not in store: a, failed: b, empty: c)'."""
    r = join.reasons
    return (
        f"{len(join.without_proposals)} of {len(images)} images have no proposals "
        f"(not in store: {r.get('not in the store', 0)}, failed: {r.get('failed', 0)}, empty: {r.get('0 boxes', 0)})"
    )


def _named(images: ImageList, idx) -> str:
    named = ", ".join(images.paths[i] for i in idx[:MAX_NAMED])
    return named + (f" and {len(idx) - MAX_NAMED} more" if len(idx) > MAX_NAMED else "")


def _no_proposals_message(images: ImageList, store: ProposalStore, join: Join) -> str:
    return (
        f"{store.directory}: {_no_proposals_count(images, join)}: {_named(images, join.without_proposals)}; "
        "make proposals for them (soco proposals) or set views.no_proposals=whole_image to use the whole image"
    )


def _other_images_message(images: ImageList, store: ProposalStore, join: Join) -> str:
    return (
        f"{store.directory}: {_no_proposals_count(images, join)}: {_named(images, join.without_proposals)}; "
        f"most images are not in this store (was it made from other images than {images.root}?): "
        "make a store for these images (soco proposals IMAGES -o STORE) "
        "or use views.proposal_source=whole_image"
    )


def _no_boxes_message(images: ImageList, json_path, boxes) -> str:
    idx = np.flatnonzero(boxes.missing)
    named = ", ".join(images.paths[i] for i in idx[:MAX_NAMED])
    more = f" and {len(idx) - MAX_NAMED} more" if len(idx) > MAX_NAMED else ""
    why = ", ".join(f"{k}: {v}" for k, v in boxes.reasons.items())
    return (
        f"{json_path}: {len(idx)} of {len(images)} images have no boxes ({why}): {named}{more}; "
        "file names must match the image paths, or set views.no_proposals=whole_image "
        "to use the whole image"
    )


# ---------------------------------------------------------------- the dataset


@dataclass
class RawSample:
    """A sample before conversion to tensors: the ViewSet (uint8 views, float64 boxes) and
    where it came from. ``generator`` is the sample's photometric torch.Generator."""

    views: object  # views.ViewSet
    index: int
    path: str
    skipped: list
    generator: torch.Generator
    image: np.ndarray  # the decoded original image (for pictures)
    boxes: np.ndarray  # the image's proposals, continuous original pixels
    rerouted: list = field(default_factory=list)  # [(path, reason)]: served whole, see the module docstring


@contextlib.contextmanager
def _one_thread():
    """Run with one torch thread, as loader workers do: float reductions (contrast's mean, blur)
    then add in the same order, so a sample is bit-identical with 0 or N workers. A no-op in
    workers; in the main process (workers=0) switching costs about 20 us."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class SoCoDataset(torch.utils.data.Dataset):
    """Views, boxes and FPN levels of every image of a source that has proposals.

    ``images``: a folder (recursive), a list file, a COCO-style ``.json`` (with ``image_root``,
    default its folder) or an ImageList. ``proposals``: a store directory or a ProposalStore;
    None (or ignored) when ``config.views.proposal_source`` is not "selective_search".
    ``config``: DataConfig (default: the paper's settings). See the module docstring for the
    sample fields. Raises DatasetError (a ValueError) listing the images without proposals
    unless ``config.views.no_proposals == "whole_image"`` (then prints one line counting them),
    and whatever that option when most images (over half) are not in the store at all.
    """

    def __init__(self, images, proposals=None, config: DataConfig | None = None, image_root=None):
        self.config = config if config is not None else DataConfig()
        self.images = image_source(images, image_root)
        if len(self.images) == 0:
            raise PathError(self.images.root, "no images found")
        self.source = self.config.views.proposal_source
        self.store, self.rows, self.boxes_json = None, None, None
        n = len(self.images)
        if self.source == "selective_search":
            if proposals is None:
                raise UserError(
                    "views.proposal_source=selective_search needs a proposal store "
                    "(make one with soco proposals IMAGES -o STORE and pass it, e.g. "
                    "--proposals STORE), or choose views.proposal_source=whole_image, "
                    "random or coco"
                )
            self.store = proposals if isinstance(proposals, ProposalStore) else load_store(proposals)
            _warn_keyless(self.store)
            join = join_store(self.images, self.store)
            self.rows = join.rows
            missing = join.missing
            # A store of other images would otherwise train on whole images only (with
            # no_proposals=whole_image): refused whatever that option; whole-image training
            # is asked for with views.proposal_source=whole_image.
            if 2 * join.reasons.get("not in the store", 0) > n:
                raise DatasetError(
                    _other_images_message(self.images, self.store, join),
                    [self.images.paths[i] for i in join.without_proposals],
                )
            message = _no_proposals_message(self.images, self.store, join) if join.missing.any() else ""
            counted = _no_proposals_count(self.images, join) if join.missing.any() else ""
        else:
            if proposals is not None:
                log.info("views.proposal_source=%s: the proposal store %s is not used", self.source, proposals)
            missing, message, counted = np.zeros(n, dtype=bool), "", ""
            if self.source == "coco":
                self.boxes_json = self._read_boxes_json()
                missing = self.boxes_json.missing
                message = _no_boxes_message(self.images, self.config.views.proposal_json, self.boxes_json)
        # Images served with the whole image as their one box: every image in "whole_image"
        # mode, else those without proposals (only with no_proposals="whole_image").
        self.whole_image = missing | (self.source == "whole_image")
        self.without_proposals = [self.images.paths[i] for i in np.flatnonzero(missing)]
        if self.without_proposals and self.config.views.no_proposals == "error":
            raise DatasetError(message, self.without_proposals)
        if counted and _is_rank_zero():  # the store's images without proposals, served as the whole image
            print(f"{counted}: they use the whole image (views.no_proposals=whole_image)", flush=True)
        elif self.without_proposals:
            log.info("%d images without proposals use the whole image as their proposal", len(self.without_proposals))
        self.epoch = 0
        self.num_views = 4 if self.config.views.soco_star else 3
        self.worker_decoded = 0  # data.decode=device: files decoded in this process (PNG, CMYK, ...)
        self.rerouted = 0  # images served whole in this process: another size than the store's
        self._rerouted_now: list = []  # this sample's, drained into its "rerouted" field

    def _read_boxes_json(self):
        views = self.config.views
        return read_coco_boxes(views.proposal_json, self.images.paths, views.proposal_json_filter)

    def __len__(self) -> int:
        return len(self.images)

    def set_epoch(self, epoch: int) -> None:
        """Epoch used by ``ds[i]`` (the loader passes it with every index as well)."""
        self.epoch = int(epoch)

    # -- loading

    def _load(self, j: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Image ``j`` decoded and its proposals in continuous original pixels (None for random
        boxes: the caller draws them with the sample's rng); ImageError if the file cannot be
        decoded or no longer matches the store or the box JSON."""
        path = self.images.abspath(j)
        image = load_rgb(path)
        h, w = image.shape[:2]
        return image, self._boxes_of(j, path, w, h)

    def _load_encoded(self, j: int):
        """``data.decode="device"``: image ``j``'s JPEG bytes (header checked, not decoded) or,
        for a file the device cannot decode, its pixels; then its (width, height) and proposals
        as in ``_load``. Returns (data or None, image or None, (w, h), boxes)."""
        path = self.images.abspath(j)
        data, image, (w, h) = load_encoded(path)
        return data, image, (w, h), self._boxes_of(j, path, w, h)

    def _boxes_of(self, j: int, path, w: int, h: int) -> np.ndarray | None:
        """Image ``j``'s proposals for its ``w`` x ``h`` pixels (see ``_load``)."""
        if self.whole_image[j]:
            return np.array([[0.0, 0.0, w, h]])
        if self.source == "random":
            return None
        if self.source == "coco":
            jw, jh = (int(v) for v in self.boxes_json.sizes[j])
            if jw and jh and (jw, jh) != (w, h):
                raise ImageError(
                    path,
                    f"decodes to {w}x{h} but {self.config.views.proposal_json} "
                    f"says {jw}x{jh} (boxes of another picture?)",
                )
            return self.boxes_json.of(j)
        row = int(self.rows[j])
        sw, sh = self.store.image_size(row)
        if (sw, sh) != (w, h):
            # Boxes of another picture would be silently wrong: never served. Like an image
            # without proposals: the whole image (no_proposals=whole_image), else skipped.
            reason = (
                f"decodes to {w}x{h} but the proposal store has {sw}x{sh} (replaced after the proposals "
                f"were made? rerun soco proposals IMAGES -o {self.store.directory} to search it again)"
            )
            if self.config.views.no_proposals != "whole_image":
                raise ImageError(path, reason)
            self._note_rerouted(path, reason)
            return np.array([[0.0, 0.0, w, h]])
        return from_store(self.store.boxes(row))

    def _note_rerouted(self, path, reason: str) -> None:
        """Record an image served whole for this sample (its "rerouted" field; the training loop
        counts them and lists them at the end) and say it the first time in this process."""
        self._rerouted_now.append((str(path), reason))
        self.rerouted += 1
        if self.rerouted == 1:
            log.warning(
                "%s: %s; it is trained on the whole image (views.no_proposals=whole_image; this process "
                "says it once, the run counts them all)",
                path,
                reason,
            )

    def _take_rerouted(self) -> list:
        taken, self._rerouted_now = self._rerouted_now, []
        return taken

    def _start(self, index: int, epoch: int | None):
        """The normalised index, the sample's geometry rng and its photometric generator."""
        n = len(self)
        index = int(index)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} images")
        index %= n
        epoch = self.epoch if epoch is None else int(epoch)
        rng = np.random.default_rng([self.config.seed, epoch, index])
        # Drawn first, so the photometric stream does not depend on how many numbers the
        # geometry consumed.
        generator = torch.Generator().manual_seed(int(rng.integers(2**63 - 1)))
        return index, rng, generator

    def _first_loadable(self, index: int, load):
        """``load(j)`` for j = index, index + 1, ... until one succeeds (max_decode_retries + 1
        tries). Returns (j, what load returned, [(path, reason) of the files skipped])."""
        n = len(self)
        skipped = []
        j = index
        for _ in range(self.config.max_decode_retries + 1):
            try:
                return j, load(j), skipped
            except ImageError as exc:
                # Never crash a worker for one bad file: record it, say so, use the next image.
                skipped.append((exc.path, exc.reason))
                log.warning("skipped unreadable image %s: %s", exc.path, exc.reason)
                j = (j + 1) % n
        raise PathError(
            self.images.root,
            f"{len(skipped)} images in a row from index {index} "
            f"failed to decode (last: {skipped[-1][0]}: {skipped[-1][1]}); "
            "is the image folder the one the proposals were made from?",
        )

    def raw(self, index: int, epoch: int | None = None) -> RawSample:
        """Sample ``index`` before conversion to tensors (views as uint8 HxWx3 arrays). Always
        decodes in this process, whatever ``config.decode`` (pictures use it)."""
        index, rng, generator = self._start(index, epoch)
        self._rerouted_now = []
        j, (image, boxes), skipped = self._first_loadable(index, self._load)
        if boxes is None:  # views.proposal_source=random: new boxes every sample (and epoch)
            boxes = random_boxes(rng, image.shape[1], image.shape[0], self.config.views.num_proposals)
        try:
            viewset = build_views(image, boxes, self.config.views, rng)
        except ValueError as exc:  # e.g. every stored box outside the image: name the file
            raise PathError(self.images.abspath(j), one_line(exc)) from exc
        return RawSample(
            views=viewset,
            index=j,
            path=self.images.paths[j],
            skipped=skipped,
            generator=generator,
            image=image,
            boxes=boxes,
            rerouted=self._take_rerouted(),
        )

    def planned(self, index: int, epoch: int | None = None) -> dict:
        """``data.decode="device"``: sample ``index`` with the image undecoded (JPEG bytes) or,
        for other files, decoded; views left to ``decode.render_batch`` (module docstring).

        The rng draws are raw()'s (the photometric generator first, then the geometry from the
        header's size), so the boxes, levels and the views rendered from the plan are the ones
        "worker" mode gives for the same seed, epoch and index."""
        index, rng, _ = self._start(index, epoch)  # the generator: drawn only to keep the draws
        self._rerouted_now = []
        j, (data, image, (w, h), boxes), skipped = self._first_loadable(index, self._load_encoded)
        if boxes is None:  # views.proposal_source=random
            boxes = random_boxes(rng, w, h, self.config.views.num_proposals)
        path = self.images.abspath(j)
        try:
            viewset = plan_views((w, h), boxes, self.config.views, rng)
        except ValueError as exc:
            raise PathError(path, one_line(exc)) from exc
        if image is not None:
            self._note_worker_decoded(path)
        return {
            "encoded": torch.from_numpy(data) if data is not None else None,
            "pixels": torch.from_numpy(image) if image is not None else None,
            "plan": torch.from_numpy(plan_array(viewset.plan)),
            "image_size": torch.tensor([w, h], dtype=torch.int64),
            "file": str(path),
            **self._geometry(viewset),
            "index": j,
            "path": self.images.paths[j],
            "skipped": skipped,
            "rerouted": self._take_rerouted(),
        }

    def _note_worker_decoded(self, path) -> None:
        """Count the files decoded here under data.decode=device and say it once per process (a
        line per file would flood a folder of PNGs; batches show them: ``pixels`` not None). A
        warning: nothing configures logging, and a fallback must reach the user's terminal."""
        self.worker_decoded += 1
        if self.worker_decoded == 1:
            log.warning(
                "data.decode=device: %s is not an RGB or grey JPEG: such images are decoded in the "
                "loader workers (this process says it once; they count in batch['pixels'])",
                path,
            )

    def __getitem__(self, key) -> dict:
        """``ds[i]`` (current epoch) or ``ds[(epoch, i)]`` (what the loader's sampler yields)."""
        epoch, index = key if isinstance(key, tuple) else (None, key)
        with _one_thread():
            if self.config.decode == "device":
                return self.planned(index, epoch)
            return self._sample(self.raw(index, epoch))

    def _sample(self, raw: RawSample) -> dict:
        vs = raw.views
        aug = self.config.augment
        views = []
        for v, img in enumerate(vs.images):
            t = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))  # uint8 3xHxW
            if aug.device != "gpu":
                t = augment_cpu(t, aug.view_params[v], aug, raw.generator)
            views.append(t)
        return {
            "views": views,
            **self._geometry(vs),
            "index": raw.index,
            "path": raw.path,
            "skipped": raw.skipped,
            "rerouted": raw.rerouted,
        }

    @staticmethod
    def _geometry(vs) -> dict:
        """A ViewSet's boxes, levels, valid and proposal_ids as the sample's tensors."""
        return {
            "boxes": [torch.from_numpy(np.asarray(b, dtype=np.float32)) for b in vs.boxes],
            "levels": [torch.from_numpy(np.asarray(lv, dtype=np.int64)) for lv in vs.levels],
            "valid": torch.from_numpy(np.asarray(vs.valid, dtype=bool)),
            "proposal_ids": torch.from_numpy(np.asarray(vs.proposal_ids, dtype=np.int64)),
        }

    def __repr__(self) -> str:
        where = self.store.directory if self.store is not None else self.source
        if self.source == "coco":
            where = f"coco {self.config.views.proposal_json}"
        return (
            f"SoCoDataset({len(self)} images from {self.images.root}, proposals {where}, "
            f"{self.num_views} views, {len(self.without_proposals)} without proposals)"
        )
