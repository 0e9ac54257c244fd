"""filters.py: the paper's rule at its exact (inclusive) bounds, duplicates, released fallbacks."""

from __future__ import annotations

import numpy as np
import pytest

from soco_pretrain.proposals.filters import (
    PRESETS,
    RULE_EMPTY,
    RULE_MIN_SIDE,
    RULE_PAPER,
    RULE_RATIO_ONLY,
    RULE_WHOLE_IMAGE,
    SearchConfig,
    filter_boxes,
    unique_boxes,
)

PAPER, RELEASED = PRESETS["paper"], PRESETS["released"]


def box(x, y, w, h):
    return [x, y, x + w, y + h]


def kept(boxes, W, H, config=PAPER):
    out, rule = filter_boxes(np.array(boxes, dtype=np.int32).reshape(-1, 4), W, H, config)
    return out.tolist(), rule


def test_presets_match_paper_and_released_code():
    assert (PAPER.scale, PAPER.sigma, PAPER.min_size, PAPER.min_box_side, PAPER.fallbacks) == (500, 0.9, 10, 0, False)
    assert (RELEASED.scale, RELEASED.sigma, RELEASED.min_size, RELEASED.min_box_side, RELEASED.fallbacks) == (
        300,
        0.9,
        100,
        32,
        True,
    )
    for c in (PAPER, RELEASED):
        assert c.ratio == (1 / 3, 3.0) and c.rel_size == (0.3, 0.8) and c.max_side == 1000


@pytest.mark.parametrize(
    "w,h,keep",
    [
        # 100x100 image: relative size = sqrt(wh)/100, ratio = w/h.
        (30, 30, True),
        (29, 29, False),  # size lower bound 0.3 inclusive
        (80, 80, True),
        (81, 81, False),  # size upper bound 0.8 inclusive
        (18, 50, True),  # sqrt(900)/100 = 0.3 exactly, ratio 0.36
        (20, 60, True),
        (60, 20, True),  # ratio exactly 1/3 and 3, size sqrt(1200)/100 = 0.346
        (20, 61, False),
        (61, 20, False),  # ratio just outside
        (0, 50, False),
        (50, 0, False),  # degenerate
    ],
)
def test_paper_rule_bounds_inclusive(w, h, keep):
    out, rule = kept([box(1, 2, w, h)], 100, 100)
    assert (out == [box(1, 2, w, h)]) is keep
    assert rule == (RULE_PAPER if keep else RULE_EMPTY)


def test_relative_size_uses_image_area_of_non_square_image():
    # 200x50 image: sqrt(WH) = 100, so a 30x30 box is exactly 0.3 and 80x80 exactly 0.8.
    assert kept([box(0, 0, 30, 30), box(0, 0, 80, 80), box(0, 0, 29, 30)], 200, 50)[0] == [
        box(0, 0, 30, 30),
        box(0, 0, 80, 80),
    ]


def test_min_box_side_inclusive_and_only_when_set():
    cfg = PAPER.with_overrides({"min_box_side": 32})
    boxes = [box(0, 0, 32, 40), box(0, 0, 31, 40), box(0, 0, 40, 31)]
    assert kept(boxes, 100, 100, cfg)[0] == [box(0, 0, 32, 40)]
    assert len(kept(boxes, 100, 100)[0]) == 3


def test_exact_duplicates_dropped_keeping_first_order():
    a, b, c = box(5, 5, 40, 40), box(1, 1, 50, 40), box(5, 5, 40, 41)
    out, rule = kept([a, b, a, c, b, a], 100, 100)
    assert out == [a, b, c] and rule == RULE_PAPER
    assert unique_boxes(np.zeros((0, 4), np.int32)).shape == (0, 4)


def test_kept_boxes_keep_input_dtype_and_empty_input():
    out, rule = filter_boxes(np.array([box(0, 0, 50, 50)], dtype=np.int16), 100, 100, PAPER)
    assert out.dtype == np.int16
    out, rule = filter_boxes(np.zeros((0, 4), np.int32), 100, 100, PAPER)
    assert out.shape == (0, 4) and rule == RULE_EMPTY


def test_large_coordinates_do_not_overflow():
    out, _ = filter_boxes(np.array([box(0, 0, 20000, 20000)], dtype=np.int16).astype(np.int32), 30000, 30000, PAPER)
    assert len(out) == 1  # w*h = 4e8 would overflow int16/int32 arithmetic if not widened


def test_released_main_rule():
    # Passes the paper rule and w,h >= 32.
    out, rule = kept([box(0, 0, 40, 40), box(0, 0, 40, 40)], 100, 100, RELEASED)
    assert out == [box(0, 0, 40, 40)] and rule == RULE_PAPER


def test_released_fallback_a_ratio_only():
    # Too small for the size rule (0.1) but a fine ratio; and a bad-ratio box that (b) would take.
    small, thin = box(0, 0, 10, 10), box(0, 0, 90, 25)
    out, rule = kept([thin, small, small], 100, 100, RELEASED)
    assert out == [small] and rule == RULE_RATIO_ONLY


def test_released_fallback_b_min_side():
    # No box has 1/3 <= w/h <= 3; one is at least 32x32 (inclusive), one too thin.
    wide, too_thin = box(0, 0, 99, 32), box(0, 0, 99, 31)
    out, rule = kept([too_thin, wide, wide], 100, 100, RELEASED)
    assert out == [wide] and rule == RULE_MIN_SIDE


def test_released_fallback_c_whole_image():
    out, rule = kept([box(0, 0, 99, 10), box(3, 3, 0, 0)], 100, 60, RELEASED)
    assert out == [[0, 0, 99, 59]] and rule == RULE_WHOLE_IMAGE
    out, rule = kept([], 1, 1, RELEASED)
    assert out == [[0, 0, 0, 0]] and rule == RULE_WHOLE_IMAGE


def test_paper_preset_has_no_fallback():
    assert kept([box(0, 0, 10, 10)], 100, 100) == ([], RULE_EMPTY)


def test_config_overrides_and_validation():
    assert PAPER.with_overrides({"scale": 300}).scale == 300
    with pytest.raises(ValueError, match="unknown search parameter"):
        PAPER.with_overrides({"scael": 300})
    with pytest.raises(ValueError):
        SearchConfig(scale=0, sigma=0.9, min_size=10, min_box_side=0, fallbacks=False)
    assert SearchConfig.from_dict(RELEASED.to_dict()) == RELEASED  # JSON round trip (lists -> tuples)
