"""The training step never reads the device on the host, and prefetching changes no result.

On a GPU a host read (``.item()``, ``.tolist()``, ``bool(t)``, boolean-mask indexing, ``nonzero``,
a copy to the CPU) stalls the launch queue until the device catches up; benchmarks/gpu.py checks
one step under ``torch.cuda.set_sync_debug_mode("error")``. Here, on a CPU, every such call made
inside ``soco pretrain``'s step (``PretrainStep`` on ``fixed_batch.job_for_batch``: batch preparation with the
on-device augmentation, forward with masked BatchNorm on padded slots, loss, backward, LARS, EMA)
is counted with a ``TorchFunctionMode``, which sees every tensor method and torch function call.
"""

from __future__ import annotations

import dataclasses
import traceback

import pytest
import torch
from data_fixtures import small_pretrain_config
from torch.overrides import TorchFunctionMode

from soco_pretrain.data.synthetic import synthetic_batch
from soco_pretrain.engine.skips import SkipLog
from soco_pretrain.train.feed import BatchFeed
from soco_pretrain.train.fixed_batch import job_for_batch
from soco_pretrain.train.loop import Position, PretrainStep

pytestmark = pytest.mark.usefixtures("one_thread")

# Calls that make the host wait for the device (on CUDA tensors).
HOST_READS = {
    "item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__", "nonzero",
    "argwhere", "masked_select", "unique", "unique_consecutive", "bincount",
}  # fmt: skip


class HostReads(TorchFunctionMode):
    """Records (function, where in soco_pretrain) for every host-reading call while active."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, str]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        reads = name in HOST_READS
        if name == "__getitem__" and len(args) > 1:  # x[mask]: the result's size needs the mask's count
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            reads = any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index)
        if reads:
            ours = [f for f in traceback.extract_stack() if "soco_pretrain" in f.filename]
            self.calls.append((name, f"{ours[-1].filename}:{ours[-1].lineno}" if ours else "outside soco_pretrain"))
        return func(*args, **kwargs)


class _Batches:
    """A loader of a few distinct batches, restarted every epoch (what set_epoch does)."""

    sampler = dataset = None

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches * 1000)

    def __len__(self) -> int:
        return len(self.batches) * 1000


def _job(prefetch: bool, accum: int = 1, *extra: str):
    cfg = small_pretrain_config(
        "model.backbone=resnet18", "model.head_dim=128", "model.proj_hidden=256", "data.augment.device=gpu",
        "train.warmup_epochs=0",
        f"train.batch_size={2 * accum}", "train.per_device_batch=2", *extra,
    )  # fmt: skip
    # as the loader gives them for the on-device augmentation: uint8 views; one padded slot per image
    batches = [synthetic_batch(cfg.data.views, 2, k=3, seed=seed, uint8=True, padded=1) for seed in range(3)]
    job = job_for_batch(cfg, batches[0], "cpu", total_steps=20)
    job.loader = _Batches(batches)
    job.plan = dataclasses.replace(job.plan, accum=accum, steps_per_epoch=2)  # crosses epochs
    job.speed = dataclasses.replace(job.speed, prefetch=prefetch)  # on a CPU: prepared early, no stream
    job.model.train()
    return job


@pytest.mark.parametrize("extra", [(), ("train.optimizer=sgd", "train.ema_schedule=constant")], ids=["lars", "sgd"])
def test_the_step_never_reads_the_device(extra):
    job = _job(True, 1, *extra)
    assert job.augmenter is not None  # the on-device augmentation is part of the counted path
    step = PretrainStep(job, Position(), SkipLog())
    step(0)  # first step: optimiser state is created
    counter = HostReads()
    with counter:
        out = step(1)
    assert counter.calls == []
    # and the counter does see such calls: the metrics' read of the loss, outside the step
    with counter:
        float(out.loss[0])
    assert counter.calls and counter.calls[0][0] == "__float__"


def test_a_prefetched_batch_asked_for_another_slot_is_the_same_batch_with_that_slots_seed():
    job = _job(prefetch=True)
    feed, plain = BatchFeed(job, lookahead=True), BatchFeed(job, lookahead=False)
    batches = iter(job.loader)
    feed.prefetch(batches, 7, 0)
    raw, prepared, _ = feed.take(batches, 8, 0)
    raw_ref, prepared_ref, _ = plain.take(iter(job.loader), 8, 0)
    assert raw is raw_ref  # no batch skipped
    assert all(torch.equal(a, b) for a, b in zip(prepared["views"], prepared_ref["views"]))  # slot (8, 0)'s seed
    _, other, _ = plain.take(iter(job.loader), 7, 0)
    assert not torch.equal(other["views"][1], prepared["views"][1])


def test_prefetching_the_next_batch_changes_nothing():
    # accumulation 2 and epochs of 2 steps: prefetches within a step, across steps and none
    # across the epoch's end; each batch keeps its augmentation seed
    results = []
    for prefetch in (False, True):
        job = _job(prefetch=prefetch, accum=2)
        initial = job.core.state_dict()["encoder.box_head.5.weight"].clone()
        step = PretrainStep(job, Position(), SkipLog())
        for i in range(3):
            step(i)
            if prefetch and i == 0:
                assert step.feed.pending is not None and step.feed.pending[0] == (1, 0)
        results.append({k: v.clone() for k, v in job.core.state_dict().items()})
    plain, prefetched = results
    assert all(torch.equal(plain[k], prefetched[k]) for k in plain)
    assert not torch.equal(initial, plain["encoder.box_head.5.weight"])  # and they trained
