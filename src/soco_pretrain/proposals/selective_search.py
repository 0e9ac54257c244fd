"""Fast selective search, box for box identical to the reference the paper used.

The reference is PyPI ``selectivesearch`` 0.4 with the released SoCo code's one fix (texture
histogram range (0, 255)); see ``reference.py``. It is pure Python and spends its time in a
per-pair similarity loop, a full sort of all pairs at every merge, per-region full-image masks
and Python pixel loops. This module computes the same thing with numba-compiled kernels:

1. Felzenszwalb segmentation exactly as scikit-image's ``felzenszwalb``: the same Gaussian
   smoothing, the same edge costs, the same (unstable) ``np.argsort`` of them -- ties exist and
   the sort decides them, so we call numpy's own -- and the merge threshold rounded to float32
   as skimage's Cython does. Only the union-find bookkeeping differs, which does not change
   the resulting partition.
2. One raster pass for region boxes, sizes, the colour histogram (only the V channel varies:
   the reference feeds 0..255 values to ``rgb2hsv`` so H and S always land in bin 0) and the
   LBP texture histograms (LBP recomputed with skimage's exact bilinear arithmetic).
   Regions are numbered by first appearance in raster order, which is the reference's dict order.
3. Neighbours by the reference's (asymmetric) bounding-box corner test, in its loop order.
4. Hierarchical grouping with a heap keyed on (similarity, insertion counter): the reference
   takes the *last inserted* pair among equal maxima (stable sort, last element), and new pairs
   get counters in its dict-insertion order. Histogram intersections are summed left to right
   like Python's ``sum`` so every similarity is bit-identical.

``tests/test_selective_search.py`` checks identity with the reference on real photos.
"""

from __future__ import annotations

import os
from pathlib import Path

import numba
import numpy as np
from scipy import ndimage as ndi
from skimage.util import img_as_float

# --- histogram bin lookup tables ------------------------------------------------------------
# Both histogrammed quantities (V = max(R, G, B) and the LBP code) are integers 0..255, so the
# bin of every possible value can be taken from numpy.histogram itself (its half-open bins with
# the last bin closed, and its floating-point edge arithmetic) once, at import.


def _bin_lut(bins: int, lo: float, hi: float) -> np.ndarray:
    lut = np.empty(256, dtype=np.int64)
    for v in range(256):
        counts = np.histogram(np.array([float(v)]), bins, (lo, hi))[0]
        lut[v] = int(np.argmax(counts))
    return lut


COLOUR_BINS = 25  # selectivesearch 0.4 _calc_colour_hist
TEXTURE_BINS = 10  # selectivesearch 0.4 _calc_texture_hist
_V_LUT = _bin_lut(COLOUR_BINS, 0.0, 255.0)
_LBP_LUT = _bin_lut(TEXTURE_BINS, 0.0, 255.0)  # range (0, 255): the released SoCo fix

# LBP sample offsets exactly as skimage's _local_binary_pattern(P=8, R=1): rounded to 5 decimals.
_P = 8
_LBP_RP = np.round(-1.0 * np.sin(2 * np.pi * np.arange(_P, dtype=np.double) / _P), 5)
_LBP_CP = np.round(1.0 * np.cos(2 * np.pi * np.arange(_P, dtype=np.double) / _P), 5)


# --- 1. Felzenszwalb ------------------------------------------------------------------------


def _smoothed(image_uint8: np.ndarray, sigma: float) -> np.ndarray:
    """skimage's felzenszwalb preprocessing: img_as_float, then Gaussian (reflect, truncate 4)."""
    # skimage scales by multiplying with 1/255, which differs from x/255 in the last bit for
    # 24 of the 256 values; call it rather than re-derive it.
    image = img_as_float(image_uint8)
    return ndi.gaussian_filter(image, sigma=[sigma, sigma, 0], mode="reflect", truncate=4.0)


def _edge_costs_numpy(image: np.ndarray) -> np.ndarray:
    """Edge costs of a smoothed image in skimage's order and arithmetic (right, down, diagonals)."""
    h, w = image.shape[:2]

    def cost(a, b):
        d = a - b
        return np.sqrt(np.sum(d * d, axis=-1))

    return np.hstack(
        [
            cost(image[:, 1:, :], image[:, : w - 1, :]).ravel(),
            cost(image[1:, :, :], image[: h - 1, :, :]).ravel(),
            cost(image[1:, 1:, :], image[: h - 1, : w - 1, :]).ravel(),
            cost(image[1:, : w - 1, :], image[: h - 1, 1:, :]).ravel(),
        ]
    ).astype(float)


