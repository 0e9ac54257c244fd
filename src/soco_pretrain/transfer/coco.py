"""COCO-format instance data for ``soco finetune``: parsing, targets, datasets, the train stream.

A COCO "instances" JSON (``images``, ``annotations``, ``categories``) is read once into a
:class:`CocoSet`. Conventions follow Detectron2 (the paper's code base, section 4.2):

- boxes come from each annotation's ``bbox`` (x, y, w, h) -> (x1, y1, x2, y2), clipped to the image;
  boxes with no area after clipping are dropped ("degenerate");
- crowd annotations (``iscrowd=1``) are not training targets (Detectron2 DatasetMapper); they stay in
  the ground truth pycocotools evaluates with (where they mark regions to ignore);
- masks: polygons (pieces of fewer than 3 points dropped, as Detectron2) and RLE (compressed or
  not) are rasterised with ``pycocotools.mask``; an annotation with no usable mask in a mask
  dataset is dropped;
- images without any usable annotation are left out of training (Detectron2's
  ``filter_empty_annotations``), never out of evaluation;
- category ids map to contiguous labels 1..C in increasing id order (0 is background in
  torchvision) and back for evaluation.

Bad input: a missing or unreadable JSON, or one that is not COCO instances, is a one-line
:class:`PathError` (the checks are :mod:`soco_pretrain.coco_json`'s, shared with the other
readers of COCO JSON). :func:`check_images` runs before any training: every image the JSON lists
must exist under the image folder and the first few must decode (a wrong ``--val-images`` stops
at once, not after the whole schedule). Past that, an image that fails to decode
(``images.load_rgb``'s ImageError) or whose size differs from the JSON's is skipped where it is
met, and reported by path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from pycocotools import mask as mask_util

from ..coco_json import OPTIONAL, REQUIRED, read_coco_json
from ..errors import PathError
from ..images import ImageError, load_rgb

T = TypeVar("T")  # select_fraction: images, or their indices (soco knn)


@dataclass
class CocoSet:
    """One COCO JSON, parsed. ``images`` in increasing id order; ``anns[image_id]`` its annotations."""

    json_path: Path
    image_root: Path
    images: list[dict]  # id, file_name, width, height
    anns: dict[int, list[dict]]
    categories: list[dict]  # sorted by id
    data: dict = field(repr=False)  # the JSON itself (ground truth for pycocotools)

    @property
    def cat_ids(self) -> list[int]:
        return [c["id"] for c in self.categories]

    @property
    def cat_to_label(self) -> dict[int, int]:
        return {cid: i + 1 for i, cid in enumerate(self.cat_ids)}

    @property
    def label_to_cat(self) -> dict[int, int]:
        return {i + 1: cid for i, cid in enumerate(self.cat_ids)}

    @property
    def num_classes(self) -> int:
        """Categories plus background (torchvision's ``num_classes``)."""
        return len(self.categories) + 1

    @property
    def has_masks(self) -> bool:
        """True when some non-crowd annotation carries a segmentation (then: Mask R-CNN)."""
        return any(a.get("segmentation") and not a.get("iscrowd", 0) for anns in self.anns.values() for a in anns)

    def image_path(self, image: dict) -> Path:
        return self.image_root / image["file_name"]


def load_coco(json_path, image_root) -> CocoSet:
    """Read and check a COCO instances JSON; ``image_root`` is the folder of its ``file_name``s.

    Parsing and the format checks are :func:`soco_pretrain.coco_json.read_coco_json`'s (images
    with ids and sizes, categories, optional annotations); its error comes back as PathError.
    """
    json_path = Path(json_path)
    if not json_path.is_file():
        raise PathError(json_path, "no such COCO JSON file")
    root = Path(image_root)
    if not root.is_dir():
        raise PathError(root, f"no such image folder (for {json_path.name})")
    parsed = read_coco_json(json_path, annotations=OPTIONAL, categories=True, sizes=REQUIRED)
    return CocoSet(
        json_path=json_path,
        image_root=root,
        images=sorted(parsed.images, key=lambda im: im["id"]),
        anns=parsed.annotations_by_image(),
        categories=sorted(parsed.categories, key=lambda c: c["id"]),
        data=parsed.data,
    )


CHECK_DECODE = 3  # images of each set decoded before training (our choice: catches a wrong folder cheaply)
LISTED_MISSING = 3  # missing file names quoted in the error


def check_images(coco: CocoSet, flag: str = "", images: list[dict] | None = None, decode: int = CHECK_DECODE) -> None:
    """Every image of ``images`` (default: all the JSON lists) exists under ``coco.image_root``
    and the first ``decode`` of them decode; else one-line PathError. ``flag`` names the folder's
    command-line option in the message.

    Each folder is listed once (``os.scandir``), so a COCO-sized set costs a directory read, not
    one ``stat`` per image.
    """
    images = coco.images if images is None else images
    where = f"{coco.image_root}" + (f" ({flag})" if flag else "")
    listed: dict[Path, set[str]] = {}
    missing = []
    for image in images:
        path = coco.image_path(image)
        folder = path.parent
        if folder not in listed:
            try:
                with os.scandir(folder) as entries:
                    listed[folder] = {e.name for e in entries if e.is_file()}  # follows symlinks
            except OSError:
                listed[folder] = set()
        if path.name not in listed[folder]:
            missing.append(image["file_name"])
    if missing:
        shown = ", ".join(missing[:LISTED_MISSING]) + (" ..." if len(missing) > LISTED_MISSING else "")
        raise PathError(coco.json_path, f"{len(missing)} of {len(images)} images it lists are not in {where}: {shown}")
    for image in images[:decode]:
        try:
            load_rgb(coco.image_path(image))
        except ImageError as exc:
            raise PathError(coco.json_path, f"image {image['file_name']} in {where}: {exc.reason}") from exc


# ---------------------------------------------------------------- targets


def segmentation_to_mask(segm, height: int, width: int) -> np.ndarray | None:
    """Polygons, uncompressed RLE or compressed RLE -> (H, W) uint8 mask; None if unusable."""
    if isinstance(segm, list):  # polygons: [[x1, y1, x2, y2, ...], ...]
        polys = [p for p in segm if isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0]
        if not polys:
            return None
        rle = mask_util.merge(mask_util.frPyObjects(polys, height, width))
    elif isinstance(segm, dict) and "counts" in segm and "size" in segm:
        if list(segm["size"]) != [height, width]:
            return None
        rle = mask_util.frPyObjects(segm, height, width) if isinstance(segm["counts"], list) else segm
    else:
        return None
    return mask_util.decode(rle).astype(np.uint8)


def clip_box(bbox, width: int, height: int) -> list[float] | None:
    """COCO (x, y, w, h) -> (x1, y1, x2, y2) clipped to the image; None when no area is left."""
    x, y, w, h = (float(v) for v in bbox)
    x1, y1 = min(max(x, 0.0), width), min(max(y, 0.0), height)
    x2, y2 = min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)
    return [x1, y1, x2, y2] if x2 > x1 and y2 > y1 else None


