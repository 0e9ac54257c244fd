"""SoCo's views V1, V2, V3 (and V4 for SoCo*) with their boxes (paper section 3.2, Figure 1).

``build_views(image, boxes, cfg, rng)`` turns one decoded image and its proposals (continuous
pixel-edge boxes in the original image, see ``boxes.py``) into resized uint8 views plus, for K
sampled proposals, their box, FPN level and validity in every view. Photometric augmentation is
not done here (``augment.py``); the horizontal flip is, because it moves the boxes.

Geometry (defaults from ``ViewsConfig``, each with its source there):

- V1: the whole image squashed to ``v1_size`` square (paper 3.2).
- V2: ``sample_crop`` of V1 (area ``crop_scale``, aspect ``crop_ratio``) resized to ``v2_size``.
  ``v2_source="v1"`` resamples V1's pixels (paper: a crop of V1); ``"original"`` samples the crop
  on the original image, as the released code does (its aspect range then holds in original
  pixels), and resamples the original pixels once.
- V3: ``v3="downsample"`` is V2's pixels resized to ``v3_size`` (paper), same geometry and flip
  as V2; ``"independent_crop"`` is its own crop resized to ``v3_size`` (released FPN code).
- V4 (``soco_star``): another crop resized to ``v4_size`` (paper 4.1, SoCo*).
  ``v2_source`` applies to every cropped view (our choice: the released code crops all of them
  from the original image, the paper all of them from V1).

Every random draw comes from ``rng`` (a seeded ``np.random.Generator`` gives identical output),
in a fixed order: crops (with re-draws), flips, proposal sampling, jitter.

Geometry and pixels are separate steps: ``plan_views(image_size, boxes, cfg, rng)`` draws
everything and returns the ViewSet without pixels plus its render plan (``ViewSet.plan``: one
``ViewPlan`` of integers per view), and ``render_views(image, plan, v1_size)`` makes the pixels
from that plan. ``build_views`` is the two together. The split lets the loader workers draw the
geometry from the JPEG header alone while the training device decodes and renders
(``data.decode="device"``, ``decode.py``), with the same draws and the same resampling.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
import torchvision.transforms.v2.functional as F

from ..config import ViewsConfig
from .boxes import (
    Rect,
    as_boxes,
    assign_levels,
    box_area,
    clip_boxes,
    crop_boxes,
    hflip_boxes,
    jitter_boxes,
    resize_boxes,
    sample_crop,
)

# Crop re-draws when no proposal is visible in every view: the released code re-draws too (5
# times); 10 is our choice (twice as many chances). Cheap: only boxes are recomputed.
MAX_REDRAWS = 10

# RESIZE_NOTE: one resampling filter for every view (contract: choose one): torchvision's
# resize(bilinear, antialias=True) on uint8 tensors in HWC memory order. It matches PIL's
# antialiased BILINEAR to within 1 grey level but is several times faster on one core (its SIMD
# uint8 path). Flips are exact (no resampling).


@dataclass
class ViewSet:
    """The views of one image and K proposals' boxes in each (list order: V1, V2, V3[, V4]).

    ``boxes[v][k]`` is proposal ``proposal_ids[k]`` in view v's pixels (continuous x1, y1, x2, y2);
    ``levels[v][k]`` its FPN level 0..3 (P2..P5). Padded slots (``valid[k]`` False, id -1) hold the
    whole view. ``crops[v]`` is view v's rectangle in V1's coordinates before its flip (V1 itself:
    the whole of V1), for pictures and debugging.
    """

    images: list[np.ndarray]
    boxes: list[np.ndarray]
    levels: list[np.ndarray]
    valid: np.ndarray
    proposal_ids: np.ndarray
    flipped: list[bool]
    crops: list[Rect]
    redraws: int = 0  # extra crop draws needed before some proposal was visible in every view
    fallback: bool = False  # all draws failed: cropped views are the whole V1 (all proposals in)
    plan: list[ViewPlan] = field(default_factory=list)  # how ``images`` are rendered (render_views)


# Where a view's pixels come from (ViewPlan.kind).
PLAN_V1 = 0  # the whole image squashed to v1_size (V1 itself)
PLAN_CROP_V1 = 1  # an integer crop of V1's pixels, resized to the view's size
PLAN_CROP_ORIGINAL = 2  # an integer crop of the original image's pixels, resized
PLAN_FOLLOWS = 3  # the pixels of view ``follows`` (before its flip), resized (paper's V3 of V2)


class ViewPlan(NamedTuple):
    """How one view's pixels are made: all integers, so it travels as a row of an int tensor
    (``plan_array``). ``x0, y0, x1, y1``: the crop in the source (kinds 1 and 2; else 0);
    ``follows``: the parent view (kind 3; else -1); ``flipped``: 0 or 1, an exact flip after the
    resampling; ``size``: the view's side."""

    kind: int
    x0: int
    y0: int
    x1: int
    y1: int
    follows: int
    flipped: int
    size: int