def kernels_cached() -> bool:
    """Whether numba's on-disk cache already holds compiled kernels of this module (the first run
    on a machine compiles them: 15-45 s before the first image, then they load in a moment)."""
    stem = Path(__file__).stem
    folders = [Path(__file__).parent / "__pycache__"]
    if os.environ.get("NUMBA_CACHE_DIR"):
        folders.append(Path(os.environ["NUMBA_CACHE_DIR"]))
    return any(any(folder.rglob(f"{stem}.*.nbi")) for folder in folders if folder.is_dir())


@numba.njit(cache=True, nogil=True)
def _pixel_cost(g, y0, x0, y1, x1):
    d0 = g[y0, x0, 0] - g[y1, x1, 0]
    d1 = g[y0, x0, 1] - g[y1, x1, 1]
    d2 = g[y0, x0, 2] - g[y1, x1, 2]
    return np.sqrt(d0 * d0 + d1 * d1 + d2 * d2)


@numba.njit(cache=True, nogil=True)
def _edge_costs_kernel(g):
    h, w = g.shape[0], g.shape[1]
    out = np.empty(h * (w - 1) + (h - 1) * w + 2 * (h - 1) * (w - 1), dtype=np.float64)
    k = 0
    for y in range(h):
        for x in range(w - 1):
            out[k] = _pixel_cost(g, y, x + 1, y, x)
            k += 1
    for y in range(h - 1):
        for x in range(w):
            out[k] = _pixel_cost(g, y + 1, x, y, x)
            k += 1
    for y in range(h - 1):
        for x in range(w - 1):
            out[k] = _pixel_cost(g, y + 1, x + 1, y, x)
            k += 1
    for y in range(h - 1):
        for x in range(w - 1):
            out[k] = _pixel_cost(g, y + 1, x, y, x + 1)
            k += 1
    return out


_KERNEL_MATCHES_NUMPY: bool | None = None


def _kernel_matches_numpy() -> bool:
    """Whether the compiled cost kernel reproduces numpy's summation bit for bit here.

    numpy's reduction order over the 3 channels is an implementation detail; rather than
    assume it, compare once on random data and fall back to numpy if it ever differs.
    """
    global _KERNEL_MATCHES_NUMPY
    if _KERNEL_MATCHES_NUMPY is None:
        g = np.random.default_rng(0).random((23, 19, 3))
        _KERNEL_MATCHES_NUMPY = bool(np.array_equal(_edge_costs_kernel(g), _edge_costs_numpy(g)))
    return _KERNEL_MATCHES_NUMPY


def _edge_costs(image_uint8: np.ndarray, sigma: float) -> np.ndarray:
    g = _smoothed(image_uint8, sigma)
    if _kernel_matches_numpy():
        return _edge_costs_kernel(g)
    return _edge_costs_numpy(g)


@numba.njit(cache=True, nogil=True)
def _edge_pixels(e, h, w):
    """The two pixel indices of edge number ``e`` in skimage's edge order."""
    n_right = h * (w - 1)
    n_down = (h - 1) * w
    n_diag = (h - 1) * (w - 1)
    if e < n_right:
        y = e // (w - 1)
        x = e - y * (w - 1)
        return y * w + x + 1, y * w + x
    e -= n_right
    if e < n_down:
        return e + w, e
    e -= n_down
    if e < n_diag:
        y = e // (w - 1)
        x = e - y * (w - 1)
        return (y + 1) * w + x + 1, y * w + x
    e -= n_diag
    y = e // (w - 1)
    x = e - y * (w - 1)
    return y * w + x + 1, (y + 1) * w + x


@numba.njit(cache=True, nogil=True)
def _find(parent, x):
    # path halving: every other node on the path points to its grandparent
    while parent[x] != x:
        parent[x] = parent[parent[x]]
        x = parent[x]
    return x


