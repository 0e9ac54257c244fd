"""``soco finetune``: Mask R-CNN (torchvision v2, R50-FPN by default) fine-tune with COCO AP (paper section 4.2).

``finetune(weights, train_json, train_images, val_json, val_images, out, ...) -> metrics`` trains
the detector of :mod:`.detector` from SoCo weights (or from scratch: ``weights="none"``) on a
COCO-format set and evaluates it with pycocotools (:mod:`.coco_eval`) into ``OUT/metrics.json``.
The detector's ResNet is the weights' own (a SoCo run's ``model.backbone``, else read from the
weights' shapes; ``backbone`` option for ``none``, refused when it contradicts the weights); it
is recorded in every checkpoint and a resume with another one is refused.

The recipe (defaults; :class:`FinetuneOptions`):
- SGD, momentum 0.9, weight decay 2.5e-5 (paper 4.2 / released configs), none on BatchNorm
  parameters (Detectron2's default WEIGHT_DECAY_NORM = 0, which the released configs run on);
  no gradient clipping (Detectron2 default).
- lr 0.02 at total batch 16 (paper 4.2), scaled linearly with the batch; linear warm-up over
  1000 iterations from 0.001 x lr (Detectron2 WARMUP_FACTOR); x0.1 after 2/3 and 8/9 of training.
- 1x = 90k iterations at batch 16 (steps 60k, 80k), 2x = 180k (120k, 160k) (Detectron2 / released
  R_50_FPN_1x.yaml); iterations, steps and warm-up scale by 16 / batch (Detectron2's
  auto-scaling rule). ``max_iters`` instead: steps at 2/3 and 8/9 of it. The warm-up never runs
  past the first drop (our choice, so a short run still trains at the full lr for a while).
- Input: short side drawn from 640..800 step 32 per training image, long side <= 1333; test
  short side 800 (Detectron2 Base-RCNN-FPN); horizontal flip p = 0.5.
- BatchNorm in training mode everywhere (fine-tuned, paper 4.2); SyncBN when the world size > 1.
- Before each evaluation BN statistics are re-estimated over ``precise_bn`` training batches
  (released config TEST.PRECISE_BN.ENABLED, Detectron2's 200 iterations).
- The total batch is ``per_device_batch`` images per forward pass x processes x accumulation
  steps; ``per_device_batch`` 0 (auto) takes the largest that fits the device's memory
  (train/memory.py, measured on a CPU), so the recipe (lr, schedule) never depends on the machine.
  Detectron2 runs 2 images per GPU on 8 GPUs; BatchNorm statistics are per forward pass.
- Before the model is built, every image the run reads must exist and the first few of each set
  must decode (:func:`.coco.check_images`).
- Before anything is written, validation images whose bytes are in the pretraining data manifest
  of ``weights`` (a run folder, its checkpoint, an export's ``FILE.manifest.json``) are refused:
  the leak guard of ``soco knn`` and ``soco compare`` (data/manifest.py); ``allow_leak`` skips it.

Engine as ``soco pretrain``: one process or torchrun/srun (DDP, rank 0 logs, saves and scores
the gathered predictions), ``OUT/checkpoints/last.pt`` (atomic) every ``checkpoint_every``
iterations and at the end, ``resume="auto"`` continues exactly (iteration, weights, optimiser,
grad scaler, RNG; the data stream is a function of the seed and the iteration), tqdm progress,
``OUT/metrics.jsonl``.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from ..config import FinetuneOptions, resume_free_keys  # the options live with every command's config
from ..data.manifest import check_weights_no_leak
from ..engine.distributed import get_rank, get_world_size
from ..engine.loader import build_loader
from ..engine.precise_bn import averaged_statistics, batch_norms
from ..engine.run import run
from ..engine.schedule import scaled_lr, warmup_multistep
from ..engine.skips import SkipLog
from ..engine.trainer import Hook, StepOutput, Trainer, autocast, set_lr
from ..errors import UserError
from ..files import atomic_write_json
from ..model.backbones import backbone_info
from ..model.soco import convert_sync_bn
from ..runfolder import file_digest
from ..weights import LoadReport, resolve_checkpoint
from . import detector_memory as memory
from .coco import (
    CocoDetection,
    CocoSet,
    TrainStream,
    check_images,
    collate,
    load_coco,
    select_fraction,
    trainable_images,
)
from .coco_eval import coco_evaluate, format_metrics, to_coco_results
from .detector import build_detector, detector_backbone, eval_sizes, load_weights

SCHEDULES = {"1x": 90_000, "2x": 180_000}  # iterations at batch 16 (Detectron2)
DETECTRON2_BATCH = 16  # the fine-tune's reference batch (paper 4.2: batch 16, lr 0.02)
METRICS_FILE = "metrics.json"


@dataclass
class Plan:
    """Iterations and learning rates for one run."""

    max_iters: int
    steps: tuple[int, int]
    warmup_iters: int
    lr: float
    warmup_factor: float = 0.001
    gamma: float = 0.1


def make_plan(opts: FinetuneOptions) -> Plan:
    """1x/2x (or max_iters), lr drops, warm-up and lr for ``opts.batch_size`` (see module docstring)."""
    if opts.batch_size < 1:
        raise UserError(f"batch must be >= 1, got {opts.batch_size}")
    scale = DETECTRON2_BATCH / opts.batch_size
    if opts.max_iters is not None:
        if opts.max_iters < 1:
            raise UserError(f"max_iters must be >= 1, got {opts.max_iters}")
        total = int(opts.max_iters)
    else:
        if opts.schedule not in SCHEDULES:
            raise UserError(f"schedule must be one of {', '.join(SCHEDULES)}, got {opts.schedule!r}")
        total = max(1, round(SCHEDULES[opts.schedule] * scale))
    steps = (round(total * 2 / 3), round(total * 8 / 9))  # paper 4.2; 1x: 60000, 80000
    warmup = min(round(opts.warmup_iters * scale), steps[0])
    lr = opts.lr if opts.lr is not None else scaled_lr(0.02, opts.batch_size, reference=DETECTRON2_BATCH)
    return Plan(total, steps, max(0, warmup), lr, opts.warmup_factor, opts.gamma)


def lr_at(iteration: int, plan: Plan) -> float:
    """Detectron2's WarmupMultiStepLR at 0-based ``iteration`` (the lr of that update)."""
    return warmup_multistep(iteration, plan.steps, plan.gamma, plan.warmup_iters, plan.warmup_factor, plan.lr)


