"""The pretraining step's batches on their way to the model: moved to the device, decoded and
rendered there (``data.decode=device``), augmented there (``data.augment.device=gpu``), and read
one micro-batch ahead on a side CUDA stream (``train.prefetch``). ``model_inputs`` is the part
of a batch the model reads."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from ..data.decode import has_encoded, render_batch
from ..data.loader import augment_batch

if TYPE_CHECKING:  # annotations only: loop.py imports this module
    from .loop import Job


def prepare_batch(batch: dict, device: torch.device, channels_last: bool, augmenter, view_params, generator,
                   views_cfg):  # fmt: skip
    """Move the batch to the device; ``data.decode=device`` decodes and renders its JPEGs there
    (data/decode.py), the GPU augmentation path makes uint8 views float there."""
    if has_encoded(batch):  # still on the CPU: the render plans are read there, no device sync
        batch = render_batch(batch, views_cfg, device)
    if augmenter is not None:
        batch = augment_batch(batch, augmenter, view_params, generator, device=device)
    if device.type != "cpu":
        batch = dict(batch)
        batch["views"] = [v.to(device, non_blocking=True) for v in batch["views"]]
        if channels_last:
            batch["views"] = [v.contiguous(memory_format=torch.channels_last) for v in batch["views"]]
    return batch


class BatchFeed:
    """The step's batches, moved to the device and (``data.augment.device=gpu``) augmented there.

    With ``lookahead`` the step asks for the next micro-batch as soon as its backward pass is
    launched (``prefetch``): the loader is read and the copy and augmentation kernels are queued
    while the device still runs the step, on a side CUDA stream when ``stream`` is given, so they
    overlap its compute; the step's stream waits for that stream only when it takes the batch.
    Without lookahead a batch is read and prepared when the step asks for it (``take``).

    Results do not depend on it: a batch's augmentation is seeded by its (step, micro-batch) slot,
    which the prefetch knows ahead, and a prefetched batch that no step takes (the run stops) is
    dropped; a resumed run re-reads it (the loader skips only the batches of steps done).
    """

    def __init__(self, job: Job, lookahead: bool, stream=None):
        self.job, self.lookahead, self.stream = job, lookahead, stream
        self.pending: tuple | None = None  # (slot, raw batch, prepared batch, seconds waited)

    def generator(self, step: int, micro: int):
        job, t = self.job, self.job.cfg.train
        if job.augmenter is None:
            return None
        seed = ((t.seed * 1_000_003 + step) * job.plan.accum + micro) * job.world + job.rank
        return torch.Generator(job.device).manual_seed(seed)  # reproducible per (seed, step, micro-batch, rank)

    def _read(self, batches, step: int, micro: int, raw=None) -> tuple:
        """(slot, raw batch, prepared batch, seconds waited); ``raw`` given: prepare that one."""
        job = self.job
        started = time.perf_counter()
        raw = next(batches) if raw is None else raw
        waited = time.perf_counter() - started
        prepared = prepare_batch(
            raw,
            job.device,
            job.device.type == "cuda" and job.cfg.train.channels_last,
            job.augmenter,
            job.cfg.data.augment.view_params,
            self.generator(step, micro),
            job.cfg.data.views,
        )
        return (step, micro), raw, prepared, waited

    def prefetch(self, batches, step: int, micro: int) -> None:
        """Read and prepare the batch of slot (step, micro) now (lookahead only)."""
        if not self.lookahead:
            return
        if self.stream is None:
            self.pending = self._read(batches, step, micro)
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.job.device))  # e.g. the augmenter's constants
        with torch.cuda.stream(self.stream):
            self.pending = self._read(batches, step, micro)

    def take(self, batches, step: int, micro: int) -> tuple[dict, dict, float]:
        """(raw batch, prepared batch, seconds the host waited for the loader) of slot (step, micro)."""
        pending, self.pending = self.pending, None
        if pending is None:
            pending = self._read(batches, step, micro)
        elif pending[0] != (step, micro):  # asked for another slot than foreseen: the same batch, its seed
            pending = self._read(batches, step, micro, raw=pending[1])[:3] + (pending[3],)
        elif self.stream is not None:
            current = torch.cuda.current_stream(self.job.device)
            current.wait_stream(self.stream)
            for value in _tensors(pending[2]):  # made on the side stream, freed after use on this one
                value.record_stream(current)
        return pending[1], pending[2], pending[3]

    def drop(self) -> None:
        self.pending = None


# The batch fields the model reads (SoCoModel.forward).
MODEL_INPUTS = ("views", "boxes", "levels", "valid")


def model_inputs(batch: dict) -> dict:
    """The fields of ``batch`` the model reads, nothing else: a compiled model's guards then see
    the same dict whatever else the data path carries (paths, render plans, skipped files), so one
    compiled graph serves every data path and the step benchmarks."""
    return {key: batch[key] for key in MODEL_INPUTS}


def _tensors(batch: dict):
    for value in batch.values():
        for item in value if isinstance(value, (list, tuple)) else (value,):
            if isinstance(item, torch.Tensor) and item.device.type == "cuda":
                yield item
