"""Helpers for the stage-2 data tests: small real photos and a proposal store written directly.

Writing the store with ``proposals.store.write_store`` (instead of running selective search)
keeps the tests fast and the boxes known.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import skimage.data
from PIL import Image

from soco_pretrain.proposals.filters import RULE_FAILED, RULE_PAPER
from soco_pretrain.proposals.generate import file_identity
from soco_pretrain.proposals.store import digest_row, write_store

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins")


def make_photos(folder: Path, names=PHOTOS, side: int = 160, subdir: str | None = None) -> list[str]:
    """Write skimage photos (long side ``side``) as PNG; returns their paths relative to ``folder``."""
    target = folder / subdir if subdir else folder
    target.mkdir(parents=True, exist_ok=True)
    rel = []
    for name in names:
        im = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
        scale = side / max(im.size)
        im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.BILINEAR)
        im.save(target / f"{name}.png")
        rel.append(f"{subdir}/{name}.png" if subdir else f"{name}.png")
    return rel


def random_boxes(rng, width: int, height: int, n: int) -> np.ndarray:
    """``n`` store boxes (x2/y2 inclusive) covering 25-70 % of each side."""
    w = rng.integers(int(0.25 * width), int(0.7 * width), n)
    h = rng.integers(int(0.25 * height), int(0.7 * height), n)
    x1 = rng.integers(0, width - w)
    y1 = rng.integers(0, height - h)
    return np.stack([x1, y1, x1 + w - 1, y1 + h - 1], axis=1).astype(np.int32)


def make_store(
    out: Path, root: Path, paths, boxes_per_image: int = 6, failed=(), empty=(), seed: int = 0, keys: bool = True
) -> Path:
    """A proposal store for ``paths`` (relative to ``root``): random boxes from each image's size;
    paths in ``failed`` get the failed status, those in ``empty`` 0 boxes. ``keys``: record each
    file's change key as ``soco proposals`` does (False: a store of an older version)."""
    rng = np.random.default_rng(seed)
    paths = sorted(paths)
    all_boxes, offsets, sizes, status = [], [0], [], []
    for p in paths:
        with Image.open(root / p) as im:
            w, h = im.size
        n = 0 if p in failed or p in empty else boxes_per_image
        boxes = random_boxes(rng, w, h, n) if n else np.zeros((0, 4), np.int32)
        all_boxes.append(boxes)
        offsets.append(offsets[-1] + len(boxes))
        sizes.append((0, 0) if p in failed else (w, h))
        status.append(RULE_FAILED if p in failed else RULE_PAPER)
    boxes = np.concatenate(all_boxes) if all_boxes else np.zeros((0, 4), np.int32)
    identity = [file_identity(root / p) for p in paths] if keys else []
    file_keys = {
        "file_keys": np.array([key for key, _ in identity], dtype=np.int64).reshape(-1, 2),
        "file_sha256": np.array([digest_row(digest) for _, digest in identity], dtype=np.uint8).reshape(-1, 32),
    }
    raw = [boxes_per_image] * len(paths)
    manifest = {"preset": "test"}
    return write_store(out, paths, boxes, offsets, sizes, status, raw, manifest, **(file_keys if keys else {}))


def corrupt(path: Path) -> None:
    """Replace an image with the first half of its PNG bytes (a truncated file)."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# A tiny pretraining setting for the tests: 64 px views, K = 2, batch 2, data in the main process,
# level bounds scaled to 64 px as the tiny preset's are to 96. Each optimiser step of the full
# R50-FPN model then takes about a second on one CPU thread.
SMALL_PRETRAIN = [
    "data.views.v1_size=64",
    "data.views.v2_size=64",
    "data.views.v3_size=32",
    "data.views.v4_size=48",
    "data.views.level_bounds=[14, 27, 55]",
    "data.views.num_proposals=2",
    "train.workers=0",
    "train.per_device_batch=2",
    "train.batch_size=2",
    "train.log_every=1",
    "train.checkpoint_every=1000",
    "train.keep_checkpoints=0",  # last.pt only: one ~0.5 GB file per run, no numbered names
]


def small_pretrain_config(*extra: str):
    """The tiny preset with SMALL_PRETRAIN and ``extra`` overrides applied (in that order)."""
    from soco_pretrain.config import apply_overrides
    from soco_pretrain.presets import load_preset

    return apply_overrides(load_preset("tiny"), [*SMALL_PRETRAIN, *extra])