def param_groups(model: nn.Module, weight_decay: float, weight_decay_norm: float) -> list[dict]:
    """Normalisation-layer parameters get ``weight_decay_norm``, every other one ``weight_decay``."""
    norm: list[nn.Parameter] = []
    other: list[nn.Parameter] = []
    seen: set[int] = set()
    for module in model.modules():
        is_norm = isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm))
        for p in module.parameters(recurse=False):
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                (norm if is_norm else other).append(p)
    return [{"params": other, "weight_decay": weight_decay}, {"params": norm, "weight_decay": weight_decay_norm}]


# ---------------------------------------------------------------- small helpers


def _to_device(items: list[dict], device: torch.device, with_targets: bool):
    images, targets = [], []
    for item in items:
        if item["image"] is None:
            continue
        images.append(item["image"].to(device, non_blocking=True).float().div_(255.0))
        if with_targets:
            targets.append({k: v.to(device, non_blocking=True) for k, v in item["target"].items()})
    return images, targets


def _loader(dataset, batch: int, workers: int, device: torch.device, sampler=None, seed: int = 0):
    return build_loader(
        dataset,
        batch,
        sampler=sampler,
        collate_fn=collate,
        workers=workers,
        seed=seed,
        pin_memory=device.type == "cuda",
    )


# ---------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(
    model: nn.Module,
    coco_val,
    label_to_cat: dict[int, int],
    masks: bool,
    device: torch.device,
    batch: int = 1,
    workers: int = 0,
    precision: str = "fp32",
    progress: bool = False,
) -> dict:
    """Predict every val image (this process's share) and score them with COCOeval on rank 0.

    ``label_to_cat``: the model's labels 1..C -> COCO category ids (of the training JSON).

    Returns ``{"bbox": {...}, "segm": {...}, "val_images": n, "skipped": [...]}`` on rank 0, {} elsewhere.
    """
    rank, world = get_rank(), get_world_size()
    dataset = CocoDetection(coco_val, coco_val.images[rank::world], masks, targets=False)
    loader = _loader(dataset, batch, workers, device)
    results, evaluated, skips = [], [], SkipLog(warn=True)
    was_training = model.training
    model.eval()
    bar = None
    if progress and rank == 0:
        bar = tqdm(total=len(dataset), desc="evaluate", unit="img", dynamic_ncols=True, mininterval=1.0)
    try:
        with eval_sizes(model):
            for items in loader:
                skips.update(item["error"] for item in items if item["error"] is not None)
                good = [item for item in items if item["image"] is not None]
                images, _ = _to_device(good, device, with_targets=False)
                if images:
                    with autocast(device, precision):
                        outputs = model(images)
                    for item, output in zip(good, outputs):
                        results += to_coco_results(output, item["image_id"], label_to_cat, masks)
                        evaluated.append(item["image_id"])
                if bar is not None:
                    bar.update(len(items))
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    if world > 1:
        gathered: list = [None] * world
        dist.all_gather_object(gathered, (results, evaluated, skips.reasons))
        results = [r for part in gathered for r in part[0]]
        evaluated = [i for part in gathered for i in part[1]]
        for part in gathered:
            skips.reasons.update(part[2])
    if rank != 0:
        return {}
    if not evaluated:
        raise UserError(f"{coco_val.json_path}: no validation image could be read")
    iou_types = ("bbox", "segm") if masks else ("bbox",)
    metrics = coco_evaluate(coco_val.data, results, iou_types, image_ids=evaluated)
    metrics["val_images"] = len(evaluated)
    metrics["skipped_val_images"] = sorted(skips.reasons)
    return metrics


