"""Boxes that replace the selective-search store: random boxes and a COCO JSON's annotations.

The dataset's ``views.proposal_source`` (config.py) picks where an image's boxes come from; the
paper ablates this in Table 4 (row 1: the whole image as the one instance) and Table 5c (K
random boxes instead of selective search). The whole image needs no code here (one box
``[0, 0, W, H]``); this module draws random boxes and reads user-supplied ones.

Every box is continuous (x1, y1, x2, y2) in the original image's pixels (``boxes.py``), as
``boxes.from_store`` returns store boxes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..coco_json import OPTIONAL, REQUIRED, normalised_file_name, read_coco_json
from ..errors import PathError

PROPOSAL_SOURCES = ("selective_search", "whole_image", "random", "coco")

# The paper's proposal filter (section 3.2): 1/3 <= w/h <= 3 and 0.3 <= sqrt(wh)/sqrt(WH) <= 0.8.
PAPER_RATIO = (1 / 3, 3.0)
PAPER_REL_SIZE = (0.3, 0.8)
# Rounds of candidate draws for random boxes before the clamping fallback (each round draws
# 4K candidates): the rules are satisfiable for nearly every box of an image with an aspect
# ratio within about [1/3, 3], so more than one round is rare.
RANDOM_ROUNDS = 16


def random_boxes(
    rng: np.random.Generator,
    width: int,
    height: int,
    k: int,
    ratio: tuple[float, float] = PAPER_RATIO,
    rel_size: tuple[float, float] = PAPER_REL_SIZE,
) -> np.ndarray:
    """``k`` random boxes inside a ``width`` x ``height`` image, float64 (k, 4), continuous.

    Paper Table 5c only says "randomly generate K bounding boxes"; our choice is boxes that pass
    the paper's own proposal filter, as selective-search boxes do: aspect ``w/h`` log-uniform in
    ``ratio``, relative size ``sqrt(wh)/sqrt(WH)`` uniform in ``rel_size``, each candidate kept
    only if it fits in the image (rejection sampling: uniform over the feasible sizes), then a
    uniform position. An image so elongated that the rules cannot hold (e.g. 30:1) gets, after
    ``RANDOM_ROUNDS`` rounds, candidates clamped to the image (the size rule then breaks).
    The draws depend only on (width, height, k), so a seeded rng gives the same boxes.
    """
    if k < 1:
        raise ValueError(f"random_boxes needs k >= 1, got {k}")
    side = math.sqrt(float(width) * float(height))
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    kept_w, kept_h = np.zeros(0), np.zeros(0)
    for _ in range(RANDOM_ROUNDS):
        s = rng.uniform(rel_size[0], rel_size[1], 4 * k)
        a = np.exp(rng.uniform(log_lo, log_hi, 4 * k))
        w, h = s * side * np.sqrt(a), s * side / np.sqrt(a)
        fits = (w <= width) & (h <= height)
        kept_w, kept_h = np.concatenate([kept_w, w[fits]]), np.concatenate([kept_h, h[fits]])
        if len(kept_w) >= k:
            break
    if len(kept_w) < k:  # extreme aspect: clamp the last round's first candidates to the image
        extra = k - len(kept_w)
        kept_w = np.concatenate([kept_w, np.minimum(w[:extra], width)])
        kept_h = np.concatenate([kept_h, np.minimum(h[:extra], height)])
    w, h = kept_w[:k], kept_h[:k]
    x1 = rng.uniform(0.0, 1.0, k) * (width - w)
    y1 = rng.uniform(0.0, 1.0, k) * (height - h)
    return np.stack([x1, y1, x1 + w, y1 + h], axis=1)


def passes_paper_filter(boxes: np.ndarray, width: float, height: float) -> np.ndarray:
    """Which continuous boxes pass the paper's filter (section 3.2; bounds inclusive)."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    positive = (w > 0) & (h > 0)
    r = np.divide(w, h, out=np.zeros_like(w), where=h > 0)
    rel = np.sqrt(np.maximum(w * h, 0.0)) / math.sqrt(float(width) * float(height))
    return (
        positive
        & (r >= PAPER_RATIO[0])
        & (r <= PAPER_RATIO[1])
        & (rel >= PAPER_REL_SIZE[0])
        & (rel <= PAPER_REL_SIZE[1])
    )


