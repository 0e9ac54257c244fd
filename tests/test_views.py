"""data/views.py: every returned box still covers its proposal's pixels in every view.

The main test paints each proposal of a synthetic image with its own colour on a grey background
(non-overlapping rectangles, random sizes, positions and image aspect), builds the views and
checks, in every view, that the colour's pixels and the box agree to resampling blur: inside
the (shrunk) box the pixels are that colour, outside the (expanded) box there is none of it, and
the colour's extent, area and centre match the box (the last two to a quarter pixel). Crop, squash,
resize, flip and V3's downsampling all
have to be right for that to hold, over many seeds and every option.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from soco_pretrain.config import ViewsConfig
from soco_pretrain.data import views as views_module
from soco_pretrain.data.boxes import assign_levels, crop_boxes, from_store, resize_boxes
from soco_pretrain.data.views import MAX_REDRAWS, ViewSet, build_views, view_names


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """build_views runs in data-loader workers, where torch uses one thread; on a loaded 2-core
    machine, torch's multi-threaded small copies/resizes are 10x slower than one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


BACKGROUND = (128, 128, 128)
PALETTE = np.array(
    [
        (230, 25, 25),
        (25, 230, 25),
        (25, 25, 230),
        (230, 230, 25),
        (230, 25, 230),
        (25, 230, 230),
        (10, 10, 10),
        (245, 245, 245),
    ],
    dtype=np.uint8,
)
COLOUR_TOL = 60  # RGB distance: a pixel at least ~2/3 this colour (vs grey) after resampling blur
BLUR = 2.0  # px: how far a resampled edge may move (bilinear, antialiased, up to two resamplings)