@numba.njit(cache=True, nogil=True)
def _felzenszwalb_segments(order, costs, h, w, scale, min_size):
    """Union-find over edges sorted by cost; returns the root of every pixel."""
    n = h * w
    m = order.shape[0]
    parent = np.arange(n, dtype=np.int32)
    size = np.ones(n, dtype=np.int32)
    cint = np.zeros(n, dtype=np.float64)
    # endpoints in sorted order, decoded once and read sequentially by the second pass
    ends = np.empty((m, 2), dtype=np.int32)
    k = scale / 255.0  # skimage rescales scale "to behave like in reference implementation"
    for idx in range(m):
        e = order[idx]
        p, q = _edge_pixels(e, h, w)
        ends[idx, 0] = p
        ends[idx, 1] = q
        a = _find(parent, p)
        b = _find(parent, q)
        if a == b:
            continue
        # skimage stores these in C floats: the threshold is rounded to float32.
        t0 = np.float32(cint[a] + k / size[a])
        t1 = np.float32(cint[b] + k / size[b])
        thr = t0 if t0 < t1 else t1
        c = costs[e]
        if c < np.float64(thr):
            if size[a] < size[b]:
                a, b = b, a
            parent[b] = a
            size[a] += size[b]
            cint[a] = c
    for i in range(n):  # flatten, so the second pass finds roots in one or two hops
        parent[i] = _find(parent, i)
    # post-processing: merge components smaller than min_size, in the same edge order
    for idx in range(m):
        a = _find(parent, ends[idx, 0])
        b = _find(parent, ends[idx, 1])
        if a == b:
            continue
        if size[a] < min_size or size[b] < min_size:
            if size[a] < size[b]:
                a, b = b, a
            parent[b] = a
            size[a] += size[b]
    roots = np.empty(n, dtype=np.int64)
    for i in range(n):
        roots[i] = _find(parent, i)
    return roots


# --- 2. regions: boxes, sizes, colour and texture histograms ---------------------------------


# The 8 samples at radius 1 are 4 axis-aligned pixels (interpolation returns them exactly) and
# 4 diagonal points at offsets of +-0.70711 on both axes. The fast LBP below relies on that layout.
assert np.array_equal(np.abs(_LBP_RP), [0, 0.70711, 1, 0.70711, 0, 0.70711, 1, 0.70711])
assert np.array_equal(_LBP_CP, [1, 0.70711, 0, -0.70711, -1, -0.70711, 0, 0.70711])


@numba.njit(cache=True, nogil=True)
def _fractions(n, offset):
    """``pos - floor(pos)`` for ``pos = i + offset``, i = 0..n-1, as skimage's bilinear
    interpolation computes it; the fraction varies in its last bits with i, and LBP compares
    interpolated values with the centre, so it must be bit-exact."""
    out = np.empty(n, dtype=np.float64)
    for i in range(n):
        pos = i + offset
        out[i] = pos - np.floor(pos)
    return out


@numba.njit(cache=True, nogil=True)
def _bilinear(a, b, c, d, dr, dc):
    # skimage _shared/interpolation.pxd bilinear_interpolation, same operation order
    top = (1 - dc) * a + dc * b
    bottom = (1 - dc) * c + dc * d
    return (1 - dr) * top + dr * bottom


@numba.njit(cache=True, nogil=True)
def _lbp_codes(image, ch, off):
    """LBP (P=8, R=1, method 'default') of one channel, identical to skimage's.

    ``off`` = 0.70711, the rounded diagonal offset. Pixels outside the image read as 0
    (skimage's mode 'C', cval 0): a zero border makes every sample an array read.
    """
    h, w = image.shape[0], image.shape[1]
    pad = np.zeros((h + 2, w + 2), dtype=np.float64)
    for y in range(h):
        for x in range(w):
            pad[y + 1, x + 1] = image[y, x, ch]
    fy_m = _fractions(h, -off)  # rows y-1 (floor) and y (ceil)
    fy_p = _fractions(h, off)  # rows y and y+1
    fx_m = _fractions(w, -off)
    fx_p = _fractions(w, off)
    codes = np.empty((h, w), dtype=np.uint8)
    for y in range(h):
        Y = y + 1
        for x in range(w):
            X = x + 1
            c = pad[Y, X]
            code = 0
            # sample p at angle 2*pi*p/8: row offset -sin, column offset +cos
            if pad[Y, X + 1] - c >= 0:  # p=0 (0, +1)
                code |= 1
            if _bilinear(pad[Y - 1, X], pad[Y - 1, X + 1], c, pad[Y, X + 1], fy_m[y], fx_p[x]) - c >= 0:
                code |= 2  # p=1 (-0.70711, +0.70711)
            if pad[Y - 1, X] - c >= 0:  # p=2 (-1, 0)
                code |= 4
            if _bilinear(pad[Y - 1, X - 1], pad[Y - 1, X], pad[Y, X - 1], c, fy_m[y], fx_m[x]) - c >= 0:
                code |= 8  # p=3 (-0.70711, -0.70711)
            if pad[Y, X - 1] - c >= 0:  # p=4 (0, -1)
                code |= 16
            if _bilinear(pad[Y, X - 1], c, pad[Y + 1, X - 1], pad[Y + 1, X], fy_p[y], fx_m[x]) - c >= 0:
                code |= 32  # p=5 (+0.70711, -0.70711)
            if pad[Y + 1, X] - c >= 0:  # p=6 (+1, 0)
                code |= 64
            if _bilinear(c, pad[Y, X + 1], pad[Y + 1, X], pad[Y + 1, X + 1], fy_p[y], fx_p[x]) - c >= 0:
                code |= 128  # p=7 (+0.70711, +0.70711)
            codes[y, x] = code
    return codes


