"""``soco finetune``: Mask R-CNN (torchvision, R50-FPN v2) fine-tune with COCO AP (paper section 4.2).

``finetune(weights, train_json, train_images, val_json, val_images, out, ...) -> metrics`` trains
the detector of :mod:`.detector` from SoCo weights (or from scratch: ``weights="none"``) on a
COCO-format set and evaluates it with pycocotools (:mod:`.coco_eval`) into ``OUT/metrics.json``.

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

Engine as ``soco pretrain``: one process or torchrun/srun (DDP, rank 0 logs, saves and scores
the gathered predictions), ``OUT/checkpoints/last.pt`` (atomic) every ``checkpoint_every``
iterations and at the end, ``resume="auto"`` continues exactly (iteration, weights, optimiser,
grad scaler, RNG; the data stream is a function of the seed and the iteration), tqdm progress,
``OUT/metrics.jsonl``.
"""

from __future__ import annotations

from ..errors import NonFiniteLossError, UserError
import bisect
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from .coco import CocoDetection, TrainStream, collate, load_coco, select_fraction, trainable_images
from .coco_eval import coco_evaluate, format_metrics, to_coco_results
from ..config import FinetuneOptions  # the options live with every command's config
from ..files import atomic_write_json
from ..train.loop import autocast
from .detector import DEFAULT_SOCO_WEIGHTS, build_detector, eval_sizes, load_weights

SCHEDULES = {"1x": 90_000, "2x": 180_000}  # iterations at batch 16 (Detectron2)
REFERENCE_BATCH = 16  # paper 4.2: batch 16, lr 0.02
PRECISIONS = ("fp32", "bf16", "fp16")
METRICS_FILE = "metrics.json"


class FinetuneError(UserError):
    """Options or inputs the fine-tune cannot run with; one line."""


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
    """1x/2x (or max_iters), lr drops, warm-up and lr for ``opts.batch`` (see module docstring)."""
    if opts.batch < 1:
        raise FinetuneError(f"batch must be >= 1, got {opts.batch}")
    scale = REFERENCE_BATCH / opts.batch
    if opts.max_iters is not None:
        if opts.max_iters < 1:
            raise FinetuneError(f"max_iters must be >= 1, got {opts.max_iters}")
        total = int(opts.max_iters)
    else:
        if opts.schedule not in SCHEDULES:
            raise FinetuneError(f"schedule must be one of {', '.join(SCHEDULES)}, got {opts.schedule!r}")
        total = max(1, round(SCHEDULES[opts.schedule] * scale))
    steps = (round(total * 2 / 3), round(total * 8 / 9))  # paper 4.2; 1x: 60000, 80000
    warmup = min(round(opts.warmup_iters * scale), steps[0])
    lr = opts.lr if opts.lr is not None else 0.02 * opts.batch / REFERENCE_BATCH
    return Plan(total, steps, max(0, warmup), lr, opts.warmup_factor, opts.gamma)


def lr_at(iteration: int, plan: Plan) -> float:
    """Detectron2's WarmupMultiStepLR at 0-based ``iteration`` (the lr of that update)."""
    factor = plan.gamma ** bisect.bisect_right(plan.steps, iteration)
    if iteration < plan.warmup_iters:
        alpha = iteration / plan.warmup_iters
        factor *= plan.warmup_factor * (1 - alpha) + alpha
    return plan.lr * factor


def param_groups(model: nn.Module, weight_decay: float, weight_decay_norm: float) -> list[dict]:
    """Normalisation-layer parameters get ``weight_decay_norm``, every other one ``weight_decay``."""
    norm, other, seen = [], [], set()
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


class Skips:
    """Images that failed to decode (or did not match the JSON's size), by path."""

    def __init__(self):
        self.reasons: dict[str, str] = {}
        self.count = 0

    def add(self, items) -> None:
        for item in items:
            if item["error"] is not None:
                path, reason = item["error"]
                self.count += 1
                if path not in self.reasons:
                    self.reasons[path] = reason
                    print(f"soco: warning: skipped {path}: {reason}", flush=True)

    def summary(self, what: str) -> str:
        lines = [f"{what}: {len(self.reasons)} image(s) skipped ({self.count} times):"]
        lines += [f"  {p}: {r}" for p, r in sorted(self.reasons.items())[:20]]
        if len(self.reasons) > 20:
            lines.append(f"  ... and {len(self.reasons) - 20} more")
        return "\n".join(lines)


def _loader(dataset, batch: int, workers: int, device: torch.device, sampler=None, seed: int = 0):
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch, sampler=sampler, num_workers=workers, collate_fn=collate,
        pin_memory=device.type == "cuda",
        # its own generator: creating the loader never consumes the global RNG (exact resume)
        generator=torch.Generator().manual_seed(seed),
    )