@torch.no_grad()
def precise_bn(model: nn.Module, batches, num_iters: int, device: torch.device, precision: str) -> None:
    """Re-estimate BatchNorm running statistics as the mean over ``num_iters`` training batches
    (Detectron2's PreciseBN / fvcore update_bn_stats), model in training mode, no gradients."""
    bns = batch_norms([model], training_only=True)
    if not bns or num_iters < 1:
        return
    with averaged_statistics(bns):
        for _ in range(num_iters):
            images, targets = _to_device([i for i in next(batches) if i["image"] is not None], device, True)
            if images:
                with autocast(device, precision):
                    model(images, targets)


# ---------------------------------------------------------------- the job, the step, the hooks


@dataclass
class Job:
    """One fine-tuning invocation: data, detector, optimiser (one per process)."""

    opts: FinetuneOptions
    plan: Plan
    coco_train: CocoSet
    coco_val: CocoSet
    masks: bool
    usable: list
    train_set: list
    core: nn.Module  # the detector itself
    model: nn.Module  # core, or its DDP wrapper
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    report: LoadReport  # which weights loaded into which module
    device: torch.device
    rank: int
    world: int
    is_main: bool
    per_device: int = 0  # images per forward pass (resolve_per_device_batch); 0: batch / world
    accum: int = 1  # forward/backward passes per iteration on each process
    backbone: str = "resnet50"  # the detector's ResNet (detector_backbone: the weights' own)
    start: dict = field(default_factory=dict)  # the starting weights (start_record)

    def __post_init__(self):
        if self.per_device == 0:
            self.per_device = self.opts.batch_size // self.world
        self.accum = self.opts.batch_size // (self.world * self.per_device)

    def batches(self, seed: int, start: int):
        """This process's micro-batches (``per_device`` images each, ``accum`` per iteration) from
        iteration ``start`` of the stream seeded ``seed``: an iteration's images do not depend on
        the split, so accumulation and a resume see exactly the images of an unsplit run."""
        per_rank = self.opts.batch_size // self.world
        stream = TrainStream(len(self.train_set), per_rank, self.rank, self.world, seed, start)
        dataset = CocoDetection(self.coco_train, self.train_set, self.masks)
        return iter(_loader(dataset, self.per_device, self.opts.workers, self.device, sampler=stream, seed=seed))


