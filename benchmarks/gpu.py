"""GPU benchmark: SoCo training steps against the card's own matmul rate, and the data pipeline.

One prepared script for a GPU machine. It prints, in order:

1. the card's measured bf16 matrix-product rate (8192^3, median of timed products on random
   data): the ceiling the steps are compared with;
2. training steps on a synthetic batch already on the device (data loading excluded): FPN, C4
   and SoCo* at batch 128 and 256, for the variants ``eager`` (NCHW), ``channels_last``,
   ``compile`` (channels_last + torch.compile) and ``cudagraph`` (channels_last +
   torch.compile(mode="reduce-overhead"), which captures CUDA graphs), plus fp16 and fp32 rows for
   FPN: images/s, achieved TFLOP/s (FLOPs per image from torch.utils.flop_counter, forward +
   backward of the online and target networks; the optimiser and EMA updates are not counted),
   percent of the measured matmul rate, peak memory;
3. whether the default step synchronises with the host (one step under
   ``torch.cuda.set_sync_debug_mode("error")``);
4. a profile of the default FPN step (top operators by device time; full table in --out);
5. end to end on real photos (``--images`` + ``--proposals``, replicated ``--copies`` times so an
   epoch spans many batches): ``soco pretrain``'s own loop with CPU workers, once with the
   photometric augmentation in the workers and once on the GPU: images/s and the fraction of
   time the step waited for data.

    python benchmarks/gpu.py --out results/                 # everything, defaults above
    python benchmarks/gpu.py --models FPN --batches 128 --variants eager,channels_last
    python benchmarks/gpu.py --device cpu --quick           # a smoke run of every code path on a CPU

``--budget-s`` stops adding rows once that many seconds have passed (compile rows come last), so
the script fits a fixed lease; rows left out are listed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import cpu_model, peak_rss_mib  # noqa: E402
from train_step import MODELS, step_config, synthetic_batch, view_sizes  # noqa: E402

from soco_pretrain.config import apply_overrides  # noqa: E402
from soco_pretrain.engine.skips import SkipLog  # noqa: E402
from soco_pretrain.presets import load_preset  # noqa: E402
from soco_pretrain.train.loop import Position, PretrainStep, job_for_batch  # noqa: E402

VARIANTS = ("eager", "channels_last", "compile", "cudagraph")
PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


class Clock:
    """Device-side timing (CUDA events) on a GPU, perf_counter on a CPU."""

    def __init__(self, device):
        self.device = device

    def time(self, fn, repeat: int) -> list[float]:
        out = []
        for _ in range(repeat):
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                out.append(start.elapsed_time(end) / 1000)
            else:
                t0 = time.perf_counter()
                fn()
                out.append(time.perf_counter() - t0)
        return out


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------- 1. matmul ceiling


def matmul_tflops(device, n: int, repeat: int) -> float:
    """bf16 (CPU: fp32) n x n x n products on random data, rotating over 3 operand sets."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device).manual_seed(0)
    sets = [
        (
            torch.randn(n, n, device=device, dtype=dtype, generator=g),
            torch.randn(n, n, device=device, dtype=dtype, generator=g),
        )
        for _ in range(3)
    ]
    out = torch.empty(n, n, device=device, dtype=dtype)
    for a, b in sets:  # warm-up: handles, kernels
        torch.matmul(a, b, out=out)
    sync(device)
    clock, times = Clock(device), []
    for i in range(repeat):
        a, b = sets[i % 3]
        times += clock.time(lambda a=a, b=b: torch.matmul(a, b, out=out), 1)
    return 2 * n**3 / float(np.median(times)) / 1e12


# ---------------------------------------------------------------- 2. training steps


def build_step(name: str, batch_size: int, variant: str, precision: str, size: int, k: int, device):
    """(step function, model, batch, autocast factory) for one row. The step is soco pretrain's own
    (``PretrainStep`` on ``job_for_batch``: model, LARS, schedules, EMA, with the row's precision,
    channels_last and compile settings), without accumulation. ``cudagraph`` swaps the job's
    forward for ``torch.compile(mode="reduce-overhead")``, which ``soco pretrain`` does not offer yet."""
    preset, n_views = MODELS[name]
    channels_last = variant != "eager"
    cfg = step_config(preset, size, batch_size, precision, channels_last, variant == "compile")
    batch = synthetic_batch(batch_size, size, k, n_views, cfg.data.views.level_bounds)
    batch = {
        key: ([t.to(device) for t in v] if isinstance(v, list) else v.to(device)) if key != "skipped" else v
        for key, v in batch.items()
    }
    if channels_last:
        batch["views"] = [v.contiguous(memory_format=torch.channels_last) for v in batch["views"]]
    job = job_for_batch(cfg, batch, device)
    if variant == "cudagraph":
        job.forward = torch.compile(job.model, mode="reduce-overhead")
    run_step = PretrainStep(job, Position(), SkipLog())
    job.model.train()
    dtype = PRECISIONS[precision]
    counter = iter(range(1 << 40))

    def autocast():
        return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)

    def step():
        if variant == "cudagraph":
            torch.compiler.cudagraph_mark_step_begin()
        run_step(next(counter))

    return step, job.core, batch, autocast


