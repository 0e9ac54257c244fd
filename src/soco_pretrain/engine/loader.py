"""The one DataLoader factory of the training stages.

Every loader gets its own seeded generator (creating or iterating it never consumes the global
RNG, which exact resume relies on), pinned memory when the batches go to a CUDA device, and
persistent workers when it has workers and will be iterated more than once.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader


def build_loader(
    dataset,
    batch_size: int,
    *,
    sampler=None,
    collate_fn=None,
    workers: int = 0,
    seed: int = 0,
    pin_memory: bool | None = None,
    drop_last: bool = False,
    persistent_workers: bool = False,
    prefetch_factor: int | None = None,
    worker_init_fn=None,
) -> DataLoader:
    """A DataLoader over ``dataset``; ``pin_memory`` None: when CUDA is available."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    extra: dict[str, Any] = {}
    if workers > 0:
        extra["persistent_workers"] = persistent_workers
        if prefetch_factor is not None:
            extra["prefetch_factor"] = prefetch_factor
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate_fn,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        drop_last=drop_last,
        worker_init_fn=worker_init_fn,
        generator=torch.Generator().manual_seed(int(seed)),
        **extra,
    )
