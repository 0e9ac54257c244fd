"""model.roi_pool: the packed canvas (one RoIAlign) against per-level pooling and an analytic oracle.

Exactness is checked in float64, where the two methods agree to ~1e-13: in float32 the canvas
coordinates of P3..P5 (offsets of up to ~50 pixels added to the boxes) round differently, ~1e-5.
Kept cheap: small channel counts, a ResNet-18 encoder on 32 px views (float64).
"""

from __future__ import annotations

import pytest
import torch

from soco_pretrain.config import ModelConfig
from soco_pretrain.model import FPN_STRIDES, SoCoEncoder, pool_boxes
from soco_pretrain.model.encoder import pack_levels

pytestmark = pytest.mark.usefixtures("one_thread")

# (H, W): the paper's views, the tests' 64, non-square ones, and tiny ones (several frames; P2 padded)
SIZES = [(224, 224), (112, 112), (192, 192), (64, 64), (96, 160), (100, 60), (16, 16), (8, 12)]


def _maps(b, c, h, w, seed=0, dtype=torch.float64) -> list[torch.Tensor]:
    """Random FPN-shaped maps of a (h, w) image: ceil(size / stride), as the ResNet's strided convs."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, c, -(-h // s), -(-w // s), generator=g, dtype=dtype).requires_grad_() for s in FPN_STRIDES]


def _slots(b, k, h, w, seed=0, dtype=torch.float64):
    """Boxes inside the (h, w) image (some touching every border, some tiny, one the whole image),
    random levels, two padded slots holding NaN boxes and out-of-range levels."""
    g = torch.Generator().manual_seed(seed + 1)
    size = torch.tensor([w, h], dtype=dtype)
    wh = torch.rand(b, k, 2, generator=g, dtype=dtype) * size
    xy = torch.rand(b, k, 2, generator=g, dtype=dtype) * (size - wh)
    boxes = torch.cat([xy, xy + wh], dim=2)
    boxes[0, 0] = torch.tensor([0, 0, w, h])  # the whole image: all four borders
    boxes[0, 1] = torch.tensor([0, 0, 0.7, 0.4])  # tiny, top-left corner
    boxes[0, 2] = torch.tensor([w - 0.3, h - 0.6, w, h])  # tiny, bottom-right corner
    boxes[1, 0] = torch.tensor([w / 3, 0, w / 2, h])  # top and bottom
    boxes[1, 1] = torch.tensor([0, h / 4, w, h / 3])  # left and right
    boxes[1, 2] = torch.tensor([w / 2, h / 2, w / 2 + 0.01, h / 2 + 0.01])  # near-empty
    levels = torch.randint(0, 4, (b, k), generator=g)
    levels[0, :3] = torch.tensor([0, 3, 3])
    levels[1, :3] = torch.tensor([3, 2, 0])
    valid = torch.ones(b, k, dtype=torch.bool)
    for (i, j), junk in zip([(1, k - 1), (b - 1, 0) if b > 2 else (0, k - 1)], (9, -3)):
        valid[i, j], boxes[i, j], levels[i, j] = False, float("nan"), junk
    return boxes, levels, valid


def _pool_and_grads(maps, boxes, levels, valid, method, weights):
    out = pool_boxes(maps, FPN_STRIDES, boxes, levels, valid, 7, 2, method=method)
    return out, torch.autograd.grad((out * weights).sum(), maps)


@pytest.mark.parametrize("size", SIZES, ids=[f"{h}x{w}" for h, w in SIZES])
def test_packed_equals_per_level_forward_and_gradients(size):
    h, w = size
    maps = _maps(3, 3, h, w)
    boxes, levels, valid = _slots(3, 6, h, w)
    weights = torch.randn(18, 3, 7, 7, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    weights[~valid.reshape(-1)] = 0  # padded rows are unspecified
    ref, ref_grads = _pool_and_grads(maps, boxes, levels, valid, "per_level", weights)
    out, grads = _pool_and_grads(maps, boxes, levels, valid, "packed", weights)
    rows = valid.reshape(-1)
    assert out.shape == ref.shape == (18, 3, 7, 7) and torch.isfinite(out).all()
    torch.testing.assert_close(out[rows], ref[rows], rtol=0, atol=1e-10)
    for g, r in zip(grads, ref_grads):  # every level map gets the same gradient
        torch.testing.assert_close(g, r, rtol=0, atol=1e-10)


def test_packed_float32_close_to_per_level():
    maps = [m.detach().float().requires_grad_() for m in _maps(3, 8, 224, 224, seed=3)]
    boxes, levels, valid = _slots(3, 6, 224, 224, seed=3, dtype=torch.float32)
    weights = torch.randn(18, 8, 7, 7, generator=torch.Generator().manual_seed(6))
    weights[~valid.reshape(-1)] = 0
    ref, ref_grads = _pool_and_grads(maps, boxes, levels, valid, "per_level", weights)
    out, grads = _pool_and_grads(maps, boxes, levels, valid, "packed", weights)
    rows = valid.reshape(-1)
    torch.testing.assert_close(out[rows], ref[rows], rtol=0, atol=5e-5)  # measured <= 2e-5
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-4)  # measured <= 5e-5


def test_packed_matches_an_analytic_oracle():
    """RoIAlign of a linear ramp is the ramp at each bin's centre when no sample is clamped
    (bilinear interpolation of a linear map is exact; the bin's samples are symmetric about its
    centre). Each level gets its own ramp and constant, so a slot read from any other level fails."""
    b, size, S = 2, 128, 7  # two channels, two ramps
    maps = []
    for index, s in enumerate(FPN_STRIDES):
        n = size // s
        ys, xs = torch.meshgrid(
            torch.arange(n, dtype=torch.float64), torch.arange(n, dtype=torch.float64), indexing="ij"
        )
        ramp = torch.stack([(index + 1) * xs + 0.5 * ys + 100 * index, -ys + 2 * xs + 7 * index])  # (c, n, n)
        maps.append(torch.stack([ramp + 1000 * i for i in range(b)]))  # the image index matters too
    levels = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0]])
    boxes = torch.tensor(
        [
            [[4.0, 6.0, 90.0, 61.5], [8.0, 9.0, 40.0, 100.0], [16.0, 20.0, 100.0, 110.0], [32.0, 33.0, 90.0, 95.0]],
            [[40.0, 32.0, 95.0, 94.0], [30.0, 17.0, 64.0, 111.0], [9.0, 8.5, 119.0, 119.0], [2.0, 2.0, 125.0, 125.0]],
        ],
        dtype=torch.float64,
    )
    valid = torch.ones(b, 4, dtype=torch.bool)
    out = pool_boxes(maps, FPN_STRIDES, boxes, levels, valid, S, 2, method="packed")
    centres = (torch.arange(S, dtype=torch.float64) + 0.5) / S
    for i in range(b):
        for k in range(4):
            index = int(levels[i, k])
            s, x1, y1, x2, y2 = FPN_STRIDES[index], *boxes[i, k].tolist()
            # aligned=True: map coordinate = pixel / stride - 0.5 (pixel centres at integers)
            x = x1 / s - 0.5 + centres * (x2 - x1) / s  # (S,) bin centres
            y = y1 / s - 0.5 + centres * (y2 - y1) / s
            n = size // s - 1  # no sample clamped: the roi's span stays within [0, n] map pixels
            assert min(x1, y1) / s - 0.5 >= 0 and max(x2, y2) / s - 0.5 <= n
            yy, xx = y[:, None], x[None, :]
            expected = torch.stack([(index + 1) * xx + 0.5 * yy + 100 * index, -yy + 2 * xx + 7 * index]) + 1000 * i
            torch.testing.assert_close(out[i * 4 + k], expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize(
    ("size", "frames"), [((224, 224), 2), ((112, 112), 2), ((100, 60), 2), ((16, 16), 4), ((8, 8), 4)]
)
def test_canvas_holds_every_level_once(size, frames):
    n = 2
    maps = [m.detach() for m in _maps(n, 3, *size)]
    canvas, places = pack_levels(maps)
    h2, w2 = maps[0].shape[-2:]
    grown = size == (8, 8)  # P3 padded (3x3) is larger than P2 (2x2): frames of 3x3, P2 padded
    assert canvas.shape == (frames * n, 3, h2 + grown, w2 + grown)
    assert places[0] == (0, 0, 0)
    for index, (m, (f, y, x)) in enumerate(zip(maps, places)):
        h, w = m.shape[-2:]
        frame = canvas[f * n : (f + 1) * n]
        torch.testing.assert_close(frame[..., y : y + h, x : x + w], m, rtol=0, atol=0)
        if index == 0 and not grown:
            continue  # P2 alone in frame 0: its borders are the frame's edges
        # a 1-pixel replicate pad (right and bottom at least)
        torch.testing.assert_close(frame[..., y + h, x : x + w], m[..., -1, :], rtol=0, atol=0)
        torch.testing.assert_close(frame[..., y : y + h, x + w], m[..., :, -1], rtol=0, atol=0)
        if index:
            torch.testing.assert_close(frame[..., y - 1, x : x + w], m[..., 0, :], rtol=0, atol=0)
            torch.testing.assert_close(frame[..., y : y + h, x - 1], m[..., :, 0], rtol=0, atol=0)
    # padded blocks never overlap: every canvas pixel belongs to at most one level (or is filler)
    owner = torch.zeros(canvas.shape[0] // n, *canvas.shape[-2:], dtype=torch.int64)
    for index, (m, (f, y, x)) in enumerate(zip(maps, places)):
        pad = 0 if index == 0 else 1
        owner[f, y - pad : y + m.shape[-2] + 1, x - pad : x + m.shape[-1] + 1] += 1
    assert owner.max() == 1


def test_boxes_outside_the_image_are_clamped_to_their_level():
    """Decision: packed clamps each box to its level's map (extent stride x map size) so no sample
    leaves the level's padded block. Out there it equals per_level on the clamped box (per_level
    itself would sample zeros beyond the map). Every other level NaN: nothing leaks across."""
    h, w, b, k = 64, 96, 2, 4
    maps = _maps(b, 2, h, w, seed=7)
    boxes = torch.tensor(
        [
            [
                [-40.0, -30.0, 20.0, 10.0],
                [50.0, 40.0, 300.0, 200.0],
                [-500.0, -500.0, 1000.0, 1000.0],
                [90, 60, 99, 70],
            ],
            [[-10.0, 5.0, -2.0, 30.0], [100.0, 70.0, 140.0, 90.0], [10.0, -20.0, 40.0, 80.0], [0.0, 0.0, 96.0, 64.0]],
        ],
        dtype=torch.float64,
    )
    valid = torch.ones(b, k, dtype=torch.bool)
    for index, s in enumerate(FPN_STRIDES):
        levels = torch.full((b, k), index)
        mh, mw = maps[index].shape[-2:]
        limit = torch.tensor([mw, mh, mw, mh], dtype=torch.float64) * s
        clamped = torch.minimum(boxes.clamp(min=0), limit)
        weights = torch.randn(b * k, 2, 7, 7, generator=torch.Generator().manual_seed(index), dtype=torch.float64)
        ref, ref_grads = _pool_and_grads(maps, clamped, levels, valid, "per_level", weights)
        out, grads = _pool_and_grads(maps, boxes, levels, valid, "packed", weights)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
        torch.testing.assert_close(grads[index], ref_grads[index], rtol=0, atol=1e-10)
        assert all(not g.any() for i, g in enumerate(grads) if i != index)
        poisoned = [m if i == index else torch.full_like(m, float("nan")) for i, m in enumerate(maps)]
        with torch.no_grad():
            assert torch.isfinite(pool_boxes(poisoned, FPN_STRIDES, boxes, levels, valid, 7, 2, method="packed")).all()
    # the difference the clamp makes: per_level reads zeros beyond the map, packed its border
    levels = torch.zeros(b, k, dtype=torch.long)
    with torch.no_grad():
        per_level = pool_boxes(maps, FPN_STRIDES, boxes, levels, valid, 7, 2, method="per_level")
        packed = pool_boxes(maps, FPN_STRIDES, boxes, levels, valid, 7, 2, method="packed")
    assert not torch.allclose(per_level[1], packed[1])  # [50, 40, 300, 200]: far past the corner
    torch.testing.assert_close(per_level[7], packed[7], rtol=0, atol=1e-10)  # the whole image


def test_encoder_forward_and_backward_packed_equals_per_level():
    """SoCoEncoder reads model.roi_pool; same weights, same outputs and parameter gradients."""
    torch.manual_seed(0)
    assert ModelConfig().roi_pool == "per_level"
    encoder = SoCoEncoder(ModelConfig(backbone="resnet18", head_dim=64, roi_pool="packed")).double()
    assert encoder.roi_pool == "packed"
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    boxes, levels, valid = _slots(2, 4, 32, 32, seed=2)
    results = []
    for method in ("packed", "per_level"):
        encoder.roi_pool = method
        encoder.zero_grad()
        out = encoder(images, boxes, levels, valid)
        out[valid.reshape(-1)].square().sum().backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in encoder.named_parameters()}))
    (out, grads), (ref, ref_grads) = results
    rows = valid.reshape(-1)
    torch.testing.assert_close(out[rows], ref[rows], rtol=1e-9, atol=1e-9)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-7, atol=1e-9, msg=name)


def test_packed_under_bf16_autocast():
    maps = [m.detach().float().requires_grad_() for m in _maps(2, 4, 64, 64, seed=4)]
    boxes, levels, valid = _slots(2, 4, 64, 64, seed=4, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = [m.to(torch.bfloat16) for m in maps]  # what autocast convolutions hand the pooler
        out = pool_boxes(low, FPN_STRIDES, boxes, levels, valid, 7, 2, method="packed")
        ref = pool_boxes(low, FPN_STRIDES, boxes, levels, valid, 7, 2, method="per_level")
    out.float().sum().backward()
    rows = valid.reshape(-1)
    assert torch.isfinite(out).all() and all(m.grad is not None and torch.isfinite(m.grad).all() for m in maps)
    torch.testing.assert_close(out[rows].float(), ref[rows].float(), rtol=0.02, atol=0.02)


def test_packed_compiles_without_graph_breaks():
    """fullgraph=True fails on any host read of a device value (.item(), .tolist(), nonzero)."""
    maps = _maps(2, 2, 64, 64, dtype=torch.float32)
    boxes, levels, valid = _slots(2, 4, 64, 64, dtype=torch.float32)
    compiled = torch.compile(
        lambda *a: pool_boxes(*a, 7, 2, method="packed"), backend="eager", fullgraph=True, dynamic=False
    )
    out = compiled(maps, FPN_STRIDES, boxes, levels, valid)
    ref = pool_boxes(maps, FPN_STRIDES, boxes, levels, valid, 7, 2, method="packed")
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_one_map_and_unknown_method():
    maps = _maps(2, 3, 64, 64)[2:3]  # C4-like: one stride-16 map
    boxes, levels, valid = _slots(2, 4, 64, 64)
    with torch.no_grad():
        a = pool_boxes(maps, (16,), boxes, levels, valid, 14, 2, method="per_level")
        b = pool_boxes(maps, (16,), boxes, levels, valid, 14, 2, method="packed")
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="method"):
        pool_boxes(maps, (16,), boxes, levels, valid, 14, 2, method="bogus")  # type: ignore[arg-type]
