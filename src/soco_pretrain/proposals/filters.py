"""Search parameters (presets) and the proposal filter of the paper and of the released code.

Boxes are ``x1, y1, x2, y2`` with x2/y2 the last pixel column/row (inclusive), as
:func:`~soco_pretrain.proposals.selective_search.selective_search` returns them; the box width
and height are ``w = x2 - x1`` and ``h = y2 - y1``, exactly as the reference's ``rect`` and the
released SoCo filter compute them.
"""

from __future__ import annotations

import numpy as np

from ..config import SEARCH_PRESETS, SearchConfig

# The search configuration and its presets live with every command's config (config.py).
PRESETS = SEARCH_PRESETS

# Rule codes stored per image (uint8): which rule produced the image's boxes.
RULE_PAPER = 0  # the preset's main filter
RULE_RATIO_ONLY = 1  # released fallback (a)
RULE_MIN_SIDE = 2  # released fallback (b)
RULE_WHOLE_IMAGE = 3  # released fallback (c)
RULE_EMPTY = 4  # nothing survived and the preset has no fallback
RULE_FAILED = 255  # the image could not be read or searched
RULE_NAMES = {
    RULE_PAPER: "paper",
    RULE_RATIO_ONLY: "ratio_only",
    RULE_MIN_SIDE: "min_side",
    RULE_WHOLE_IMAGE: "whole_image",
    RULE_EMPTY: "empty",
    RULE_FAILED: "failed",
}

# Released code's fallback (b): w, h >= 32 px (fixed there, independent of min_box_side).
FALLBACK_MIN_SIDE = 32


def unique_boxes(boxes: np.ndarray) -> np.ndarray:
    """Drop exact duplicate rows, keeping each box's first occurrence and the original order."""
    if len(boxes) < 2:
        return boxes
    _, first = np.unique(boxes, axis=0, return_index=True)
    return boxes[np.sort(first)]


def _ratio_ok(w: np.ndarray, h: np.ndarray, config: SearchConfig) -> np.ndarray:
    positive = (w > 0) & (h > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = w / np.where(h > 0, h, 1)
    return positive & (r >= config.ratio[0]) & (r <= config.ratio[1])


def filter_boxes(boxes, width: int, height: int, config: SearchConfig):
    """Filter selective-search boxes of a ``width`` x ``height`` image.

    Returns ``(kept, rule)``: kept is an (m, 4) array in the input's dtype and order with exact
    duplicates dropped; rule is the RULE_* code of the rule that produced it. The main rule
    (paper section 3.2) keeps ``ratio[0] <= w/h <= ratio[1]`` and
    ``rel_size[0] <= sqrt(w*h)/sqrt(W*H) <= rel_size[1]`` (bounds inclusive, w or h == 0
    dropped), plus ``w, h >= min_box_side`` when set. With ``fallbacks`` (released code), an
    image left with no box takes, in order: (a) the ratio rule alone, (b) w, h >= 32 px,
    (c) the whole image ``[0, 0, W-1, H-1]``.
    """
    boxes = np.asarray(boxes)
    if boxes.size == 0:
        boxes = boxes.reshape(0, 4)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must have shape (n, 4), got {boxes.shape}")
    # int64 arithmetic: w*h of int16/int32 boxes must not overflow.
    b = boxes.astype(np.int64, copy=False)
    w = b[:, 2] - b[:, 0]
    h = b[:, 3] - b[:, 1]
    ratio_ok = _ratio_ok(w, h, config)
    rel = np.sqrt((w * h).astype(np.float64)) / np.sqrt(float(width) * float(height))
    keep = ratio_ok & (rel >= config.rel_size[0]) & (rel <= config.rel_size[1])
    if config.min_box_side:
        keep &= (w >= config.min_box_side) & (h >= config.min_box_side)
    if keep.any():
        return unique_boxes(boxes[keep]), RULE_PAPER
    if not config.fallbacks:
        return boxes[:0], RULE_EMPTY
    if ratio_ok.any():
        return unique_boxes(boxes[ratio_ok]), RULE_RATIO_ONLY
    big = (w >= FALLBACK_MIN_SIDE) & (h >= FALLBACK_MIN_SIDE)
    if big.any():
        return unique_boxes(boxes[big]), RULE_MIN_SIDE
    whole = np.array([[0, 0, width - 1, height - 1]], dtype=boxes.dtype if boxes.dtype.kind == "i" else np.int32)
    return whole, RULE_WHOLE_IMAGE