def resolve_per_device_batch(opts: FinetuneOptions, world: int, device: torch.device) -> tuple[int, str]:
    """``per_device_batch`` (0: auto, the largest divisor of batch / world whose estimated peak
    memory fits the device: train/memory.py) and, for auto, a line saying what was chosen."""

    per_process = opts.batch_size // world
    if opts.per_device_batch:
        if per_process % opts.per_device_batch:
            raise UserError(
                f"per_device_batch {opts.per_device_batch} does not divide the batch per process "
                f"({opts.batch_size} / {world} = {per_process})"
            )
        return opts.per_device_batch, ""
    short, cuda = max(opts.train_sizes), device.type == "cuda"
    if cuda:
        available = torch.cuda.get_device_properties(device).total_memory / 2**30
        where = f"the {available:.0f} GiB card"
    else:
        free = memory.cpu_available_gib()
        if free is None:  # no /proc/meminfo: keep the recipe's split
            return per_process, f"per-device batch {per_process} (auto: the available memory is unknown)"
        shared = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))  # processes on this machine
        available = free / shared
        where = f"{available:.1f} GiB available" + (f" to each of {shared} processes" if shared > 1 else "")
    chosen = memory.auto_finetune_batch(per_process, available, short, opts.max_size, cuda)
    if world > 1:  # every process must take the same number of micro-batches: the smallest choice
        smallest = torch.tensor([chosen], device=device if cuda else "cpu")  # NCCL reduces CUDA tensors
        dist.all_reduce(smallest, op=dist.ReduceOp.MIN)
        chosen = int(smallest.item())
    estimate = memory.finetune_estimate_gib(chosen, short, opts.max_size, cuda)
    note = (
        f"per-device batch {chosen} (auto: {where}, about {estimate:.1f} GiB estimated at {short} px; "
        f"{per_process // chosen} accumulation step(s) keep the batch at {opts.batch_size}; --per-device-batch sets it)"
    )
    return chosen, note


def build_job(weights, train_json, train_images, val_json, val_images, out: Path, opts: FinetuneOptions, info) -> Job:

    dev, world, is_main = info.device, info.world_size, info.is_main
    if opts.precision == "fp16" and dev.type != "cuda":
        raise UserError("precision fp16 needs a CUDA device; use bf16 or fp32 on the CPU")
    if opts.batch_size % world:
        raise UserError(f"batch {opts.batch_size} is not divisible by the {world} processes")
    per_device, note = resolve_per_device_batch(opts, world, dev)
    coco_train, coco_val = load_coco(train_json, train_images), load_coco(val_json, val_images)
    masks = coco_train.has_masks and not opts.boxes_only
    if coco_val.cat_ids != coco_train.cat_ids and is_main:
        print(
            f"note: {coco_val.json_path.name} and {coco_train.json_path.name} list different categories; "
            "labels follow the training JSON",
            flush=True,
        )
    usable = trainable_images(coco_train, masks)
    if not usable and not opts.eval_only:
        raise UserError(
            f"{coco_train.json_path}: no image has a usable annotation "
            "(non-crowd, non-empty box" + (", with a mask)" if masks else ")")
        )
    train_set = select_fraction(usable, opts.fraction, opts.seed) if usable else []
    # Every image the run will read exists and the first few decode, before the model is built
    # (a wrong --val-images would otherwise surface only at the evaluation after training).
    if not opts.eval_only:
        check_images(coco_train, "--train-images", train_set)
    check_images(coco_val, "--val-images")
    if is_main and note:
        print(note, flush=True)
    # the weights' backbone; a contradicting --backbone is one line, never a half-loaded detector
    backbone = detector_backbone(weights, opts.backbone, opts.soco_weights)
    if is_main and opts.fraction < 1.0:  # after the input checks: a refused run writes nothing to OUT
        atomic_write_json(
            out / "train_subset.json",
            {"fraction": opts.fraction, "seed": opts.seed, "image_ids": [im["id"] for im in train_set]},
        )
    torch.manual_seed(opts.seed)  # the same new heads on every rank
    core = build_detector(
        coco_train.num_classes,
        masks,
        opts.train_sizes,
        opts.test_size or max(opts.train_sizes),
        opts.max_size,
        box_batch_size_per_image=opts.roi_batch,
        rpn_post_nms_top_n_train=opts.rpn_train_proposals,
        rpn_post_nms_top_n_test=opts.test_proposals,
        box_detections_per_img=opts.detections,
        backbone=backbone,
    )
    report = load_weights(core, weights, opts.soco_weights)
    if is_main:
        print(report.format(), flush=True)
    core = convert_sync_bn(core.to(dev))  # SyncBN only when world size > 1 (paper 4.2)
    plan = make_plan(opts)
    optimizer = torch.optim.SGD(
        param_groups(core, opts.weight_decay, opts.weight_decay_norm), lr=plan.lr, momentum=opts.momentum
    )
    model = core
    if world > 1:
        model = nn.parallel.DistributedDataParallel(core, device_ids=[dev.index] if dev.type == "cuda" else None)
    return Job(
        opts=opts,
        plan=plan,
        coco_train=coco_train,
        coco_val=coco_val,
        masks=masks,
        usable=usable,
        train_set=train_set,
        core=core,
        model=model,
        optimizer=optimizer,
        scaler=torch.amp.GradScaler(dev.type, enabled=opts.precision == "fp16"),
        report=report,
        device=dev,
        rank=info.rank,
        world=world,
        is_main=is_main,
        per_device=per_device,
        backbone=backbone,
    )


