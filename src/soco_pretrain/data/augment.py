"""BYOL's photometric augmentation without its random crop, on the CPU per image or batched on a device.

SoCo (paper section 3.2) augments every view with BYOL's pipeline minus the random crop; the
horizontal flip is geometric and lives in ``views.py`` (it moves the boxes). What is left, in
BYOL's order (Grill et al. 2020, Table 6), each step with its own probability:

1. colour jitter (p 0.8): brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1, the four ops in a
   random order, with torchvision ``ColorJitter``'s factor ranges and formulas;
2. grayscale (p 0.2), torchvision's luma weights, copied to the three channels;
3. Gaussian blur (p 1.0 for BYOL's first view, 0.1 for its second), sigma ~ U[0.1, 2.0] px, kernel
   odd(10% of the side): 23 px at 224 (BYOL Table 6), reflect padding like torchvision;
4. solarize (p 0.0 first view, 0.2 second): x -> 1 - x where x >= 0.5, on [0, 1] images;

then ImageNet mean/std normalisation. The probabilities and ranges come from
:class:`~soco_pretrain.config.AugmentConfig`; which of BYOL's two parameter sets ("param set" 0 or
1) each SoCo view uses is ``AugmentConfig.view_params`` (see :func:`view_param_sets`).

Two paths with one output distribution:

* :func:`augment_cpu` -- one 3xHxW image, in the data-loader workers; ops skipped when their coin
  says no (that is where the CPU time goes).
* :class:`BatchAugment` -- a (B, 3, H, W) batch on the training device, per-sample parameters,
  every op computed for the whole batch and kept per sample by masks: no Python loop over samples,
  no data-dependent shapes, no host-device synchronisation.

Both draw their random numbers with :func:`draw_params` (one ``torch.rand`` of 13 numbers per
image, columns in ``_COLUMNS``), so a seeded generator gives bit-identical parameters on both
paths and the outputs agree to float rounding (tested), not only in distribution.

Everything works in float32 on [0, 1]: torchvision's uint8 kernels convert to float for hue and
blur anyway, truncate rather than round after brightness, and are slower on the CPU than the
float ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

from ..config import AugmentConfig

# BYOL (Table 6) fixes the blur kernel at 23 px for 224 px views, i.e. odd(10% of the side); we
# keep the 10% for the other view sizes (V3 112 px -> 11, V4 192 px -> 19). Odd as
# 2 * ((side // 10) // 2) + 1, the radius form the SimCLR/BYOL-style implementations use.
BLUR_KERNEL_FRACTION_DIV = 10
# BYOL's solarization threshold on [0, 1] images (Table 6 / its code: x < 0.5 ? x : 1 - x).
SOLARIZE_THRESHOLD = 0.5

# Op codes inside the colour jitter, in torchvision ColorJitter's numbering.
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3

# Columns of the uniform draws (one row per image): fixed so both paths consume a generator alike.
_COLUMNS = (
    "jitter",  # 0: colour jitter fires when u < colour_jitter_p
    "key0",
    "key1",
    "key2",
    "key3",  # 1-4: op order = argsort of 4 uniform keys (uniform permutation)
    "brightness",
    "contrast",
    "saturation",
    "hue",  # 5-8: factors, ColorJitter's ranges
    "grayscale",  # 9
    "blur",
    "sigma",  # 10-11
    "solarize",  # 12
)
NUM_DRAWS = len(_COLUMNS)

# torchvision's rgb_to_grayscale weights (ITU-R 601-2 luma), used by its contrast and saturation.
_LUMA = (0.2989, 0.587, 0.114)


# ---------------------------------------------------------------- configuration helpers


def view_param_sets(cfg: AugmentConfig, num_views: int) -> tuple[int, ...]:
    """BYOL parameter set (0 or 1) for each of the first ``num_views`` SoCo views (V1, V2, V3[, V4]).

    Default ``cfg.view_params`` = (0, 1, 1, 1): V1 takes BYOL's first view's parameters (always
    blurred, never solarized), V2/V3/V4 the second's (see config.py for the reading of the paper).
    """
    if num_views > len(cfg.view_params):
        raise ValueError(
            f"augment.view_params={tuple(cfg.view_params)!r} names {len(cfg.view_params)} views, {num_views} needed"
        )
    sets = tuple(int(p) for p in cfg.view_params[:num_views])
    for p in sets:
        _check_param_set(p)
    return sets


def blur_kernel_size(side: int) -> int:
    """Odd blur kernel of about 10% of ``side``: 224 -> 23 (BYOL Table 6), 112 -> 11, 192 -> 19."""
    return 2 * ((int(side) // BLUR_KERNEL_FRACTION_DIV) // 2) + 1


def _check_param_set(param_set: int) -> None:
    if param_set not in (0, 1):
        raise ValueError(f"param_set must be 0 (BYOL view 1) or 1 (BYOL view 2), got {param_set!r}")


def _check_cfg(cfg: AugmentConfig) -> None:
    for name in ("brightness", "contrast", "saturation"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"augment.{name} must be >= 0, got {getattr(cfg, name)}")
    if not 0 <= cfg.hue <= 0.5:  # torchvision's bound: a hue shift is a fraction of the colour wheel
        raise ValueError(f"augment.hue must be in [0, 0.5], got {cfg.hue}")
    lo, hi = cfg.blur_sigma
    if not 0 < lo <= hi:
        raise ValueError(f"augment.blur_sigma must be 0 < low <= high, got {cfg.blur_sigma}")
    probs = [cfg.colour_jitter_p, cfg.grayscale_p, *cfg.blur_p, *cfg.solarize_p]
    if len(cfg.blur_p) != 2 or len(cfg.solarize_p) != 2 or not all(0 <= p <= 1 for p in probs):
        raise ValueError("augment probabilities must be in [0, 1] (blur_p and solarize_p: two values)")


def _factor_range(value: float) -> tuple[float, float]:
    """ColorJitter's range for brightness/contrast/saturation: [max(0, 1 - v), 1 + v]."""
    return max(0.0, 1.0 - value), 1.0 + value