def plan_array(plan: list[ViewPlan]) -> np.ndarray:
    """A render plan as an int32 (V, 8) array (columns in ViewPlan's field order)."""
    return np.asarray(plan, dtype=np.int32).reshape(len(plan), len(ViewPlan._fields))


def plan_from_array(rows) -> list[ViewPlan]:
    """The inverse of ``plan_array`` (rows: an array, a tensor's ``tolist()`` or lists)."""
    return [ViewPlan(*(int(v) for v in row)) for row in rows]


@dataclass
class _View:
    """Geometry of one view while it is being built."""

    size: int
    rect: Rect  # in V1 coordinates
    src_rect: Rect | None = None  # crop in the pixel source (V1 or the original image)
    follows: int | None = None  # index of the view it is a downsampled copy of (V3 of V2)
    flipped: bool = False


def view_names(cfg: ViewsConfig) -> list[str]:
    """Names of the views ``build_views`` returns, in order."""
    return ["V1", "V2", "V3", "V4"] if cfg.soco_star else ["V1", "V2", "V3"]


def build_views(image: np.ndarray, boxes, cfg: ViewsConfig, rng: np.random.Generator) -> ViewSet:
    """Views and K sampled proposals' boxes for one image (see the module docstring).

    ``image``: uint8 HxWx3 RGB. ``boxes``: (n, 4) continuous boxes in the original image's pixels
    (``boxes.from_store`` converts store boxes), n >= 1 (images without proposals are the
    dataset's business: ``ViewsConfig.no_proposals``).
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"build_views needs a uint8 HxWx3 image, got {image.dtype} {image.shape}")
    height, width = image.shape[:2]
    viewset = plan_views((width, height), boxes, cfg, rng)
    viewset.images = render_views(image, viewset.plan, cfg.v1_size)
    return viewset


def plan_views(image_size: tuple[int, int], boxes, cfg: ViewsConfig, rng: np.random.Generator) -> ViewSet:
    """``build_views`` without the pixels: the ViewSet of an image of ``image_size`` = (width,
    height) with ``images`` empty and ``plan`` filled (``render_views`` makes the pixels).

    Draws exactly what build_views draws, in the same order, so both give the same geometry
    for the same rng state."""
    width, height = (int(v) for v in image_size)
    s1 = cfg.v1_size
    v1_boxes = clip_boxes(resize_boxes(as_boxes(boxes), (width, height), (s1, s1)), s1, s1)
    if not (box_area(v1_boxes) > 0).any():
        raise ValueError(f"build_views needs at least one non-empty proposal, got {len(v1_boxes)}")

    views, present, redraws, fallback = _draw_geometry(v1_boxes, cfg, rng, width, height)
    for view in views:  # V3 downsampled from V2 keeps V2's flip (it is V2's pixels)
        view.flipped = views[view.follows].flipped if view.follows is not None else bool(rng.random() < cfg.hflip_p)
    ids, valid = _sample_ids(np.flatnonzero(present), cfg, rng)
    view_boxes = _view_boxes(views, v1_boxes, ids, valid, cfg, rng)
    return ViewSet(
        images=[],
        boxes=view_boxes,
        levels=[assign_levels(b, cfg.level_bounds) for b in view_boxes],
        valid=valid,
        proposal_ids=ids,
        flipped=[v.flipped for v in views],
        crops=[v.rect for v in views],
        redraws=redraws,
        fallback=fallback,
        plan=[_plan_of(view, cfg) for view in views],
    )


def _plan_of(view: _View, cfg: ViewsConfig) -> ViewPlan:
    """A view's render instructions (integers only; see ViewPlan)."""
    flipped = int(view.flipped)
    if view.follows is not None:  # paper: V3 is V2 downsampled
        return ViewPlan(PLAN_FOLLOWS, 0, 0, 0, 0, view.follows, flipped, view.size)
    if view.src_rect is None:
        return ViewPlan(PLAN_V1, 0, 0, 0, 0, -1, flipped, view.size)
    x0, y0, x1, y1 = (int(v) for v in view.src_rect)  # sample_crop's corners are integers
    kind = PLAN_CROP_V1 if cfg.v2_source == "v1" else PLAN_CROP_ORIGINAL
    return ViewPlan(kind, x0, y0, x1, y1, -1, flipped, view.size)