def start_record(weights) -> dict:
    """What a fine-tune starts from: the weights' absolute path (a run folder: its checkpoint file)
    and their sha256, recorded in every checkpoint and checked when the run resumes."""
    if weights is None or str(weights).lower() == "none":
        return {"weights": "none", "sha256": None}
    path = resolve_checkpoint(weights).resolve()
    return {"weights": str(path), "sha256": file_digest(path)}


def describe_start(record: dict) -> str:
    """A :func:`start_record` for a message: ``PATH (sha256 0123456789ab)``, or what it lacks
    (random init has no file, so no digest: never "sha256 None")."""
    weights, digest = record.get("weights"), record.get("sha256")
    if weights is None or str(weights).lower() == "none":
        return "random init (--weights none)"
    return f"{weights} (sha256 {digest[:12]})" if isinstance(digest, str) else f"{weights} (sha256 not recorded)"


# Options a resumed fine-tune may change: how it runs and what it evaluates, not what it trains.
# Any other difference from the checkpoint's options needs accept_changes (engine.run).
RESUME_FREE = resume_free_keys(FinetuneOptions)  # config.py: run options and resume_free=True


class FinetuneStep:
    """One SGD iteration of the detector: this process's share of the batch in ``job.accum``
    micro-batches of ``job.per_device`` images (gradients of loss / accum summed; DDP synchronises
    only the last backward), Detectron2's WarmupMultiStepLR, the summed losses (averaged over the
    micro-batches here and over the processes by the metrics when they read them). The losses stay
    on the device: the metrics read them when a record or the guard is due.

    With accumulation the update is that of the whole batch up to what is computed per forward
    pass: BatchNorm statistics, padding to the largest image and the RPN / RoI sampling's
    normalisation are per micro-batch (as they are per GPU in Detectron2)."""

    def __init__(self, job: Job, start: int, skips: SkipLog):
        self.job, self.skips = job, skips
        self.batches = job.batches(job.opts.seed, start)
        self.last_good: tuple | None = None

    def __call__(self, iteration: int) -> StepOutput:

        job = self.job
        job.optimizer.zero_grad(set_to_none=True)
        total: torch.Tensor | None = None
        parts: dict[str, torch.Tensor] = {}
        lr = None
        for micro in range(job.accum):
            items = next(self.batches)
            self.skips.update(item["error"] for item in items if item["error"] is not None)
            images, targets = _to_device(items, job.device, with_targets=True)
            if images:
                self.last_good = (images, targets)
            elif self.last_good is None:
                raise UserError("every image of the first batch failed to decode (see the warnings)")
            else:
                images, targets = self.last_good  # keeps every rank stepping together
            if lr is None:
                lr = lr_at(iteration, job.plan)
                set_lr(job.optimizer, lr)
            last = micro == job.accum - 1
            unsynced = job.world > 1 and not last  # DDP synchronises only the last backward
            with job.model.no_sync() if unsynced else contextlib.nullcontext():  # type: ignore[operator]
                with autocast(job.device, job.opts.precision):
                    losses = job.model(images, targets)
                loss: torch.Tensor = sum(losses.values())  # type: ignore[assignment]
                job.scaler.scale(loss / job.accum).backward()
            part = loss.detach().float() / job.accum
            total = part if total is None else total + part
            for k, v in losses.items():
                value = v.detach().float() / job.accum
                parts[k] = parts[k] + value if k in parts else value
        job.scaler.step(job.optimizer)
        job.scaler.update()
        assert total is not None  # accum >= 1
        return StepOutput(loss=[total], images=job.opts.batch_size, parts=parts, scalars={"lr": lr})

    def close(self) -> None:
        self.batches = None


