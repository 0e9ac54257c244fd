"""The pretraining loss and its gradient do not depend on how the global batch is split.

One optimiser step (``PretrainStep``) on the same 4 images with uneven numbers of valid proposals
(``data.views.pad=mask``): one micro-batch of 4, 4 accumulated micro-batches of 1, and 2 gloo
processes x 2 accumulated micro-batches of 1. The loss is the mean over the valid proposals of the
whole batch (model/loss.py), so the logged loss, the gradients and the updated weights agree.

BatchNorm runs in eval mode (running statistics) here: in training mode its batch statistics
depend on the split (per micro-batch, or synchronised over processes), which no normalisation of
the loss can undo; with it off, every image's contribution is computed on its own.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from data_fixtures import make_photos, small_pretrain_config
from torch import nn

pytestmark = pytest.mark.usefixtures("one_thread")

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS")
# ResNet-18: the split does not depend on the backbone, and R18 halves the steps' time.
EXTRA = (
    "data.views.pad=mask",
    "train.batch_size=4",
    "train.warmup_epochs=0",
    "train.epochs=2",
    "model.backbone=resnet18",
)


def _uneven_store(out, image_dir, rel, counts):
    from test_train import _uneven_store as make

    return make(out, image_dir, rel, counts)


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    """4 photos with 1, 3, 1 and 1 stored proposals: with K = 2, 1, 2, 1 and 1 valid slots. 5 in all:
    however the batch is split in two, the halves hold 2 and 3, so a loss normalised by a
    process's own count instead of the global one gives another step."""
    root = tmp_path_factory.mktemp("split_data")
    rel = make_photos(root / "images", ("astronaut", "coffee", "chelsea", "rocket"), side=96)
    store = _uneven_store(root / "store", root / "images", rel, [1, 3, 1, 1])
    return root / "images", store


def one_step(cfg, images, store) -> dict:
    """One ``PretrainStep`` in this process (world from the launcher's variables), BatchNorm in
    eval mode: the logged loss (averaged over processes, as the metrics do), the gradients LARS
    receives, the online weights after the step and the valid proposals per micro-batch."""
    from soco_pretrain.engine.distributed import all_reduce_mean, cleanup, init_distributed
    from soco_pretrain.engine.skips import SkipLog
    from soco_pretrain.train.loop import Position, PretrainStep, build_job

    info = init_distributed(device="cpu")
    try:
        job = build_job(cfg, images, store, None, info)
        job.model.train()
        for module in job.core.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        grads: dict = {}

        def snapshot(optimizer, args, kwargs):
            grads.update({n: p.grad.clone() for n, p in job.core.named_parameters() if p.grad is not None})

        job.optimizer.register_step_pre_hook(snapshot)
        out = PretrainStep(job, Position(), SkipLog())(0)
        loss = all_reduce_mean(sum(out.loss))
        weights = {n: p.detach().clone() for n, p in job.core.named_parameters() if p.requires_grad}
        return {"loss": loss.item(), "grads": grads, "weights": weights, "plan": (job.world, job.plan.accum)}
    finally:
        cleanup()


def _worker(rank: int, world: int, port: int, cfg, images, store, out_dir) -> None:
    torch.set_num_threads(1)
    os.environ.update(
        {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1"}
    )
    os.environ["MASTER_PORT"] = str(port)
    result = one_step(cfg, images, store)
    if rank == 0:
        torch.save(result, os.path.join(out_dir, "rank0.pt"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _assert_same(a: dict, b: dict) -> None:
    """Same loss, gradients and updated weights. The gradient at initialisation is a small
    difference of large terms, so float32 rounding (other summation orders) moves each tensor's
    by up to ~0.1 % of its norm; weighting images differently (the per-micro-batch mean this
    replaces) moves them by percents and the loss by ~0.3 %."""
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6)
    assert a["grads"].keys() == b["grads"].keys() and a["grads"]
    for key, g in a["grads"].items():
        assert (b["grads"][key] - g).norm() <= 5e-3 * g.norm() + 1e-9, key
    for key, w in a["weights"].items():
        torch.testing.assert_close(b["weights"][key], w, rtol=1e-4, atol=1e-5, msg=key)


@pytest.fixture(scope="module")
def one_batch_of_four(uneven):
    return one_step(small_pretrain_config(*EXTRA, "train.per_device_batch=4"), *uneven)


def test_accumulation_matches_one_micro_batch_with_masked_padding(uneven, one_batch_of_four, monkeypatch):
    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    accumulated = one_step(small_pretrain_config(*EXTRA, "train.per_device_batch=1"), *uneven)
    assert one_batch_of_four["plan"] == (1, 1) and accumulated["plan"] == (1, 4)
    _assert_same(one_batch_of_four, accumulated)


# In the default run: the one check that DDP over processes (gloo on 127.0.0.1) gives the step of one
# process. Its cost is the 2 spawned interpreters importing torch/torchvision, then one R18 step each.
def test_two_processes_with_accumulation_match_one_micro_batch(uneven, one_batch_of_four, tmp_path):
    cfg = small_pretrain_config(*EXTRA, "train.per_device_batch=1")
    mp.start_processes(
        _worker,
        args=(2, _free_port(), cfg, *map(str, uneven), str(tmp_path)),
        nprocs=2,
        join=True,
        start_method="spawn",
    )
    ddp = torch.load(tmp_path / "rank0.pt", weights_only=False)
    assert ddp["plan"] == (2, 2)
    _assert_same(one_batch_of_four, ddp)