def usable_annotations(coco: CocoSet, image: dict, masks: bool) -> list[tuple[dict, list[float]]]:
    """The training annotations of ``image``: non-crowd, non-degenerate; (annotation, xyxy box)."""
    out = []
    for a in coco.anns.get(image["id"], []):
        if a.get("iscrowd", 0):
            continue
        box = clip_box(a["bbox"], image["width"], image["height"])
        if box is None:
            continue
        if masks and not a.get("segmentation"):
            continue
        out.append((a, box))
    return out


def make_target(coco: CocoSet, image: dict, masks: bool) -> dict:
    """torchvision target: ``boxes`` (N, 4) float32 xyxy, ``labels`` (N,) int64, ``masks`` (N, H, W) uint8."""
    cat_to_label = coco.cat_to_label
    boxes, labels, mask_list = [], [], []
    h, w = image["height"], image["width"]
    for a, box in usable_annotations(coco, image, masks):
        if masks:
            m = segmentation_to_mask(a["segmentation"], h, w)
            if m is None:
                continue  # malformed polygon/RLE: dropped like a degenerate box
            mask_list.append(m)
        boxes.append(box)
        labels.append(cat_to_label[a["category_id"]])
    target = {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(labels, dtype=torch.int64),
    }
    if masks:
        target["masks"] = (
            torch.from_numpy(np.stack(mask_list)) if mask_list else torch.zeros((0, h, w), dtype=torch.uint8)
        )
    return target


def trainable_images(coco: CocoSet, masks: bool) -> list[dict]:
    """Images with at least one usable annotation (Detectron2's filter_empty_annotations)."""
    return [im for im in coco.images if usable_annotations(coco, im, masks)]