class PreciseBNHook(Hook):
    """Precise BN before every evaluation (Detectron2's order): BatchNorm statistics re-estimated on
    training batches, before the checkpointer saves them and the evaluation reads them."""

    def __init__(self, job: Job, due):
        self.job, self.due = job, due

    def after_step(self, trainer) -> None:
        if self.due(trainer):
            with trainer.side_work():
                self.run(trainer.step)

    def run(self, at: int) -> None:
        job, opts, dev = self.job, self.job.opts, self.job.device
        n = min(opts.precise_bn, max(job.plan.max_iters, 1))
        if n < 1 or not job.train_set or opts.eval_only:
            return
        # BN re-estimation must not shift the training RNG stream.
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            precise_bn(job.core, job.batches(opts.seed * 1_000_003 + at + 1, 0), n, dev, opts.precision)


class EvalHook(Hook):
    """COCO evaluation every ``eval_every`` iterations and at the end, after the precise BN and
    the checkpoint of the same step (so an evaluation that fails loses no training: the rerun
    finds the finished checkpoint and evaluates it again)."""

    def __init__(self, job: Job, due):
        self.job, self.due = job, due
        self.metrics: dict = {}

    def after_step(self, trainer) -> None:
        if not self.due(trainer):
            return
        with trainer.side_work():
            self.metrics = self.run()
        trainer.record.update({f"{t}_{k}": v for t in ("bbox", "segm") for k, v in self.metrics.get(t, {}).items()})
        if self.metrics and not trainer.is_last:  # the final block is printed once, with the summary
            trainer.metrics.bar.write(f"iteration {trainer.step}:\n{format_metrics(self.metrics)}")

    def run(self) -> dict:
        job, opts, dev = self.job, self.job.opts, self.job.device
        start = time.perf_counter()
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):  # the training RNG stays
            metrics = evaluate(
                job.core,
                job.coco_val,
                job.coco_train.label_to_cat,
                job.masks,
                dev,
                job.per_device,
                opts.workers,
                opts.precision,
                progress=opts.progress,
            )
        if job.is_main:
            metrics["eval_seconds"] = round(time.perf_counter() - start, 2)
        return metrics


