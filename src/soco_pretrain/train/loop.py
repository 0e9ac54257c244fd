"""The pretraining loop: ``pretrain(cfg, images, proposals, run_dir)`` (paper section 4.1).

One process on a CPU or GPU, or one process per GPU under torchrun / srun (DDP, SyncBN). Per
optimiser step: ``accum`` micro-batches of ``train.per_device_batch`` images on every process
(accum = batch_size / (per_device_batch x world size), so the total batch is the paper's 2048
whatever the hardware), gradients averaged, then the lr for this step is set (warm-up + cosine,
per step), LARS updates the online network, and the target is EMA-updated with tau(step)
(after the update; BYOL and the paper; the released code updates before the target forward).

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

import torch

from ..config import PretrainConfig, to_dict
from ..errors import NonFiniteLossError, UserError

CONFIG_FILE = "config.yaml"
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
    batch = auto_per_device_batch(cfg.model.arch, cfg.data.views.soco_star, card_gib, t.batch_size, world_size,
                                  cfg.data.views.v1_size, precision)
    where = f"a {card_gib:.0f} GiB card" if card_gib is not None else "the CPU"
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(t, per_device_batch=batch))
    return cfg, f" (per-device batch {batch}: auto for {where})"


def resolve_augment_device(cfg: PretrainConfig, device) -> PretrainConfig:
    """``data.augment.device: auto`` -> "gpu" (batched photometric augmentation on the training
    device) when training on CUDA, "cpu" (in the loader workers) otherwise."""
    import dataclasses

    aug = cfg.data.augment
    if aug.device != "auto":
        return cfg
    resolved = "gpu" if torch.device(device).type == "cuda" else "cpu"
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, augment=dataclasses.replace(aug, device=resolved)))


def resolve_compile(value, device: torch.device) -> bool:
    """``train.compile``: auto (on for CUDA, where benchmarks/gpu.py measured 1.5x images/s for
    the FPN step; off on CPUs, where compiling costs minutes for little) | true | false."""
    text = str(value).lower()
    if text not in ("auto", "true", "false"):
        raise PretrainError(f"train.compile={value!r}: expected auto, true or false")
    return text == "true" or (text == "auto" and torch.device(device).type == "cuda")


def compiled(model):
    """torch.compile(model), falling back to eager (with a one-line note) if compiling fails,
    e.g. where no compiler toolchain is installed: a slower run beats no run."""
    fast = torch.compile(model)
    state = {"fn": fast}

    def forward(*args, **kwargs):
        try:
            return state["fn"](*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - only compiler failures fall back; the rest re-raise
            from torch._dynamo.exc import BackendCompilerFailed

            if state["fn"] is model or not isinstance(exc, BackendCompilerFailed):
                raise
            print(f"note: torch.compile failed ({type(exc).__name__}); training without it "
                  "(--set train.compile=false silences this)", flush=True)
            state["fn"] = model
            return model(*args, **kwargs)

    return forward


def make_plan(cfg: PretrainConfig, world_size: int, micro_batches_per_epoch: int, device) -> Plan:
    """Accumulation, steps per epoch, schedule lengths and the peak lr for this job."""
    from .schedule import scaled_lr

    if cfg.train.per_device_batch == 0:  # auto (the loop resolves it first; callers may not)
        cfg, _ = resolve_per_device_batch(cfg, world_size, device)
    t = cfg.train
    per_step = t.per_device_batch * world_size
    if t.per_device_batch < 1 or t.batch_size < 1 or t.batch_size % per_step:
        raise PretrainError(
            f"train.batch_size={t.batch_size} must be a multiple of train.per_device_batch "
            f"({t.per_device_batch}) x world size ({world_size}) = {per_step}; change one of them "
            f"(e.g. --set train.per_device_batch=...)")
    accum = t.batch_size // per_step
    steps_per_epoch = micro_batches_per_epoch // accum  # a trailing partial step is dropped
    if steps_per_epoch < 1:
        raise PretrainError(
            f"one optimiser step needs {accum} batches of {t.per_device_batch} images per process but "
            f"an epoch has only {micro_batches_per_epoch}: lower train.batch_size or add images")
    if t.epochs < 1 or t.warmup_epochs < 0:
        raise PretrainError(f"train.epochs={t.epochs} / warmup_epochs={t.warmup_epochs}: need >= 1 / >= 0")
    return Plan(
        world_size=world_size,
        accum=accum,
        micro_batches_per_epoch=micro_batches_per_epoch,
        steps_per_epoch=steps_per_epoch,
        total_steps=t.epochs * steps_per_epoch,
        warmup_steps=t.warmup_epochs * steps_per_epoch,
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


def autocast(device: torch.device, precision: str):
    """The autocast context for a resolved precision (bf16 | fp16 | fp32 = none); also fine-tuning's."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def _prepare_batch(batch: dict, device: torch.device, channels_last: bool, augmenter, view_params, generator):
    """Move the batch to the device; the GPU augmentation path makes uint8 views float there."""
    from ..data.loader import augment_batch

    if augmenter is not None:
        batch = augment_batch(batch, augmenter, view_params, generator, device=device)
    if device.type != "cpu":
        batch = dict(batch)
        batch["views"] = [v.to(device, non_blocking=True) for v in batch["views"]]
        if channels_last:
            batch["views"] = [v.contiguous(memory_format=torch.channels_last) for v in batch["views"]]
    return batch