def select_fraction(images: list[T], fraction: float, seed: int) -> list[T]:
    """A seeded random ``fraction`` of ``images`` (paper 4.5 Mini COCO), kept in id order.

    ``round(fraction * n)`` images (at least 1); the same seed and list give the same subset.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if fraction == 1.0:
        return list(images)
    k = max(1, round(fraction * len(images)))
    chosen = np.random.default_rng(seed).choice(len(images), size=k, replace=False)
    return [images[i] for i in sorted(chosen.tolist())]


# ---------------------------------------------------------------- datasets


def _flip(image: np.ndarray, target: dict, width: int) -> tuple[np.ndarray, dict]:
    target = dict(target)
    boxes = target["boxes"].clone()
    boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
    target["boxes"] = boxes
    if "masks" in target:
        target["masks"] = target["masks"].flip(-1)
    return np.ascontiguousarray(image[:, ::-1]), target


class CocoDetection(torch.utils.data.Dataset):
    """Images (uint8 (3, H, W) tensors) with targets, for training or evaluation.

    Keys are an index or ``(index, flip)`` (the train stream decides flips, so they are
    reproducible). An item is a dict: ``image``, ``target`` (None when ``targets=False``),
    ``image_id``, ``size`` (h, w), and ``error`` = (path, reason) for an image that failed to
    decode or does not match the JSON's size (then ``image`` is None).
    """

    def __init__(self, coco: CocoSet, images: list[dict], masks: bool, targets: bool = True):
        self.coco = coco
        self.images = images
        self.masks = masks
        self.targets = targets

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key) -> dict:
        index, flip = key if isinstance(key, tuple) else (key, False)
        info = self.images[index]
        item = {
            "image": None,
            "target": None,
            "image_id": info["id"],
            "size": (info["height"], info["width"]),
            "error": None,
        }
        path = self.coco.image_path(info)
        try:
            with _one_thread():
                image = load_rgb(path)  # grey, palette, CMYK ... -> RGB
        except ImageError as exc:
            item["error"] = (str(path), exc.reason)
            return item
        if image.shape[:2] != (info["height"], info["width"]):
            reason = (
                f"decoded size {image.shape[1]}x{image.shape[0]} differs from the JSON's "
                f"{info['width']}x{info['height']}"
            )
            item["error"] = (str(path), reason)
            return item
        target = make_target(self.coco, info, self.masks) if self.targets else None
        if flip and target is not None:
            image, target = _flip(image, target, info["width"])
        image = np.ascontiguousarray(image)
        if not image.flags.writeable:  # PIL's buffer: torch wants memory it may write
            image = image.copy()
        item["image"] = torch.from_numpy(image).permute(2, 0, 1)
        item["target"] = target
        return item


class _one_thread:
    """torch ops inside data-loader workers use one thread (workers are the parallelism)."""

    def __enter__(self):
        self.before = torch.get_num_threads()
        if torch.utils.data.get_worker_info() is not None and self.before != 1:
            torch.set_num_threads(1)

    def __exit__(self, *exc):
        if torch.get_num_threads() != self.before:
            torch.set_num_threads(self.before)


def collate(items: list[dict]) -> list[dict]:
    """Keep the batch a list: detection images differ in size (the model pads them)."""
    return items


class TrainStream(torch.utils.data.Sampler):
    """An endless, reproducible stream of ``(index, flip)`` keys for one process, from ``start_iter``.

    The global stream visits the images epoch by epoch, each epoch a permutation seeded by
    (seed, epoch), each position with its own horizontal-flip coin (p=0.5, Detectron2's default
    augmentation). Iteration ``i`` takes positions ``[i*B, (i+1)*B)`` of it (B = total batch);
    process ``rank`` takes its ``B / world`` consecutive ones. The stream depends only on the seed
    and the iteration, so a resumed run sees exactly the images it would have seen, whatever the
    number of data-loader workers (Detectron2's TrainingSampler is endless in the same way).
    """

    def __init__(
        self, num_images: int, per_rank_batch: int, rank: int = 0, world: int = 1, seed: int = 0, start_iter: int = 0
    ):
        if num_images < 1:
            raise ValueError("no training images")
        self.n, self.b, self.rank, self.world = num_images, per_rank_batch, rank, world
        self.seed, self.start_iter = seed, start_iter
        self._epoch: int | None = None
        self._perm, self._flips = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=bool)  # drawn per epoch

    def key(self, position: int) -> tuple[int, bool]:
        epoch, offset = divmod(position, self.n)
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._epoch, self._perm, self._flips = epoch, rng.permutation(self.n), rng.random(self.n) < 0.5
        return int(self._perm[offset]), bool(self._flips[offset])

    def keys_for(self, iteration: int) -> list[tuple[int, bool]]:
        first = (iteration * self.world + self.rank) * self.b
        return [self.key(p) for p in range(first, first + self.b)]

    def __iter__(self):
        iteration = self.start_iter
        while True:
            yield from self.keys_for(iteration)
            iteration += 1

    def __len__(self) -> int:  # endless; DataLoader only needs this for len(loader)
        return 2**62