class FinetuneStage:
    """Fine-tuning on the engine (``engine.run``): the job, the step, precise BN + COCO AP as
    hooks around the checkpointer, what a checkpoint holds, the summary."""

    command = "finetune"
    distributed = True
    keep_checkpoints = 1
    run_keys: tuple[str, ...] = RESUME_FREE

    def __init__(self, weights, train_json, train_images, val_json, val_images, out, opts: FinetuneOptions,
                 allow_leak: bool = False):  # fmt: skip
        self.weights, self.out, self.opts, self.allow_leak = weights, Path(out), opts, allow_leak
        self.paths = (train_json, train_images, val_json, val_images)
        self.trains = not opts.eval_only  # an evaluation-only run starts nothing fresh
        self.skips = SkipLog(warn=True)

    def check(self, info, fresh: bool) -> None:
        if not self.allow_leak:  # every rank: all stop together, before OUT is made
            _refuse_leaks(self.weights, self.paths[2], self.paths[3], info.is_main)

    def build(self, info) -> None:
        job = build_job(self.weights, *self.paths, self.out, self.opts, info)
        job.start = start_record(self.weights)
        self.job, self.device, self.is_main = job, job.device, job.is_main
        self.total_steps = job.plan.max_iters
        self.precise = PreciseBNHook(job, self.eval_due)
        self.evaluation = EvalHook(job, self.eval_due)

    def eval_due(self, trainer) -> bool:
        return trainer.is_last or trainer.every(self.opts.eval_every)

    # -- checkpoints
    def recipe(self) -> dict:
        return asdict(self.opts)

    def recipe_of(self, checkpoint: dict, path: Path, accept_changes: bool) -> dict:
        job = self.job
        if not isinstance(checkpoint, dict) or not {"model", "optimizer", "iteration"} <= set(checkpoint):
            raise UserError(f"{path}: not a soco finetune checkpoint (a pretraining checkpoint or an export?)")
        began = checkpoint.get("start")
        if began is not None and began != job.start and not accept_changes:
            raise UserError(
                f"{path}: this fine-tune started from {describe_start(began)}, not {describe_start(job.start)}; give "
                "another --out, --resume none --overwrite, or --accept-changes"
            )
        check_same_detector(checkpoint, path, job)
        return checkpoint.get("options", {})

    def state_dict(self, step: int) -> dict:
        job = self.job
        return {
            "model": job.core.state_dict(),
            "optimizer": job.optimizer.state_dict(),
            "scaler": job.scaler.state_dict(),
            "iteration": step,
            "options": asdict(self.opts),
            "num_classes": job.coco_train.num_classes,
            "masks": job.masks,
            "categories": job.coco_train.cat_ids,
            "world_size": job.world,
            "start": job.start,  # the starting weights (start_record), checked on resume
            "backbone": job.backbone,  # checked on resume (check_same_detector)
        }

    def load_state_dict(self, checkpoint: dict, path: Path) -> None:
        self.job.core.load_state_dict(checkpoint["model"])
        self.job.optimizer.load_state_dict(checkpoint["optimizer"])
        self.job.scaler.load_state_dict(checkpoint["scaler"])

    def resumed_line(self, checkpoint: dict, path: Path) -> str:
        return f"resumed from {path} at iteration {int(checkpoint['iteration'])}"

    # -- the run
    def finished_result(self, start: int):
        job, out = self.job, self.out
        if self.opts.eval_only:
            self.precise.run(start)
            return _finish(job, out, self.weights, start, self.evaluation.run(), None, 0.0, eval_only=True)
        if start >= job.plan.max_iters and (out / METRICS_FILE).is_file():
            if not job.is_main:
                return {}
            stored = json.loads((out / METRICS_FILE).read_text(encoding="utf-8"))
            print(f"already finished ({start} iterations); metrics in {out / METRICS_FILE}\n{format_metrics(stored)}",
                  flush=True)  # fmt: skip
            return stored
        return None

    def begin(self, start: int, stop: int, resumed_from) -> None:
        if self.is_main:
            _announce(self.job)
        self.job.model.train()

    def make_step(self, start: int) -> FinetuneStep:
        return FinetuneStep(self.job, start, self.skips)

    def metrics(self) -> dict:
        opts = self.opts
        return {
            "desc": "finetune",
            "tensorboard": False,
            "log_due": lambda tr: tr.every(opts.log_every) or self.eval_due(tr),
            "check_every": 1 if self.device.type == "cpu" else opts.log_every,
            "record": lambda tr, w: {
                "loss": w.loss,
                "lr": tr.output.scalars["lr"],
                "images_per_s": round(w.images_per_s, 3),
                **w.parts,
            },
            "where": lambda tr: f"in iteration {tr.step}",
            "hint": "Try a lower --lr or --precision fp32.",
        }

    def checkpoint_due(self, trainer) -> bool:
        return trainer.every(self.opts.checkpoint_every) or self.eval_due(trainer)

    def hooks(self, writer: Hook, checkpointer: Hook) -> list[Hook]:
        # precise BN, then the checkpoint (with the re-estimated statistics), then the evaluation
        return [self.precise, checkpointer, self.evaluation, writer]

    def finish(self, trainer: Trainer, start: int, seconds: float) -> dict:
        metrics = self.evaluation.metrics
        if start >= self.job.plan.max_iters:  # finished, but its evaluation did not complete: redo it
            self.precise.run(trainer.step)
            if trainer.checkpointer is not None:
                trainer.checkpointer.save(trainer)
            metrics = self.evaluation.run()
        return _finish(self.job, self.out, self.weights, trainer.step, metrics, self.skips, trainer.seconds,
                       saved=trainer.last_checkpoint)  # fmt: skip


def check_same_detector(checkpoint: dict, path: Path, job: Job) -> None:
    """A fine-tune checkpoint resumes only into the detector it was made for: its backbone, its
    classes and whether it has masks (one line naming ``path`` otherwise)."""
    made_with = checkpoint.get("backbone", "resnet50")  # checkpoints from before the key: ResNet-50
    if made_with != job.backbone:
        raise UserError(
            f"{path}: a fine-tune of a {made_with} detector, this run builds {job.backbone} "
            f"(--backbone {made_with} with --weights none, or another --out)"
        )
    if checkpoint.get("num_classes") != job.coco_train.num_classes or checkpoint.get("masks") != job.masks:
        raise UserError(
            f"{path}: made for {checkpoint.get('num_classes')} classes "
            f"({'masks' if checkpoint.get('masks') else 'boxes only'}), this data needs "
            f"{job.coco_train.num_classes} ({'masks' if job.masks else 'boxes only'}); "
            "use another --out or --resume none"
        )


# ---------------------------------------------------------------- the entry point