# ---------------------------------------------------------------- the loop


def pretrain(cfg: PretrainConfig, images, proposals, run_dir, max_steps: int | None = None,
             resume: str | Path | None = "auto", image_root=None, progress: bool = True,
             device: str | None = None) -> Summary:
    """Pretrain SoCo on ``images`` with their ``proposals`` store into ``run_dir``.

    ``proposals`` may be None when ``cfg.data.views.proposal_source`` is whole_image, random or
    coco (the ablation sources need no store; the dataset says so in one line otherwise).

    ``max_steps``: stop after this many optimiser steps in total (counting resumed ones; the
    schedules keep their full length, so a later run can continue). ``resume``: "auto" (the
    run's latest checkpoint if any), "none" (start at step 0) or a checkpoint path.
    ``device``: "cpu" or "cuda" to force one (default CUDA when available). Launch under torchrun
    or srun for several processes. Raises PretrainError (bad config), NonFiniteLossError.
    """
    from ..data import SkipLog, SoCoDataset, make_loader, set_epoch
    from ..data.manifest import record_run_manifest
    from ..model import SoCoModel, convert_sync_bn
    from .checkpoint import CheckpointManager, load_checkpoint, rng_state, set_rng_state
    from .distributed import all_reduce_mean, barrier, cleanup, init_distributed
    from .lars import LARS, lars_param_groups
    from .metrics import MetricsLogger, Progress
    from .schedule import lr_at, set_lr, tau_at

    run_dir = Path(run_dir)
    if max_steps is not None and max_steps < 0:
        raise PretrainError(f"max_steps must be >= 0, got {max_steps}")
    dist_info = init_distributed(device)
    dev, world, is_main = dist_info.device, dist_info.world_size, dist_info.is_main
    try:
        cfg, batch_note = resolve_per_device_batch(cfg, world, dev)
        cfg = resolve_augment_device(cfg, dev)
        t = cfg.train
        use_compile = resolve_compile(t.compile, dev)
        # ---- data (stage 2): per-sample randomness from (data.seed, epoch, index)
        dataset = SoCoDataset(images, proposals, cfg.data, image_root=image_root)
        # Full batches only (the paper's fixed batch), unless the dataset is smaller than one
        # batch per process (the demo's 7 photos): then one short batch per epoch.
        drop_last = len(dataset) >= t.per_device_batch * world
        loader = make_loader(dataset, t.per_device_batch, workers=t.workers, drop_last=drop_last)
        plan = make_plan(cfg, world, len(loader), dev)

        # ---- model, optimiser, precision
        torch.manual_seed(t.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)
        try:
            model = SoCoModel(cfg).to(dev)
        except ValueError as exc:  # e.g. an unknown model.arch / model.loss, SoCo* with C4
            raise PretrainError(str(exc)) from None
        if dev.type == "cuda" and t.channels_last:
            model = model.to(memory_format=torch.channels_last)
        model = convert_sync_bn(model)  # SyncBN only when world size > 1
        core = model  # the SoCoModel itself: update_target, state_dict
        optimizer = LARS(lars_param_groups(core, t.weight_decay), lr=plan.peak_lr, momentum=t.momentum,
                         weight_decay=t.weight_decay, eta=t.lars_eta)
        if world > 1:
            # Every parameter gets a gradient every step (pool_boxes keeps FPN levels without
            # boxes in the graph), so DDP need not search for unused ones.
            model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[dev.index] if dev.type == "cuda" else None)
        forward = compiled(model) if use_compile else model
        scaler = torch.amp.GradScaler(dev.type, enabled=plan.precision == "fp16")
        augmenter = None
        if cfg.data.augment.device == "gpu":
            from ..data import BatchAugment

            augmenter = BatchAugment(cfg.data.augment)

        # ---- resume
        manager = CheckpointManager(run_dir, keep=t.keep_checkpoints)
        checkpoint_path = manager.resume_from(resume)
        step, epoch, done_in_epoch = 0, 0, 0
        if checkpoint_path is not None:
            state = load_checkpoint(checkpoint_path, map_location=dev)
            differs = _config_differences(state.get("config", {}), to_dict(cfg))
            core.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scaler.load_state_dict(state["scaler"])
            step, epoch, done_in_epoch = int(state["step"]), int(state["epoch"]), int(state["batch_in_epoch"])
            set_rng_state(state["rng"])
            if is_main:
                print(f"resumed from {checkpoint_path} at step {step} (epoch {epoch}, "
                      f"{done_in_epoch}/{plan.steps_per_epoch} steps into it)", flush=True)
                if differs:
                    print(f"note: the config differs from the checkpoint's in {', '.join(differs)}", flush=True)
        stop_step = plan.total_steps if max_steps is None else min(plan.total_steps, max_steps)

        if is_main:
            save_config(cfg, run_dir)
            # Which files this run sees, by content (reused as is on resume): the leak guard's input.
            images_seen = dataset.images
            record_run_manifest(run_dir, [images_seen.abspath(i) for i in range(len(images_seen))],
                                images_seen.root, progress)
            print(f"pretraining {cfg.model.arch}{'*' if cfg.data.views.soco_star else ''} on {len(dataset)} "
                  f"images: batch {t.batch_size} = {t.per_device_batch} x {world} process(es) x "
                  f"{plan.accum} accumulation, {plan.steps_per_epoch} steps/epoch, {plan.total_steps} steps "
                  f"({t.epochs} epochs), lr {plan.peak_lr:g}, {plan.precision} on {dev}"
                  f"{', torch.compile' if use_compile else ''}{batch_note}", flush=True)
            if not drop_last:
                print(f"note: {len(dataset)} images are fewer than one batch per process: one batch of "
                      f"{math.ceil(len(dataset) / world)} per process and epoch", flush=True)

        def checkpoint_state() -> dict:
            return {"model": core.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                    "epoch": epoch, "batch_in_epoch": done_in_epoch, "rng": rng_state(),
                    "scaler": scaler.state_dict(), "config": to_dict(cfg), "world_size": world}

        # ---- object kNN monitor (rank 0, between steps; off unless monitor.json is set)
        monitor = None
        if is_main and cfg.monitor.json:
            from ..evaluate.knn import ObjectMonitor, describe

            monitor = ObjectMonitor(cfg, dev)
            print(f"monitor: object kNN every {monitor.every} steps on {cfg.monitor.json} "
                  f"({monitor.train.num_objects} neighbour / {monitor.val.num_objects} query objects)", flush=True)

        # ---- train
        metrics = MetricsLogger(run_dir, enabled=is_main)
        bar = Progress(plan.total_steps, initial=step, enabled=is_main and progress)
        if monitor is not None and step == 0 and stop_step > 0:
            result = monitor(core)  # the starting point (random init) of the curve
            metrics.log(0, **result)
            bar.write(f"step 0: {describe(result)}")
        # The guard reads the loss: every step on the CPU (free), every log_every steps on a GPU.
        check_every = 1 if dev.type == "cpu" else max(1, t.log_every)
        window_loss = torch.zeros((), device=dev)  # summed on the device, read at log steps
        window_steps, window_images, window_wait, window_start = 0, 0, 0.0, time.perf_counter()
        last_loss, start_step, start_time, images_seen = None, step, time.perf_counter(), 0
        saved = checkpoint_path
        skipped = SkipLog()
        model.train()
        try:
            while step < stop_step:
                if done_in_epoch >= plan.steps_per_epoch:  # the epoch is complete: next one
                    epoch, done_in_epoch = epoch + 1, 0
                set_epoch(loader, epoch, skip_batches=done_in_epoch * plan.accum)
                batches = iter(loader)
                while step < stop_step and done_in_epoch < plan.steps_per_epoch:
                    # -- one optimiser step: accum micro-batches, gradients summed (loss / accum)
                    for micro in range(plan.accum):
                        wait_start = time.perf_counter()
                        batch = next(batches)
                        window_wait += time.perf_counter() - wait_start
                        skipped.update(batch)  # undecodable files (the dataset warned already)
                        window_images += len(batch["index"]) * world  # every rank's batch is as long
                        generator = None
                        if augmenter is not None:  # reproducible per (seed, step, micro-batch, rank)
                            generator = torch.Generator(dev).manual_seed(
                                ((t.seed * 1_000_003 + step) * plan.accum + micro) * world + dist_info.rank)
                        batch = _prepare_batch(batch, dev, dev.type == "cuda" and t.channels_last,
                                               augmenter, cfg.data.augment.view_params, generator)
                        last_micro = micro == plan.accum - 1
                        sync = model.no_sync() if world > 1 and not last_micro else contextlib.nullcontext()
                        with sync:
                            with autocast(dev, plan.precision):
                                loss, _ = forward(batch)
                            scaler.scale(loss / plan.accum).backward()
                        window_loss += loss.detach().float() / plan.accum
                    lr = lr_at(step, plan.total_steps, plan.warmup_steps, plan.peak_lr,
                               t.warmup_start_factor, t.final_lr)
                    set_lr(optimizer, lr)
                    scaler.step(optimizer)
                    scaler.update()
                    optimizer.zero_grad(set_to_none=True)
                    tau = tau_at(step, plan.total_steps, t.ema_tau)
                    core.update_target(tau)
                    step += 1
                    done_in_epoch += 1
                    window_steps += 1

                    # -- guard, log, checkpoint (the only places that read device values)
                    log_now = step % t.log_every == 0 or step == stop_step
                    save_now = step % t.checkpoint_every == 0 or step == stop_step
                    if log_now or save_now or step % check_every == 0:
                        mean_loss = all_reduce_mean(window_loss) / window_steps
                        value = mean_loss.item()  # the host sync, lagged to here
                        if not math.isfinite(value):
                            raise NonFiniteLossError(
                                f"non-finite loss ({value}) by step {step} (epoch {epoch}); stopped without "
                                f"saving. Last good checkpoint: {saved or 'none'}. Try a lower train.base_lr "
                                "or train.precision=fp32.")
                    # One metrics record per step (read_metrics treats a repeated step as a resume).
                    monitored = {}
                    if monitor is not None and (monitor.due(step) or step == stop_step):
                        monitor_start = time.perf_counter()
                        monitored = monitor(core)
                        bar.write(f"step {step}: {describe(monitored)}")
                        window_start += time.perf_counter() - monitor_start  # not training time
                        if not log_now:
                            metrics.log(step, epoch=epoch, **monitored)
                    if log_now:
                        elapsed = time.perf_counter() - window_start
                        last_loss = value
                        images_per_s = window_images / max(elapsed, 1e-9)
                        data_wait = min(1.0, window_wait / max(elapsed, 1e-9))
                        metrics.log(step, epoch=epoch, loss=value, lr=lr, tau=tau,
                                    images_per_s=round(images_per_s, 3), data_wait=round(data_wait, 4), **monitored)
                        bar.update(step, loss=value, lr=lr, tau=tau, images_per_s=images_per_s,
                                   data_wait=data_wait)
                        window_loss.zero_()
                        images_seen += window_images
                        window_steps, window_images, window_wait, window_start = 0, 0, 0.0, time.perf_counter()
                    if save_now:
                        if is_main:
                            saved = manager.save(checkpoint_state())
                        barrier()  # nobody races ahead of a checkpoint another rank may resume from
                del batches  # stop the workers' prefetch of an unfinished epoch
        finally:
            bar.close()
            metrics.close()
        seconds = time.perf_counter() - start_time
        if is_main:
            if len(skipped):
                print(skipped.summary(), flush=True)
            print(f"stopped at step {step}/{plan.total_steps} (epoch {epoch}); last checkpoint: {saved}",
                  flush=True)
        return Summary(run_dir=run_dir, step=step, start_step=start_step, total_steps=plan.total_steps,
                       epoch=epoch, loss=last_loss,
                       images_per_s=(images_seen + window_images) / max(seconds, 1e-9),
                       seconds=seconds, checkpoint=saved, finished=step >= plan.total_steps, plan=plan)
    finally:
        cleanup()
