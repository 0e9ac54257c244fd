"""The pretraining loop: ``pretrain(cfg, images, proposals, run_dir)`` (paper section 4.1).

One process on a CPU or GPU, or one process per GPU under torchrun / srun (DDP, SyncBN). Per
optimiser step: ``accum`` micro-batches of ``train.per_device_batch`` images on every process
(accum = batch_size / (per_device_batch x world size), so the total batch is the paper's 2048
whatever the hardware), gradients averaged, then the lr for this step is set (warm-up + cosine,
per step), LARS (or SGD: train.optimizer) updates the online network, and the target is
EMA-updated with tau(step) (after the update; BYOL and the paper; the released code updates
before the target forward).

No host-device synchronisation inside the step on a GPU: the loss is summed on the device and
read (``.item()``) once every ``train.log_every`` steps, where the non-finite guard also looks
at it. On the CPU there is nothing to synchronise with, so the guard looks every step.

Checkpoints (rank 0, every ``train.checkpoint_every`` steps and at the end) hold everything a
resumed run needs to continue exactly: online and target weights, optimiser state, the step
(lr and tau derive from it), the epoch and how many optimiser steps of it are done (the loader
skips those samples), RNG states, the grad scaler and the config. On the CPU a run resumed from
step N gives the same weights as an uninterrupted one (tests/test_train.py).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from ..config import CONFIG_FILE, PretrainConfig, TrainConfig, to_dict
from ..engine.trainer import Hook, StepOutput, Trainer, autocast, set_lr
from ..errors import NonFiniteLossError, UserError  # noqa: F401 - NonFiniteLossError: raised by the engine for pretrain()
from .speed import Speed, apply_speed, compiled, mark_step_begin, resolve_speed

PRECISIONS = ("auto", "bf16", "fp16", "fp32")


class PretrainError(UserError):
    """A configuration or input the loop cannot train with (batch that does not divide, dataset
    smaller than one batch, unknown precision, unusable checkpoint); one line."""


@dataclass
class Plan:
    """How the config maps onto this job: derived numbers, logged at the start."""

    world_size: int
    accum: int  # micro-batches per optimiser step on each process
    micro_batches_per_epoch: int  # per process
    steps_per_epoch: int  # optimiser steps
    total_steps: int  # epochs x steps_per_epoch: the schedules' length
    warmup_steps: int
    peak_lr: float
    precision: str  # resolved: bf16 | fp16 | fp32


@dataclass
class Summary:
    """What ``pretrain`` returns."""

    run_dir: Path
    step: int  # optimiser steps done in total
    start_step: int  # where this invocation started (0, or the resumed step)
    total_steps: int
    epoch: int
    loss: float | None  # mean loss over the last logged window
    images_per_s: float  # over this invocation
    seconds: float
    checkpoint: Path | None  # the last checkpoint written (rank 0) or resumed from
    finished: bool  # the schedule's end was reached (not stopped by max_steps)
    plan: Plan


# ---------------------------------------------------------------- set-up helpers


def resolve_precision(precision: str, device: torch.device) -> str:
    """auto -> bf16 on CUDA (Ampere+ throughput, no grad scaler needed), fp32 elsewhere (our choice;
    the released code used apex O1 fp16). fp16 needs CUDA (CPU autocast is bf16 only)."""
    if precision not in PRECISIONS:
        raise PretrainError(f"train.precision={precision!r}: expected one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise PretrainError("train.precision=fp16 needs a CUDA device; use bf16 or fp32 on the CPU")
    return precision


def resolve_per_device_batch(cfg: PretrainConfig, world_size: int, device) -> tuple[PretrainConfig, str]:
    """``train.per_device_batch: 0`` (auto) -> the largest batch that fits the device (memory.py);
    returns the config with the number filled in and a note for the start-up line."""
    import dataclasses

    from .memory import auto_per_device_batch

    t = cfg.train
    if t.per_device_batch != 0:
        return cfg, ""
    device = torch.device(device)
    card_gib = None
    if device.type == "cuda":
        card_gib = torch.cuda.get_device_properties(device).total_memory / 2**30
    precision = resolve_precision(t.precision, device)
    batch = auto_per_device_batch(
        cfg.model.arch,
        cfg.data.views.soco_star,
        card_gib,
        t.batch_size,
        world_size,
        cfg.data.views.v1_size,
        precision,
        backbone=cfg.model.backbone,
    )
    where = f"a {card_gib:.0f} GiB card" if card_gib is not None else "the CPU"
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(t, per_device_batch=batch))
    return cfg, f" (per-device batch {batch}: auto for {where})"


def resolve_augment_device(cfg: PretrainConfig, device) -> PretrainConfig:
    """``data.augment.device: auto`` -> "gpu" (batched photometric augmentation on the training
    device) when training on CUDA or decoding there (``data.decode=device``: the workers hold no
    pixels), "cpu" (in the loader workers) otherwise."""
    import dataclasses

    aug = cfg.data.augment
    if aug.device != "auto":
        return cfg
    on_device = torch.device(device).type == "cuda" or cfg.data.decode == "device"
    resolved: Literal["gpu", "cpu"] = "gpu" if on_device else "cpu"
    return dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, augment=dataclasses.replace(aug, device=resolved))
    )


def make_plan(cfg: PretrainConfig, world_size: int, micro_batches_per_epoch: int, device) -> Plan:
    """Accumulation, steps per epoch, schedule lengths and the peak lr for this job."""
    from ..engine.schedule import scaled_lr

    if cfg.train.per_device_batch == 0:  # auto (the loop resolves it first; callers may not)
        cfg, _ = resolve_per_device_batch(cfg, world_size, device)
    t = cfg.train
    per_step = t.per_device_batch * world_size
    if t.per_device_batch < 1 or t.batch_size < 1 or t.batch_size % per_step:
        raise PretrainError(
            f"train.batch_size={t.batch_size} must be a multiple of train.per_device_batch "
            f"({t.per_device_batch}) x world size ({world_size}) = {per_step}; change one of them "
            f"(e.g. --set train.per_device_batch=...)"
        )
    accum = t.batch_size // per_step
    steps_per_epoch = micro_batches_per_epoch // accum  # a trailing partial step is dropped
    if steps_per_epoch < 1:
        raise PretrainError(
            f"one optimiser step needs {accum} batches of {t.per_device_batch} images per process but "
            f"an epoch has only {micro_batches_per_epoch}: lower train.batch_size or add images"
        )
    if t.epochs < 1 or t.warmup_epochs < 0 or (t.warmup_steps is not None and t.warmup_steps < 0):
        raise PretrainError(
            f"train.epochs={t.epochs} / warmup_epochs={t.warmup_epochs} / warmup_steps={t.warmup_steps}: "
            "need >= 1 / >= 0 / >= 0"
        )
    return Plan(
        world_size=world_size,
        accum=accum,
        micro_batches_per_epoch=micro_batches_per_epoch,
        steps_per_epoch=steps_per_epoch,
        total_steps=t.epochs * steps_per_epoch,
        # train.warmup_steps when set (our small-budget option), else the paper's epochs
        warmup_steps=t.warmup_epochs * steps_per_epoch if t.warmup_steps is None else t.warmup_steps,
        peak_lr=scaled_lr(t.base_lr, t.batch_size),  # paper 4.1: lr = base_lr x batch / 256
        precision=resolve_precision(t.precision, torch.device(device)),
    )


def save_config(cfg: PretrainConfig, run_dir: Path) -> Path:
    """RUN/config.yaml: the resolved config (preset + overrides), loadable with config.from_dict."""
    import yaml

    path = Path(run_dir) / CONFIG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")
    return path


def _config_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key}")
    return keys


def _prepare_batch(batch: dict, device: torch.device, channels_last: bool, augmenter, view_params, generator,
                   views_cfg):  # fmt: skip
    """Move the batch to the device; ``data.decode=device`` decodes and renders its JPEGs there
    (data/decode.py), the GPU augmentation path makes uint8 views float there."""
    from ..data.decode import has_encoded, render_batch
    from ..data.loader import augment_batch

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
        prepared = _prepare_batch(
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


# ---------------------------------------------------------------- the job, the step, the hooks


@dataclass
class Job:
    """Everything one pretraining invocation is built from (one per process)."""

    cfg: PretrainConfig
    plan: Plan
    dataset: Any
    loader: Any
    core: Any  # the SoCoModel itself: update_target, state_dict
    model: Any  # core, or its DDP wrapper
    forward: Any  # model, or its compiled forward
    optimizer: Any
    scaler: Any
    augmenter: Any  # BatchAugment on the device, or None (augmentation in the workers)
    device: torch.device
    world: int
    rank: int
    is_main: bool
    speed: Speed  # compile, cuDNN autotuning, TF32, prefetch (train/speed.py)
    batch_note: str
    drop_last: bool


def build_job(cfg: PretrainConfig, images, proposals, image_root, dist_info) -> Job:
    """Resolve the config for this device and world, then build data, model and optimiser."""
    from ..data import SoCoDataset, make_loader

    dev, world = dist_info.device, dist_info.world_size
    cfg, batch_note = resolve_per_device_batch(cfg, world, dev)
    cfg = resolve_augment_device(cfg, dev)
    t = cfg.train
    # data: per-sample randomness from (data.seed, epoch, index)
    dataset = SoCoDataset(images, proposals, cfg.data, image_root=image_root)
    # Full batches only (the paper's fixed batch), unless the dataset is smaller than one batch
    # per process (the demo's 7 photos): then one short batch per epoch.
    drop_last = len(dataset) >= t.per_device_batch * world
    loader = make_loader(dataset, t.per_device_batch, workers=t.workers, drop_last=drop_last)
    plan = make_plan(cfg, world, len(loader), dev)
    return Job(
        cfg=cfg,
        plan=plan,
        dataset=dataset,
        loader=loader,
        device=dev,
        world=world,
        rank=dist_info.rank,
        is_main=dist_info.is_main,
        batch_note=batch_note,
        drop_last=drop_last,
        **model_parts(cfg, plan, dev, world),
    )


def make_optimizer(core: torch.nn.Module, t: TrainConfig, lr: float) -> torch.optim.Optimizer:
    """``train.optimizer`` over the trainable parameters of ``core`` (frozen ones are in no group):
    LARS (the paper's) or SGD (our small-budget option: momentum ``train.momentum``, no Nesterov).
    Both give biases and normalisation parameters no weight decay (lars.decay_param_groups)."""
    from .lars import LARS, decay_param_groups, lars_param_groups

    if t.optimizer == "sgd":
        return torch.optim.SGD(
            decay_param_groups(core, t.weight_decay), lr=lr, momentum=t.momentum, weight_decay=t.weight_decay
        )
    if t.optimizer != "lars":
        raise PretrainError(f"train.optimizer={t.optimizer!r}: expected one of lars, sgd")
    return LARS(
        lars_param_groups(core, t.weight_decay), lr=lr, momentum=t.momentum, weight_decay=t.weight_decay, eta=t.lars_eta
    )


def model_parts(cfg: PretrainConfig, plan: Plan, dev: torch.device, world: int) -> dict:
    """The model (SyncBN, DDP, channels_last, compile as configured), the optimiser (LARS or SGD),
    the grad scaler and the on-device augmenter of a job: the same for training and for the step
    benchmarks."""
    from ..model import SoCoModel, convert_sync_bn

    t = cfg.train
    torch.manual_seed(t.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)
    try:
        core: Any = SoCoModel(cfg).to(dev)
    except ValueError as exc:  # e.g. an unknown model.arch / model.loss, SoCo* with C4
        raise PretrainError(str(exc)) from None
    if dev.type == "cuda" and t.channels_last:
        core = core.to(memory_format=torch.channels_last)
    core = convert_sync_bn(core)  # SyncBN only when world size > 1
    optimizer = make_optimizer(core, t, plan.peak_lr)
    model: Any = core
    if world > 1:
        # Every parameter gets a gradient every step (pool_boxes keeps FPN levels without boxes in
        # the graph), so DDP need not search for unused ones.
        model = torch.nn.parallel.DistributedDataParallel(core, device_ids=[dev.index] if dev.type == "cuda" else None)
    speed = resolve_speed(t, dev)
    apply_speed(speed)
    augmenter = None
    if cfg.data.augment.device == "gpu":
        from ..data import BatchAugment

        augmenter = BatchAugment(cfg.data.augment)
    return {
        "core": core,
        "model": model,
        "forward": compiled(model, speed.compile_mode) if speed.compile else model,
        "optimizer": optimizer,
        "scaler": torch.amp.GradScaler(dev.type, enabled=plan.precision == "fp16"),
        "augmenter": augmenter,
        "speed": speed,
    }


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
    from ..engine.schedule import scaled_lr

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


@dataclass
class Position:
    """Where the data stream is: the epoch and how many optimiser steps of it are done."""

    epoch: int = 0
    in_epoch: int = 0


def _scale_gradients(module: torch.nn.Module, factor: torch.Tensor) -> None:
    """Multiply every gradient of ``module`` by ``factor`` (a device scalar: no host sync)."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if grads:
        torch._foreach_mul_(grads, factor)


class PretrainStep:
    """One optimiser step (paper 4.1): ``accum`` micro-batches on every process, gradients summed,
    then the lr of this step (warm-up + cosine), LARS (or SGD), and the EMA update of the target
    with tau(step) after the optimiser update (BYOL and the paper; the released code updates
    before the target forward). No host-device sync of ours: the loss stays on the device.

    The loss is the mean over the loss units (valid proposals; images for ``model.loss=released``;
    model/loss.py) of the *global* batch, every micro-batch of every process, whatever the split
    (tests/test_loss_split.py). A micro-batch's units are known only once it is loaded, so rather
    than holding all ``accum`` micro-batches first, each one backpropagates its loss *sum* divided
    by a fixed nominal count (``accum`` fully valid micro-batches: the magnitude of a mean, for
    fp16's range; the same on every process), and after the last one the units of the step are
    summed over micro-batches and processes (one all-reduce of a scalar) and the gradients, which
    DDP has averaged over the W processes, are multiplied by W x nominal / global count. With
    every slot valid (``data.views.pad=repeat``; ``released`` with full batches) that factor is
    exactly 1: the previous step (loss / accum per micro-batch, DDP's mean over processes). The
    logged loss is each process's sum x W / global count, which the metrics average over the
    processes: the global mean.

    A step the fp16 grad scaler skips (inf/NaN gradients: ``GradScaler.step`` does not call
    ``optimizer.step``, deciding on the host, a sync the scaler makes anyway) leaves the target
    as it is: a post-step hook on the optimiser (``Optimizer.register_step_post_hook``, run only
    when ``optimizer.step`` runs; LARS and the unfused SGD do not take the scaler's fused path,
    where it always would) tells the step whether the online network moved, with no device read
    of ours. The lr and tau schedules still advance: they are functions of the trainer's step
    counter, which also counts the batches consumed and is what checkpoints and a resume restore;
    not advancing them would need a second, device-side counter read on the host every step. A
    skip loses one step of the schedule, as in torch's AMP recipe (``scheduler.step()`` after a
    skipped step).
    """

    def __init__(self, job: Job, position: Position, skipped):
        self.job, self.position, self.skipped = job, position, skipped
        self.batches: Any = None
        stream = torch.cuda.Stream(job.device) if job.speed.prefetch and job.device.type == "cuda" else None
        self.feed = BatchFeed(job, lookahead=job.speed.prefetch, stream=stream)
        self.stepped = False  # the optimiser ran in this step (False: skipped by the grad scaler)
        job.optimizer.register_step_post_hook(self._mark_stepped)

    def _mark_stepped(self, optimizer, args, kwargs) -> None:
        self.stepped = True

    def __call__(self, step: int) -> StepOutput:
        from ..data import set_epoch
        from ..engine.distributed import all_reduce_sum
        from ..engine.schedule import lr_at, tau_at
        from ..model.loss import full_count

        job, pos, plan, t = self.job, self.position, self.job.plan, self.job.cfg.train
        if pos.in_epoch >= plan.steps_per_epoch:  # the epoch is complete: next one
            pos.epoch, pos.in_epoch = pos.epoch + 1, 0
        if self.batches is None:  # a resumed run skips the batches of this epoch it has done
            set_epoch(job.loader, pos.epoch, skip_batches=pos.in_epoch * plan.accum)
            self.batches = iter(job.loader)
        images, wait = 0, 0.0
        nominal = plan.accum * full_count(job.cfg.model.loss, t.per_device_batch, job.cfg.data.views.num_proposals)
        loss_sum = torch.zeros((), device=job.device)  # this process's loss sum over the step
        count = torch.zeros((), device=job.device)  # and its loss units
        for micro in range(plan.accum):
            raw, batch, waited = self.feed.take(self.batches, step, micro)
            wait += waited
            self.skipped.update(batch)  # undecodable files and those served whole (the dataset warned already)
            images += len(raw["index"]) * job.world  # every rank's batch is as long
            last_micro = micro == plan.accum - 1
            sync = job.model.no_sync() if job.world > 1 and not last_micro else contextlib.nullcontext()
            with sync:
                mark_step_begin(job.speed)
                with autocast(job.device, plan.precision):
                    loss, stats = job.forward(model_inputs(batch), reduction="sum")
                job.scaler.scale(loss / nominal).backward()
            # The next micro-batch of this epoch, read and prepared while the device runs this one.
            if not last_micro:
                self.feed.prefetch(self.batches, step, micro + 1)
            elif pos.in_epoch + 1 < plan.steps_per_epoch:
                self.feed.prefetch(self.batches, step + 1, 0)
            # New tensors, not the forward's outputs (a CUDA-graph replay reuses those).
            loss_sum = loss_sum + loss.detach().float()
            count = count + stats["count"]
        count = all_reduce_sum(count).clamp(min=1)  # the loss units of the global batch
        _scale_gradients(job.core, (job.world * nominal) / count)
        lr = lr_at(step, plan.total_steps, plan.warmup_steps, plan.peak_lr, t.warmup_start_factor, t.final_lr)
        set_lr(job.optimizer, lr)
        self.stepped = False
        job.scaler.step(job.optimizer)
        job.scaler.update()
        job.optimizer.zero_grad(set_to_none=True)
        tau = tau_at(step, plan.total_steps, t.ema_tau, t.ema_schedule)
        if self.stepped:  # not a step the grad scaler skipped: the online network moved
            job.core.update_target(tau)
        pos.in_epoch += 1
        if pos.in_epoch >= plan.steps_per_epoch:
            self.close()
        terms = [loss_sum * (job.world / count)]  # averaged over processes by the metrics: the global mean
        return StepOutput(loss=terms, images=images, data_wait=wait, scalars={"lr": lr, "tau": tau})

    def close(self) -> None:
        self.batches = None  # stops the workers' prefetch of an unfinished epoch
        self.feed.drop()


class MonitorHook(Hook):
    """The object-kNN monitor (rank 0, between steps): at step 0 (the curve's starting point),
    every ``monitor.every`` steps and at the last; results join the step's metrics record."""

    def __init__(self, monitor, core):
        self.monitor, self.core = monitor, core

    def _measure(self, trainer) -> dict:
        from ..evaluate.knn import describe

        with trainer.side_work():  # not training time
            result = self.monitor(self.core)
        trainer.metrics.bar.write(f"step {trainer.step}: {describe(result)}")
        return result

    def before_train(self, trainer) -> None:
        if trainer.step == 0 and trainer.stop_step > 0:
            trainer.metrics.logger.log(0, **self._measure(trainer))

    def after_step(self, trainer) -> None:
        if self.monitor.due(trainer.step) or trainer.is_last:
            trainer.record.update(self._measure(trainer))


# Settings a resumed run may change freely: how it runs and reports, not what it trains. Any
# other difference from the checkpoint's config (model, data, schedule) needs accept_changes.
RESUME_FREE = ("version", "train.log_every", "train.checkpoint_every", "train.keep_checkpoints", "train.workers",
               "train.dist_timeout_s",
               "train.compile", "train.per_device_batch", "train.channels_last", "train.precision",
               "train.cudnn_benchmark", "train.tf32", "train.prefetch", "data.augment.device", "data.decode",
               "model.roi_pool", "monitor.")  # fmt: skip

# Keys added after checkpoints were first written, with the value a checkpoint without the key
# trained with: such a checkpoint is compared as if it held it (an older run resumes as before).
ADDED_KEYS: dict[str, Any] = {"train.optimizer": "lars", "train.ema_schedule": "cosine", "train.warmup_steps": None}


def _with_added_keys(config: dict) -> dict:
    """``config`` (a checkpoint's) with the ADDED_KEYS it lacks set to the value it trained with."""
    import copy

    config = copy.deepcopy(config)
    for dotted, value in ADDED_KEYS.items():
        section, name = dotted.split(".")
        if isinstance(config.get(section), dict):
            config[section].setdefault(name, value)
    return config


def keep_recorded_init(job: Job, saved: dict, run_dir: Path) -> None:
    """On resume ``model.init`` is compared by content, not by path: a resume never reads the file
    (the checkpoint holds the weights), so a warm-started run whose init file moved resumes without
    ``--init`` or with it at another path holding the same bytes; the recorded init (and
    ``init_partial``) is kept in the config. An ``--init`` whose sha256 differs from the recorded
    one (RUN/init_report.json) is refused naming both, even at the recorded path and even with
    --accept-changes: the config would name weights the run did not start from."""
    from dataclasses import replace

    from ..transfer.warm_start import InitError, init_sha256, recorded_init_sha256

    model = saved.get("model", {})
    recorded, given = model.get("init"), job.cfg.model.init
    if not recorded:
        return  # a run from scratch: a new --init is a changed setting like any other
    if given:
        sha = recorded_init_sha256(run_dir)
        if sha is None:  # no report to compare with: the paths are compared as any other setting
            return
        why = f"this run started from {recorded} (sha256 {sha[:12]}); resume without --init (the checkpoint holds it)"
        try:
            digest = init_sha256(given)
        except InitError as exc:
            raise InitError(f"{exc}; {why}") from None
        if digest != sha:
            raise InitError(f"--init {given} (sha256 {digest[:12]}) is not the file {why}")
        if given != recorded and job.is_main:
            print(f"note: the init {recorded} was found at another path, {given} (same sha256 {sha[:12]})", flush=True)
    job.cfg = replace(
        job.cfg, model=replace(job.cfg.model, init=recorded, init_partial=model.get("init_partial", False))
    )


def resume_job(job: Job, manager, resume, position: Position, accept_changes: bool = False) -> tuple[int, Path | None]:
    """Load the checkpoint ``resume`` names (if any) into the job; returns (step, its path).

    A checkpoint made with other training settings (anything outside RESUME_FREE) is refused in
    one line naming them, unless ``accept_changes``; another world size is allowed (the total
    batch is kept by accumulation) and said in one line."""
    from ..engine.checkpoint import load_checkpoint, set_rng_state
    from ..runfolder import RunFolderError

    path = manager.resume_from(resume)
    if path is None:
        return 0, None
    state = load_checkpoint(path, map_location=job.device)
    if not isinstance(state, dict) or not {"model", "optimizer", "step", "config"} <= set(state):
        raise PretrainError(f"{path}: not a soco pretrain checkpoint (a fine-tune checkpoint or an export?)")
    # A checkpoint written before the config had a version holds version 1's keys without it.
    saved = _with_added_keys({"version": 1, **state.get("config", {})})
    run_of_checkpoint = path.parent.parent if path.parent.name == "checkpoints" else manager.directory.parent
    keep_recorded_init(job, saved, run_of_checkpoint)
    differs = _config_differences(saved, to_dict(job.cfg))
    changed = [key for key in differs if not key.startswith(RESUME_FREE)]
    if changed and not accept_changes:
        raise RunFolderError(
            f"{path}: made with other settings ({', '.join(changed[:6])}{' ...' if len(changed) > 6 else ''}); "
            "resume with the run's own (RUN/config.yaml), give another --out, or add --accept-changes"
        )
    job.core.load_state_dict(state["model"])
    saved_optimizer = saved.get("train", {}).get("optimizer", "lars")
    if saved_optimizer == job.cfg.train.optimizer:
        job.optimizer.load_state_dict(state["optimizer"])
    # else: an accepted change of train.optimizer; the other optimiser's state does not fit this one
    job.scaler.load_state_dict(state["scaler"])
    step, position.epoch, position.in_epoch = int(state["step"]), int(state["epoch"]), int(state["batch_in_epoch"])
    set_rng_state(state["rng"])
    if job.is_main:
        print(
            f"resumed from {path} at step {step} (epoch {position.epoch}, {position.in_epoch}/"
            f"{job.plan.steps_per_epoch} steps into it)",
            flush=True,
        )
        if differs:
            print(f"note: the config differs from the checkpoint's in {', '.join(differs)}", flush=True)
        if saved_optimizer != job.cfg.train.optimizer:
            print(
                f"note: train.optimizer was {saved_optimizer}, now {job.cfg.train.optimizer}: its state "
                "(momentum) starts afresh",
                flush=True,
            )
        saved_world = state.get("world_size")
        if saved_world not in (None, job.world):
            print(
                f"note: resumed on {job.world} process(es), the checkpoint ran on {saved_world}: the total batch "
                "is kept; the rest of this epoch's order is dealt anew over the processes",
                flush=True,
            )
    return step, path


def warm_start(job: Job, init, run_dir: Path) -> None:
    """Load the checked init weights into both networks (every rank; DDP broadcast its initial
    weights already); rank 0 prints the key report and saves it as RUN/init_report.json."""
    from ..files import atomic_write_json
    from ..transfer.warm_start import REPORT_FILE, apply_init

    apply_init(job.core, init)
    if job.is_main:
        print(init.format(), flush=True)
        atomic_write_json(Path(run_dir) / REPORT_FILE, init.to_json())


def announce(job: Job, run_dir: Path, progress: bool, stop: int) -> None:
    """Rank 0: RUN/config.yaml, the data manifest (the leak guard's input; reused on resume) and
    the start-up line with the derived numbers."""
    from ..data.manifest import record_run_manifest

    cfg, plan, t = job.cfg, job.plan, job.cfg.train
    speed = f", {job.speed.describe()}" if job.speed.describe() else ""
    save_config(cfg, run_dir)
    seen = job.dataset.images
    record_run_manifest(run_dir, [seen.abspath(i) for i in range(len(seen))], seen.root, progress)
    print(
        f"pretraining {cfg.model.arch}{'*' if cfg.data.views.soco_star else ''} on {len(job.dataset)} "
        f"images: batch {t.batch_size} = {t.per_device_batch} x {job.world} process(es) x {plan.accum} "
        f"accumulation, {plan.steps_per_epoch} steps/epoch, {plan.total_steps} steps ({t.epochs} epochs), "
        f"{t.optimizer} lr {plan.peak_lr:g} after {plan.warmup_steps} warm-up steps, tau {t.ema_tau:g} "
        f"{'constant' if t.ema_schedule == 'constant' else '-> 1'}, {plan.precision} on {job.device}{speed}"
        f"{job.batch_note}",
        flush=True,
    )
    if stop < plan.total_steps:
        print(
            f"stopping after step {stop} (max_steps): the progress bar counts to it, the lr and tau "
            f"schedules keep their {plan.total_steps} steps so a rerun without it continues",
            flush=True,
        )
    if not job.drop_last:
        print(
            f"note: {len(job.dataset)} images are fewer than one batch per process: one batch of "
            f"{math.ceil(len(job.dataset) / job.world)} per process and epoch",
            flush=True,
        )


def make_trainer(
    job: Job, run_dir: Path, start: int, stop: int, position: Position, skipped, resumed_from, progress: bool
) -> Trainer:
    """The engine set up for pretraining: the step, metrics every ``log_every`` steps (guard
    every step on a CPU), checkpoints every ``checkpoint_every`` steps and at the end, the monitor."""
    from ..engine.checkpoint import Checkpointer, CheckpointManager, rng_state
    from ..engine.distributed import all_reduce_mean, barrier
    from ..engine.metrics import Metrics

    t, dev = job.cfg.train, job.device
    step_fn = PretrainStep(job, position, skipped)

    def state() -> dict:
        return {
            "model": job.core.state_dict(),
            "optimizer": job.optimizer.state_dict(),
            "step": trainer.step,
            "epoch": position.epoch,
            "batch_in_epoch": position.in_epoch,
            "rng": rng_state(),
            "scaler": job.scaler.state_dict(),
            "config": to_dict(job.cfg),
            "world_size": job.world,
            "total_steps": job.plan.total_steps,  # so an export can say "stopped at step N of M"
        }

    hooks: list[Hook] = []  # built before the metrics file and bar: a bad monitor setting fails first
    if job.is_main and job.cfg.monitor.json:
        from ..evaluate.knn import ObjectMonitor

        monitor = ObjectMonitor(job.cfg, dev)
        print(
            f"monitor: object kNN every {monitor.every} steps on {job.cfg.monitor.json} "
            f"({monitor.train.num_objects} neighbour / {monitor.val.num_objects} query objects)",
            flush=True,
        )
        hooks.append(MonitorHook(monitor, job.core))
    metrics = Metrics(
        run_dir,
        total_steps=stop,  # the bar and its ETA end where this invocation stops
        initial=start,
        enabled=job.is_main,
        progress=progress,
        desc="pretrain",
        log_due=lambda tr: tr.every(t.log_every) or tr.is_last,
        check_every=1 if dev.type == "cpu" else t.log_every,
        reduce=all_reduce_mean,
        base=lambda tr: {"epoch": position.epoch},
        record=lambda tr, w: {
            "loss": w.loss,
            "lr": tr.output.scalars["lr"],
            "tau": tr.output.scalars["tau"],
            "images_per_s": round(w.images_per_s, 3),
            "data_wait": round(w.data_wait, 4),
        },
        where=lambda tr: f"by step {tr.step} (epoch {position.epoch})",
        hint="Try a lower train.base_lr or train.precision=fp32.",
    )
    checkpointer = Checkpointer(
        CheckpointManager(run_dir, keep=t.keep_checkpoints),
        state,
        due=lambda tr: tr.every(t.checkpoint_every) or tr.is_last,
        is_main=job.is_main,
        barrier=barrier,
    )
    trainer = Trainer(step_fn, start, stop, hooks, metrics=metrics, checkpointer=checkpointer)
    trainer.last_checkpoint = resumed_from
    return trainer


def _summarise(
    job: Job, run_dir: Path, trainer: Trainer, start: int, position: Position, skipped, seconds: float
) -> Summary:
    """Rank 0 prints the skipped files and where the run stopped; every rank returns the Summary."""
    if job.is_main:
        if len(skipped):
            print(skipped.summary(), flush=True)
        elif skipped.rerouted:  # images trained on the whole image for their size: one line
            print(skipped.rerouted_line(), flush=True)
        print(
            f"stopped at step {trainer.step}/{job.plan.total_steps} (epoch {position.epoch}); last "
            f"checkpoint: {trainer.last_checkpoint}",
            flush=True,
        )
    return Summary(
        run_dir=run_dir,
        step=trainer.step,
        start_step=start,
        total_steps=job.plan.total_steps,
        epoch=position.epoch,
        loss=trainer.metrics.last_logged,
        images_per_s=trainer.metrics.images_seen() / max(seconds, 1e-9),
        seconds=seconds,
        checkpoint=trainer.last_checkpoint,
        finished=trainer.step >= job.plan.total_steps,
        plan=job.plan,
    )


# ---------------------------------------------------------------- the entry point


def pretrain(
    cfg: PretrainConfig,
    images,
    proposals,
    run_dir,
    max_steps: int | None = None,
    resume: str | Path | None = "auto",
    image_root=None,
    progress: bool = True,
    device: str | None = None,
    overwrite: bool = False,
    accept_changes: bool = False,
) -> Summary:
    """Pretrain SoCo on ``images`` with their ``proposals`` store into ``run_dir``.

    ``proposals`` may be None when ``cfg.data.views.proposal_source`` is whole_image, random or
    coco (the ablation sources need no store; the dataset says so in one line otherwise).

    ``max_steps``: stop after this many optimiser steps in total (counting resumed ones; the
    schedules keep their full length, so a later run can continue). ``resume``: "auto" (the
    run's latest checkpoint if any), "none" (start at step 0) or a checkpoint path.
    ``device``: "cpu" or "cuda" to force one (default CUDA when available). Launch under torchrun
    or srun for several processes. The run folder is locked for the run (runfolder.locked);
    ``overwrite`` lets ``resume="none"`` move an earlier run aside, ``accept_changes`` lets a
    resume continue with other settings than the checkpoint's. Raises PretrainError (bad config),
    RunFolderError, NonFiniteLossError.
    """
    from ..engine.distributed import cleanup, init_distributed, stop_on_lost_ranks
    from ..runfolder import locked, start_fresh

    run_dir = Path(run_dir)
    if max_steps is not None and max_steps < 0:
        raise PretrainError(f"max_steps must be >= 0, got {max_steps}")
    init = prepare_warm_start(cfg, run_dir, resume)  # a bad --init file fails before anything is written
    timeout = cfg.train.dist_timeout_s
    dist_info = init_distributed(device, timeout_s=timeout)
    then = f"; rerun the same command to resume from the last checkpoint in {run_dir / 'checkpoints'}"
    try:
        with locked(run_dir, "pretrain", enabled=dist_info.is_main), stop_on_lost_ranks(dist_info, timeout, then):
            if resume in (None, "none") and dist_info.is_main:
                start_fresh(run_dir, overwrite, "pretrain")
            return _pretrain(cfg, images, proposals, run_dir, max_steps, resume, image_root, progress, dist_info,
                             accept_changes, init)  # fmt: skip
    finally:
        cleanup()


def prepare_warm_start(cfg: PretrainConfig, run_dir: Path, resume):
    """The checked ``model.init`` file of a run that starts at step 0 (transfer/warm_start.py), or
    None (no init, or a run that resumes and takes its weights from the checkpoint). A frozen part
    needs an init that fills it: freezing random weights is refused."""
    from ..engine.checkpoint import CheckpointManager
    from ..transfer.warm_start import prepare_init

    m, t = cfg.model, cfg.train
    if not m.init and t.freeze == "none":
        return None
    fresh = resume in (None, "none") or (resume == "auto" and CheckpointManager(run_dir).latest() is None)
    if not fresh:  # the checkpoint holds the weights; resume_job compares the init by its sha256
        return None
    if not m.init:
        raise PretrainError(
            f"train.freeze={t.freeze} would keep random weights fixed: give --init FILE (e.g. a supervised "
            "torchvision ResNet state dict) or --set train.freeze=none"
        )
    return prepare_init(m.init, m, t.freeze)


def _pretrain(cfg, images, proposals, run_dir: Path, max_steps, resume, image_root, progress, dist_info,
              accept_changes: bool, init=None) -> Summary:  # fmt: skip
    """pretrain() inside its process group and run-folder lock."""
    from ..engine.checkpoint import CheckpointManager
    from ..engine.skips import SkipLog

    job = build_job(cfg, images, proposals, image_root, dist_info)
    position, skipped = Position(), SkipLog()
    manager = CheckpointManager(run_dir, keep=job.cfg.train.keep_checkpoints)
    start, resumed_from = resume_job(job, manager, resume, position, accept_changes)
    if init is not None and resumed_from is None:
        warm_start(job, init, run_dir)
    stop = job.plan.total_steps if max_steps is None else min(job.plan.total_steps, max_steps)
    if job.is_main:
        announce(job, run_dir, progress, stop)
    trainer = make_trainer(job, run_dir, start, stop, position, skipped, resumed_from, progress)
    wall = time.perf_counter()
    job.model.train()
    trainer.run()
    return _summarise(job, run_dir, trainer, start, position, skipped, time.perf_counter() - wall)