def finetune(
    weights,
    train_json,
    train_images,
    val_json,
    val_images,
    out,
    options: FinetuneOptions | None = None,
    *,
    overwrite: bool = False,
    accept_changes: bool = False,
    allow_leak: bool = False,
    **overrides,
) -> dict:
    """Fine-tune from ``weights`` (file, SoCo run folder, or None/"none") and evaluate; returns the
    metrics written to ``out/metrics.json`` (rank 0; {} on other ranks).

    ``options`` (or keyword ``overrides`` of its fields) set the recipe. The output folder is
    locked for the run; ``overwrite`` lets ``resume="none"`` move an earlier run aside;
    ``accept_changes`` resumes a run that started from other weights or with other recipe
    options (those outside RESUME_FREE); ``allow_leak`` runs even if validation images are in the
    weights' pretraining set. Raises UserError, CocoError, WeightsError, CheckpointError,
    UserError, LeakError, NonFiniteLossError.
    """
    opts = _options(options, overrides)
    stage = FinetuneStage(weights, train_json, train_images, val_json, val_images, out, opts, allow_leak)
    return run(stage, out, resume=opts.resume, accept_changes=accept_changes, overwrite=overwrite,
               device=opts.device, progress=opts.progress)  # fmt: skip


def _refuse_leaks(weights, val_json, val_images, is_main: bool) -> None:
    """The leak guard of soco knn and soco compare (data/manifest.py): LeakError (one line naming
    both files) when a validation image's bytes are in the pretraining data manifest of
    ``weights``; a note when the weights have none."""
    if weights is None:
        return
    coco_val = load_coco(val_json, val_images)
    paths = [coco_val.image_path(image) for image in coco_val.images]

    def log(line: str) -> None:
        if is_main:
            print(line, flush=True)

    check_weights_no_leak([("--weights", weights)], paths, "val", log)


def _options(options: FinetuneOptions | None, overrides: dict) -> FinetuneOptions:
    opts = options or FinetuneOptions()
    if overrides:
        unknown = sorted(set(overrides) - set(FinetuneOptions.__dataclass_fields__))
        if unknown:
            raise TypeError(f"finetune() got unknown option(s): {', '.join(unknown)}")
        opts = FinetuneOptions(**{**asdict(opts), **overrides})
    make_plan(opts)  # schedule and batch errors before any data is read
    return opts


def _announce(job: Job) -> None:
    opts, plan = job.opts, job.plan
    print(
        f"fine-tuning {'Mask' if job.masks else 'Faster'} R-CNN ({_label(job.backbone)}-FPN) on "
        f"{len(job.train_set)} images "
        f"({len(job.usable)} usable, fraction {opts.fraction:g}), {job.coco_train.num_classes - 1} classes: "
        f"{plan.max_iters} iterations at batch {opts.batch_size} ({job.per_device} x {job.world} process(es) x "
        f"{job.accum} accumulation), lr "
        f"{plan.lr:g}, drops at {plan.steps[0]} and {plan.steps[1]}, warm-up {plan.warmup_iters}, "
        f"{opts.precision} on {job.device}",
        flush=True,
    )


def _label(backbone: str) -> str:

    return backbone_info(backbone).label


def _finish(
    job: Job,
    out: Path,
    weights,
    iteration: int,
    metrics: dict,
    skips: SkipLog | None,
    seconds: float,
    saved=None,
    eval_only: bool = False,
) -> dict:
    """Rank 0: OUT/metrics.json (atomic) and the AP block, printed once."""
    if not job.is_main:
        return {}
    opts = job.opts
    if eval_only:
        metrics.update(iterations=iteration, weights=str(weights or "none"), seconds=0.0)
    else:
        metrics.update(
            iterations=iteration,
            max_iters=job.plan.max_iters,
            weights=str(weights or "none"),
            soco_weights=opts.soco_weights,
            backbone=job.backbone,
            train_images=len(job.train_set),
            fraction=opts.fraction,
            seed=opts.seed,
            batch=opts.batch_size,
            per_device_batch=job.per_device,
            seconds=round(seconds, 2),
            skipped_train_images=sorted(skips.reasons) if skips is not None else [],
            weights_loaded={m: list(c) for m, c in job.report.modules.items()},
        )
    atomic_write_json(out / METRICS_FILE, metrics)
    if skips is not None and skips.reasons:
        print(skips.summary("training: skipped images"), flush=True)
    head = (
        ""
        if eval_only
        else (
            f"finished {iteration} iterations in {seconds:.0f} s; checkpoint {saved}; metrics in {out / METRICS_FILE}\n"
        )
    )
    print(f"{head}{format_metrics(metrics)}", flush=True)
    return metrics
