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
import copy
import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
import yaml

from ..config import CONFIG_FILE, PretrainConfig, TrainConfig, resume_free_keys, to_dict
from ..data import BatchAugment, SoCoDataset, make_loader, set_epoch
from ..data.manifest import record_run_manifest
from ..engine.distributed import all_reduce_sum
from ..engine.run import run
from ..engine.schedule import lr_at, scaled_lr, tau_at
from ..engine.skips import SkipLog
from ..engine.trainer import Hook, StepOutput, Trainer, autocast, set_lr
from ..errors import NonFiniteLossError, UserError  # noqa: F401 - NonFiniteLossError: raised by the engine for pretrain()
from ..files import atomic_write_json
from ..model import SoCoModel, convert_sync_bn
from ..model.loss import full_count
from ..transfer.warm_start import REPORT_FILE, InitError, apply_init, init_sha256, prepare_init, recorded_init_sha256
from .feed import BatchFeed, model_inputs
from .lars import LARS, decay_param_groups, lars_param_groups
from .memory import auto_per_device_batch
from .speed import Speed, apply_speed, compiled, mark_step_begin, resolve_speed

PRECISIONS = ("auto", "bf16", "fp16", "fp32")


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
        raise UserError(f"train.precision={precision!r}: expected one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise UserError("train.precision=fp16 needs a CUDA device; use bf16 or fp32 on the CPU")
    return precision


def resolve_per_device_batch(cfg: PretrainConfig, world_size: int, device) -> tuple[PretrainConfig, str]:
    """``train.per_device_batch: 0`` (auto) -> the largest batch that fits the device (memory.py);
    returns the config with the number filled in and a note for the start-up line."""

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
    aug = cfg.data.augment
    if aug.device != "auto":
        return cfg
    on_device = torch.device(device).type == "cuda" or cfg.data.decode == "device"
    resolved: Literal["gpu", "cpu"] = "gpu" if on_device else "cpu"
    return dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, augment=dataclasses.replace(aug, device=resolved))
    )


def full_batches_only(images: int, per_device_batch: int, world: int) -> bool:
    """Whether the loader drops a trailing partial batch: full batches only (the paper's fixed
    batch), unless the images are fewer than one batch per process (the demo's 7 photos): then one
    short batch per epoch."""
    return images >= per_device_batch * world