def count_flops(model, batch, autocast) -> float:
    """FLOPs of one forward + backward (eager), per image."""
    counter = FlopCounterMode(display=False)
    with counter:
        with autocast():
            loss, _ = model(batch)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch["valid"].shape[0]


def bench_row(name, batch_size, variant, precision, args, device, flops_cache, matmul) -> dict:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    step, model, batch, autocast = build_step(name, batch_size, variant, precision, args.size, args.k, device)
    for _ in range(args.warmup):
        step()
    sync(device)
    warm_s = time.perf_counter() - started
    times = Clock(device).time(step, args.steps)
    key = (name, precision)
    if key not in flops_cache:
        flops_cache[key] = count_flops(model, batch, autocast)
    step_s = float(np.median(times))
    images_per_s = batch_size / step_s
    tflops = flops_cache[key] * images_per_s / 1e12
    if device.type == "cuda":
        memory = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        memory = peak_rss_mib() / 1024
    del step, model, batch
    return {
        "model": name,
        "batch": batch_size,
        "variant": variant,
        "precision": precision,
        "images_per_s": images_per_s,
        "ms": 1000 * step_s,
        "spread_ms": 1000 * (max(times) - min(times)),
        "gflop_per_image": flops_cache[key] / 1e9,
        "tflops": tflops,
        "pct_matmul": 100 * tflops / matmul,
        "peak_gib": memory,
        "warmup_s": warm_s,
    }


def step_rows(args) -> list[tuple]:
    """(model, batch, variant, precision) in run order: every eager-type row first, compile last."""
    rows = []
    cheap = [v for v in args.variants if v in ("eager", "channels_last")]
    costly = [v for v in args.variants if v in ("compile", "cudagraph")]
    for name in args.models:
        for i, b in enumerate(args.batches):
            # NCHW eager is the reference at the first batch size only
            rows += [(name, b, v, args.precision) for v in cheap if i == 0 or v != "eager"]
    if "FPN" in args.models and args.batches:
        rows += [("FPN", args.batches[0], "channels_last", p) for p in args.extra_precisions]
    for name in args.models:  # FPN's compiled rows first: the default model matters most
        rows += [(name, args.batches[0], v, args.precision) for v in costly]
    return rows


# ---------------------------------------------------------------- 3. host syncs, 4. profile


