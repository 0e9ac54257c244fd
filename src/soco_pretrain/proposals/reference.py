"""The reference selective search: PyPI ``selectivesearch`` 0.4 with the released SoCo fix.

The released SoCo code vendors ``selectivesearch`` 0.4 with one change: the texture
histogram uses the range (0, 255) instead of (0, 1) (the package's issue #30; unpatched it
only counts LBP codes 0 and 1). This module runs the PyPI package with exactly that one
function replaced. It is slow (pure Python) and exists for tests and benchmarks: our fast
implementation in ``selective_search.py`` must return the very same boxes.
"""

from __future__ import annotations

import numpy as np


def _patched_texture_hist(img):
    # Same as selectivesearch 0.4 ``_calc_texture_hist`` but with range (0, 255).
    bins = 10
    hist = np.array([])
    for colour_channel in (0, 1, 2):
        fd = img[:, colour_channel]
        hist = np.concatenate([hist] + [np.histogram(fd, bins, (0.0, 255.0))[0]])
    return hist / len(img)


def reference_regions(image: np.ndarray, scale: float = 500, sigma: float = 0.9, min_size: int = 10):
    """Run the patched reference; returns its list of region dicts (``rect`` = x, y, w, h)."""
    try:
        import selectivesearch.selectivesearch as ss  # here, not at the top: a dev extra only
    except ImportError as exc:  # pragma: no cover - dev extra missing
        raise RuntimeError(
            "the reference needs the 'selectivesearch' package: pip install 'soco-pretrain[dev]'"
        ) from exc
    original = ss._calc_texture_hist
    ss._calc_texture_hist = _patched_texture_hist
    try:
        _, regions = ss.selective_search(image, scale=scale, sigma=sigma, min_size=min_size)
    finally:
        ss._calc_texture_hist = original
    return regions


def reference_selective_search(
    image: np.ndarray, scale: float = 500, sigma: float = 0.9, min_size: int = 10
) -> np.ndarray:
    """Boxes of the patched reference as an (n, 4) int array of x1, y1, x2, y2, in its order.

    ``x2 = x + w`` and ``y2 = y + h`` with the reference's ``rect``: the coordinates of the
    last pixel column/row of the region (inclusive), exactly as the released SoCo code stores them.
    """
    regions = reference_regions(image, scale, sigma, min_size)
    boxes = np.array([r["rect"] for r in regions], dtype=np.int64).reshape(-1, 4)
    boxes[:, 2] += boxes[:, 0]
    boxes[:, 3] += boxes[:, 1]
    return boxes.astype(np.int32)