# ---------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(model: nn.Module, coco_val, label_to_cat: dict[int, int], masks: bool, device: torch.device,
             batch: int = 1, workers: int = 0, precision: str = "fp32", progress: bool = False) -> dict:
    """Predict every val image (this process's share) and score them with COCOeval on rank 0.

    ``label_to_cat``: the model's labels 1..C -> COCO category ids (of the training JSON).

    Returns ``{"bbox": {...}, "segm": {...}, "val_images": n, "skipped": [...]}`` on rank 0, {} elsewhere.
    """
    from ..train.distributed import get_rank, get_world_size

    rank, world = get_rank(), get_world_size()
    dataset = CocoDetection(coco_val, coco_val.images[rank::world], masks, targets=False)
    loader = _loader(dataset, batch, workers, device)
    results, evaluated, skips = [], [], Skips()
    was_training = model.training
    model.eval()
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=len(dataset), desc="evaluate", unit="img", dynamic_ncols=True, mininterval=1.0)
    try:
        with eval_sizes(model):
            for items in loader:
                skips.add(items)
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
        import torch.distributed as dist

        gathered = [None] * world
        dist.all_gather_object(gathered, (results, evaluated, skips.reasons))
        results = [r for part in gathered for r in part[0]]
        evaluated = [i for part in gathered for i in part[1]]
        for part in gathered:
            skips.reasons.update(part[2])
    if rank != 0:
        return {}
    if not evaluated:
        raise FinetuneError(f"{coco_val.json_path}: no validation image could be read")
    iou_types = ("bbox", "segm") if masks else ("bbox",)
    metrics = coco_evaluate(coco_val.data, results, iou_types, image_ids=evaluated)
    metrics["val_images"] = len(evaluated)
    metrics["skipped_val_images"] = sorted(skips.reasons)
    return metrics


