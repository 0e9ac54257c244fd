"""Box geometry for the views: crop, resize, flip, clip, jitter, FPN level, random crop rectangle.

Pure numpy, no pixels. Coordinates are continuous pixel edges (the data loader's contract): a box
``(x1, y1, x2, y2)`` covers ``[x1, x2) x [y1, y2)`` and an image of width W spans ``[0, W]``, so
cropping is a shift, resizing a scale and flipping a reflection, with no +-1 terms anywhere.
Every function takes and returns float64 ``(n, 4)`` arrays and never modifies its input; all are
vectorised because they run per image per step in the data-loader workers.
"""

from __future__ import annotations

import math

import numpy as np

Rect = tuple[float, float, float, float]  # (x0, y0, x1, y1), continuous, in the source image


def as_boxes(boxes) -> np.ndarray:
    """A float64 ``(n, 4)`` copy-free view when possible (``(0, 4)`` for empty input)."""
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 4)


def from_store(boxes_int) -> np.ndarray:
    """Store boxes (int, x2/y2 = last pixel INCLUSIVE) -> continuous float64 boxes (x2+1, y2+1)."""
    out = np.array(boxes_int, dtype=np.float64).reshape(-1, 4)
    out[:, 2:] += 1.0
    return out


def box_area(boxes) -> np.ndarray:
    """Area ``w * h`` of each box; 0 for degenerate (empty or inverted) boxes."""
    b = as_boxes(boxes)
    # np.maximum, not np.clip: same result, a fraction of the call overhead on tiny arrays.
    return np.maximum(b[:, 2] - b[:, 0], 0.0) * np.maximum(b[:, 3] - b[:, 1], 0.0)


def clip_boxes(boxes, width: float, height: float) -> np.ndarray:
    """Boxes clipped to the image ``[0, width] x [0, height]`` (a box fully outside collapses
    onto the border with zero area)."""
    b = as_boxes(boxes)
    return np.minimum(np.maximum(b, 0.0), np.array([width, height, width, height], dtype=np.float64))


def crop_boxes(boxes, rect: Rect) -> tuple[np.ndarray, np.ndarray]:
    """Boxes in the coordinates of the crop ``rect`` (continuous, in the boxes' image), clipped to
    the crop, and the visible fraction of each box (clipped area / original area; 0 for a
    degenerate box, which is never "visible")."""
    b = as_boxes(boxes)
    x0, y0, x1, y1 = (float(v) for v in rect)
    shifted = b - np.array([x0, y0, x0, y0])
    clipped = clip_boxes(shifted, x1 - x0, y1 - y0)
    area = box_area(b)
    visible = np.divide(box_area(clipped), area, out=np.zeros_like(area), where=area > 0)
    return clipped, visible


def resize_boxes(boxes, src_size: tuple[float, float], dst_size: tuple[float, float]) -> np.ndarray:
    """Boxes of an image of ``src_size=(w, h)`` mapped into the same image resized to ``dst_size``
    (independent x and y scales: resizing may change the aspect, as V1's squash does)."""
    b = as_boxes(boxes)
    sx = dst_size[0] / src_size[0]
    sy = dst_size[1] / src_size[1]
    return b * np.array([sx, sy, sx, sy])


def hflip_boxes(boxes, width: float) -> np.ndarray:
    """Boxes of the horizontally flipped image: ``x1' = W - x2, x2' = W - x1``."""
    b = as_boxes(boxes)
    out = b.copy()
    out[:, 0] = width - b[:, 2]
    out[:, 2] = width - b[:, 0]
    return out


def jitter_boxes(
    boxes, rng: np.random.Generator, ratio: float = 0.1, p: float = 0.5, form: str = "paper"
) -> np.ndarray:
    """Box jitter, applied to each box independently with probability ``p``.

    ``form="paper"`` (paper 3.2): centre form with ONE ``r ~ U[-ratio, ratio]`` per box:
    ``cx += r*w, cy += r*h, w += r*w, h += r*h`` (w, h of the input box).
    ``form="released"`` (hologerry/SoCo ``jitter_props``): four independent r per box on the
    top-left corner and the size: ``x1 += r1*w, y1 += r2*h, w += r3*w, h += r4*h`` (so x2 moves by
    ``(r1 + r3) * w``). The result is not clipped; callers clip to their view.

    The rng draws are the same whatever boxes are selected (n coin flips, then n or 4n uniforms)
    so that the number of values consumed depends only on ``len(boxes)``.
    """
    b = as_boxes(boxes)
    n = len(b)
    apply = rng.random(n) < p
    w = b[:, 2] - b[:, 0]
    h = b[:, 3] - b[:, 1]
    if form == "paper":
        r = rng.uniform(-ratio, ratio, n)
        cx = (b[:, 0] + b[:, 2]) / 2 + r * w
        cy = (b[:, 1] + b[:, 3]) / 2 + r * h
        half_w = w * (1 + r) / 2
        half_h = h * (1 + r) / 2
        jittered = np.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], axis=1)
    elif form == "released":
        r = rng.uniform(-ratio, ratio, (n, 4))
        x1 = b[:, 0] + r[:, 0] * w
        y1 = b[:, 1] + r[:, 1] * h
        jittered = np.stack([x1, y1, x1 + w * (1 + r[:, 2]), y1 + h * (1 + r[:, 3])], axis=1)
    else:
        raise ValueError(f"jitter form must be 'paper' or 'released', got {form!r}")
    # Boxes not drawn for jitter stay bit-identical (no centre/size round trip).
    return np.where(apply[:, None], jittered, b)


def assign_levels(boxes, bounds: tuple[float, ...] = (48, 96, 192)) -> np.ndarray:
    """FPN level of each box from its area in the view's pixels (paper 3.3, scale-aware
    assignment): ``area <= 48^2 -> 0 (P2), <= 96^2 -> 1 (P3), <= 192^2 -> 2 (P4), else 3 (P5)``.

    The paper writes the ranges as 0-48^2, 49^2-96^2, ... for integer sizes; for real-valued
    areas we read them as half-open ``(lo^2, hi^2]`` intervals, so a box exactly on a boundary
    goes to the lower level (our choice; matches the released ``size <= range`` test)."""
    limits = np.square(np.asarray(bounds, dtype=np.float64))
    # side="left": the index of the first limit >= area, i.e. area == limit stays below.
    return np.searchsorted(limits, box_area(boxes), side="left").astype(np.int64)


def sample_crop(
    rng: np.random.Generator,
    width: int,
    height: int,
    scale: tuple[float, float] = (0.5, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> Rect:
    """A random crop rectangle by torchvision ``RandomResizedCrop.get_params``'s algorithm
    (area fraction ``U[scale]``, log-uniform aspect ``w/h`` in ``ratio``, 10 tries, then the
    central crop clamped to ``ratio``), drawn from ``rng`` instead of torch's global generator.

    Returns ``(x0, y0, x1, y1)`` continuous with integer corners inside ``[0, width] x [0, height]``.
    """
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            y0 = int(rng.integers(0, height - h + 1))
            x0 = int(rng.integers(0, width - w + 1))
            return (float(x0), float(y0), float(x0 + w), float(y0 + h))
    # Fallback (torchvision): central crop with the aspect clamped to the ratio range.
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    # Our guard (torchvision would return an empty crop here, e.g. a 1x1 image with ratio (0.5, 0.5)).
    w, h = max(1, w), max(1, h)
    y0, x0 = (height - h) // 2, (width - w) // 2
    return (float(x0), float(y0), float(x0 + w), float(y0 + h))
