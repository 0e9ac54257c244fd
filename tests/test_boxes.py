"""data/boxes.py: crop/resize/flip round trips, clipping, visible fraction, jitter (exact formula,
bounds, frequency), FPN level boundaries, RandomResizedCrop's crop sampling."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchvision.transforms import RandomResizedCrop

from soco_pretrain.data.boxes import (
    assign_levels,
    box_area,
    clip_boxes,
    crop_boxes,
    from_store,
    hflip_boxes,
    jitter_boxes,
    resize_boxes,
    sample_crop,
)


def random_boxes(rng, n, width=300.0, height=200.0):
    x = np.sort(rng.uniform(0, width, (n, 2)), axis=1)
    y = np.sort(rng.uniform(0, height, (n, 2)), axis=1)
    return np.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], axis=1)


# ---------------------------------------------------------------- geometry


def test_from_store_makes_inclusive_corners_exclusive():
    out = from_store(np.array([[0, 0, 9, 4], [3, 5, 3, 5]], dtype=np.int32))
    assert out.dtype == np.float64
    np.testing.assert_array_equal(out, [[0, 0, 10, 5], [3, 5, 4, 6]])  # a 1-px box has area 1
    np.testing.assert_array_equal(box_area(out), [50, 1])
    assert from_store(np.zeros((0, 4), np.int32)).shape == (0, 4)


def test_crop_boxes_shift_clip_and_visible_fraction():
    boxes = np.array(
        [
            [20, 20, 40, 40],  # fully inside
            [0, 20, 20, 40],  # half outside on the left
            [90, 90, 130, 110],  # 20 x 10 of its 40 x 20 inside: a quarter visible
            [200, 0, 220, 10],  # fully outside
            [50, 50, 50, 60],  # degenerate (zero width)
        ],
        dtype=np.float64,
    )
    out, vis = crop_boxes(boxes, (10, 10, 110, 100))  # crop 100 x 90
    np.testing.assert_allclose(out[0], [10, 10, 30, 30])
    np.testing.assert_allclose(out[1], [0, 10, 10, 30])
    np.testing.assert_allclose(out[2], [80, 80, 100, 90])
    np.testing.assert_allclose(vis, [1.0, 0.5, (20 * 10) / (40 * 20), 0.0, 0.0])
    assert box_area(out[3:4])[0] == 0  # collapsed onto the border
    assert (out[:, [0, 2]] >= 0).all() and (out[:, [0, 2]] <= 100).all()
    assert (out[:, [1, 3]] >= 0).all() and (out[:, [1, 3]] <= 90).all()


def test_crop_then_uncrop_gives_the_clipped_box():
    rng = np.random.default_rng(0)
    boxes = random_boxes(rng, 200)
    rect = (37.0, 12.0, 201.0, 150.0)
    out, vis = crop_boxes(boxes, rect)
    back = out + np.array([rect[0], rect[1], rect[0], rect[1]])
    expected = np.stack(
        [
            np.clip(boxes[:, 0], 37, 201),
            np.clip(boxes[:, 1], 12, 150),
            np.clip(boxes[:, 2], 37, 201),
            np.clip(boxes[:, 3], 12, 150),
        ],
        axis=1,
    )
    np.testing.assert_allclose(back, expected)
    np.testing.assert_allclose(vis, box_area(expected) / box_area(boxes))
    assert ((vis >= 0) & (vis <= 1)).all()


def test_inputs_are_never_modified():
    rng = np.random.default_rng(1)
    boxes = random_boxes(rng, 10)
    keep = boxes.copy()
    crop_boxes(boxes, (0, 0, 50, 50)), resize_boxes(boxes, (300, 200), (10, 10)), hflip_boxes(boxes, 300)
    clip_boxes(boxes, 5, 5), jitter_boxes(boxes, rng, p=1.0), jitter_boxes(boxes, rng, p=1.0, form="released")
    np.testing.assert_array_equal(boxes, keep)


def test_resize_round_trip_and_anisotropic_scale():
    rng = np.random.default_rng(2)
    boxes = random_boxes(rng, 100, 640, 120)
    there = resize_boxes(boxes, (640, 120), (224, 224))  # V1's squash: x and y scale differently
    np.testing.assert_allclose(there[:, [0, 2]], boxes[:, [0, 2]] * 224 / 640)
    np.testing.assert_allclose(there[:, [1, 3]], boxes[:, [1, 3]] * 224 / 120)
    np.testing.assert_allclose(resize_boxes(there, (224, 224), (640, 120)), boxes)
    # the whole image maps to the whole image
    np.testing.assert_allclose(resize_boxes([[0, 0, 640, 120]], (640, 120), (224, 112)), [[0, 0, 224, 112]])


def test_hflip_is_an_involution_and_mirrors():
    rng = np.random.default_rng(3)
    boxes = random_boxes(rng, 100, 224, 224)
    flipped = hflip_boxes(boxes, 224)
    np.testing.assert_allclose(hflip_boxes(flipped, 224), boxes)
    np.testing.assert_allclose(flipped[:, 2] - flipped[:, 0], boxes[:, 2] - boxes[:, 0])  # width kept
    np.testing.assert_allclose(flipped[:, [1, 3]], boxes[:, [1, 3]])  # y untouched
    np.testing.assert_allclose(hflip_boxes([[0, 5, 10, 20]], 224), [[214, 5, 224, 20]])  # left edge -> right edge
    assert (flipped[:, 2] > flipped[:, 0]).all()


def test_clip_boxes():
    out = clip_boxes([[-5, -3, 30, 40], [10, 10, 20, 20], [300, 300, 400, 400]], 25, 35)
    np.testing.assert_array_equal(out, [[0, 0, 25, 35], [10, 10, 20, 20], [25, 35, 25, 35]])


# ---------------------------------------------------------------- jitter


def test_paper_jitter_exact_formula_for_a_fixed_rng():
    boxes = random_boxes(np.random.default_rng(4), 50)
    out = jitter_boxes(boxes, np.random.default_rng(7), ratio=0.1, p=0.5, form="paper")
    rng = np.random.default_rng(7)  # same draws, in the documented order: coins, then one r per box
    apply = rng.random(50) < 0.5
    r = rng.uniform(-0.1, 0.1, 50)
    x, y = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    x, y, w, h = x + r * w, y + r * h, w + r * w, h + r * h  # paper 3.2, verbatim
    expected = np.stack([x - w / 2, y - h / 2, x + w / 2, y + h / 2], axis=1)
    np.testing.assert_allclose(out[apply], expected[apply])
    np.testing.assert_array_equal(out[~apply], boxes[~apply])  # untouched boxes bit-identical
    assert 15 < apply.sum() < 35


def test_released_jitter_exact_formula_for_a_fixed_rng():
    boxes = random_boxes(np.random.default_rng(5), 50)
    out = jitter_boxes(boxes, np.random.default_rng(8), ratio=0.1, p=0.5, form="released")
    rng = np.random.default_rng(8)
    apply = rng.random(50) < 0.5
    r = np.where(apply[:, None], rng.uniform(-0.1, 0.1, (50, 4)), 0.0)  # r = 0: the box is unchanged
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    # hologerry/SoCo jitter_props: x1 += j0*w, y1 += j1*h, w += j2*w, h += j3*h (then x2 = x1 + w)
    x1, y1 = boxes[:, 0] + r[:, 0] * w, boxes[:, 1] + r[:, 1] * h
    expected = np.stack([x1, y1, x1 + w * (1 + r[:, 2]), y1 + h * (1 + r[:, 3])], axis=1)
    np.testing.assert_allclose(out, expected)
    np.testing.assert_array_equal(out[~apply], boxes[~apply])


def test_paper_jitter_bounds_single_r_and_frequency():
    boxes = random_boxes(np.random.default_rng(6), 20000)
    boxes = boxes[box_area(boxes) > 1]
    out = jitter_boxes(boxes, np.random.default_rng(9), ratio=0.1, p=0.5)
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    dx = ((out[:, 0] + out[:, 2]) - (boxes[:, 0] + boxes[:, 2])) / 2
    dy = ((out[:, 1] + out[:, 3]) - (boxes[:, 1] + boxes[:, 3])) / 2
    rw = (out[:, 2] - out[:, 0]) / w - 1
    rh = (out[:, 3] - out[:, 1]) / h - 1
    assert (np.abs(dx) <= 0.1 * w + 1e-9).all() and (np.abs(dy) <= 0.1 * h + 1e-9).all()
    assert (np.abs(rw) <= 0.1 + 1e-9).all() and (np.abs(rh) <= 0.1 + 1e-9).all()
    # ONE r per box: the centre shift and the size change use the same r, in x and in y
    np.testing.assert_allclose(dx / w, rw, atol=1e-9)
    np.testing.assert_allclose(dy / h, rh, atol=1e-9)
    np.testing.assert_allclose(rw, rh, atol=1e-9)
    changed = np.any(out != boxes, axis=1)
    assert abs(changed.mean() - 0.5) < 0.02  # p = 0.5 per box (binomial sd ~ 0.004)
    r = rw[changed]
    assert abs(r.mean()) < 0.005 and r.min() < -0.099 and r.max() > 0.099  # U[-0.1, 0.1]
    assert abs(np.mean(np.abs(r)) - 0.05) < 0.003  # uniform: E|r| = ratio / 2


def test_released_jitter_bounds_independent_r_and_frequency():
    boxes = random_boxes(np.random.default_rng(10), 20000)
    boxes = boxes[box_area(boxes) > 1]
    out = jitter_boxes(boxes, np.random.default_rng(11), ratio=0.1, p=0.5, form="released")
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    r1, r2 = (out[:, 0] - boxes[:, 0]) / w, (out[:, 1] - boxes[:, 1]) / h
    r3, r4 = (out[:, 2] - out[:, 0]) / w - 1, (out[:, 3] - out[:, 1]) / h - 1
    rs = np.stack([r1, r2, r3, r4])
    assert (np.abs(rs) <= 0.1 + 1e-9).all()
    changed = np.any(out != boxes, axis=1)
    assert abs(changed.mean() - 0.5) < 0.02
    corr = np.corrcoef(rs[:, changed])
    assert np.abs(corr[~np.eye(4, dtype=bool)]).max() < 0.05  # four independent r


def test_jitter_probability_extremes_and_bad_form():
    boxes = random_boxes(np.random.default_rng(12), 100)
    np.testing.assert_array_equal(jitter_boxes(boxes, np.random.default_rng(0), p=0.0), boxes)
    assert np.all(np.any(jitter_boxes(boxes, np.random.default_rng(0), p=1.0) != boxes, axis=1))
    assert jitter_boxes(np.zeros((0, 4)), np.random.default_rng(0)).shape == (0, 4)
    with pytest.raises(ValueError, match="jitter form"):
        jitter_boxes(boxes, np.random.default_rng(0), form="corner")


# ---------------------------------------------------------------- levels


@pytest.mark.parametrize(
    "w,h,level",
    [
        (48, 48, 0),
        (32, 72, 0),  # area exactly 48^2 -> P2 (boundary goes to the lower level)
        (48, 48 + 1e-9, 1),
        (49, 49, 1),  # just above 48^2 -> P3
        (96, 96, 1),
        (64, 144, 1),  # exactly 96^2 -> P3
        (96, 96 + 1e-9, 2),
        (192, 192, 2),
        (144, 256, 2),  # exactly 192^2 -> P4
        (192, 192 + 1e-9, 3),
        (224, 224, 3),  # -> P5
        (0, 10, 0),
        (1, 1, 0),
    ],
)
def test_level_boundaries(w, h, level):
    assert assign_levels(np.array([[10.0, 20.0, 10.0 + w, 20.0 + h]])).tolist() == [level]


def test_levels_vectorised_and_custom_bounds():
    boxes = np.array([[0, 0, s, s] for s in (10, 48, 50, 96, 100, 192, 200)], dtype=np.float64)
    out = assign_levels(boxes)
    assert out.dtype == np.int64 and out.tolist() == [0, 0, 1, 1, 2, 2, 3]
    assert assign_levels(boxes, (20, 60, 150)).tolist() == [0, 1, 1, 2, 2, 3, 3]
    assert assign_levels(np.zeros((0, 4))).shape == (0,)


# ---------------------------------------------------------------- crop sampling


# scale > 1 asks for more area than the image has: every one of the 10 draws fails (rounding
# cannot save a draw: w*h >= (2/3)^2 * 4 * area > area), so both sample_crop and torchvision's
# RandomResizedCrop.get_params return their fallback whatever the random numbers.
FORCE_FALLBACK = (4.0, 5.0)


def torchvision_fallback(width, height, ratio):
    """torchvision's own central crop (RandomResizedCrop.get_params's fallback): (top, left, height, width)."""
    return RandomResizedCrop.get_params(torch.empty(1, height, width), list(FORCE_FALLBACK), list(ratio))


def assert_is_torchvisions_fallback(rect, width, height, ratio):
    i, j, h, w = torchvision_fallback(width, height, ratio)
    x0, y0, x1, y1 = rect
    if w >= 1 and h >= 1:
        assert rect == (float(j), float(i), float(j + w), float(i + h))
    else:  # torchvision's crop is empty there (e.g. 1x1 px, ratio >= 2); ours is 1 px, centred
        assert (x1 - x0, y1 - y0) == (max(w, 1), max(h, 1))
        assert (x0, y0) == ((width - max(w, 1)) // 2, (height - max(h, 1)) // 2)


@settings(max_examples=150, deadline=None)
@given(
    width=st.integers(1, 2000),
    height=st.integers(1, 2000),
    scale=st.tuples(st.floats(0.05, 1.0), st.floats(0.05, 1.0)).map(sorted),
    ratio=st.tuples(st.floats(0.2, 5.0), st.floats(0.2, 5.0)).map(sorted),
    seed=st.integers(0, 2**32 - 1),
)
def test_sample_crop_within_bounds(width, height, scale, ratio, seed):
    rect = sample_crop(np.random.default_rng(seed), width, height, tuple(scale), tuple(ratio))
    x0, y0, x1, y1 = rect
    assert all(float(v).is_integer() for v in rect)
    assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
    w, h = x1 - x0, y1 - y0
    # A random draw: w = round(sqrt(A * a)), h = round(sqrt(A / a)) with A = area * U[scale] and
    # a in [ratio], so (w -+ 0.5) * (h -+ 0.5) bracket A and (w -+ 0.5) / (h +- 0.5) bracket a.
    area = width * height
    drawn = (
        (w - 0.5) * (h - 0.5) <= scale[1] * area * (1 + 1e-9)
        and (w + 0.5) * (h + 0.5) >= scale[0] * area * (1 - 1e-9)
        and (w - 0.5) / (h + 0.5) <= ratio[1] * (1 + 1e-9)
        and (w + 0.5) / max(h - 0.5, 1e-12) >= ratio[0] * (1 - 1e-9)
    )
    if not drawn:  # otherwise it must be the fallback, as torchvision computes it
        assert_is_torchvisions_fallback(rect, width, height, ratio)


@settings(max_examples=150, deadline=None)
@given(
    width=st.integers(1, 2000),
    height=st.integers(1, 2000),
    ratio=st.tuples(st.floats(0.2, 5.0), st.floats(0.2, 5.0)).map(sorted),
    seed=st.integers(0, 2**32 - 1),
)
def test_forced_fallback_equals_torchvisions(width, height, ratio, seed):
    rect = sample_crop(np.random.default_rng(seed), width, height, FORCE_FALLBACK, tuple(ratio))
    assert_is_torchvisions_fallback(rect, width, height, ratio)


def test_sample_crop_fallback_by_hand():
    # 10 x 1000: any area >= 0.9 of the image is wider than 10 px at aspect >= 3/4 -> 10 failures
    rect = sample_crop(np.random.default_rng(0), 10, 1000, (0.9, 1.0), (3 / 4, 4 / 3))
    assert rect == (0.0, 493.0, 10.0, 506.0)  # w = 10, h = round(10 / 0.75) = 13, centred
    assert sample_crop(np.random.default_rng(0), 1000, 10, (0.9, 1.0), (3 / 4, 4 / 3)) == (493.0, 0.0, 506.0, 10.0)
    # 300 x 200 (aspect 1.5 > 4/3): full height, w = round(200 x 4/3) = 267, x0 = (300 - 267) // 2 = 16.
    assert sample_crop(np.random.default_rng(0), 300, 200, FORCE_FALLBACK, (3 / 4, 4 / 3)) == (16.0, 0.0, 283.0, 200.0)
    # 120 x 100 (aspect 1.2, inside the range): the whole image.
    assert sample_crop(np.random.default_rng(0), 120, 100, FORCE_FALLBACK, (3 / 4, 4 / 3)) == (0.0, 0.0, 120.0, 100.0)
    # 1 x 1 with ratio (2, 3): torchvision's h = round(1 / 2) = 0 (empty); our guard keeps 1 px.
    assert sample_crop(np.random.default_rng(0), 1, 1, FORCE_FALLBACK, (2.0, 3.0)) == (0.0, 0.0, 1.0, 1.0)


def test_sample_crop_same_distribution_as_torchvision():
    """Same algorithm as RandomResizedCrop.get_params: compare the distributions of w, h, x0."""
    width, height, scale, ratio, n = 300, 200, (0.5, 1.0), (3 / 4, 4 / 3), 4000
    rng = np.random.default_rng(0)
    ours = np.array([sample_crop(rng, width, height, scale, ratio) for _ in range(n)])
    torch.manual_seed(0)
    img = torch.empty(1, height, width)
    tv = np.array([RandomResizedCrop.get_params(img, list(scale), list(ratio)) for _ in range(n)])  # i, j, h, w
    tv = np.stack([tv[:, 1], tv[:, 0], tv[:, 1] + tv[:, 3], tv[:, 0] + tv[:, 2]], axis=1).astype(float)
    for col in range(4):  # x0, y0, x1, y1: means agree within 4 standard errors
        se = math.sqrt(ours[:, col].var() / n + tv[:, col].var() / n)
        assert abs(ours[:, col].mean() - tv[:, col].mean()) < 4 * se, col
        assert abs(ours[:, col].std() - tv[:, col].std()) < 0.1 * tv[:, col].std() + 1, col
    area_frac = (ours[:, 2] - ours[:, 0]) * (ours[:, 3] - ours[:, 1]) / (width * height)
    assert area_frac.min() >= 0.49 and area_frac.max() <= 1.0


def test_sample_crop_is_deterministic_per_seed():
    a = [sample_crop(np.random.default_rng(3), 224, 224) for _ in range(3)]
    assert a[0] == a[1] == a[2]
    others = {sample_crop(np.random.default_rng(s), 224, 224) for s in range(20)}
    assert len(others) > 15
