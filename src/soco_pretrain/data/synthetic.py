"""Random batches shaped like the loader's (``loader.soco_collate``): for the step benchmarks and
the tests, where the data pipeline is not what is measured or checked.

Views are random (normalised floats, or uint8 as the loader gives them for the on-device
augmentation), boxes are random rectangles of ``min_box`` px to the whole view with the paper's
scale-aware FPN levels (``boxes.assign_levels``), and every slot is valid except the last
``padded`` of each image (``views.pad=mask``'s padding).
"""

from __future__ import annotations

import numpy as np
import torch

from ..config import ViewsConfig
from .boxes import assign_levels


def synthetic_batch(
    views: ViewsConfig,
    batch: int,
    k: int | None = None,
    n_views: int | None = None,
    seed: int = 0,
    *,
    min_box: float = 16.0,
    uint8: bool = False,
    padded: int = 0,
) -> dict:
    """``batch`` images with ``k`` box slots (default ``views.num_proposals``) in the first
    ``n_views`` views (default all: 4 for SoCo*, else 3) at ``views``' sizes; same ``seed``, same
    batch."""
    k = views.num_proposals if k is None else k
    sizes = [views.v1_size, views.v2_size, views.v3_size, views.v4_size]
    sizes = sizes[: n_views if n_views is not None else (4 if views.soco_star else 3)]
    rng, gen = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    images, boxes, levels = [], [], []
    for size in sizes:
        if uint8:
            images.append(torch.randint(0, 256, (batch, 3, size, size), generator=gen, dtype=torch.uint8))
        else:
            images.append(torch.randn(batch, 3, size, size, generator=gen))
        wh = rng.uniform(min(min_box, size), size, (batch, k, 2))
        xy = rng.uniform(0, 1, (batch, k, 2)) * (size - wh)
        b = np.concatenate([xy, xy + wh], axis=2).astype(np.float32)
        boxes.append(torch.from_numpy(b))
        levels.append(torch.from_numpy(assign_levels(b.reshape(-1, 4), views.level_bounds).reshape(batch, k)))
    valid = torch.ones(batch, k, dtype=torch.bool)
    if padded:
        valid[:, k - padded :] = False
    return {
        "views": images,
        "boxes": boxes,
        "levels": levels,
        "valid": valid,
        "proposal_ids": torch.where(valid, torch.arange(k).expand(batch, k), -1),
        "index": torch.arange(batch),
        "paths": [f"synthetic/{i}" for i in range(batch)],
        "skipped": [],
    }