@torch.no_grad()
def precise_bn(model: nn.Module, batches, num_iters: int, device: torch.device, precision: str) -> None:
    """Re-estimate BatchNorm running statistics as the mean over ``num_iters`` training batches
    (Detectron2's PreciseBN / fvcore update_bn_stats), model in training mode, no gradients."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    if not bns or num_iters < 1:
        return
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average of the batches' statistics
    try:
        for _ in range(num_iters):
            images, targets = _to_device([i for i in next(batches) if i["image"] is not None], device, True)
            if images:
                with autocast(device, precision):
                    model(images, targets)
    finally:
        for m, momentum in zip(bns, momenta):
            m.momentum = momentum


# ---------------------------------------------------------------- the fine-tune


def finetune(weights, train_json, train_images, val_json, val_images, out, options: FinetuneOptions | None = None,
             **overrides) -> dict:
    """Fine-tune from ``weights`` (file, SoCo run folder, or None/"none") and evaluate; returns the
    metrics written to ``out/metrics.json`` (rank 0; {} on other ranks).

    ``options`` (or keyword ``overrides`` of its fields) set the recipe. Raises FinetuneError,
    CocoError, WeightsError, CheckpointError, NonFiniteLossError.
    """
    from ..train.checkpoint import CheckpointManager, load_checkpoint, rng_state, set_rng_state
    from ..train.distributed import all_reduce_mean, barrier, cleanup, init_distributed

    opts = options or FinetuneOptions()
    if overrides:
        unknown = sorted(set(overrides) - set(FinetuneOptions.__dataclass_fields__))
        if unknown:
            raise TypeError(f"finetune() got unknown option(s): {', '.join(unknown)}")
        opts = FinetuneOptions(**{**asdict(opts), **overrides})
    if opts.precision not in PRECISIONS:
        raise FinetuneError(f"precision must be one of {', '.join(PRECISIONS)}, got {opts.precision!r}")
    if not 0.0 < opts.fraction <= 1.0:
        raise FinetuneError(f"fraction must be in (0, 1], got {opts.fraction}")
    out = Path(out)
    plan = make_plan(opts)

    info = init_distributed(opts.device)
    dev, world, is_main = info.device, info.world_size, info.is_main
    try:
        if opts.precision == "fp16" and dev.type != "cuda":
            raise FinetuneError("precision fp16 needs a CUDA device; use bf16 or fp32 on the CPU")
        if opts.batch % world:
            raise FinetuneError(f"batch {opts.batch} is not divisible by the {world} processes")
        per_rank = opts.batch // world
        coco_train = load_coco(train_json, train_images)
        coco_val = load_coco(val_json, val_images)
        masks = coco_train.has_masks and not opts.boxes_only
        if coco_val.cat_ids != coco_train.cat_ids and is_main:
            print(f"note: {coco_val.json_path.name} and {coco_train.json_path.name} list different categories; "
                  "labels follow the training JSON", flush=True)
        usable = trainable_images(coco_train, masks)
        if not usable and not opts.eval_only:
            raise FinetuneError(f"{coco_train.json_path}: no image has a usable annotation "
                                "(non-crowd, non-empty box" + (", with a mask)" if masks else ")"))
        train_set = select_fraction(usable, opts.fraction, opts.seed) if usable else []
        if is_main and opts.fraction < 1.0:
            atomic_write_json(out / "train_subset.json", {"fraction": opts.fraction, "seed": opts.seed,
                                                   "image_ids": [im["id"] for im in train_set]})

        # ---- model
        test_size = opts.test_size or max(opts.train_sizes)
        torch.manual_seed(opts.seed)  # the same new heads on every rank
        model = build_detector(
            coco_train.num_classes, masks, opts.train_sizes, test_size, opts.max_size,
            box_batch_size_per_image=opts.roi_batch, rpn_post_nms_top_n_train=opts.rpn_train_proposals,
            rpn_post_nms_top_n_test=opts.test_proposals, box_detections_per_img=opts.detections)
        report = load_weights(model, weights, opts.soco_weights)
        if is_main:
            print(report.format(), flush=True)
        from ..model.soco import convert_sync_bn

        model = convert_sync_bn(model.to(dev))  # SyncBN only when world size > 1 (paper 4.2)
        core = model
        optimizer = torch.optim.SGD(param_groups(core, opts.weight_decay, opts.weight_decay_norm), lr=plan.lr,
                                    momentum=opts.momentum)
        scaler = torch.amp.GradScaler(dev.type, enabled=opts.precision == "fp16")

        # ---- resume
        manager = CheckpointManager(out, keep=1)
        checkpoint = manager.resume_from(opts.resume)
        iteration = 0
        if checkpoint is not None:
            state = load_checkpoint(checkpoint, map_location=dev)
            if state.get("num_classes") != coco_train.num_classes or state.get("masks") != masks:
                raise FinetuneError(f"{checkpoint}: made for {state.get('num_classes')} classes "
                                    f"({'masks' if state.get('masks') else 'boxes only'}), this data needs "
                                    f"{coco_train.num_classes} ({'masks' if masks else 'boxes only'}); "
                                    "use another --out or --resume none")
            core.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scaler.load_state_dict(state["scaler"])
            iteration = int(state["iteration"])
            set_rng_state(state["rng"])
            if is_main:
                print(f"resumed from {checkpoint} at iteration {iteration}", flush=True)

        def checkpoint_state() -> dict:
            return {"model": core.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                    "iteration": iteration, "step": iteration, "rng": rng_state(), "options": asdict(opts),
                    "num_classes": coco_train.num_classes, "masks": masks, "categories": coco_train.cat_ids,
                    "world_size": world}

        train_skips = Skips()

        def batches_from(seed: int, start: int):
            stream = TrainStream(len(train_set), per_rank, info.rank, world, seed, start)
            dataset = CocoDetection(coco_train, train_set, masks)
            return iter(_loader(dataset, per_rank, opts.workers, dev, sampler=stream, seed=seed))

        eval_time = [0.0]

        def run_eval(at: int) -> dict:
            start = time.perf_counter()
            # BN re-estimation and evaluation must not shift the training RNG stream.
            with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
                n = min(opts.precise_bn, max(plan.max_iters, 1))
                if n > 0 and train_set and not opts.eval_only:
                    precise_bn(core, batches_from(opts.seed * 1_000_003 + at + 1, 0), n, dev, opts.precision)
                metrics = evaluate(core, coco_val, coco_train.label_to_cat, masks, dev, per_rank, opts.workers,
                                   opts.precision, progress=opts.progress)
            eval_time[0] += time.perf_counter() - start
            if is_main:
                metrics["eval_seconds"] = round(time.perf_counter() - start, 2)
            return metrics

        # ---- evaluation only
        if opts.eval_only:
            metrics = run_eval(iteration)
            if is_main:
                metrics.update(iterations=iteration, weights=str(weights or "none"), seconds=0.0)
                atomic_write_json(out / METRICS_FILE, metrics)
                print(format_metrics(metrics), flush=True)
            return metrics

        if iteration >= plan.max_iters and (out / METRICS_FILE).is_file():
            if is_main:
                print(f"already finished ({iteration} iterations); metrics in {out / METRICS_FILE}", flush=True)
            return json.loads((out / METRICS_FILE).read_text(encoding="utf-8")) if is_main else {}
        if world > 1:
            model = nn.parallel.DistributedDataParallel(core, device_ids=[dev.index] if dev.type == "cuda" else None)
        if is_main:
            print(f"fine-tuning {'Mask' if masks else 'Faster'} R-CNN on {len(train_set)} images "
                  f"({len(usable)} usable, fraction {opts.fraction:g}), {coco_train.num_classes - 1} classes: "
                  f"{plan.max_iters} iterations at batch {opts.batch} ({per_rank} x {world}), lr {plan.lr:g}, "
                  f"drops at {plan.steps[0]} and {plan.steps[1]}, warm-up {plan.warmup_iters}, "
                  f"{opts.precision} on {dev}", flush=True)

        from ..train.metrics import MetricsLogger, Progress

        logger = MetricsLogger(out, enabled=is_main, tensorboard=False)
        bar = Progress(plan.max_iters, initial=iteration, enabled=is_main and opts.progress, desc="finetune")
        batches = batches_from(opts.seed, iteration)
        window: dict[str, float] = {}
        window_iters, window_images, window_start = 0, 0, time.perf_counter()
        start_time, last_good, saved, metrics = time.perf_counter(), None, checkpoint, {}
        if iteration >= plan.max_iters:  # finished before its metrics were written: evaluate again
            metrics = run_eval(iteration)
        model.train()
        try:
            while iteration < plan.max_iters:
                items = next(batches)
                train_skips.add(items)
                images, targets = _to_device(items, dev, with_targets=True)
                if images:
                    last_good = (images, targets)
                elif last_good is None:
                    raise FinetuneError("every image of the first batch failed to decode (see the warnings)")
                else:
                    images, targets = last_good  # keeps every rank stepping together
                lr = lr_at(iteration, plan)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                with autocast(dev, opts.precision):
                    losses = model(images, targets)
                loss = sum(losses.values())
                value = all_reduce_mean(loss.detach().float()).item()
                if not math.isfinite(value):
                    raise NonFiniteLossError(
                        f"non-finite loss ({value}) at iteration {iteration}; stopped without saving. Last "
                        f"checkpoint: {saved or 'none'}. Try a lower --lr or --precision fp32.")
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                iteration += 1
                step_done = time.perf_counter()  # throughput excludes checkpoints and evaluations
                window_iters += 1
                window_images += opts.batch
                window["loss"] = window.get("loss", 0.0) + value
                for k, v in losses.items():
                    window[k] = window.get(k, 0.0) + float(v.detach())

                bar.update(iteration, loss=value, lr=lr)
                last = iteration == plan.max_iters
                eval_now = last or (opts.eval_every and iteration % opts.eval_every == 0)
                save_now = last or iteration % opts.checkpoint_every == 0
                eval_metrics = {}
                if save_now and not eval_now:
                    if is_main:
                        saved = manager.save(checkpoint_state(), step=iteration)
                    barrier()
                if eval_now:  # precise BN, checkpoint (with its statistics), evaluation: Detectron2's order
                    eval_metrics = run_eval(iteration)
                    if is_main:
                        saved = manager.save(checkpoint_state(), step=iteration)  # with the precise BN statistics
                        bar.write(f"iteration {iteration}:\n{format_metrics(eval_metrics)}")
                    barrier()
                    metrics = eval_metrics
                if iteration % opts.log_every == 0 or last or eval_now:
                    elapsed = max(step_done - window_start, 1e-9)
                    means = {k: v / window_iters for k, v in window.items()}
                    extras = {f"{t}_{k}": v for t in ("bbox", "segm") for k, v in eval_metrics.get(t, {}).items()}
                    logger.log(iteration, lr=lr, images_per_s=round(window_images / elapsed, 3), **means, **extras)
                    window, window_iters, window_images, window_start = {}, 0, 0, time.perf_counter()
        finally:
            bar.close()
            logger.close()
            del batches
        seconds = time.perf_counter() - start_time - eval_time[0]  # training only
        if not is_main:
            return {}
        metrics.update(iterations=iteration, max_iters=plan.max_iters, weights=str(weights or "none"),
                       soco_weights=opts.soco_weights, train_images=len(train_set), fraction=opts.fraction, seed=opts.seed, batch=opts.batch,
                       seconds=round(seconds, 2), skipped_train_images=sorted(train_skips.reasons),
                       weights_loaded={m: list(c) for m, c in report.modules.items()})
        atomic_write_json(out / METRICS_FILE, metrics)
        if train_skips.reasons:
            print(train_skips.summary("training"), flush=True)
        print(f"finished {iteration} iterations in {seconds:.0f} s; checkpoint {saved}; metrics in "
              f"{out / METRICS_FILE}\n{format_metrics(metrics)}", flush=True)
        return metrics
    finally:
        cleanup()
