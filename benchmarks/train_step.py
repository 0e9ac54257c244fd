"""Benchmark: one SoCo training step (FPN, C4, SoCo*) on a synthetic batch.

For each model, a step is ``soco pretrain``'s own step (``train.loop.PretrainStep`` on a job
built by ``train.fixed_batch.job_for_batch``: the same model, LARS, precision, lr/tau schedules and
EMA update, no accumulation): forward of the online and target networks on every view, the
loss, backward, the LARS update and the EMA update of the target. The batch is synthetic
(random normalised views, random boxes of 16 px to the whole view, levels from the paper's
scale-aware assignment, K = 4, all valid), so the data pipeline is not measured (benchmarks/data.py does that).

Reported per model: images/s (batch / mean step time after warm-up steps), FLOPs per image of
one forward + backward (torch.utils.flop_counter.FlopCounterMode, which counts matmuls and
convolutions: 2 FLOPs per multiply-add; the optimiser and EMA updates are not counted), and
peak memory (GPU: torch.cuda.max_memory_allocated; CPU: the process's peak resident memory,
VmHWM, reset before each row where Linux allows).

    python benchmarks/train_step.py                       # CPU: batch 2, 224 px views
    python benchmarks/train_step.py --size 96 --batch 8   # the tiny preset's views
    python benchmarks/train_step.py --device cuda         # GPU: batch 64, bf16, channels_last
    python benchmarks/train_step.py --models FPN --freeze none,stem,backbone,backbone+fpn  # warm starts
    python benchmarks/train_step.py --models R18-FPN --size 64 --batch 32 --roi-pool per_level,packed  # cpu-small

Views: V1 and V2 at --size, V3 at size/2, V4 at size x 192/224 (the paper's proportions).
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import sys
import time

import numpy as np
import torch
from bench_common import cpu_model, peak_rss_mib, reset_peak_rss  # benchmarks/bench_common.py
from torch.utils.flop_counter import FlopCounterMode

from soco_pretrain.config import apply_overrides
from soco_pretrain.data.synthetic import synthetic_batch
from soco_pretrain.engine.skips import SkipLog
from soco_pretrain.presets import load_preset
from soco_pretrain.train.fixed_batch import job_for_batch
from soco_pretrain.train.loop import Position, PretrainStep

# row name -> (preset, number of views the model uses)
MODELS = {"FPN": ("fpn-100ep", 3), "C4": ("c4-100ep", 2), "SoCo*": ("fpn-star-400ep", 4), "R18-FPN": ("cpu-small", 3)}


def view_sizes(size: int) -> list[int]:
    return [size, size, max(32, size // 2), max(32, round(size * 192 / 224))]


def step_config(
    preset: str,
    size: int,
    batch: int,
    precision: str,
    channels_last: bool | None,
    compile: bool | None,
    freeze: str = "none",
    extra: tuple[str, ...] = (),
):
    """The preset's config for a step on a prepared batch of ``batch`` images at ``size`` px.
    ``channels_last`` / ``compile`` None keep the preset's (what ``soco pretrain`` resolves);
    ``extra``: more ``key=value`` overrides."""
    sizes = view_sizes(size)
    speed = [f"train.channels_last={str(channels_last).lower()}"] if channels_last is not None else []
    speed += [f"train.compile={str(compile).lower()}"] if compile is not None else []
    return apply_overrides(
        load_preset(preset),
        [
            *(f"data.views.v{i + 1}_size={s}" for i, s in enumerate(sizes)),
            f"train.precision={precision}",
            f"train.per_device_batch={batch}",
            *speed,
            "data.augment.device=cpu",  # a prepared batch: no on-device augmentation to time
            f"train.freeze={freeze}",
            *extra,
        ],
    )


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_model(name: str, args, device, freeze: str = "none", roi_pool: str | None = None) -> dict:
    preset, n_views = MODELS[name]
    sizes = view_sizes(args.size)
    channels_last = device.type == "cuda" and not args.no_channels_last
    extra = (f"model.roi_pool={roi_pool}",) if roi_pool else ()
    cfg = step_config(preset, args.size, args.batch, args.precision, channels_last, args.compile, freeze, extra)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    rss_reset = reset_peak_rss()
    batch = synthetic_batch(cfg.data.views, args.batch, args.k, n_views)
    batch["views"] = [v.to(device) for v in batch["views"]]
    if channels_last:
        batch["views"] = [v.contiguous(memory_format=torch.channels_last) for v in batch["views"]]
    job = job_for_batch(cfg, batch, device)
    model, precision = job.core, job.plan.precision
    step = PretrainStep(job, Position(), SkipLog())
    job.model.train()
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
        if precision != "fp32"
        else None
    )

    for i in range(args.warmup):
        step(i)
    _sync(device)
    times = []
    for i in range(args.steps):
        t0 = time.perf_counter()
        step(args.warmup + i)
        _sync(device)
        times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        memory = f"{peak:.2f} GiB (allocated)"
    else:
        memory = f"{peak_rss_mib() / 1024:.2f} GiB (VmHWM{'' if rss_reset else ', since start'})"

    # FLOPs of one forward + backward (eager: the counter sees the aten ops).
    counter = FlopCounterMode(display=False)
    with counter:
        if autocast is None:
            loss, _ = model(batch)
        else:
            with autocast:
                loss, _ = model(batch)
        loss.backward()
    job.optimizer.zero_grad(set_to_none=True)
    flops = counter.get_total_flops() / args.batch
    step_s = float(np.median(times))
    return {
        "name": name
        + ("" if freeze == "none" else f", freeze {freeze}")
        + (f", roi_pool {roi_pool}" if roi_pool else ""),
        "model": name,
        "views": "+".join(str(s) for s in sizes[:n_views]),
        "precision": precision,
        "images_per_s": args.batch / step_s,
        "ms": 1000 * step_s,
        "gflop": flops / 1e9,
        "memory": memory,
    }


def table(rows: list[dict], args) -> str:
    lines = [
        "| step | views (px) | batch | precision | images/s | x first row of the model | ms/step "
        "| GFLOP/image (fwd+bwd) | peak memory |",
        "|---|---|---:|---|---:|---:|---:|---:|---|",
    ]
    first: dict = {}
    for r in rows:
        base = first.setdefault(r["model"], r["images_per_s"])
        lines.append(
            f"| {r['name']} | {r['views']} | {args.batch} | {r['precision']} | {r['images_per_s']:.2f} | "
            f"{r['images_per_s'] / base:.2f} | {r['ms']:.0f} | {r['gflop']:.1f} | {r['memory']} |"
        )
    return "\n".join(lines)


def machine(device) -> str:
    import torchvision

    cpu = f"{cpu_model()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "no GPU used"
    return (
        f"{cpu}; {gpu}; python {platform.python_version()}, torch {torch.__version__}, "
        f"torchvision {torchvision.__version__}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda")
    parser.add_argument("--batch", type=int, default=None, help="images per step (default: 2 on CPU, 64 on GPU)")
    parser.add_argument("--size", type=int, default=224, help="V1/V2 size in px (default 224, the paper's)")
    parser.add_argument("--k", type=int, default=4, help="proposals per image (default 4, the paper's)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: 3 on CPU, 20 on GPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 1 CPU, 5 GPU)")
    parser.add_argument("--precision", default="auto", help="auto (bf16 on GPU, fp32 on CPU), bf16, fp16, fp32")
    parser.add_argument("--no-channels-last", action="store_true", help="GPU: keep NCHW")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (timed steps only)")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {', '.join(MODELS)}")
    parser.add_argument(
        "--freeze",
        default="none",
        help="comma-separated train.freeze modes, one row each per model (none, stem, backbone, backbone+fpn; "
        "FLOPs count the forward + the backward that runs)",
    )
    parser.add_argument(
        "--roi-pool",
        default="",
        help="comma-separated model.roi_pool values (per_level, packed), one row each per model (default: the "
        "preset's)",
    )
    args = parser.parse_args()
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    gpu = device.type == "cuda"
    args.batch = args.batch or (64 if gpu else 2)
    args.steps = args.steps or (20 if gpu else 3)
    args.warmup = args.warmup if args.warmup is not None else (5 if gpu else 1)
    if gpu:
        torch.backends.cudnn.benchmark = True
    rows = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        if name not in MODELS:
            sys.exit(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
        for freeze in [f.strip() for f in args.freeze.split(",") if f.strip()]:
            if freeze == "backbone+fpn" and name == "C4":
                continue  # C4 has no FPN
            for roi_pool in [r.strip() for r in args.roi_pool.split(",") if r.strip()] or [None]:
                print(f"benchmarking {name}, freeze {freeze}, roi_pool {roi_pool or 'preset'} ...", file=sys.stderr,
                      flush=True)  # fmt: skip
                rows.append(bench_model(name, args, device, freeze, roi_pool))
    print(
        f"\nSoCo training step on {device.type.upper()} (synthetic batch, K={args.k}; forward online + target, "
        f"loss, backward, LARS, EMA; median of {args.steps} steps after {args.warmup} warm-up):\n"
    )
    print(table(rows, args))
    print(f"\nMachine: {machine(device)}")


if __name__ == "__main__":
    main()