@numba.njit(cache=True, nogil=True)
def _regions(image, roots, v_lut, lbp_lut, off, n_colour_bins, n_texture_bins):
    """Per-region box, size and L1-normalised histograms, regions in raster first-appearance order."""
    h, w = image.shape[0], image.shape[1]
    n = h * w
    region_of_root = np.full(n, -1, dtype=np.int64)
    labels = np.empty(n, dtype=np.int64)
    n_regions = 0
    for i in range(n):
        r = roots[i]
        if region_of_root[r] < 0:
            region_of_root[r] = n_regions
            n_regions += 1
        labels[i] = region_of_root[r]

    lbp0 = _lbp_codes(image, 0, off)
    lbp1 = _lbp_codes(image, 1, off)
    lbp2 = _lbp_codes(image, 2, off)
    boxes = np.empty((n_regions, 4), dtype=np.int64)
    boxes[:, 0] = 0xFFFF
    boxes[:, 1] = 0xFFFF
    boxes[:, 2] = 0
    boxes[:, 3] = 0
    sizes = np.zeros(n_regions, dtype=np.int64)
    vcount = np.zeros((n_regions, n_colour_bins), dtype=np.int64)
    tcount = np.zeros((n_regions, 3 * n_texture_bins), dtype=np.int64)
    for y in range(h):
        for x in range(w):
            k = labels[y * w + x]
            if x < boxes[k, 0]:
                boxes[k, 0] = x
            if y < boxes[k, 1]:
                boxes[k, 1] = y
            if x > boxes[k, 2]:
                boxes[k, 2] = x
            if y > boxes[k, 3]:
                boxes[k, 3] = y
            sizes[k] += 1
            vmax = max(max(image[y, x, 0], image[y, x, 1]), image[y, x, 2])
            vcount[k, v_lut[vmax]] += 1
            tcount[k, lbp_lut[lbp0[y, x]]] += 1
            tcount[k, n_texture_bins + lbp_lut[lbp1[y, x]]] += 1
            tcount[k, 2 * n_texture_bins + lbp_lut[lbp2[y, x]]] += 1

    n_c = 3 * n_colour_bins
    hist_c = np.zeros((n_regions, n_c), dtype=np.float64)
    hist_t = np.empty((n_regions, 3 * n_texture_bins), dtype=np.float64)
    for k in range(n_regions):
        s = np.float64(sizes[k])
        # H and S are always in bin 0 (see module docstring), so those bins hold size/size = 1.
        hist_c[k, 0] = s / s
        hist_c[k, n_colour_bins] = s / s
        for b in range(n_colour_bins):
            hist_c[k, 2 * n_colour_bins + b] = np.float64(vcount[k, b]) / s
        for b in range(3 * n_texture_bins):
            hist_t[k, b] = np.float64(tcount[k, b]) / s
    return boxes, sizes, hist_c, hist_t


# --- 3-4. neighbours and hierarchical grouping ----------------------------------------------


@numba.njit(cache=True, nogil=True)
def _intersect(boxes, a, b):
    """selectivesearch 0.4 ``_extract_neighbours.intersect``: a corner of b strictly inside a."""
    ax0, ay0, ax1, ay1 = boxes[a, 0], boxes[a, 1], boxes[a, 2], boxes[a, 3]
    bx0, by0, bx1, by1 = boxes[b, 0], boxes[b, 1], boxes[b, 2], boxes[b, 3]
    if ax0 < bx0 < ax1 and ay0 < by0 < ay1:
        return True
    if ax0 < bx1 < ax1 and ay0 < by1 < ay1:
        return True
    if ax0 < bx0 < ax1 and ay0 < by1 < ay1:
        return True
    if ax0 < bx1 < ax1 and ay0 < by0 < ay1:
        return True
    return False