# ---------------------------------------------------------------- random parameters


@dataclass
class AugmentParams:
    """Per-image random parameters, one row per image (tensors of length B).

    ``jitter``/``grayscale``/``blur``/``solarize`` say whether each op fires; ``order_keys`` (B, 4)
    give the colour-jitter op order (op codes BRIGHTNESS..HUE sorted by key); the factors are
    torchvision's (brightness/contrast/saturation multiply-blend factors, hue shift in turns).
    """

    jitter: torch.Tensor
    order_keys: torch.Tensor
    brightness: torch.Tensor
    contrast: torch.Tensor
    saturation: torch.Tensor
    hue: torch.Tensor
    grayscale: torch.Tensor
    blur: torch.Tensor
    sigma: torch.Tensor
    solarize: torch.Tensor

    def to(self, device, non_blocking: bool = True) -> AugmentParams:
        return AugmentParams(
            **{f.name: getattr(self, f.name).to(device, non_blocking=non_blocking) for f in fields(self)}
        )

    def slice(self, start: int, stop: int) -> AugmentParams:
        """Rows ``start:stop`` (views, no copy)."""
        return AugmentParams(**{f.name: getattr(self, f.name)[start:stop] for f in fields(self)})

    def order(self) -> torch.Tensor:
        """(B, 4) op codes in the order they are applied."""
        return torch.argsort(self.order_keys, dim=1)

    def __len__(self) -> int:
        return self.jitter.shape[0]


def draw_params(
    n: int, param_set: int, cfg: AugmentConfig, generator: torch.Generator | None = None, device=None
) -> AugmentParams:
    """Draw the parameters of ``n`` images for BYOL parameter set ``param_set`` with ONE ``torch.rand``.

    Drawn where ``generator`` lives (else on ``device``, default CPU) and moved to ``device`` if that
    differs: a single small copy, never a read back to the host. For CUDA images prefer a CUDA
    generator (``torch.Generator(device="cuda")``) or None (the device's default generator).
    """
    _check_param_set(param_set)
    gen_device = generator.device if generator is not None else (device or "cpu")
    u = torch.rand(n, NUM_DRAWS, generator=generator, device=gen_device)
    if device is not None and torch.device(device) != u.device:
        if u.device.type == "cpu" and torch.device(device).type == "cuda":
            # A copy from pageable host memory waits for the stream; from pinned memory it does not.
            u = u.pin_memory()
        u = u.to(device, non_blocking=True)
    c = {name: u[:, i] for i, name in enumerate(_COLUMNS)}

    def uniform(col, lo, hi):
        return lo + (hi - lo) * c[col]

    return AugmentParams(
        jitter=c["jitter"] < cfg.colour_jitter_p,
        order_keys=u[:, 1:5],
        brightness=uniform("brightness", *_factor_range(cfg.brightness)),
        contrast=uniform("contrast", *_factor_range(cfg.contrast)),
        saturation=uniform("saturation", *_factor_range(cfg.saturation)),
        hue=uniform("hue", -cfg.hue, cfg.hue),
        grayscale=c["grayscale"] < cfg.grayscale_p,
        blur=c["blur"] < cfg.blur_p[param_set],
        sigma=uniform("sigma", *cfg.blur_sigma),
        solarize=c["solarize"] < cfg.solarize_p[param_set],
    )


