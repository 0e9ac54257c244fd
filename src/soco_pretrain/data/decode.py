"""JPEG decoding and view rendering on the training device (``data.decode="device"``).

With ``data.decode="device"`` the loader workers only read each file's bytes and draw the views'
geometry from its header (``SoCoDataset.planned``); ``render_batch`` then does the pixel work on
the training device: one batched ``torchvision.io.decode_jpeg`` call for the batch's JPEGs
(nvJPEG on CUDA, libjpeg-turbo on the CPU), then each image's views from its render plan with
the worker path's steps (``views.render_views``: bilinear antialiased resize, exact flips). The
photometric augmentation (``BatchAugment``) follows on the uint8 views, as for
``augment.device="gpu"``.

Same pixels: PIL and torchvision's CPU decoder are both libjpeg-turbo without EXIF rotation
(``apply_exif_orientation=False`` keeps it so), measured identical here (tests/test_decode.py);
nvJPEG's IDCT and chroma upsampling may differ from libjpeg-turbo by a few grey levels, and
CUDA's resize from the CPU's uint8 kernel by about one.

A file that fails to decode here (the workers only parsed its header) never stops training: if
the batched call raises, each image is decoded alone (on the device, then on the CPU with
decode_jpeg, then with ``images.load_rgb``); an image that still fails gets zero views and
valid=False in all its slots (never in the loss), and ``(absolute path, reason)`` is appended to
the batch's ``skipped``, as a worker does for a file it cannot read.
"""

from __future__ import annotations

import logging
import re
import warnings

import torch
import torchvision.transforms.v2.functional as F
from torchvision.io import ImageReadMode, decode_jpeg

from ..config import ViewsConfig
from ..errors import one_line
from ..images import ImageError, load_rgb
from .views import PixelOps, plan_from_array, render_views

log = logging.getLogger("soco_pretrain.data")


def has_encoded(batch: dict) -> bool:
    """True for a batch of ``data.decode="device"`` samples (its views are still to render)."""
    return "encoded" in batch


def _resize_chw(img: torch.Tensor, size: int) -> torch.Tensor:
    """views.resize_square for CxHxW tensors on any device: same filter (bilinear, antialias)."""
    if tuple(img.shape[-2:]) == (size, size):
        return img  # the views are stacked into new tensors: no copy needed here
    return F.resize(img, [size, size], interpolation=F.InterpolationMode.BILINEAR, antialias=True)


# render_views' steps on uint8 CxHxW tensors (the decoder's layout).
TENSOR_OPS = PixelOps(
    crop=lambda img, x0, y0, x1, y1: img[:, y0:y1, x0:x1],
    resize=_resize_chw,
    flip=lambda img: img.flip(-1),
    finish=lambda img: img,
)

# One side stream per CUDA device for the decoder (see _decode_call).
_SIDE_STREAMS: dict = {}