# ---------------------------------------------------------------- geometry


def _draw_geometry(v1_boxes, cfg, rng, width, height):
    """Views with their crops, and which proposals are visible in all of them.

    Re-draws every crop while no proposal is visible in all cropped views (MAX_REDRAWS times),
    then falls back to crops covering the whole V1 (every non-empty proposal visible)."""
    s1 = cfg.v1_size
    for attempt in range(MAX_REDRAWS + 1):
        views = [_View(s1, (0.0, 0.0, float(s1), float(s1)))]
        views.append(_crop_view(cfg.v2_size, cfg, rng, width, height))
        if cfg.v3 == "downsample":
            views.append(_View(cfg.v3_size, views[1].rect, follows=1))
        else:
            views.append(_crop_view(cfg.v3_size, cfg, rng, width, height))
        if cfg.soco_star:
            views.append(_crop_view(cfg.v4_size, cfg, rng, width, height))
        present = np.ones(len(v1_boxes), dtype=bool)
        for view in views[1:]:
            if view.follows is None:
                _, visible = crop_boxes(v1_boxes, view.rect)
                present &= _is_visible(visible, cfg.min_visible)
        if present.any():
            return views, present, attempt, False
    whole_src = (0.0, 0.0, float(s1), float(s1)) if cfg.v2_source == "v1" else (0.0, 0.0, float(width), float(height))
    for view in views[1:]:
        view.rect = (0.0, 0.0, float(s1), float(s1))
        view.src_rect = None if view.follows is not None else whole_src
    return views, box_area(v1_boxes) > 0, MAX_REDRAWS, True


def _is_visible(fraction: np.ndarray, min_visible: float) -> np.ndarray:
    # "> 0" too: with min_visible = 0 (released code: any overlap) a proposal entirely outside
    # the crop must still count as absent.
    return (fraction >= min_visible) & (fraction > 0)


def _crop_view(size: int, cfg: ViewsConfig, rng, width: int, height: int) -> _View:
    """A cropped view: the crop drawn on V1 ("v1") or on the original image ("original")."""
    s1 = cfg.v1_size
    if cfg.v2_source == "v1":
        rect = sample_crop(rng, s1, s1, cfg.crop_scale, cfg.crop_ratio)
        return _View(size, rect, src_rect=rect)
    src = sample_crop(rng, width, height, cfg.crop_scale, cfg.crop_ratio)
    sx, sy = s1 / width, s1 / height
    return _View(size, (src[0] * sx, src[1] * sy, src[2] * sx, src[3] * sy), src_rect=src)


def _sample_ids(candidates: np.ndarray, cfg: ViewsConfig, rng) -> tuple[np.ndarray, np.ndarray]:
    """K proposal ids drawn uniformly without replacement among ``candidates``; fewer than K are
    padded with -1 and valid=False ("mask") or by re-drawing candidates with replacement
    ("repeat", the released code's padding; all valid)."""
    k, m = cfg.num_proposals, len(candidates)
    if m >= k:
        return rng.choice(candidates, k, replace=False).astype(np.int64), np.ones(k, dtype=bool)
    ids = rng.permutation(candidates).astype(np.int64)
    if cfg.pad == "repeat":
        extra = rng.choice(candidates, k - m, replace=True).astype(np.int64)
        return np.concatenate([ids, extra]), np.ones(k, dtype=bool)
    valid = np.arange(k) < m
    return np.concatenate([ids, np.full(k - m, -1, dtype=np.int64)]), valid


