"""Batches for pretraining: collate, the SoCo loader (on the engine's factory), epochs.

Determinism: the sampler's order comes from (seed, epoch) (torch's DistributedSampler, also
used with one process), and each sample's randomness from (seed, epoch, index) inside the
dataset; the sampler hands every index to the workers together with its epoch. The same seed
therefore gives the same batches with 0, 2 or 16 workers (bit for bit: the dataset computes
with one torch thread, as workers do), and persistent workers never see a stale epoch.
"""

from __future__ import annotations

import itertools
import random

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from ..engine.loader import build_loader
from ..engine.skips import SkipLog  # noqa: F401 - the one skipped-image log, re-exported for data users
from ..runfolder import default_workers as _default_workers


def soco_collate(samples: list[dict]) -> dict:
    """Stack samples (SoCoDataset items) into a batch of the same fields.

    views: list of (B, 3, H, W); boxes: list of (B, K, 4) float32; levels: list of (B, K) int64;
    valid and proposal_ids: (B, K); index: (B,) int64; paths: list of B str; skipped and
    rerouted: all the samples' (path, reason) pairs, concatenated.

    ``data.decode="device"`` samples (no views): encoded and pixels stay lists of B (a tensor or
    None each: sizes differ), plan (B, V, 8) int32, image_size (B, 2) int64, files list of B str;
    ``decode.render_batch`` turns them into views on the training device.
    """
    if not samples:
        raise ValueError("soco_collate: empty batch")
    num_views = len(samples[0]["boxes"])
    batch: dict = {}
    if "encoded" in samples[0]:
        batch["encoded"] = [s["encoded"] for s in samples]
        batch["pixels"] = [s["pixels"] for s in samples]
        batch["plan"] = torch.stack([s["plan"] for s in samples])
        batch["image_size"] = torch.stack([s["image_size"] for s in samples])
        batch["files"] = [s["file"] for s in samples]
    else:
        batch["views"] = [torch.stack([s["views"][v] for s in samples]) for v in range(num_views)]
    batch.update(
        {
            "boxes": [torch.stack([s["boxes"][v] for s in samples]) for v in range(num_views)],
            "levels": [torch.stack([s["levels"][v] for s in samples]) for v in range(num_views)],
            "valid": torch.stack([s["valid"] for s in samples]),
            "proposal_ids": torch.stack([s["proposal_ids"] for s in samples]),
            "index": torch.tensor([s["index"] for s in samples], dtype=torch.int64),
            "paths": [s["path"] for s in samples],
            "skipped": [item for s in samples for item in s["skipped"]],
            "rerouted": [item for s in samples for item in s.get("rerouted", ())],
        }
    )
    return batch


class EpochSampler(Sampler):
    """Wraps a sampler with ``set_epoch`` and yields ``(epoch, index)`` pairs, so each index
    reaches the (possibly persistent) worker processes together with its epoch."""

    def __init__(self, sampler):
        self.sampler = sampler
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """``skip``: indices of this epoch to leave out at its start (a resumed run skips the
        samples it has already trained on, without loading them)."""
        self.epoch = int(epoch)
        self.skip = int(skip)
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(self.epoch)

    def __iter__(self):
        epoch = self.epoch
        return ((epoch, int(i)) for i in itertools.islice(self.sampler, self.skip, None))

    def __len__(self) -> int:
        return max(0, len(self.sampler) - self.skip)


def _seed_worker(worker_id: int) -> None:
    # torch seeds each worker with base_seed + worker_id (base_seed from the loader's seeded
    # generator); numpy's and Python's global RNGs follow it. Our samples use their own
    # per-sample RNG, so this only tames third-party code that uses the global ones.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def default_workers() -> int:
    """Loader workers when not given: the usable cores (``runfolder.default_workers``), at most 8."""
    return _default_workers(cap=8)


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def make_loader(
    dataset,
    batch_size: int,
    workers: int | None = None,
    seed: int | None = None,
    shuffle: bool = True,
    drop_last: bool = True,
    distributed: bool | None = None,
    pin_memory: bool | None = None,
    persistent_workers: bool | None = None,
    prefetch_factor: int | None = None,
) -> DataLoader:
    """A DataLoader over ``dataset`` (a SoCoDataset) with soco_collate.

    ``workers`` default: default_workers(). ``seed`` (default dataset.config.seed) fixes the
    order and the worker seeds; each sample's own randomness always comes from
    dataset.config.seed (with the epoch and index). ``distributed`` None: a DistributedSampler over the process
    group when torch.distributed is initialised (each rank gets its share), else one process.
    ``pin_memory`` None: when CUDA is available. ``persistent_workers`` None: when workers > 0.
    ``prefetch_factor``: batches prefetched per worker (torch default 2). Call
    :func:`set_epoch` before each epoch.
    """
    workers = default_workers() if workers is None else int(workers)
    if seed is None:
        seed = dataset.config.seed if hasattr(dataset, "config") else 0
    seed = int(seed)
    if distributed is None:
        distributed = _distributed()
    if distributed:
        if not _distributed():
            raise RuntimeError("make_loader(distributed=True) needs torch.distributed to be initialised")
        # Pads (by repeating) so every rank gets the same number of samples.
        base: DistributedSampler = DistributedSampler(dataset, shuffle=shuffle, seed=seed)
    else:
        # Same seeded, epoch-aware shuffle as the distributed case, with one replica.
        base = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=shuffle, seed=seed)
    return build_loader(
        dataset,
        batch_size,
        sampler=EpochSampler(base),
        collate_fn=soco_collate,
        workers=workers,
        seed=seed,
        pin_memory=pin_memory,
        drop_last=drop_last,
        persistent_workers=workers > 0 if persistent_workers is None else persistent_workers,
        prefetch_factor=prefetch_factor,
        worker_init_fn=_seed_worker,
    )


def set_epoch(loader: DataLoader, epoch: int, skip_batches: int = 0) -> None:
    """Set the epoch of the loader's sampler (order) and dataset (per-sample randomness).

    ``skip_batches``: batches of this epoch to leave out at its start (resuming mid-epoch; the
    remaining batches are exactly those an uninterrupted run would see next). Needs the
    loader's EpochSampler.
    """
    if skip_batches:
        if not isinstance(loader.sampler, EpochSampler) or loader.batch_size is None:
            raise ValueError("set_epoch(skip_batches=...) needs a loader from make_loader")
        loader.sampler.set_epoch(epoch, skip=skip_batches * loader.batch_size)
    elif hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)
    if hasattr(loader.dataset, "set_epoch"):
        loader.dataset.set_epoch(epoch)


def augment_batch(
    batch: dict,
    augmenter,
    view_params,
    generator: torch.Generator | None = None,
    device=None,
    non_blocking: bool = True,
) -> dict:
    """The GPU path: move a batch's uint8 views to ``device`` and run ``augmenter``
    (augment.BatchAugment) on each with its BYOL parameter set ``view_params[v]``.

    Returns a new dict (boxes, levels and valid moved too); float views pass through unchanged.
    """
    out = dict(batch)
    views = []
    for v, imgs in enumerate(batch["views"]):
        if device is not None:
            imgs = imgs.to(device, non_blocking=non_blocking)
        if imgs.dtype == torch.uint8:
            imgs = augmenter(imgs, view_params[v], generator)
        views.append(imgs)
    out["views"] = views
    if device is not None:
        for key in ("boxes", "levels"):
            out[key] = [t.to(device, non_blocking=non_blocking) for t in batch[key]]
        for key in ("valid", "proposal_ids"):
            out[key] = batch[key].to(device, non_blocking=non_blocking)
    return out