def make_plan(cfg: PretrainConfig, world_size: int, micro_batches_per_epoch: int, device) -> Plan:
    """Accumulation, steps per epoch, schedule lengths and the peak lr for this job."""
    if cfg.train.per_device_batch == 0:  # auto (the loop resolves it first; callers may not)
        cfg, _ = resolve_per_device_batch(cfg, world_size, device)
    t = cfg.train
    per_step = t.per_device_batch * world_size
    if t.per_device_batch < 1 or t.batch_size < 1 or t.batch_size % per_step:
        raise UserError(
            f"train.batch_size={t.batch_size} must be a multiple of train.per_device_batch "
            f"({t.per_device_batch}) x world size ({world_size}) = {per_step}; change one of them "
            f"(e.g. --set train.per_device_batch=...)"
        )
    accum = t.batch_size // per_step
    steps_per_epoch = micro_batches_per_epoch // accum  # a trailing partial step is dropped
    if steps_per_epoch < 1:
        raise UserError(
            f"one optimiser step needs {accum} batches of {t.per_device_batch} images per process but "
            f"an epoch has only {micro_batches_per_epoch}: lower train.batch_size or add images"
        )
    if t.epochs < 1 or t.warmup_epochs < 0 or (t.warmup_steps is not None and t.warmup_steps < 0):
        raise UserError(
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
    path = Path(run_dir) / CONFIG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")
    return path


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
    dev, world = dist_info.device, dist_info.world_size
    cfg, batch_note = resolve_per_device_batch(cfg, world, dev)
    cfg = resolve_augment_device(cfg, dev)
    t = cfg.train
    # data: per-sample randomness from (data.seed, epoch, index)
    dataset = SoCoDataset(images, proposals, cfg.data, image_root=image_root)
    drop_last = full_batches_only(len(dataset), t.per_device_batch, world)
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
    if t.optimizer == "sgd":
        return torch.optim.SGD(
            decay_param_groups(core, t.weight_decay), lr=lr, momentum=t.momentum, weight_decay=t.weight_decay
        )
    if t.optimizer != "lars":
        raise UserError(f"train.optimizer={t.optimizer!r}: expected one of lars, sgd")
    return LARS(
        lars_param_groups(core, t.weight_decay), lr=lr, momentum=t.momentum, weight_decay=t.weight_decay, eta=t.lars_eta
    )


def model_parts(cfg: PretrainConfig, plan: Plan, dev: torch.device, world: int) -> dict:
    """The model (SyncBN, DDP, channels_last, compile as configured), the optimiser (LARS or SGD),
    the grad scaler and the on-device augmenter of a job: the same for training and for the step
    benchmarks."""
    t = cfg.train
    torch.manual_seed(t.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)
    try:
        core: Any = SoCoModel(cfg).to(dev)
    except ValueError as exc:  # e.g. an unknown model.arch / model.loss, SoCo* with C4
        raise UserError(str(exc)) from None
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


# Settings a resumed run may change freely: how it runs and reports, not what it trains. Any
# other difference from the checkpoint's config (model, data, schedule) needs accept_changes.
RESUME_FREE = resume_free_keys(PretrainConfig)  # the fields config.py declares kind="run"

# Keys added after checkpoints were first written, with the value a checkpoint without the key
# trained with: such a checkpoint is compared as if it held it (an older run resumes as before).
ADDED_KEYS: dict[str, Any] = {"train.optimizer": "lars", "train.ema_schedule": "cosine", "train.warmup_steps": None}


def _with_added_keys(config: dict) -> dict:
    """``config`` (a checkpoint's) with the ADDED_KEYS it lacks set to the value it trained with."""
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


# ---------------------------------------------------------------- the stage and the entry point

# A hook factory: called with the built job (rank 0 and every other rank), returns a hook or None.
HookFactory = Callable[[Job], "Hook | None"]


class PretrainStage:
    """Pretraining on the engine (``engine.run``): the job, the step, what a checkpoint holds,
    the start-up line and the summary. Hooks such as the object-kNN monitor are injected by the
    caller (``soco pretrain`` adds ``evaluate.monitor.monitor_hook``) as factories of the job."""

    command = "pretrain"
    distributed = True
    trains = True
    run_keys: tuple[str, ...] = RESUME_FREE

    def __init__(self, cfg: PretrainConfig, images, proposals, run_dir, image_root=None, progress: bool = True,
                 hooks: Sequence[HookFactory] = ()):  # fmt: skip
        self.cfg, self.images, self.proposals, self.image_root = cfg, images, proposals, image_root
        self.progress = progress
        self.run_dir = Path(run_dir)
        self.hook_factories = list(hooks)
        self.keep_checkpoints = cfg.train.keep_checkpoints
        self.position, self.skipped = Position(), SkipLog()
        self.init = None  # the checked --init report of a run that starts at step 0
        self.own_hooks: list[Hook] = []
        self.notes: list[str] = []  # said after the resumed line

    # -- before and while building
    def check(self, info, fresh: bool) -> None:
        self.init = prepare_warm_start(self.cfg, fresh)  # a bad --init file fails before anything is written

    def build(self, info) -> None:
        self.attach(build_job(self.cfg, self.images, self.proposals, self.image_root, info))

    def attach(self, job: Job) -> PretrainStage:
        """Use a built job (``build``; tests resume a ``fixed_batch`` job through it)."""
        self.job = job
        self.device, self.is_main = job.device, job.is_main
        self.total_steps = job.plan.total_steps
        self.keep_checkpoints = job.cfg.train.keep_checkpoints
        return self

    # -- checkpoints
    def recipe(self) -> dict:
        return to_dict(self.job.cfg)

    def recipe_of(self, checkpoint: dict, path: Path, accept_changes: bool) -> dict:
        if not isinstance(checkpoint, dict) or not {"model", "optimizer", "step", "config"} <= set(checkpoint):
            raise UserError(f"{path}: not a soco pretrain checkpoint (a fine-tune checkpoint or an export?)")
        # A checkpoint written before the config had a version holds version 1's keys without it.
        saved = _with_added_keys({"version": 1, **checkpoint.get("config", {})})
        run_of_checkpoint = path.parent.parent if path.parent.name == "checkpoints" else self.run_dir
        keep_recorded_init(self.job, saved, run_of_checkpoint)
        return saved

    def state_dict(self, step: int) -> dict:
        job = self.job
        return {
            "model": job.core.state_dict(),
            "optimizer": job.optimizer.state_dict(),
            "epoch": self.position.epoch,
            "batch_in_epoch": self.position.in_epoch,
            "scaler": job.scaler.state_dict(),
            "config": to_dict(job.cfg),
            "world_size": job.world,
            "total_steps": job.plan.total_steps,  # so an export can say "stopped at step N of M"
        }

    def load_state_dict(self, checkpoint: dict, path: Path) -> None:
        job = self.job
        job.core.load_state_dict(checkpoint["model"])
        saved_optimizer = checkpoint["config"].get("train", {}).get("optimizer", "lars")
        if saved_optimizer == job.cfg.train.optimizer:
            job.optimizer.load_state_dict(checkpoint["optimizer"])
        else:  # an accepted change of train.optimizer: the other optimiser's state does not fit this one
            self.notes.append(
                f"note: train.optimizer was {saved_optimizer}, now {job.cfg.train.optimizer}: its state (momentum) "
                "starts afresh"
            )
        job.scaler.load_state_dict(checkpoint["scaler"])
        self.position.epoch, self.position.in_epoch = int(checkpoint["epoch"]), int(checkpoint["batch_in_epoch"])
        saved_world = checkpoint.get("world_size")
        if saved_world not in (None, job.world):
            self.notes.append(
                f"note: resumed on {job.world} process(es), the checkpoint ran on {saved_world}: the total batch is "
                "kept; the rest of this epoch's order is dealt anew over the processes"
            )

    def resumed_line(self, checkpoint: dict, path: Path) -> str:
        pos = self.position
        return "\n".join(
            [
                f"resumed from {path} at step {int(checkpoint['step'])} (epoch {pos.epoch}, {pos.in_epoch}/"
                f"{self.job.plan.steps_per_epoch} steps into it)",
                *self.notes,
            ]
        )

    # -- the run
    def begin(self, start: int, stop: int, resumed_from: Path | None) -> None:
        job = self.job
        if self.init is not None and resumed_from is None:
            warm_start(job, self.init, self.run_dir)
        # built before the metrics file and bar: a bad hook setting (the monitor's) fails first
        self.own_hooks = [hook for make in self.hook_factories if (hook := make(job)) is not None]
        if job.is_main:
            announce(job, self.run_dir, self.progress, stop)
        job.model.train()

    def finished_result(self, start: int) -> None:
        return None

    def make_step(self, start: int) -> PretrainStep:
        return PretrainStep(self.job, self.position, self.skipped)

    def metrics(self) -> dict:
        t, position = self.job.cfg.train, self.position
        return {
            "desc": "pretrain",
            "log_due": lambda tr: tr.every(t.log_every) or tr.is_last,
            "check_every": 1 if self.device.type == "cpu" else t.log_every,
            "base": lambda tr: {"epoch": position.epoch},
            "record": lambda tr, w: {
                "loss": w.loss,
                "lr": tr.output.scalars["lr"],
                "tau": tr.output.scalars["tau"],
                "images_per_s": round(w.images_per_s, 3),
                "data_wait": round(w.data_wait, 4),
            },
            "where": lambda tr: f"by step {tr.step} (epoch {position.epoch})",
            "hint": "Try a lower train.base_lr or train.precision=fp32.",
        }

    def checkpoint_due(self, trainer: Trainer) -> bool:
        return trainer.every(self.job.cfg.train.checkpoint_every) or trainer.is_last

    def hooks(self, writer: Hook, checkpointer: Hook) -> list[Hook]:
        return [*self.own_hooks, writer, checkpointer]

    def finish(self, trainer: Trainer, start: int, seconds: float) -> Summary:
        """Rank 0 prints the skipped files and where the run stopped; every rank returns the Summary."""
        job, position, skipped = self.job, self.position, self.skipped
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
        metrics = trainer.metrics
        return Summary(
            run_dir=self.run_dir,
            step=trainer.step,
            start_step=start,
            total_steps=job.plan.total_steps,
            epoch=position.epoch,
            loss=metrics.last_logged if metrics is not None else None,
            images_per_s=(metrics.images_seen() if metrics is not None else 0) / max(seconds, 1e-9),
            seconds=seconds,
            checkpoint=trainer.last_checkpoint,
            finished=trainer.step >= job.plan.total_steps,
            plan=job.plan,
        )


def warm_start(job: Job, init, run_dir: Path) -> None:
    """Load the checked init weights into both networks (every rank; DDP broadcast its initial
    weights already); rank 0 prints the key report and saves it as RUN/init_report.json."""
    apply_init(job.core, init)
    if job.is_main:
        print(init.format(), flush=True)
        atomic_write_json(Path(run_dir) / REPORT_FILE, init.to_json())


def announce(job: Job, run_dir: Path, progress: bool, stop: int) -> None:
    """Rank 0: RUN/config.yaml, the data manifest (the leak guard's input; reused on resume) and
    the start-up line with the derived numbers."""
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


def prepare_warm_start(cfg: PretrainConfig, fresh: bool):
    """The checked ``model.init`` file of a run that starts at step 0 (transfer/warm_start.py), or
    None (no init, or a run that resumes and takes its weights from the checkpoint). A frozen part
    needs an init that fills it: freezing random weights is refused."""
    m, t = cfg.model, cfg.train
    if not fresh or (not m.init and t.freeze == "none"):
        return None  # a resume: the checkpoint holds the weights; keep_recorded_init compares the init's sha256
    if not m.init:
        raise UserError(
            f"train.freeze={t.freeze} would keep random weights fixed: give --init FILE (e.g. a supervised "
            "torchvision ResNet state dict) or --set train.freeze=none"
        )
    return prepare_init(m.init, m, t.freeze)


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
    hooks: Sequence[HookFactory] = (),
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
    resume continue with other settings than the checkpoint's. ``hooks``: factories of extra
    trainer hooks, called with the built :class:`Job` (the ``soco pretrain`` command passes the
    object-kNN monitor's, ``evaluate.monitor.monitor_hook``, when ``monitor.json`` is set).
    Raises UserError (bad config), UserError, NonFiniteLossError.
    """
    if max_steps is not None and max_steps < 0:
        raise UserError(f"max_steps must be >= 0, got {max_steps}")
    if cfg.monitor.json and not hooks:
        print("note: monitor.json is set but no monitor hook was given: pass hooks=[monitor_hook] "
              "(soco_pretrain.evaluate.monitor) to pretrain(); soco pretrain does", flush=True)  # fmt: skip
    stage = PretrainStage(cfg, images, proposals, run_dir, image_root, progress, hooks)
    return run(
        stage,
        run_dir,
        resume=resume,
        accept_changes=accept_changes,
        overwrite=overwrite,
        max_steps=max_steps,
        device=device,
        progress=progress,
        timeout_s=cfg.train.dist_timeout_s,
    )