def painted_scene(seed: int):
    """A random-size grey image with up to 8 non-overlapping coloured rectangles.

    Returns (image uint8 HxWx3, store-style int boxes with inclusive x2/y2, colour per box)."""
    rng = np.random.default_rng(seed)
    width, height = (int(v) for v in rng.integers(80, 640, 2))
    image = np.empty((height, width, 3), np.uint8)
    image[:] = BACKGROUND
    gap = max(4, int(0.04 * max(width, height)))  # grey between rectangles: colours never touch
    boxes: list[list[int]] = []
    for _ in range(200):
        if len(boxes) == len(PALETTE):
            break
        w = int(rng.integers(max(8, width // 8), max(9, width // 2)))
        h = int(rng.integers(max(8, height // 8), max(9, height // 2)))
        x1, y1 = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
        x2, y2 = x1 + w - 1, y1 + h - 1
        if all(x1 > b[2] + gap or x2 < b[0] - gap or y1 > b[3] + gap or y2 < b[1] - gap for b in boxes):
            boxes.append([x1, y1, x2, y2])
    for i, (x1, y1, x2, y2) in enumerate(boxes):
        image[y1 : y2 + 1, x1 : x2 + 1] = PALETTE[i]
    return image, np.array(boxes, np.int32), PALETTE[: len(boxes)]


def colour_mask(view: np.ndarray, colour) -> np.ndarray:
    diff = view.astype(np.int32) - np.asarray(colour, np.int32)
    return (diff * diff).sum(axis=2) < COLOUR_TOL**2


def colour_moments(view: np.ndarray, box, colour, margin: float = 2.0):
    """Area and centre of the colour's coverage around ``box`` (its window expanded by margin).

    Coverage alpha = the pixel's projection on (colour - grey): 1 on the colour, 0 on grey, and
    resampling is a linear filter with unit-sum symmetric kernels, so the sum of alpha is the
    rectangle's area and its centroid the rectangle's centre, to a small fraction of a pixel."""
    height, width = view.shape[:2]
    x1, y1, x2, y2 = box
    xa, xb = max(0, int(np.floor(x1 - margin))), min(width, int(np.ceil(x2 + margin)))
    ya, yb = max(0, int(np.floor(y1 - margin))), min(height, int(np.ceil(y2 + margin)))
    grey = np.array(BACKGROUND, float)
    d = np.asarray(colour, float) - grey
    alpha = (view[ya:yb, xa:xb].astype(float) - grey) @ d / (d @ d)
    area = alpha.sum()
    cx = (alpha.sum(axis=0) * (np.arange(xa, xb) + 0.5)).sum() / area
    cy = (alpha.sum(axis=1) * (np.arange(ya, yb) + 0.5)).sum() / area
    return area, cx, cy


def check_box_covers_colour(view: np.ndarray, box, colour, where: str) -> bool:
    """Asserts box and colour agree in ``view``; returns False when the box is too thin for the
    interior checks (only the outside check then runs)."""
    x1, y1, x2, y2 = box
    mask = colour_mask(view, colour)
    ys, xs = np.nonzero(mask)
    cx, cy = xs + 0.5, ys + 0.5  # pixel centres, continuous coordinates
    # 1) no pixel of this colour outside the box, expanded by the blur
    outside = (cx < x1 - BLUR) | (cx > x2 + BLUR) | (cy < y1 - BLUR) | (cy > y2 + BLUR)
    assert not outside.any(), f"{where}: {outside.sum()} pixels of the colour outside box {box}"
    if min(x2 - x1, y2 - y1) < 2 * BLUR + 2:
        return False
    # 2) inside the box, shrunk by the blur, (almost) every pixel has the colour
    gx = np.arange(view.shape[1]) + 0.5
    gy = np.arange(view.shape[0]) + 0.5
    inner = ((gy[:, None] > y1 + BLUR) & (gy[:, None] < y2 - BLUR)) & (
        (gx[None, :] > x1 + BLUR) & (gx[None, :] < x2 - BLUR)
    )
    assert mask[inner].mean() > 0.97, f"{where}: only {mask[inner].mean():.2f} of box {box} has the colour"
    # 3) the colour's extent (pixel edges) matches the box edges
    extent = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    assert np.allclose(extent, box, atol=BLUR), f"{where}: colour extent {extent} vs box {box}"
    # 4) sub-pixel: the colour's area and centre are the box's (measured error < 0.1 px on
    # correct code; a box off by one pixel anywhere fails)
    area, mx, my = colour_moments(view, box, colour)
    w, h = x2 - x1, y2 - y1
    assert abs(mx - (x1 + x2) / 2) < 0.25 and abs(my - (y1 + y2) / 2) < 0.25, f"{where}: centre {mx, my} vs box {box}"
    assert abs(area - w * h) < 0.3 * (w + h), f"{where}: colour area {area:.1f} vs box {box} area {w * h:.1f}"
    return True


CONFIGS = {
    "paper": ViewsConfig(jitter="none"),
    "flip_all": ViewsConfig(jitter="none", hflip_p=1.0),
    "original_source": ViewsConfig(jitter="none", v2_source="original"),
    "independent_v3": ViewsConfig(jitter="none", v3="independent_crop", hflip_p=0.5),
    "soco_star_original": ViewsConfig(jitter="none", soco_star=True, v2_source="original", v3="independent_crop"),
    "soco_star_any_overlap": ViewsConfig(jitter="none", soco_star=True, min_visible=0.0, crop_scale=(0.2, 1.0)),
}


SEEDS = 25  # per config: ~600 box checks in all; a bug in one branch fails within a few seeds


@pytest.mark.parametrize("name", list(CONFIGS))
def test_boxes_cover_their_colour_in_every_view(name):
    cfg = dataclasses.replace(CONFIGS[name], num_proposals=6)
    checked = flips = 0
    for seed in range(SEEDS):
        image, store_boxes, colours = painted_scene(seed)
        vs = build_views(image, from_store(store_boxes), cfg, np.random.default_rng(seed))
        assert vs.valid.any()
        for v, (view, boxes) in enumerate(zip(vs.images, vs.boxes)):
            flips += vs.flipped[v]
            for k in np.flatnonzero(vs.valid):
                where = f"{name} seed {seed} {view_names(cfg)[v]} proposal {vs.proposal_ids[k]}"
                checked += check_box_covers_colour(view, boxes[k], colours[vs.proposal_ids[k]], where)
        # padded slots hold the whole view
        for view, boxes in zip(vs.images, vs.boxes):
            assert (boxes[~vs.valid] == [0, 0, view.shape[1], view.shape[0]]).all()
    assert checked > 6 * SEEDS  # the interior checks really ran, not just the outside one
    if cfg.hflip_p == 1.0:
        assert flips == SEEDS * len(vs.images)
    elif cfg.hflip_p > 0:
        assert 0 < flips < SEEDS * len(vs.images)


@pytest.mark.parametrize("name", ["paper", "soco_star_original"])
def test_visible_fraction_of_returned_proposals_from_pixels(name):
    """Each valid proposal shows at least min_visible of its pixels in every cropped view,
    counted on the painted pixels (independent of the box code)."""
    cfg = dataclasses.replace(CONFIGS[name], num_proposals=8)
    for seed in range(20):
        image, store_boxes, colours = painted_scene(100 + seed)
        vs = build_views(image, from_store(store_boxes), cfg, np.random.default_rng(seed))
        v1_counts = [colour_mask(vs.images[0], c).sum() for c in colours]
        for v in range(1, len(vs.images)):
            x0, y0, x1, y1 = vs.crops[v]
            size = vs.images[v].shape[0]
            zoom = (size / (x1 - x0)) * (size / (y1 - y0))  # V1 pixels -> this view's pixels
            for k in np.flatnonzero(vs.valid):
                i = vs.proposal_ids[k]
                fraction = colour_mask(vs.images[v], colours[i]).sum() / (zoom * v1_counts[i])
                assert fraction >= cfg.min_visible - 0.12, (seed, v, i, fraction)


def test_v1_boxes_are_the_squashed_proposals():
    image, store_boxes, _ = painted_scene(3)
    cfg = ViewsConfig(jitter="none", hflip_p=0.0, num_proposals=8)
    vs = build_views(image, from_store(store_boxes), cfg, np.random.default_rng(0))
    h, w = image.shape[:2]
    k = vs.valid
    expected = resize_boxes(from_store(store_boxes)[vs.proposal_ids[k]], (w, h), (224, 224))
    np.testing.assert_allclose(vs.boxes[0][k], expected)
    assert vs.crops[0] == (0.0, 0.0, 224.0, 224.0)


def test_downsampled_v3_is_v2_at_half_size():
    cfg = ViewsConfig(jitter="none")
    for seed in range(10):
        image, store_boxes, _ = painted_scene(seed)
        vs = build_views(image, from_store(store_boxes), cfg, np.random.default_rng(seed))
        assert vs.crops[2] == vs.crops[1] and vs.flipped[2] == vs.flipped[1]
        np.testing.assert_allclose(vs.boxes[2], vs.boxes[1] * 112 / 224)
        # the pixels too: V3 ~ V2 averaged over 2x2 blocks
        v2 = vs.images[1].astype(float).reshape(112, 2, 112, 2, 3).mean(axis=(1, 3))
        assert np.abs(vs.images[2] - v2).mean() < 6


def test_output_types_shapes_and_levels():
    image, store_boxes, _ = painted_scene(5)
    for star in (False, True):
        cfg = ViewsConfig(soco_star=star)
        vs = build_views(image, from_store(store_boxes), cfg, np.random.default_rng(1))
        assert isinstance(vs, ViewSet)
        sizes = [224, 224, 112, 192] if star else [224, 224, 112]
        assert [im.shape for im in vs.images] == [(s, s, 3) for s in sizes]
        assert all(im.dtype == np.uint8 and im.flags["C_CONTIGUOUS"] and im.flags["WRITEABLE"] for im in vs.images)
        assert len(vs.boxes) == len(vs.levels) == len(vs.flipped) == len(vs.crops) == len(sizes)
        assert vs.valid.dtype == bool and vs.valid.shape == (4,)
        assert vs.proposal_ids.dtype == np.int64 and vs.proposal_ids.shape == (4,)
        for s, boxes, levels in zip(sizes, vs.boxes, vs.levels):
            assert boxes.dtype == np.float64 and boxes.shape == (4, 4)
            assert levels.dtype == np.int64 and levels.tolist() == assign_levels(boxes).tolist()
            assert (boxes >= 0).all() and (boxes <= s).all()
            assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()


def test_levels_follow_the_view_scale():
    """A 100x100 proposal filling... in V1 (P4 at 100^2) is at most P3 in the 112-px V3."""
    image = np.full((224, 224, 3), 128, np.uint8)
    boxes = np.array([[62.0, 62.0, 162.0, 162.0]])
    cfg = ViewsConfig(jitter="none", crop_scale=(1.0, 1.0), hflip_p=0.0, num_proposals=1)
    vs = build_views(image, boxes, cfg, np.random.default_rng(0))
    assert [lv.tolist() for lv in vs.levels] == [[2], [2], [1]]  # 100^2 in (96^2, 192^2]; 50^2 in (48^2, 96^2]


# ---------------------------------------------------------------- sampling and padding


def tiny_cfg(**kw) -> ViewsConfig:
    """Small views and the whole image as every crop: sampling tests without pixel cost."""
    base = dict(v1_size=32, v2_size=32, v3_size=16, v4_size=24, crop_scale=(1.0, 1.0), jitter="none")
    base.update(kw)
    return ViewsConfig(**base)


def grid_boxes(n: int) -> np.ndarray:
    return np.array([[i, 0, i + 1, 10] for i in range(n)], dtype=np.float64)


def test_k_sampled_uniformly_without_replacement():
    cfg, n, image = tiny_cfg(), 10, np.zeros((10, 20, 3), np.uint8)
    counts = np.zeros(n)
    for seed in range(1000):
        vs = build_views(image, grid_boxes(n), cfg, np.random.default_rng(seed))
        assert vs.valid.all() and len(set(vs.proposal_ids.tolist())) == 4  # no repeats
        counts[vs.proposal_ids] += 1
    expected = 1000 * 4 / n
    assert np.abs(counts - expected).max() < 5 * np.sqrt(expected)  # every proposal equally likely


def test_fewer_than_k_padded_with_invalid_whole_view_slots():
    image = np.zeros((10, 20, 3), np.uint8)
    vs = build_views(image, grid_boxes(2), tiny_cfg(soco_star=True, jitter="paper"), np.random.default_rng(0))
    assert vs.valid.tolist() == [True, True, False, False]
    assert sorted(vs.proposal_ids[:2].tolist()) == [0, 1] and vs.proposal_ids[2:].tolist() == [-1, -1]
    for boxes, size in zip(vs.boxes, (32, 32, 16, 24)):
        np.testing.assert_array_equal(boxes[2:], [[0, 0, size, size]] * 2)


def test_repeat_padding_fills_k_with_valid_duplicates():
    image = np.zeros((10, 20, 3), np.uint8)
    seen = set()
    for seed in range(20):
        vs = build_views(image, grid_boxes(3), tiny_cfg(pad="repeat", num_proposals=7), np.random.default_rng(seed))
        assert vs.valid.all() and len(vs.proposal_ids) == 7
        assert set(vs.proposal_ids.tolist()) == {0, 1, 2}  # every present proposal, then repeats
        for boxes in vs.boxes:  # a repeated proposal has the same box (no jitter here)
            for i in range(3):
                rows = boxes[vs.proposal_ids == i]
                assert (rows == rows[0]).all()
        seen.add(tuple(vs.proposal_ids.tolist()))
    assert len(seen) > 5


def test_only_proposals_visible_in_every_view_are_sampled(monkeypatch):
    """With fixed crops, visibility is exact: fraction >= min_visible, and > 0."""
    image = np.zeros((100, 100, 3), np.uint8)
    # V1 = 100 -> 100 (no squash); the crop is x in [0, 50]: these boxes are 0, 1/4, 1/2, 3/4, 1 inside
    boxes = np.array([[60, 0, 80, 10], [40, 20, 80, 30], [30, 40, 70, 50], [20, 60, 60, 70], [10, 80, 50, 90]], float)
    monkeypatch.setattr(views_module, "sample_crop", lambda rng, w, h, scale, ratio: (0.0, 0.0, 50.0, 100.0))
    for min_visible, expected in ((0.5, {2, 3, 4}), (0.75, {3, 4}), (1.0, {4}), (0.0, {1, 2, 3, 4})):
        cfg = ViewsConfig(v1_size=100, v2_size=100, v3_size=50, jitter="none", num_proposals=5, min_visible=min_visible)
        vs = build_views(image, boxes, cfg, np.random.default_rng(0))
        assert set(vs.proposal_ids[vs.valid].tolist()) == expected, min_visible
        assert vs.valid.sum() == len(expected) and vs.redraws == 0 and not vs.fallback
        # the boxes are clipped to the crop: V2 = crop 50 x 100 stretched to 100 x 100
        for k in np.flatnonzero(vs.valid):
            clipped, _ = crop_boxes(boxes[vs.proposal_ids[k]][None], (0, 0, 50, 100))
            want = resize_boxes(clipped, (50, 100), (100, 100))[0]
            if vs.flipped[1]:
                want = [100 - want[2], want[1], 100 - want[0], want[3]]
            np.testing.assert_allclose(vs.boxes[1][k], want)


def test_crops_redrawn_when_no_proposal_is_visible(monkeypatch):
    image = np.zeros((100, 100, 3), np.uint8)
    boxes = np.array([[80.0, 80.0, 100.0, 100.0]])  # bottom-right corner only
    calls = []

    def crops(rng, w, h, scale, ratio):
        calls.append(1)
        return (0.0, 0.0, 50.0, 50.0) if len(calls) <= 3 else (50.0, 50.0, 100.0, 100.0)  # misses 3 times

    monkeypatch.setattr(views_module, "sample_crop", crops)
    cfg = ViewsConfig(v1_size=100, v2_size=100, v3_size=50, jitter="none")
    vs = build_views(image, boxes, cfg, np.random.default_rng(0))
    assert vs.redraws == 3 and not vs.fallback and vs.crops[1] == (50.0, 50.0, 100.0, 100.0)
    assert vs.valid.tolist() == [True, False, False, False]


@pytest.mark.parametrize("source", ["v1", "original"])
def test_whole_view_fallback_after_max_redraws(monkeypatch, source):
    image = np.random.default_rng(0).integers(0, 256, (50, 100, 3), dtype=np.uint8)  # pixels tell crops apart
    boxes = np.array([[80.0, 40.0, 100.0, 50.0], [0.0, 0.0, 10.0, 10.0]])
    monkeypatch.setattr(views_module, "sample_crop", lambda rng, w, h, scale, ratio: (30.0, 10.0, 60.0, 30.0))
    cfg = ViewsConfig(jitter="none", soco_star=True, v3="independent_crop", v2_source=source, hflip_p=0.0)
    vs = build_views(image, boxes, cfg, np.random.default_rng(0))
    assert vs.fallback and vs.redraws == MAX_REDRAWS
    assert vs.crops == [(0.0, 0.0, 224.0, 224.0)] * 4
    assert vs.valid.tolist() == [True, True, False, False]
    v1 = resize_boxes(boxes[vs.proposal_ids[:2]], (100, 50), (224, 224))
    for boxes_v, size in zip(vs.boxes, (224, 224, 112, 192)):
        np.testing.assert_allclose(boxes_v[:2], v1 * size / 224)
    # whole-view crops: V2 has V1's pixels
    assert np.abs(vs.images[1].astype(int) - vs.images[0]).max() <= 1


def test_fallback_without_patching():
    """A proposal covering the whole image can never be fully inside a crop of scale <= 0.6."""
    image = np.zeros((60, 80, 3), np.uint8)
    cfg = ViewsConfig(crop_scale=(0.5, 0.6), min_visible=1.0, jitter="none")
    vs = build_views(image, np.array([[0.0, 0.0, 80.0, 60.0]]), cfg, np.random.default_rng(0))
    assert vs.fallback and vs.valid.tolist() == [True, False, False, False]
    np.testing.assert_allclose(vs.boxes[2][0], [0, 0, 112, 112])


# ---------------------------------------------------------------- jitter in the views


def test_paper_jitter_moves_each_view_within_bounds():
    cfg_none = ViewsConfig(jitter="none", soco_star=True)
    cfg_paper = dataclasses.replace(cfg_none, jitter="paper")
    changed = total = 0
    for seed in range(40):
        image, store_boxes, _ = painted_scene(seed)
        boxes = from_store(store_boxes)
        base = build_views(image, boxes, cfg_none, np.random.default_rng(seed))
        jit = build_views(image, boxes, cfg_paper, np.random.default_rng(seed))
        # jitter draws come last: same crops, flips, proposals and pixels
        assert base.crops == jit.crops and base.flipped == jit.flipped
        np.testing.assert_array_equal(base.proposal_ids, jit.proposal_ids)
        assert all((a == b).all() for a, b in zip(base.images, jit.images))
        for b, j, size in zip(base.boxes, jit.boxes, (224, 224, 112, 192)):
            b, j = b[base.valid], j[base.valid]
            w = (b[:, 2] - b[:, 0])[:, None]
            h = (b[:, 3] - b[:, 1])[:, None]
            # centre form: x1 moves by r*w/2, x2 by 3*r*w/2 (|r| <= 0.1), then clipped to the view
            lo = np.clip(b - np.hstack([0.05 * w, 0.05 * h, 0.15 * w, 0.15 * h]), 0, size)
            hi = np.clip(b + np.hstack([0.05 * w, 0.05 * h, 0.15 * w, 0.15 * h]), 0, size)
            assert ((j >= lo - 1e-9) & (j <= hi + 1e-9)).all()
            changed += np.any(j != b, axis=1).sum()
            total += len(b)
    assert abs(changed / total - 0.5) < 0.06  # p = 0.5, independently per view (a clipped shift can vanish)


def test_released_jitter_only_touches_v1():
    cfg_none = ViewsConfig(jitter="none")
    cfg_rel = dataclasses.replace(cfg_none, jitter="released", jitter_p=1.0)
    for seed in range(10):
        image, store_boxes, _ = painted_scene(seed)
        base = build_views(image, from_store(store_boxes), cfg_none, np.random.default_rng(seed))
        rel = build_views(image, from_store(store_boxes), cfg_rel, np.random.default_rng(seed))
        k = base.valid
        assert np.any(rel.boxes[0][k] != base.boxes[0][k], axis=1).all()
        for v in (1, 2):
            np.testing.assert_array_equal(rel.boxes[v], base.boxes[v])


# ---------------------------------------------------------------- determinism and errors


def test_same_seed_same_output_other_seed_differs():
    image, store_boxes, _ = painted_scene(7)
    boxes = from_store(store_boxes)
    cfg = ViewsConfig(soco_star=True)
    a = build_views(image, boxes, cfg, np.random.default_rng(42))
    b = build_views(image, boxes, cfg, np.random.default_rng(42))
    for field in ("images", "boxes", "levels"):
        assert all((x == y).all() for x, y in zip(getattr(a, field), getattr(b, field)))
    assert (a.valid == b.valid).all() and (a.proposal_ids == b.proposal_ids).all()
    assert a.flipped == b.flipped and a.crops == b.crops
    c = build_views(image, boxes, cfg, np.random.default_rng(43))
    assert c.crops != a.crops or not all((x == y).all() for x, y in zip(a.boxes, c.boxes))


def test_errors():
    image = np.zeros((10, 10, 3), np.uint8)
    boxes = np.array([[0.0, 0.0, 5.0, 5.0]])
    rng = np.random.default_rng(0)
    for key, bad in (("v2_source", "crop"), ("v3", "none"), ("pad", "zeros"), ("jitter", "corner")):
        with pytest.raises(ValueError, match=f'{key}="{bad}": must be one of'):  # the config refuses it
            dataclasses.replace(ViewsConfig(), **{key: bad})
    with pytest.raises(ValueError, match="num_proposals=0: must be"):
        ViewsConfig(num_proposals=0)
    with pytest.raises(ValueError, match="uint8 HxWx3"):
        build_views(image[..., 0], boxes, ViewsConfig(), rng)
    with pytest.raises(ValueError, match="at least one non-empty proposal"):
        build_views(image, np.zeros((0, 4)), ViewsConfig(), rng)
    with pytest.raises(ValueError, match="at least one non-empty proposal"):
        build_views(image, np.array([[3.0, 3.0, 3.0, 8.0]]), ViewsConfig(), rng)


def test_views_own_their_pixels():
    """Views never alias the input image or each other (augmentation may work in place)."""
    image = np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    cfg = ViewsConfig(crop_scale=(1.0, 1.0), hflip_p=0.0, soco_star=True, v4_size=224)
    for source in ("v1", "original"):
        vs = build_views(
            image,
            np.array([[0.0, 0.0, 50.0, 50.0]]),
            dataclasses.replace(cfg, v2_source=source),
            np.random.default_rng(0),
        )
        np.testing.assert_array_equal(vs.images[1], image)  # whole-image crop at the same size
        arrays = [image, *vs.images]
        for i in range(len(arrays)):
            for j in range(i + 1, len(arrays)):
                assert not np.shares_memory(arrays[i], arrays[j]), (source, i, j)