# ---------------------------------------------------------------- shared pieces


def to_float01(img: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [0, 1] (torchvision's to_dtype(scale=True)); float input -> float32 as is."""
    if img.dtype == torch.uint8:
        return img.to(torch.float32).mul_(1.0 / 255.0)
    if not img.is_floating_point():
        raise TypeError(f"expected a uint8 or float image, got {img.dtype}")
    return img.to(torch.float32)


def normalise(imgs: torch.Tensor, cfg: AugmentConfig) -> torch.Tensor:
    """ImageNet mean/std normalisation (``cfg.mean``, ``cfg.std``) of [0, 1] images (..., 3, H, W)."""
    mean = torch.tensor(cfg.mean, dtype=imgs.dtype, device=imgs.device).view(3, 1, 1)
    std = torch.tensor(cfg.std, dtype=imgs.dtype, device=imgs.device).view(3, 1, 1)
    return (imgs - mean) / std


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    """(..., 1, H, W) luma, same operation order as torchvision (bit-identical on float)."""
    r, g, b = x[..., 0:1, :, :], x[..., 1:2, :, :], x[..., 2:3, :, :]
    return r.mul(_LUMA[0]).add_(g, alpha=_LUMA[1]).add_(b, alpha=_LUMA[2])


def adjust_hue(x: torch.Tensor, shift) -> torch.Tensor:
    """torchvision's adjust_hue (RGB -> HSV, h += shift mod 1, HSV -> RGB) on float [0, 1] images.

    ``x`` is (..., 3, H, W); ``shift`` a float or a tensor broadcastable to (..., 1, H, W), e.g.
    (B, 1, 1, 1) for one shift per sample. Same HSV maths as torchvision's ``_rgb_to_hsv`` (Pillow's
    hue) but the inverse in the closed form c = v - v*s*clamp(min(k, 4 - k), 0, 1), k = (n + 6h) mod
    6, n = 5, 3, 1 for R, G, B -- equal to torchvision's sector table (tested to 1e-5) without its
    gather and min/max over dim reductions, which make torchvision's ~2x slower on the CPU.
    """
    maxc = x.amax(dim=-3, keepdim=True)
    minc = x.amin(dim=-3, keepdim=True)
    rng = maxc - minc  # = v * s
    # torchvision divides by 1 where max == min (grey pixels); there every numerator below is 0.
    d = (maxc - x) / (rng + (rng == 0).to(x.dtype))
    rc, gc, bc = d[..., 0:1, :, :], d[..., 1:2, :, :], d[..., 2:3, :, :]
    is_r = maxc == x[..., 0:1, :, :]
    is_g = (maxc == x[..., 1:2, :, :]) & ~is_r
    is_b = ~(is_r | is_g)
    # Hue in sixths of a turn, in [-1, 5); torchvision's later "+1, mod 1" only adds whole turns,
    # which the final mod 6 removes, so it is folded in there.
    h6 = (bc - gc) * is_r + (rc - bc + 2.0) * is_g + (gc - rc + 4.0) * is_b
    if isinstance(shift, torch.Tensor):
        shift = shift.to(x.dtype)
    n = torch.tensor((5.0, 3.0, 1.0), dtype=x.dtype, device=x.device).view(3, 1, 1)
    t = h6 + shift * 6.0 + 12.0 + n  # > 0 for |shift| <= 0.5, so floor gives the true mod
    k = t - 6.0 * torch.floor(t / 6.0)
    w = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    return maxc - rng * w


def solarize(x: torch.Tensor, threshold: float = SOLARIZE_THRESHOLD) -> torch.Tensor:
    """torchvision's solarize on float images: 1 - x where x >= threshold."""
    if threshold == 0.5:
        # Exactly the same values, without torch.where (~30x slower on the CPU): for x >= 0.5,
        # 1 - x <= x; for x < 0.5, x < 1 - x.
        return torch.minimum(x, 1.0 - x)
    return torch.where(x >= threshold, 1.0 - x, x)


def _gaussian_weights(sigma: torch.Tensor, k: int) -> torch.Tensor:
    """(B, k) 1-D Gaussian kernels, torchvision's ``_get_gaussian_kernel1d`` formula, one per sigma."""
    lim = (k - 1) / (2.0 * math.sqrt(2.0))
    x = torch.linspace(-lim, lim, steps=k, dtype=sigma.dtype, device=sigma.device)
    return torch.softmax(x.view(1, k).div(sigma.view(-1, 1)).pow(2).neg(), dim=1)


def gaussian_blur(
    x: torch.Tensor, sigma: torch.Tensor, kernel_size: tuple[int, int] | None = None, impl: str = "shift"
) -> torch.Tensor:
    """torchvision's gaussian_blur (reflect padding, its kernel formula) with one sigma per sample.

    ``x`` (B, C, H, W) float, ``sigma`` (B,); ``kernel_size`` (kx, ky) defaults to
    :func:`blur_kernel_size` of W and H. Separable (a horizontal then a vertical 1-D pass; reflect
    padding is separable too, so this equals torchvision's 2-D conv up to float rounding).
    ``impl``: "shift" = k shifted multiply-adds per pass (fastest on the CPU: 2 ms vs torchvision's
    16 ms at 224 px); "conv" = depthwise conv2d with groups = B * C (one kernel launch per pass).
    """
    b, c, h, w = x.shape
    kx, ky = kernel_size if kernel_size is not None else (blur_kernel_size(w), blur_kernel_size(h))
    sigma = sigma.to(device=x.device, dtype=x.dtype).reshape(b)
    out = x
    for axis, k in ((3, kx), (2, ky)):
        if k <= 1:
            continue
        p = k // 2
        wts = _gaussian_weights(sigma, k)  # (B, k)
        pad = (p, p, 0, 0) if axis == 3 else (0, 0, p, p)
        xp = F.pad(out, pad, mode="reflect")
        if impl == "conv":
            shape = (b * c, 1, 1, k) if axis == 3 else (b * c, 1, k, 1)
            weight = wts.repeat_interleave(c, dim=0).view(shape)
            out = F.conv2d(xp.reshape(1, b * c, *xp.shape[-2:]), weight, groups=b * c).view(b, c, h, w)
        elif impl == "shift":
            size = w if axis == 3 else h
            wv = wts.view(b, 1, 1, 1, k)
            acc = xp.narrow(axis, 0, size) * wv[..., 0]
            for j in range(1, k):
                acc.addcmul_(xp.narrow(axis, j, size), wv[..., j])
            out = acc
        else:
            raise ValueError(f"blur impl must be 'shift' or 'conv', got {impl!r}")
    return out


# ---------------------------------------------------------------- CPU path (one image)


def augment_cpu(
    img: torch.Tensor, param_set: int, cfg: AugmentConfig, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Augment one image (uint8 or [0, 1] float, 3xHxW) with BYOL parameter set ``param_set``.

    Returns float32 3xHxW, normalised. ``generator`` (CPU) makes it deterministic; None uses the
    global RNG. ``cfg.enabled`` False: only float conversion + normalisation (no draw either).
    """
    if img.ndim != 3 or img.shape[0] != 3:
        raise ValueError(f"expected a 3xHxW image, got shape {tuple(img.shape)}")
    x = to_float01(img)
    if not cfg.enabled:
        return normalise(x, cfg)
    _check_cfg(cfg)
    params = draw_params(1, param_set, cfg, generator)
    return normalise(apply_params_cpu(x, params, 0, cfg), cfg)


def apply_params_cpu(x: torch.Tensor, params: AugmentParams, i: int, cfg: AugmentConfig) -> torch.Tensor:
    """Apply row ``i`` of ``params`` to one float [0, 1] 3xHxW image; returns [0, 1] (not normalised).

    torchvision.transforms.v2.functional for brightness/contrast/saturation/grayscale (float
    kernels, ColorJitter's formulas), this module's :func:`adjust_hue`, :func:`gaussian_blur` and
    :func:`solarize` (same maths, tested against torchvision's, faster on the CPU).
    """
    row = {f.name: getattr(params, f.name)[i] for f in fields(params)}
    if bool(row["jitter"]):
        for op in torch.argsort(row["order_keys"]).tolist():
            # A zero setting is skipped, like ColorJitter with a None parameter.
            if op == BRIGHTNESS and cfg.brightness > 0:
                x = TF.adjust_brightness(x, float(row["brightness"]))
            elif op == CONTRAST and cfg.contrast > 0:
                x = TF.adjust_contrast(x, float(row["contrast"]))
            elif op == SATURATION and cfg.saturation > 0:
                x = TF.adjust_saturation(x, float(row["saturation"]))
            elif op == HUE and cfg.hue > 0:
                x = adjust_hue(x, float(row["hue"]))
    if bool(row["grayscale"]):
        x = TF.rgb_to_grayscale(x, num_output_channels=3)
    if bool(row["blur"]):
        x = gaussian_blur(x.unsqueeze(0), row["sigma"].view(1))[0]
    if bool(row["solarize"]):
        x = solarize(x)
    return x


# ---------------------------------------------------------------- batched path (device)


class BatchAugment:
    """Batched BYOL augmentation on the tensors' device, per-sample random parameters.

    ``BatchAugment(cfg)(imgs, param_set, generator=None)``: ``imgs`` uint8 (or [0, 1] float)
    (B, 3, H, W) on any device -> float32 normalised (B, 3, H, W). Every op runs on the whole batch;
    per-sample masks keep it where its coin fired (the cost of the unfired ones is the price of
    no synchronisation; ops whose probability is 0 in this param set are skipped outright).

    Colour jitter in random order without a loop over samples: brightness, contrast and saturation
    are all torchvision's ``_blend(x, ref, f)`` = clamp(f*x + (1 - f)*ref, 0, 1) with ref = 0, the
    grey mean, or the grey image, so one "stage" applies each sample's own op by choosing its ref
    and factor (f = 1 is an exact identity). Hue, the costly op, runs once: the cheap ops before it
    in a sample's order run in three stages first, then hue, then the cheap ops after it in three
    more stages (stage j applies a sample's j-th cheap op only on the right side of its hue).

    ``blur_impl``: "auto" (depthwise conv on CUDA, shifted multiply-adds elsewhere), "conv" or
    "shift" (see :func:`gaussian_blur`). On CUDA, PyTorch's default lets cuDNN run float32
    convolutions in TF32 (~5e-4 abs error on [0, 1], a fraction of a uint8 level); "shift" is
    plain float32 everywhere. ``cpu_chunk``: on CPU tensors, images per chunk (cache
    friendly; 0 = whole batch at once); ignored on other devices.
    """

    def __init__(self, cfg: AugmentConfig, blur_impl: str = "auto", cpu_chunk: int = 4):
        _check_cfg(cfg)
        if blur_impl not in ("auto", "conv", "shift"):
            raise ValueError(f"blur_impl must be auto, conv or shift, got {blur_impl!r}")
        self.cfg = cfg
        self.blur_impl = blur_impl
        self.cpu_chunk = cpu_chunk

    def __call__(self, imgs: torch.Tensor, param_set: int, generator: torch.Generator | None = None) -> torch.Tensor:
        if imgs.ndim != 4 or imgs.shape[1] != 3:
            raise ValueError(f"expected (B, 3, H, W) images, got shape {tuple(imgs.shape)}")
        _check_param_set(param_set)
        x = to_float01(imgs)
        if not self.cfg.enabled:
            return normalise(x, self.cfg)
        params = draw_params(x.shape[0], param_set, self.cfg, generator, device=x.device)
        if x.device.type == "cpu" and self.cpu_chunk and x.shape[0] > self.cpu_chunk:
            # On the CPU the ops are memory-bound: whole-batch passes over (B, 3, 224, 224) miss the
            # cache and run slower per image than small chunks. No device to sync.
            n = self.cpu_chunk
            return torch.cat(
                [
                    normalise(self.apply(x[i : i + n], params.slice(i, i + n), param_set), self.cfg)
                    for i in range(0, x.shape[0], n)
                ]
            )
        return normalise(self.apply(x, params, param_set), self.cfg)

    def apply(self, x: torch.Tensor, params: AugmentParams, param_set: int | None = None) -> torch.Tensor:
        """Apply ``params`` (on ``x``'s device) to float [0, 1] images (B, 3, H, W); not normalised.

        ``param_set`` only lets ops whose probability is 0 there be skipped (None: run everything).
        """
        cfg = self.cfg
        b = x.shape[0]
        if b == 0:
            return x

        def view(t):  # (B,) -> (B, 1, 1, 1) for broadcasting over an image
            return t.view(b, 1, 1, 1)

        def fires(p):  # can the op fire at all in this param set? (a config fact, no sync)
            return param_set is None or p > 0

        if fires(cfg.colour_jitter_p):
            x = self._colour_jitter(x, params, view)
        if fires(cfg.grayscale_p):
            x = torch.where(view(params.grayscale), _grayscale(x).expand_as(x), x)
        if param_set is None or cfg.blur_p[param_set] > 0:
            impl = self.blur_impl
            if impl == "auto":
                impl = "conv" if x.device.type == "cuda" else "shift"
            blurred = gaussian_blur(x, params.sigma, impl=impl)
            x = (
                blurred
                if param_set is not None and cfg.blur_p[param_set] >= 1
                else torch.where(view(params.blur), blurred, x)
            )
        if param_set is None or cfg.solarize_p[param_set] > 0:
            x = torch.where(view(params.solarize), solarize(x), x)
        return x

    def _colour_jitter(self, x: torch.Tensor, params: AugmentParams, view) -> torch.Tensor:
        cfg = self.cfg
        keys = params.order_keys
        # Order of the three cheap ops among themselves, and how many of them precede hue.
        cheap_order = torch.argsort(keys[:, :3], dim=1)  # (B, 3) op codes 0..2
        use_hue = cfg.hue > 0
        if use_hue:
            hue_pos = (keys[:, :3] < keys[:, 3:4]).sum(dim=1, keepdim=True)  # (B, 1) in 0..3
        else:
            hue_pos = torch.full_like(cheap_order[:, :1], 3)  # no hue: every cheap op "before" it
        factors = torch.stack((params.brightness, params.contrast, params.saturation), dim=1)  # (B, 3)
        for name, code in (("brightness", BRIGHTNESS), ("contrast", CONTRAST), ("saturation", SATURATION)):
            if getattr(cfg, name) == 0:  # ColorJitter skips a zero setting; f = 1 is the same op
                factors[:, code] = 1.0
        stage = torch.arange(3, device=x.device).view(1, 3)
        before = params.jitter.view(-1, 1) & (stage < hue_pos)  # (B, 3): stage j runs before hue
        after = params.jitter.view(-1, 1) & (stage >= hue_pos)
        ordered_f = torch.gather(factors, 1, cheap_order)  # factor of each sample's j-th cheap op
        for j in range(3):
            x = self._blend_stage(x, cheap_order[:, j], torch.where(before[:, j], ordered_f[:, j], 1.0), view)
        if use_hue:
            x = torch.where(view(params.jitter), adjust_hue(x, view(params.hue)), x)
            for j in range(3):
                x = self._blend_stage(x, cheap_order[:, j], torch.where(after[:, j], ordered_f[:, j], 1.0), view)
        return x

    @staticmethod
    def _blend_stage(x: torch.Tensor, op: torch.Tensor, f: torch.Tensor, view) -> torch.Tensor:
        """Per sample: brightness, contrast or saturation (``op``) with factor ``f`` (1 = identity).

        torchvision's float formulas: brightness clamp(f*x), contrast clamp(f*x + (1-f)*mean(grey)),
        saturation clamp(f*x + (1-f)*grey).
        """
        grey = _grayscale(x)  # (B, 1, H, W)
        mean = grey.mean(dim=(-3, -2, -1), keepdim=True)
        is_c = view(op == CONTRAST).to(x.dtype)
        is_s = view(op == SATURATION).to(x.dtype)
        ref = grey * is_s + mean * is_c  # 0 for brightness
        f = view(f.to(x.dtype))
        return (x * f).add_(ref * (1.0 - f)).clamp_(0.0, 1.0)