def _decode_call(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """``decode_jpeg`` of ``data`` (CPU uint8 1-D tensors) to RGB CxHxW on ``device``.

    On CUDA the call runs with an idle side stream current, so its outputs come from that
    stream's memory pool: torchvision allocates them on the current stream and nvJPEG (its
    hardware decoder at least) writes them without waiting for work queued on that stream, so a
    block just freed there could be overwritten while queued kernels still read it
    (pytorch/vision#9606; draining the caller's stream would also do, at a host sync). An idle
    stream's free blocks are truly free; the side stream is from torch's pool, so if another
    user's work is queued on it we wait for that (rare). ``record_stream`` keeps each output's
    block out of that pool while the caller's stream still uses it.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29: "use TorchCodec"
        if device.type != "cuda":
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=False)
        caller = torch.cuda.current_stream(device)
        side = _SIDE_STREAMS.get(device)
        if side is None:
            side = _SIDE_STREAMS[device] = torch.cuda.Stream(device)
        if not side.query():  # a pool stream shared with queued work: let it finish first
            side.synchronize()
        with torch.cuda.stream(side):
            images = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        caller.wait_stream(side)
        for img in images:
            img.record_stream(caller)
        return images


# What decode_jpeg raises for a file it cannot decode: libjpeg and nvJPEG failures are
# RuntimeErrors (torch.cuda.OutOfMemoryError among them), malformed input a ValueError.
DECODE_ERRORS = (RuntimeError, ValueError)


def _decode_reason(exc: BaseException) -> str:
    """The decoder's message without torchvision's "decode_jpeg, FILE.cpp:LINE, " prefix."""
    return re.sub(r"^\w+, \S+:\d+, ", "", one_line(exc))


def _decode_one(data: torch.Tensor, file: str, device: torch.device) -> torch.Tensor | str:
    """One image after the batched call failed: decode_jpeg on the device, then on the CPU, then
    load_rgb from the file (PIL). Returns the CxHxW tensor on ``device`` or every attempt's
    reason, so a device-only failure (nvJPEG) is still named when PIL fails too."""
    attempts = [device] if device.type == "cpu" else [device, torch.device("cpu")]
    reasons = []
    for where in attempts:
        try:
            return _decode_call([data], where)[0].to(device, non_blocking=True)
        except DECODE_ERRORS as exc:
            reasons.append(f"decode_jpeg on {where.type}: {_decode_reason(exc)}")
    try:
        image = load_rgb(file)
    except ImageError as exc:
        return "; ".join([*reasons, exc.reason])
    return torch.from_numpy(image).to(device, non_blocking=True).permute(2, 0, 1)


def _decode_jpegs(data: list[torch.Tensor], files: list[str], device: torch.device) -> list[torch.Tensor | str]:
    """Every JPEG decoded in one call; if that raises (one corrupt file fails the whole call),
    image by image (``_decode_one``). Each entry: a CxHxW uint8 tensor on ``device`` or the
    reason it could not be decoded."""
    try:
        return list(_decode_call(data, device))
    except DECODE_ERRORS:  # each image's own reason comes from _decode_one
        return [_decode_one(d, f, device) for d, f in zip(data, files)]


def render_batch(batch: dict, views_cfg: ViewsConfig, device, non_blocking: bool = True) -> dict:
    """Decode and render a ``data.decode="device"`` batch (``soco_collate`` of
    ``SoCoDataset.planned`` samples, still on the CPU) on ``device``.

    Returns a new dict: ``views`` = one uint8 (B, 3, S, S) tensor per view on ``device``;
    boxes, levels, valid and proposal_ids moved to ``device``; ``skipped`` extended with the
    files that failed here (their slots valid=False, their views zeros); ``encoded`` and
    ``pixels`` dropped; the other fields unchanged. No host-device sync besides the decoder's
    own (the plan is read from the batch's CPU tensors).
    """
    device = torch.device(device)
    files = batch["files"]
    n = len(files)
    images: list[torch.Tensor | None] = [None] * n
    reasons: dict[int, str] = {}
    jpegs = [i for i, data in enumerate(batch["encoded"]) if data is not None]
    if jpegs:
        decoded = _decode_jpegs([batch["encoded"][i] for i in jpegs], [files[i] for i in jpegs], device)
        for i, result in zip(jpegs, decoded):
            if isinstance(result, str):
                reasons[i] = result
            else:
                images[i] = result
    for i, pixels in enumerate(batch["pixels"]):  # decoded in the worker (PNG, CMYK JPEG, ...)
        if pixels is not None:
            images[i] = pixels.to(device, non_blocking=non_blocking).permute(2, 0, 1)

    plans = batch["plan"].tolist()
    sizes = batch["image_size"].tolist()
    per_view: list[list[torch.Tensor]] = [[] for _ in plans[0]] if plans else []
    for i in range(n):
        plan = plan_from_array(plans[i])
        img = images[i]
        (w, h) = sizes[i]
        if img is not None and tuple(img.shape) != (3, h, w):  # the file changed since its header was read
            reasons[i] = f"decodes to {img.shape[-1]}x{img.shape[-2]} but its header said {w}x{h}"
            img = None
        if img is None:
            views = [torch.zeros((3, p.size, p.size), dtype=torch.uint8, device=device) for p in plan]
        else:
            views = render_views(img, plan, views_cfg.v1_size, TENSOR_OPS)
        for v, view in enumerate(views):
            per_view[v].append(view)

    out = {k: v for k, v in batch.items() if k not in ("encoded", "pixels")}
    out["views"] = [torch.stack(views) for views in per_view]
    valid = batch["valid"]
    failed = sorted(reasons)
    if failed:
        valid = valid.clone()  # on the CPU: no device work, no sync
        valid[failed] = False
    for i in failed:
        log.warning("skipped undecodable image %s: %s", files[i], reasons[i])
    out["skipped"] = list(batch["skipped"]) + [(files[i], reasons[i]) for i in failed]
    out["boxes"] = [t.to(device, non_blocking=non_blocking) for t in batch["boxes"]]
    out["levels"] = [t.to(device, non_blocking=non_blocking) for t in batch["levels"]]
    out["valid"] = valid.to(device, non_blocking=non_blocking)
    out["proposal_ids"] = batch["proposal_ids"].to(device, non_blocking=non_blocking)
    return out
