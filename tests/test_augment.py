"""BYOL photometric augmentation (data/augment.py): each op against torchvision, both paths against
each other and against a torchvision pipeline built from BYOL's numbers, and statistics of the
random parameters recovered from the outputs (so a wrong probability or range fails).

Statistical tests use fixed seeds (deterministic); their tolerances are ~4 standard errors, so they
would also pass for other seeds, while the wrong parameters named in each test move the statistic
by several times the tolerance.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
import pytest
import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF
from matplotlib.colors import rgb_to_hsv
from PIL import Image
from skimage import data

from soco_pretrain.config import AugmentConfig
from soco_pretrain.data import augment as A
from soco_pretrain.data.augment import AugmentParams, BatchAugment, augment_cpu

# BYOL, Table 6 -- written out here, not read from the config, so a wrong default fails.
BYOL = dict(
    colour_jitter_p=0.8,
    brightness=0.4,
    contrast=0.4,
    saturation=0.2,
    hue=0.1,
    grayscale_p=0.2,
    blur_p=(1.0, 0.1),
    blur_sigma=(0.1, 2.0),
    solarize_p=(0.0, 0.2),
)
N = 512  # draws per statistical test


def photo(size: int, name: str = "astronaut") -> torch.Tensor:
    """A bundled skimage photo squashed to size x size, uint8 3xHxW."""
    im = Image.fromarray(getattr(data, name)()).resize((size, size), Image.BILINEAR)
    return torch.from_numpy(np.asarray(im).transpose(2, 0, 1).copy())


def only(**kwargs) -> AugmentConfig:
    """Config with every op off except those in kwargs."""
    off = dict(
        colour_jitter_p=0.0,
        brightness=0.0,
        contrast=0.0,
        saturation=0.0,
        hue=0.0,
        grayscale_p=0.0,
        blur_p=(0.0, 0.0),
        solarize_p=(0.0, 0.0),
    )
    return AugmentConfig(**{**off, **kwargs})


def unnormalise(x: torch.Tensor, cfg: AugmentConfig) -> torch.Tensor:
    mean = torch.tensor(cfg.mean).view(3, 1, 1)
    std = torch.tensor(cfg.std).view(3, 1, 1)
    return x * std + mean


def run_both(cfg: AugmentConfig, img: torch.Tensor, param_set: int, n: int = N, seed: int = 0):
    """n augmentations of one image by each path, unnormalised back to [0, 1]: (cpu, batched)."""
    g = torch.Generator().manual_seed(seed)
    cpu = torch.stack([augment_cpu(img, param_set, cfg, g) for _ in range(n)])
    g = torch.Generator().manual_seed(seed + 1)
    batched = BatchAugment(cfg)(img.expand(n, *img.shape).contiguous(), param_set, g)
    return unnormalise(cpu, cfg), unnormalise(batched, cfg)


def check_uniform(values: np.ndarray, lo: float, hi: float, what: str) -> None:
    """Values look like U[lo, hi]: inside the range, reaching both ends, KS distance small."""
    values = np.sort(np.asarray(values, dtype=np.float64))
    n, width = len(values), hi - lo
    assert values[0] >= lo - 1e-4 * width and values[-1] <= hi + 1e-4 * width, (what, values[0], values[-1])
    # Both ends reached: a too narrow range fails (P(miss) = 0.97^n, < 1e-5 for n >= 400).
    assert values[0] < lo + 0.03 * width and values[-1] > hi - 0.03 * width, (what, values[0], values[-1])
    ecdf = np.arange(1, n + 1) / n
    cdf = (values - lo) / width
    d = max(np.max(ecdf - cdf), np.max(cdf - (ecdf - 1 / n)))
    assert d < 1.8 / math.sqrt(n), (what, d)  # KS 0.5% level


def binomial_ok(frac: float, p: float, n: int) -> bool:
    return abs(frac - p) <= 4 * math.sqrt(max(p * (1 - p), 1e-4) / n) + 1e-9


def make_params(
    b: int,
    *,
    jitter=True,
    order=None,
    brightness=1.0,
    contrast=1.0,
    saturation=1.0,
    hue=0.0,
    grayscale=False,
    blur=False,
    sigma=1.0,
    solarize=False,
) -> AugmentParams:
    """Fixed per-sample parameters (scalars broadcast to b samples; ``order``: list of permutations)."""

    def vec(v, dtype=torch.float32):
        return torch.as_tensor(v, dtype=dtype).expand(b).clone()

    keys = torch.zeros(b, 4)
    for i in range(b):
        perm = order[i % len(order)] if order is not None else (0, 1, 2, 3)
        for pos, op in enumerate(perm):
            keys[i, op] = (pos + 1) / 5.0  # argsort(keys) == perm
    return AugmentParams(
        jitter=vec(jitter, torch.bool),
        order_keys=keys,
        brightness=vec(brightness),
        contrast=vec(contrast),
        saturation=vec(saturation),
        hue=vec(hue),
        grayscale=vec(grayscale, torch.bool),
        blur=vec(blur, torch.bool),
        sigma=vec(sigma),
        solarize=vec(solarize, torch.bool),
    )


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    """(6, 3, 30, 46) float [0, 1]: two photos, uniform noise, and 8-bit noise with grey pixels and
    tied channels (the hue conversion's special cases)."""
    g = torch.Generator().manual_seed(3)
    photos = [TF.resize(photo(64, n), [30, 46], antialias=True).float() / 255 for n in ("astronaut", "coffee")]
    noise = torch.rand(2, 3, 30, 46, generator=g)
    q = torch.randint(0, 256, (2, 3, 30, 46), generator=g) / 255.0
    q[:, :, :8] = q[:, :1, :8]  # grey
    q[:, 1, 8:16] = q[:, 0, 8:16]  # r == g
    q[:, 2, 16:24] = q[:, 1, 16:24]  # g == b
    return torch.cat([torch.stack(photos), noise, q])


# ---------------------------------------------------------------- config and helpers


def test_defaults_are_byols():
    cfg = AugmentConfig()
    for key, value in BYOL.items():
        assert getattr(cfg, key) == value, key
    assert cfg.mean == (0.485, 0.456, 0.406) and cfg.std == (0.229, 0.224, 0.225)
    assert A.SOLARIZE_THRESHOLD == 0.5


def test_blur_kernel_size():
    assert A.blur_kernel_size(224) == 23  # BYOL Table 6
    assert [A.blur_kernel_size(s) for s in (112, 192, 240, 64, 32, 9)] == [11, 19, 25, 7, 3, 1]


def test_view_param_sets():
    cfg = AugmentConfig()
    assert A.view_param_sets(cfg, 3) == (0, 1, 1)
    assert A.view_param_sets(cfg, 4) == (0, 1, 1, 1)
    with pytest.raises(ValueError, match="view_params"):
        A.view_param_sets(cfg, 5)
    with pytest.raises(ValueError, match=r"view_params=\[0, 2\]: must be a list of 0 .* or 1"):
        dataclasses.replace(cfg, view_params=(0, 2))  # the config rejects it before any view is made


def test_bad_inputs():
    with pytest.raises(ValueError, match="param_set"):
        augment_cpu(photo(16), 2, AugmentConfig())
    with pytest.raises(ValueError, match="hue"):
        BatchAugment(AugmentConfig(hue=0.6))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        BatchAugment(AugmentConfig())(photo(16), 0)


# ---------------------------------------------------------------- each op vs torchvision, fixed parameters


@pytest.mark.parametrize(
    "op,fn",
    [(A.BRIGHTNESS, TF.adjust_brightness), (A.CONTRAST, TF.adjust_contrast), (A.SATURATION, TF.adjust_saturation)],
)
def test_blend_ops_match_torchvision(batch, op, fn):
    factors = torch.tensor([0.6, 1.4, 0.93, 1.0, 1.2, 0.0])
    view = lambda t: t.view(-1, 1, 1, 1)  # noqa: E731
    out = BatchAugment._blend_stage(batch, torch.full((6,), op), factors, view)
    for i in range(6):
        torch.testing.assert_close(out[i], fn(batch[i], float(factors[i])), atol=1e-6, rtol=0)


def test_blend_stage_mixes_ops_per_sample(batch):
    ops = torch.tensor([0, 1, 2, 2, 1, 0])
    factors = torch.tensor([1.3, 0.7, 1.2, 0.8, 1.4, 0.6])
    out = BatchAugment._blend_stage(batch, ops, factors, lambda t: t.view(-1, 1, 1, 1))
    fns = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation]
    for i in range(6):
        torch.testing.assert_close(out[i], fns[ops[i]](batch[i], float(factors[i])), atol=1e-6, rtol=0)