def sync_check(args, device) -> str:
    if device.type != "cuda":
        return "skipped (needs CUDA)"
    step, *_ = build_step("FPN", args.batches[0], "channels_last", args.precision, args.size, args.k, device)
    step()
    sync(device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
        result = "none: the step never waits on the host"
    except RuntimeError as exc:
        result = "SYNC: " + str(exc).strip().splitlines()[0][:200]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    sync(device)
    return result


def profile_step(args, device, out_dir: Path | None) -> str:
    from torch.profiler import ProfilerActivity, profile

    step, *_ = build_step("FPN", args.batches[0], "channels_last", args.precision, args.size, args.k, device)
    for _ in range(2):
        step()
    sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(3):
            step()
        sync(device)
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    full = prof.key_averages().table(sort_by=sort, row_limit=60)
    if out_dir is not None:
        (out_dir / "profile_fpn.txt").write_text(full)
    return prof.key_averages().table(sort_by=sort, row_limit=15)


# ---------------------------------------------------------------- 5. end to end


def replicate(images: Path, store_dir: Path, copies: int, work: Path) -> tuple[Path, Path]:
    """An image folder of ``copies`` hard-linked (or copied) replicas with a proposal store to
    match, so that an epoch of a small photo set spans many batches."""
    import shutil

    from soco_pretrain.proposals.store import load, read_manifest, write_store

    store = load(store_dir)
    arrays = store.arrays()
    folder = work / "images"
    paths = []
    for c in range(copies):
        for rel in store.paths:
            dst = folder / f"copy{c}" / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(images / rel, dst)
            except OSError:
                shutil.copy2(images / rel, dst)
            paths.append(f"copy{c}/{rel}")
    boxes, offsets = arrays["boxes"], arrays["offsets"]
    counts = np.diff(offsets)
    all_boxes = np.concatenate([boxes] * copies)
    all_offsets = np.concatenate([[0], np.cumsum(np.tile(counts, copies))]).astype(offsets.dtype)
    manifest = read_manifest(store_dir)
    out = write_store(
        work / "proposals",
        paths,
        all_boxes,
        all_offsets,
        np.tile(arrays["sizes"], (copies, 1)),
        np.tile(arrays["status"], copies),
        np.tile(arrays["raw_counts"], copies),
        manifest,
    )
    return folder, out


def end_to_end(args, device, augment: str, images: Path, proposals: Path, work: Path) -> dict:
    from soco_pretrain.engine.metrics import read_metrics
    from soco_pretrain.train.loop import pretrain

    b = args.batches[0]
    sizes = view_sizes(args.size)
    cfg = apply_overrides(
        load_preset("fpn-100ep"),
        [
            f"train.batch_size={b}",
            f"train.per_device_batch={b}",
            f"train.workers={args.workers}",
            f"train.log_every={args.e2e_log_every}",
            "train.checkpoint_every=1000000",
            f"data.augment.device={augment}",
            "train.channels_last=true",
            f"train.compile={'true' if args.e2e_compile else 'false'}",
            f"data.views.v1_size={sizes[0]}",
            f"data.views.v2_size={sizes[1]}",
            f"data.views.v3_size={sizes[2]}",
            "data.views.no_proposals=whole_image",
        ],
    )
    run = work / f"run-{augment}"
    summary = pretrain(
        cfg,
        str(images),
        str(proposals),
        run,
        max_steps=args.e2e_steps,
        resume="none",
        progress=False,
        device=device.type,
    )
    rows = read_metrics(run)
    steady = rows[1:] or rows  # the first window holds worker start-up and cudnn autotuning
    ips = float(np.mean([r["images_per_s"] for r in steady]))
    wait = float(np.mean([r["data_wait"] for r in steady]))
    return {
        "augment": augment,
        "batch": b,
        "workers": args.workers,
        "images_per_s": ips,
        "data_wait": wait,
        "steps": summary.step,
        "windows": len(steady),
    }


# ---------------------------------------------------------------- output


def step_table(rows: list[dict], matmul: float) -> str:
    lines = [
        f"| model | batch | variant | precision | images/s | ms/step (spread) | GFLOP/image | TFLOP/s | "
        f"% of matmul ({matmul:.0f}) | peak memory GiB |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['variant']} | {r['precision']} | {r['images_per_s']:.1f} | "
            f"{r['ms']:.1f} ({r['spread_ms']:.1f}) | {r['gflop_per_image']:.1f} | {r['tflops']:.1f} | "
            f"{r['pct_matmul']:.1f} | {r['peak_gib']:.1f} |"
        )
    return "\n".join(lines)


def e2e_table(rows: list[dict]) -> str:
    lines = ["| photometric augmentation | batch | workers | images/s | data wait |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['augment']} | {r['batch']} | {r['workers']} | {r['images_per_s']:.1f} | "
            f"{100 * r['data_wait']:.1f}% |"
        )
    return "\n".join(lines)


def machine(device) -> str:
    import torchvision

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "no GPU"
    return (
        f"{gpu}; {cpu_model()}, {os.cpu_count()} cores; python {platform.python_version()}, "
        f"torch {torch.__version__}, torchvision {torchvision.__version__}"
    )


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (smoke run)")
    p.add_argument("--models", default=",".join(MODELS), help=f"subset of {', '.join(MODELS)}")
    p.add_argument("--batches", default="128,256", help="batch sizes (default 128,256)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"subset of {', '.join(VARIANTS)}")
    p.add_argument("--precision", default="bf16", choices=list(PRECISIONS), help="precision of the main rows")
    p.add_argument("--extra-precisions", default="fp16,fp32", help="extra FPN rows at the first batch size")
    p.add_argument("--size", type=int, default=224, help="V1/V2 size in px (paper 224)")
    p.add_argument("--k", type=int, default=4, help="proposals per image (paper 4)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per row (median)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per row first")
    p.add_argument("--matmul-n", type=int, default=8192)
    p.add_argument("--budget-s", type=float, default=None, help="add no row after this many seconds")
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--images", type=Path, default=None, help="real photos for the end-to-end rows")
    p.add_argument("--proposals", type=Path, default=None, help="their proposal store")
    p.add_argument("--copies", type=int, default=8, help="replicas of the photo set (longer epochs)")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2), help="loader processes")
    p.add_argument("--e2e-steps", type=int, default=40)
    p.add_argument("--e2e-log-every", type=int, default=10)
    p.add_argument(
        "--e2e-compile",
        action="store_true",
        help="compile the model in the end-to-end runs too (the loop's GPU default; ~4 min more each)",
    )
    p.add_argument("--out", type=Path, default=None, help="folder for results.json and the profile")
    p.add_argument("--quick", action="store_true", help="tiny sizes: check every code path (CPU smoke)")
    args = p.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.batches = [int(b) for b in args.batches.split(",") if b.strip()]
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    args.extra_precisions = [x.strip() for x in args.extra_precisions.split(",") if x.strip()]
    for m in args.models:
        if m not in MODELS:
            p.error(f"unknown model {m!r}")
    for v in args.variants:
        if v not in VARIANTS:
            p.error(f"unknown variant {v!r}")
    if args.quick:
        args.size, args.batches, args.steps, args.warmup, args.matmul_n = 64, [2], 1, 1, 256
        args.e2e_steps, args.e2e_log_every, args.copies = 4, 2, 2
        if args.device == "cpu":  # CPU autocast in bf16 is very slow: the smoke run checks code, not speed
            args.precision, args.extra_precisions = "fp32", []
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    t0 = time.perf_counter()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 rows: the speed a user gets by default
        torch.backends.cudnn.allow_tf32 = True
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
    results: dict = {"machine": machine(device), "args": {k: str(v) for k, v in vars(args).items()}}

    def save():
        if args.out is not None:
            (args.out / "results.json").write_text(json.dumps(results, indent=1))

    def log(msg):
        print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", file=sys.stderr, flush=True)

    matmul = matmul_tflops(device, args.matmul_n, 30 if device.type == "cuda" else 3)
    results["matmul_tflops"] = matmul
    log(f"matmul {args.matmul_n}^3: {matmul:.1f} TFLOP/s")

    rows, skipped, flops_cache = [], [], {}
    for spec in step_rows(args):
        if args.budget_s is not None and time.perf_counter() - t0 > args.budget_s:
            skipped.append(spec)
            continue
        try:
            row = bench_row(*spec, args, device, flops_cache, matmul)
        except Exception as exc:  # noqa: BLE001 - one failing variant must not lose the other rows
            log(f"{spec}: FAILED {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}")
            skipped.append(spec)
            continue
        rows.append(row)
        log(
            f"{spec}: {row['images_per_s']:.1f} images/s, {row['tflops']:.1f} TFLOP/s, "
            f"{row['peak_gib']:.1f} GiB, warm-up {row['warmup_s']:.0f}s"
        )
        results["steps"], results["skipped"] = rows, [list(s) for s in skipped]
        save()

    results["sync"] = sync_check(args, device) if args.batches else "skipped"
    log(f"host syncs in the step: {results['sync']}")
    save()
    prof = None
    if not args.no_profile:
        prof = profile_step(args, device, args.out)
        log("profile done")

    e2e = []
    if args.images is not None and args.proposals is not None:
        with tempfile.TemporaryDirectory() as tmp:
            images, store = replicate(args.images, args.proposals, args.copies, Path(tmp))
            log(f"end to end: {args.copies} x {len(os.listdir(args.images))} photos")
            for augment in ("gpu", "cpu") if device.type == "cuda" else ("cpu",):
                try:
                    e2e.append(end_to_end(args, device, augment, images, store, Path(tmp)))
                    log(f"end to end ({augment} augmentation): {e2e[-1]}")
                except Exception as exc:  # noqa: BLE001
                    log(f"end to end ({augment}): FAILED {type(exc).__name__}: {exc}")
                results["end_to_end"] = e2e
                save()

    if prof is not None:
        print(f"\nTop operators of the default FPN step (3 steps, {args.precision}, channels_last):\n")
        print(prof)
    print(
        f"\nSoCo training steps, synthetic batch on the device (views {'+'.join(map(str, view_sizes(args.size)))} px, "
        f"K={args.k}; median of {args.steps} steps after {args.warmup} warm-up):\n"
    )
    print(step_table(rows, matmul))
    if skipped:
        print(f"\nnot run (budget or failure): {', '.join('/'.join(map(str, s)) for s in skipped)}")
    print(f"\nHost-device syncs inside the step: {results['sync']}")
    if e2e:
        print(
            f"\nEnd to end on real photos (soco pretrain's loop, FPN, batch {args.batches[0]}, "
            f"{args.workers} workers; mean over logged windows after the first):\n"
        )
        print(e2e_table(e2e))
    print(f"\nMachine: {machine(device)}; matmul {matmul:.0f} TFLOP/s measured; total {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