@dataclass
class ImageBoxes:
    """Boxes per dataset image: image ``i`` owns ``boxes[offsets[i]:offsets[i + 1]]``.

    ``sizes[i]`` is the (width, height) the JSON gives (0, 0 when absent); ``missing[i]`` marks
    images left without a box, ``reasons`` counts why. Flat arrays: cheap to send to workers.
    """

    boxes: np.ndarray  # float64 (n, 4), continuous original pixels
    offsets: np.ndarray  # int64 (images + 1,)
    sizes: np.ndarray  # int64 (images, 2)
    missing: np.ndarray  # bool (images,)
    reasons: dict = field(default_factory=dict)

    def of(self, i: int) -> np.ndarray:
        return self.boxes[self.offsets[i] : self.offsets[i + 1]]


def read_coco_boxes(json_path, paths: list[str], apply_filter: bool = False) -> ImageBoxes:
    """The annotation boxes of a COCO JSON for the images ``paths`` (relative paths, matched to
    the JSON's ``file_name`` after normalisation, as the dataset's COCO image source does).

    COCO ``bbox`` is ``[x, y, w, h]`` in continuous pixels, so the box is ``(x, y, x + w, y + h)``
    (no +1: the store's inclusive convention does not apply). Crowd annotations
    (``iscrowd: 1``, regions of many objects) and boxes with w or h <= 0 are skipped (our
    choice). ``apply_filter``: keep only boxes passing the paper's filter (needs each image's
    ``width`` and ``height`` in the JSON). The file is read and checked by
    :func:`soco_pretrain.coco_json.read_coco_json` (images with ids, annotations with a known
    ``image_id`` and a 4-number ``bbox``; categories are not needed). Raises PathError (one
    line naming the file) for a bad file.
    """
    json_path = Path(json_path)
    parsed = read_coco_json(json_path, annotations=REQUIRED, categories=False, sizes=OPTIONAL, what="the proposal JSON")
    by_name = {}
    for entry in parsed.images:
        size = (int(entry.get("width") or 0), int(entry.get("height") or 0))
        by_name[normalised_file_name(entry["file_name"])] = (entry["id"], size)
    per_image: dict = {}
    for ann in parsed.annotations:
        if ann.get("iscrowd", 0):
            continue
        x, y, w, h = (float(v) for v in ann["bbox"])
        if w > 0 and h > 0:
            per_image.setdefault(ann["image_id"], []).append((x, y, x + w, y + h))

    n = len(paths)
    chunks, offsets = [], [0]
    sizes = np.zeros((n, 2), dtype=np.int64)
    missing = np.zeros(n, dtype=bool)
    reasons = {"not in the JSON": 0, "no boxes": 0}
    for i, path in enumerate(paths):
        found = by_name.get(path)
        boxes = np.zeros((0, 4))
        if found is None:
            reasons["not in the JSON"] += 1
        else:
            image_id, size = found
            sizes[i] = size
            boxes = np.asarray(per_image.get(image_id, []), dtype=np.float64).reshape(-1, 4)
            if apply_filter and len(boxes):
                if min(size) <= 0:
                    raise PathError(
                        json_path,
                        f"views.proposal_json_filter needs the image size, but the entry of {path} has no width/height",
                    )
                boxes = boxes[passes_paper_filter(boxes, *size)]
            if not len(boxes):
                reasons["no boxes"] += 1
        missing[i] = not len(boxes)
        chunks.append(boxes)
        offsets.append(offsets[-1] + len(boxes))
    return ImageBoxes(
        boxes=np.concatenate(chunks) if chunks else np.zeros((0, 4)),
        offsets=np.asarray(offsets, dtype=np.int64),
        sizes=sizes,
        missing=missing,
        reasons={k: v for k, v in reasons.items() if v},
    )
