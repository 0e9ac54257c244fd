"""A pretraining job whose data is one prepared batch repeated: what the step benchmarks
(benchmarks/train_step.py, benchmarks/gpu.py) and the step-level tests time and check -- the
real ``PretrainStep``, model, optimiser, precision and compile settings, without the data
pipeline."""

from __future__ import annotations

import torch

from ..config import PretrainConfig
from ..engine.schedule import scaled_lr
from .loop import Job, Plan, model_parts, resolve_augment_device, resolve_per_device_batch, resolve_precision


class _RepeatedBatch:
    """An endless loader of one prepared batch (no sampler or dataset epochs to set)."""

    sampler = dataset = None

    def __init__(self, batch: dict):
        self.batch = batch

    def __iter__(self):
        while True:
            yield self.batch

    def __len__(self) -> int:
        return 1 << 40


def job_for_batch(cfg: PretrainConfig, batch: dict, device, total_steps: int = 1 << 30) -> Job:
    """A one-process job whose data is ``batch`` (a collated SoCo batch) repeated: what the step
    benchmarks time -- the real step, model, optimiser, precision and compile settings of ``cfg``,
    without the data pipeline. ``cfg.train.per_device_batch`` must be the batch's size. The lr
    starts at its peak unless ``train.warmup_steps`` is set (an epoch has no length here)."""
    dev = torch.device(device)
    cfg, _ = resolve_per_device_batch(cfg, 1, dev)
    cfg = resolve_augment_device(cfg, dev)
    t = cfg.train
    plan = Plan(
        world_size=1,
        accum=1,
        micro_batches_per_epoch=1 << 40,
        steps_per_epoch=1 << 40,
        total_steps=total_steps,
        warmup_steps=t.warmup_steps or 0,  # no epochs here: only a warm-up set in steps applies
        peak_lr=scaled_lr(t.base_lr, t.per_device_batch),
        precision=resolve_precision(t.precision, dev),
    )
    return Job(
        cfg=cfg,
        plan=plan,
        dataset=None,
        loader=_RepeatedBatch(batch),
        device=dev,
        world=1,
        rank=0,
        is_main=True,
        batch_note="",
        drop_last=True,
        **model_parts(cfg, plan, dev, 1),
    )