def _view_boxes(views, v1_boxes, ids, valid, cfg, rng) -> list[np.ndarray]:
    """The K boxes in every view: crop, resize, flip, then jitter and clip; padded slots hold
    the whole view."""
    chosen = v1_boxes[np.where(valid, ids, 0)]
    unflipped: list[np.ndarray] = []
    for view in views:
        if view.follows is not None:  # downsampled copy: its parent's boxes, scaled
            parent = views[view.follows]
            b = resize_boxes(unflipped[view.follows], (parent.size, parent.size), (view.size, view.size))
        else:
            b, _ = crop_boxes(chosen, view.rect)
            x0, y0, x1, y1 = view.rect
            b = resize_boxes(b, (x1 - x0, y1 - y0), (view.size, view.size))
        unflipped.append(b)
    result = []
    for i, (view, b) in enumerate(zip(views, unflipped)):
        if view.flipped:
            b = hflip_boxes(b, view.size)
        if cfg.jitter == "paper" or (cfg.jitter == "released" and i == 0):
            # Paper: every proposal in every view; released: view-1 copies only. Jittered in the
            # view's own pixels, after the crop's clipping, then clipped again to the view.
            b = clip_boxes(jitter_boxes(b, rng, cfg.jitter_ratio, cfg.jitter_p, cfg.jitter), view.size, view.size)
        b = b.copy() if b is unflipped[i] else b  # never write into a parent's boxes
        b[~valid] = (0.0, 0.0, view.size, view.size)
        result.append(b)
    return result


# ---------------------------------------------------------------- pixels


class PixelOps(NamedTuple):
    """The pixel operations ``render_views`` needs, for one image layout: ``crop(img, x0, y0,
    x1, y1)``, ``resize(img, size)``, ``flip`` (horizontal, exact) and ``finish`` (applied to
    every returned view). NUMPY_OPS' resize always returns a new array (every view owns its
    pixels: the CPU augmentation works in place); decode.TENSOR_OPS' may return its input (those
    views are stacked into new tensors)."""

    crop: Any
    resize: Any
    flip: Any
    finish: Any


def render_views(image, plan: list[ViewPlan], v1_size: int, ops: PixelOps | None = None) -> list:
    """Each view's pixels: one resampling from its source (an integer crop is a slice), then an
    exact flip. ``image`` and the views are uint8 HxWx3 numpy arrays with the default ``ops``;
    decode.py passes ops for CxHxW tensors on the training device (same steps, same filter)."""
    ops = ops or NUMPY_OPS
    v1 = ops.resize(image, v1_size)
    unflipped: list = []
    for view in plan:
        if view.kind == PLAN_FOLLOWS:
            img = ops.resize(unflipped[view.follows], view.size)
        elif view.kind == PLAN_V1:
            img = v1
        else:
            src = v1 if view.kind == PLAN_CROP_V1 else image
            img = ops.resize(ops.crop(src, view.x0, view.y0, view.x1, view.y1), view.size)
        unflipped.append(img)
    return [ops.finish(ops.flip(img) if view.flipped else img) for img, view in zip(unflipped, plan)]


def _flip_hwc(img: np.ndarray) -> np.ndarray:
    return _as_tensor(img).flip(1).numpy()  # torch: ~20x faster than numpy's [:, ::-1] copy


# Arrays stay HxWx3; torch only sees dense HWC memory (its fast uint8 path).
NUMPY_OPS = PixelOps(
    crop=lambda img, x0, y0, x1, y1: img[y0:y1, x0:x1],
    resize=lambda img, size: resize_square(img, size),
    flip=_flip_hwc,
    finish=np.ascontiguousarray,
)


def _as_tensor(arr: np.ndarray) -> torch.Tensor:
    """A HxWx3 tensor sharing ``arr``'s memory (read only here; torch warns on read-only arrays)."""
    if arr.flags.writeable:
        return torch.from_numpy(arr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(arr)


def resize_square(img: np.ndarray, size: int) -> np.ndarray:
    """Bilinear antialiased resize of a uint8 HxWx3 array to size x size (see RESIZE_NOTE)."""
    if img.shape[:2] == (size, size):
        return img.copy()  # every view owns its pixels (never the caller's image or another view's)
    # A crop is a strided slice: copy it dense first (numpy: a row memcpy), because torch's fast
    # uint8 kernel needs dense HWC memory (3-4x faster than resizing the slice).
    chw = _as_tensor(np.ascontiguousarray(img)).permute(2, 0, 1)
    out = F.resize(chw, [size, size], interpolation=F.InterpolationMode.BILINEAR, antialias=True)
    return out.permute(1, 2, 0).numpy()