@numba.njit(cache=True, nogil=True)
def _similarity(boxes, sizes, hist_c, hist_t, a, b, imsize):
    """colour + texture + size + fill, summed in the reference's order (Python ``sum``)."""
    sc = 0.0
    for i in range(hist_c.shape[1]):
        x = hist_c[a, i]
        y = hist_c[b, i]
        sc += x if x <= y else y
    st = 0.0
    for i in range(hist_t.shape[1]):
        x = hist_t[a, i]
        y = hist_t[b, i]
        st += x if x <= y else y
    size_sim = 1.0 - np.float64(sizes[a] + sizes[b]) / np.float64(imsize)
    bw = max(boxes[a, 2], boxes[b, 2]) - min(boxes[a, 0], boxes[b, 0])
    bh = max(boxes[a, 3], boxes[b, 3]) - min(boxes[a, 1], boxes[b, 1])
    fill = 1.0 - np.float64(bw * bh - sizes[a] - sizes[b]) / np.float64(imsize)
    return sc + st + size_sim + fill


@numba.njit(cache=True, nogil=True)
def _heap_before(sim, p, q):
    # p pops before q: higher similarity, then later insertion (the reference's stable sort
    # puts the last-inserted of equal maxima at the end, and it takes the end).
    return sim[p] > sim[q] or (sim[p] == sim[q] and p > q)


@numba.njit(cache=True, nogil=True)
def _heap_push(heap, n, sim, p):
    i = n
    heap[i] = p
    while i > 0:
        parent = (i - 1) >> 1
        if _heap_before(sim, heap[i], heap[parent]):
            heap[i], heap[parent] = heap[parent], heap[i]
            i = parent
        else:
            break
    return n + 1


@numba.njit(cache=True, nogil=True)
def _heap_pop(heap, n, sim):
    top = heap[0]
    n -= 1
    heap[0] = heap[n]
    i = 0
    while True:
        left = 2 * i + 1
        if left >= n:
            break
        best = left
        right = left + 1
        if right < n and _heap_before(sim, heap[right], heap[left]):
            best = right
        if _heap_before(sim, heap[best], heap[i]):
            heap[i], heap[best] = heap[best], heap[i]
            i = best
        else:
            break
    return top, n


@numba.njit(cache=True, nogil=True)
def _grow(arr):
    """A copy of ``arr`` with twice the rows (numba arrays cannot be resized in place)."""
    out = np.empty((2 * arr.shape[0],) + arr.shape[1:], dtype=arr.dtype)
    out[: arr.shape[0]] = arr
    return out


@numba.njit(cache=True, nogil=True)
def _add_pair(links, psim, heap, n_pairs, n_heap, head, a, b, sim):
    """Insert pair (a, b) with its similarity: the reference's ``S[(a, b)] = sim``.

    ``links[p]`` = (a, b, next older pair of a, next older pair of b): per-region linked lists
    from ``head``, so a merge finds the live pairs of its two regions without scanning all.
    The pair number doubles as the insertion counter that breaks similarity ties.
    """
    if n_pairs == links.shape[0]:
        links = _grow(links)
        psim = _grow(psim)
        heap = _grow(heap)
    links[n_pairs, 0] = a
    links[n_pairs, 1] = b
    links[n_pairs, 2] = head[a]
    links[n_pairs, 3] = head[b]
    head[a] = n_pairs
    head[b] = n_pairs
    psim[n_pairs] = sim
    n_heap = _heap_push(heap, n_heap, psim, n_pairs)
    return links, psim, heap, n_pairs + 1, n_heap