def test_hue_matches_torchvision(batch):
    shifts = torch.tensor([-0.5, -0.1, 0.0, 0.037, 0.1, 0.5])
    out = A.adjust_hue(batch, shifts.view(-1, 1, 1, 1))
    for i in range(6):
        ref = TF.adjust_hue(batch[i], float(shifts[i]))
        torch.testing.assert_close(out[i], ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(A.adjust_hue(batch[i], float(shifts[i])), ref, atol=1e-5, rtol=0)


def test_grayscale_and_solarize_match_torchvision(batch):
    ba = BatchAugment(AugmentConfig())
    mask = [True, False, True, False, True, True]
    out = ba.apply(batch, make_params(6, jitter=False, grayscale=mask))
    for i in range(6):
        ref = TF.rgb_to_grayscale(batch[i], num_output_channels=3) if mask[i] else batch[i]
        torch.testing.assert_close(out[i], ref, atol=0, rtol=0)
    out = ba.apply(batch, make_params(6, jitter=False, solarize=mask))
    for i in range(6):
        ref = TF.solarize(batch[i], 0.5) if mask[i] else batch[i]
        torch.testing.assert_close(out[i], ref, atol=0, rtol=0)
    torch.testing.assert_close(A.solarize(batch, 0.3), TF.solarize(batch, 0.3), atol=0, rtol=0)


@pytest.mark.parametrize("impl", ["shift", "conv"])
def test_blur_matches_torchvision(batch, impl):
    sigmas = torch.tensor([0.1, 0.5, 1.0, 1.3, 1.7, 2.0])
    out = A.gaussian_blur(batch, sigmas, impl=impl)  # kernel 5 (width 46) x 3 (height 30)
    for i in range(6):
        ref = TF.gaussian_blur(batch[i], [5, 3], [float(sigmas[i])] * 2)
        torch.testing.assert_close(out[i], ref, atol=1e-5, rtol=0)
    # BYOL's 23 px kernel (a 224 px view) on a smaller image: reflect padding needs pad < side.
    out = A.gaussian_blur(batch[:, :, :, :30], sigmas, kernel_size=(23, 23), impl=impl)
    for i in range(6):
        ref = TF.gaussian_blur(batch[i, :, :, :30], [23, 23], [float(sigmas[i])] * 2)
        torch.testing.assert_close(out[i], ref, atol=1e-5, rtol=0)


def tv_reference(x: torch.Tensor, p: AugmentParams, i: int, cfg: AugmentConfig) -> torch.Tensor:
    """Row i of ``p`` applied with torchvision.transforms.v2.functional only (the oracle)."""
    if p.jitter[i]:
        for op in p.order()[i].tolist():
            if op == A.BRIGHTNESS:
                x = TF.adjust_brightness(x, float(p.brightness[i]))
            elif op == A.CONTRAST:
                x = TF.adjust_contrast(x, float(p.contrast[i]))
            elif op == A.SATURATION:
                x = TF.adjust_saturation(x, float(p.saturation[i]))
            else:
                x = TF.adjust_hue(x, float(p.hue[i]))
    if p.grayscale[i]:
        x = TF.rgb_to_grayscale(x, num_output_channels=3)
    if p.blur[i]:
        h, w = x.shape[-2:]
        x = TF.gaussian_blur(x, [A.blur_kernel_size(w), A.blur_kernel_size(h)], [float(p.sigma[i])] * 2)
    if p.solarize[i]:
        x = TF.solarize(x, 0.5)
    return x


def test_all_24_orders_and_every_op_match_torchvision(batch):
    """Both paths, every op order, random factors and coins: per sample equal to the oracle."""
    cfg = AugmentConfig(grayscale_p=0.3, blur_p=(0.5, 0.5), solarize_p=(0.5, 0.5))
    b = 48
    x = batch.repeat(8, 1, 1, 1)
    p = A.draw_params(b, 0, cfg, torch.Generator().manual_seed(5))
    perms = list(itertools.permutations(range(4)))
    p.order_keys = make_params(b, order=perms).order_keys
    assert [tuple(r) for r in p.order()[:24].tolist()] == perms
    p.jitter[:40] = True  # all 24 orders with jitter on, a few samples without
    out = BatchAugment(cfg).apply(x, p)  # param_set None: every op computed, masks decide
    for i in range(b):
        ref = tv_reference(x[i], p, i, cfg)
        torch.testing.assert_close(out[i], ref, atol=2e-5, rtol=0, msg=f"sample {i}")
        torch.testing.assert_close(A.apply_params_cpu(x[i], p, i, cfg), ref, atol=2e-5, rtol=0)


def test_order_changes_the_result(batch):
    """Guards the oracle test: brightness then contrast differs from contrast then brightness."""
    ba = BatchAugment(AugmentConfig())
    kw = dict(brightness=1.4, contrast=0.6)
    a = ba.apply(batch[:1], make_params(1, order=[(0, 1, 2, 3)], **kw))
    b = ba.apply(batch[:1], make_params(1, order=[(1, 0, 2, 3)], **kw))
    assert (a - b).abs().max() > 0.01


# ---------------------------------------------------------------- determinism, shapes, devices


def test_cpu_path_deterministic_and_equal_to_batched_for_one_seed():
    img = photo(48)
    cfg = AugmentConfig()
    for ps in (0, 1):
        outs = [augment_cpu(img, ps, cfg, torch.Generator().manual_seed(s)) for s in (7, 7, 8)]
        assert outs[0].dtype == torch.float32 and outs[0].shape == (3, 48, 48)
        assert torch.equal(outs[0], outs[1])
        assert not torch.equal(outs[0], outs[2])
        # Same generator state -> same 13 draws -> same parameters on both paths.
        for s in range(6):
            one = augment_cpu(img, ps, cfg, torch.Generator().manual_seed(s))
            bat = BatchAugment(cfg)(img[None], ps, torch.Generator().manual_seed(s))
            torch.testing.assert_close(bat[0], one, atol=1e-4, rtol=0)


def test_batched_deterministic_chunking_invariant_and_float_inputs():
    cfg = AugmentConfig()
    imgs = torch.stack([photo(40, n) for n in ("astronaut", "coffee", "chelsea", "rocket", "coffee")])
    for ps in (0, 1):
        a = BatchAugment(cfg)(imgs, ps, torch.Generator().manual_seed(1))
        b = BatchAugment(cfg, cpu_chunk=0)(imgs, ps, torch.Generator().manual_seed(1))
        c = BatchAugment(cfg, blur_impl="conv", cpu_chunk=2)(imgs.double() / 255, ps, torch.Generator().manual_seed(1))
        assert a.dtype == c.dtype == torch.float32 and a.shape == imgs.shape
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
        torch.testing.assert_close(a, c, atol=1e-5, rtol=0)
    out = BatchAugment(cfg)(imgs[:0], 1)
    assert out.shape == (0, 3, 40, 40)
    torch.manual_seed(0)  # generator None: the global RNG (device default)
    assert BatchAugment(cfg)(imgs[:1], 1).shape == (1, 3, 40, 40)


def test_batched_needs_no_host_sync():
    """Runs on the meta device, where reading any value back (.item(), nonzero, bool(), data-dependent
    shapes) raises: the GPU path never waits for the device."""
    x = torch.empty(4, 3, 32, 32, dtype=torch.uint8, device="meta")
    for impl in ("shift", "conv"):
        for ps in (0, 1):
            out = BatchAugment(AugmentConfig(), blur_impl=impl)(x, ps)
            assert out.shape == x.shape and out.device.type == "meta"


def test_disabled_is_float_and_normalise_only():
    cfg = AugmentConfig(enabled=False)
    img = photo(24)
    expected = (img.float() / 255 - torch.tensor(cfg.mean).view(3, 1, 1)) / torch.tensor(cfg.std).view(3, 1, 1)
    out = augment_cpu(img, 0, cfg, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    assert torch.equal(out, A.normalise(A.to_float01(img), cfg))
    out_b = BatchAugment(cfg)(img[None].expand(2, -1, -1, -1), 1)
    torch.testing.assert_close(out_b, expected.expand(2, -1, -1, -1), atol=1e-6, rtol=0)
    back = (unnormalise(out, cfg) * 255).round().to(torch.uint8)
    assert torch.equal(back, img)


# ---------------------------------------------------------------- statistics: probabilities and ranges


def is_grey(x: torch.Tensor) -> torch.Tensor:
    return ((x[:, 0] - x[:, 1]).abs().amax((1, 2)) < 1e-5) & ((x[:, 1] - x[:, 2]).abs().amax((1, 2)) < 1e-5)


def as01(img: torch.Tensor) -> torch.Tensor:
    return img.float() / 255 if img.dtype == torch.uint8 else img


def changed(out: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
    return (out - as01(img)).abs().flatten(1).amax(1) > 1e-5


def test_grayscale_probability():
    img = photo(32)
    for ps in (0, 1):
        for out in run_both(only(grayscale_p=0.2), img, ps):
            assert binomial_ok(is_grey(out).float().mean().item(), 0.2, N)  # 0.1 or 0.3 fail


def test_solarize_probability():
    img = photo(32)
    cpu, bat = run_both(only(solarize_p=BYOL["solarize_p"]), img, 1)
    x = as01(img)
    for out in (cpu, bat):
        sol = changed(out, img)
        assert binomial_ok(sol.float().mean().item(), 0.2, N)
        torch.testing.assert_close(out[sol], torch.minimum(x, 1 - x).expand(int(sol.sum()), -1, -1, -1))
    for out in run_both(only(solarize_p=BYOL["solarize_p"]), img, 0, n=64):
        assert not changed(out, img).any()  # BYOL view 1: never


def _blur_curve(img: torch.Tensor, grid: np.ndarray) -> np.ndarray:
    """Mean squared change blur makes to ``img`` as a function of sigma (torchvision's blur)."""
    x = img.float() / 255
    k = A.blur_kernel_size(img.shape[-1])
    return np.array([((TF.gaussian_blur(x, [k, k], [float(s)] * 2) - x) ** 2).mean().item() for s in grid])


def test_blur_probability_and_sigma_range():
    img = photo(64)  # kernel 7: sigma up to 2 still changes the result
    grid = np.linspace(0.2, 2.3, 300)
    curve = _blur_curve(img, grid)
    assert np.all(np.diff(curve) >= 0) and np.all(np.diff(curve[grid > 0.28]) > 0)
    cfg = only(blur_p=BYOL["blur_p"], blur_sigma=BYOL["blur_sigma"])
    x = as01(img)
    detectable = []
    for out in run_both(cfg, img, 0):
        stat = ((out - x) ** 2).flatten(1).mean(1).numpy()
        sigma = np.interp(stat, curve, grid)
        # Below ~0.25 px the blur barely changes an image: recover sigma where it is well defined.
        big = sigma[sigma > 0.3]
        check_uniform(big, 0.3, 2.0, "sigma")  # [0.1, 1.0] or [0.1, 3.0] fail
        assert abs(len(big) / len(sigma) - 1.7 / 1.9) < 0.07
        detectable.append(changed(out, img).float().mean().item())
    # BYOL view 2: blur with p 0.1 (more draws: 0.1 vs 0.2 must be far apart).
    for out, det in zip(run_both(cfg, img, 1, n=1024), detectable):
        assert binomial_ok(changed(out, img).float().mean().item(), 0.1 * det, 1024)


def _jitter_factors(cfg: AugmentConfig, img: torch.Tensor, recover) -> None:
    """Jitter fires with p 0.8; the factor recovered from each fired output is uniform on its range."""
    lo, hi = recover.range
    for out in run_both(cfg, img, 1):
        f = np.array([recover(o, as01(img)) for o in out])
        fired = np.abs(f - recover.identity) > 1e-5
        assert binomial_ok(fired.mean(), 0.8, N), fired.mean()
        check_uniform(f[fired], lo, hi, recover.__name__)


def mid_photo(size: int = 32) -> torch.Tensor:
    """A photo squeezed to [0.4, 0.6] (a float image): no op below clamps."""
    return photo(size).float() / 255 * 0.2 + 0.4


class _Recover:
    def __init__(self, fn, rng, identity=1.0):
        self.fn, self.range, self.identity, self.__name__ = fn, rng, identity, fn.__name__

    def __call__(self, out, x):
        return self.fn(out, x)


def _grey(x):
    return A._grayscale(x)


def brightness(out, x):
    return (out.sum() / x.sum()).item()


def contrast(out, x):
    return (out.std() / x.std()).item()


def saturation(out, x):
    g = _grey(x)
    return ((out - g).norm() / (x - g).norm()).item()


def hue(out, x):
    h_in, h_out = (rgb_to_hsv(t.permute(1, 2, 0).double().numpy()) for t in (x, out))
    ok = h_in[..., 1] > 0.05
    d = (h_out[..., 0] - h_in[..., 0])[ok]
    return float(np.angle(np.mean(np.exp(2j * np.pi * d))) / (2 * np.pi))  # circular mean, turns


@pytest.mark.parametrize(
    "name,recover",
    [
        ("brightness", _Recover(brightness, (0.6, 1.4))),  # BYOL 0.4: 0.3 or 0.5 miss the range
        ("contrast", _Recover(contrast, (0.6, 1.4))),
        ("saturation", _Recover(saturation, (0.8, 1.2))),
        ("hue", _Recover(hue, (-0.1, 0.1), identity=0.0)),
    ],
)
def test_colour_jitter_probability_and_ranges(name, recover):
    cfg = only(colour_jitter_p=0.8, **{name: BYOL[name]})
    img = mid_photo() if name != "hue" else photo(32)
    if name == "brightness":
        img = img * 0.7  # no clamp at 1.4
    _jitter_factors(cfg, img, recover)


def test_order_is_a_uniform_permutation():
    p = A.draw_params(24 * 200, 0, AugmentConfig(), torch.Generator().manual_seed(2))
    codes = (p.order() * torch.tensor([64, 16, 4, 1])).sum(1)
    counts = torch.bincount(codes, minlength=256)
    counts = counts[counts > 0].double()
    assert len(counts) == 24
    chi2 = (((counts - 200) ** 2) / 200).sum().item()
    assert chi2 < 55  # 23 dof: p ~ 2e-4


# ---------------------------------------------------------------- full pipeline: both paths vs torchvision


def torchvision_byol(param_set: int, size: int) -> T.Compose:
    """BYOL's photometric pipeline (minus crop and flip) from torchvision.transforms.v2, BYOL's numbers."""
    k = A.blur_kernel_size(size)
    return T.Compose(
        [
            T.ToDtype(torch.float32, scale=True),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
            T.RandomApply([T.GaussianBlur(k, sigma=(0.1, 2.0))], p=(1.0, 0.1)[param_set]),
            T.RandomSolarize(0.5, p=(0.0, 0.2)[param_set]),
        ]
    )


def _summary(out: torch.Tensor) -> dict:
    return {"mean": out.mean((2, 3)), "std": out.std((2, 3)), "grey": is_grey(out).float()[:, None]}


@pytest.mark.parametrize("param_set", [0, 1])
def test_full_pipeline_agrees_with_torchvision(param_set):
    img = photo(48, "coffee")
    cpu, bat = run_both(AugmentConfig(), img, param_set, seed=10)
    torch.manual_seed(11)
    tv = torchvision_byol(param_set, 48)
    ref = torch.stack([tv(img) for _ in range(N)])
    stats = [_summary(o) for o in (cpu, bat, ref)]
    for key in ("mean", "std", "grey"):
        for a in stats[:2]:
            va, vr = a[key], stats[2][key]
            z = (va.mean(0) - vr.mean(0)) / torch.sqrt(va.var(0) / N + vr.var(0) / N + 1e-12)
            assert z.abs().max() < 4.5, (key, z)
            ratio = va.std(0) / vr.std(0).clamp_min(1e-6)
            assert ((ratio > 0.8) & (ratio < 1.25)).all(), (key, ratio)