@numba.njit(cache=True, nogil=True)
def _group(boxes0, sizes0, hist_c0, hist_t0, imsize):
    """Hierarchical grouping; returns the boxes of all regions, initial then merged, in order."""
    n0 = boxes0.shape[0]
    cap = max(2 * n0 - 1, 1)
    boxes = np.empty((cap, 4), dtype=np.int64)
    sizes = np.empty(cap, dtype=np.int64)
    hist_c = np.empty((cap, hist_c0.shape[1]), dtype=np.float64)
    hist_t = np.empty((cap, hist_t0.shape[1]), dtype=np.float64)
    boxes[:n0] = boxes0
    sizes[:n0] = sizes0
    hist_c[:n0] = hist_c0
    hist_t[:n0] = hist_t0
    alive = np.zeros(cap, dtype=np.bool_)
    alive[:n0] = True
    head = np.full(cap, -1, dtype=np.int64)  # newest pair of each region

    pcap = 4 * n0 + 16
    links = np.empty((pcap, 4), dtype=np.int64)
    psim = np.empty(pcap, dtype=np.float64)
    heap = np.empty(pcap, dtype=np.int64)
    n_pairs = 0
    n_heap = 0

    # initial neighbours in the reference's loop order
    for a in range(n0 - 1):
        for b in range(a + 1, n0):
            if _intersect(boxes, a, b):
                sim = _similarity(boxes, sizes, hist_c, hist_t, a, b, imsize)
                links, psim, heap, n_pairs, n_heap = _add_pair(links, psim, heap, n_pairs, n_heap, head, a, b, sim)

    n_regions = n0
    touched = np.empty(16, dtype=np.int64)
    seen = np.full(cap, -1, dtype=np.int64)
    while n_heap > 0:
        p, n_heap = _heap_pop(heap, n_heap, psim)
        i = links[p, 0]
        j = links[p, 1]
        if not (alive[i] and alive[j]):
            continue  # lazily deleted: the reference removed it when i or j was merged
        t = n_regions
        n_regions += 1
        s = sizes[i] + sizes[j]
        boxes[t, 0] = min(boxes[i, 0], boxes[j, 0])
        boxes[t, 1] = min(boxes[i, 1], boxes[j, 1])
        boxes[t, 2] = max(boxes[i, 2], boxes[j, 2])
        boxes[t, 3] = max(boxes[i, 3], boxes[j, 3])
        sizes[t] = s
        for c in range(hist_c.shape[1]):
            hist_c[t, c] = (hist_c[i, c] * sizes[i] + hist_c[j, c] * sizes[j]) / s
        for c in range(hist_t.shape[1]):
            hist_t[t, c] = (hist_t[i, c] * sizes[i] + hist_t[j, c] * sizes[j]) / s
        alive[i] = False
        alive[j] = False
        alive[t] = True

        # live pairs of i and j (other than (i, j)), in insertion order, as the reference's
        # ``key_to_delete`` list; each gives a new pair (t, other), first occurrence kept.
        n_touched = 0
        for r in (i, j):
            q = head[r]
            while q >= 0:
                mine = 0 if links[q, 0] == r else 1
                other = links[q, 1 - mine]
                if alive[other]:
                    if n_touched == touched.shape[0]:
                        touched = _grow(touched)
                    touched[n_touched] = q
                    n_touched += 1
                q = links[q, 2 + mine]
        touched[:n_touched].sort()
        for k in range(n_touched):
            q = touched[k]
            other = links[q, 1] if links[q, 0] == i or links[q, 0] == j else links[q, 0]
            if seen[other] == t:
                continue
            seen[other] = t
            sim = _similarity(boxes, sizes, hist_c, hist_t, t, other, imsize)
            links, psim, heap, n_pairs, n_heap = _add_pair(links, psim, heap, n_pairs, n_heap, head, t, other, sim)
    return boxes[:n_regions]


# --- public ----------------------------------------------------------------------------------


def felzenszwalb_roots(image: np.ndarray, scale: float, sigma: float, min_size: int) -> np.ndarray:
    """Felzenszwalb segmentation (skimage-identical partition); returns a root id per pixel."""
    h, w = image.shape[:2]
    costs = _edge_costs(image, sigma)
    order = np.argsort(costs)  # numpy's default (unstable) sort, as skimage: ties matter
    return _felzenszwalb_segments(order, costs, h, w, float(scale), int(min_size)).reshape(h, w)


def selective_search(image: np.ndarray, scale: float = 500, sigma: float = 0.9, min_size: int = 10) -> np.ndarray:
    """Selective search on an (H, W, 3) uint8 RGB image.

    Returns an (n, 4) int32 array of boxes x1, y1, x2, y2 (x2/y2 = last pixel column/row,
    inclusive, as the reference's ``x + w``), unfiltered and in the reference's order
    (initial regions in raster order of first appearance, then merged regions in merge order).
    Defaults are the paper's (appendix A.1): scale=500, sigma=0.9, min_size=10.
    """
    image = np.ascontiguousarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {image.dtype} {image.shape}")
    h, w = image.shape[:2]
    roots = felzenszwalb_roots(image, scale, sigma, min_size).ravel()
    boxes0, sizes0, hist_c0, hist_t0 = _regions(
        image, roots, _V_LUT, _LBP_LUT, float(_LBP_CP[1]), COLOUR_BINS, TEXTURE_BINS
    )
    boxes = _group(boxes0, sizes0, hist_c0, hist_t0, h * w)
    return boxes.astype(np.int32)
