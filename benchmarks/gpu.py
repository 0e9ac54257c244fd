"""GPU benchmark: ``soco pretrain``'s training step and loop against the card's own matmul rate.

One prepared script for a lent GPU machine (one call, ``--budget-s``). Every step row is
``soco pretrain``'s own step (``PretrainStep`` on ``fixed_batch.job_for_batch``: the model, LARS, schedules
and EMA, with the speed settings ``train/speed.py`` applies from the config: cuDNN autotuning,
TF32, torch.compile and its mode, channels_last); the script sets no global flag of its own. The
``defaults`` variant overrides nothing but the batch and the view sizes: it is what a user gets.

Tasks, in priority order (``--budget-s`` skips a task whose estimated cost no longer fits; the
skipped ones are listed; a task that fails is reported and the others go on):

1. the card's bf16 matrix-product rate (8192^3, median of 30): the ceiling the steps are compared with;
2. the FPN step at the first batch size, ``channels_last`` (eager) then ``defaults`` (compiled);
3. host syncs: one ``defaults`` step under ``torch.cuda.set_sync_debug_mode("error")``;
4. a profile of the ``defaults`` step (top operators by device time; full table in --out);
5. GPU vs CPU at fp32 (TF32 off) on a small batch: the same step from the same weights on both;
6. RoIAlign alone, per level vs packed (benchmarks/roi_pool.py);
7. end to end on real photos (``--images`` + ``--proposals``, replicated ``--copies`` times):
   ``soco pretrain``'s own loop with its defaults, JPEGs decoded in the workers and on the device
   (``data.decode``): images/s, data wait, and the ratio to the ``defaults`` step;
8. the other step rows: ``cudagraph`` (compile mode reduce-overhead: CUDA graphs), ``eager``
   (NCHW), ``packed`` (one RoIAlign, ``model.roi_pool=packed``), fp16 / fp32, C4 and SoCo*,
   batch 256; then the other compiled rows.

Step rows report images/s, achieved TFLOP/s (FLOPs per image from torch.utils.flop_counter:
forward + backward of online and target networks; optimiser and EMA not counted), % of the
matmul rate and peak memory, which the memory table compares with ``train/memory.py``'s estimate.

    python benchmarks/gpu.py --out results/ --images .gpu_data/images --proposals .gpu_data/proposals \\
        --workers 14 --budget-s 450                      # the prepared run (about 8 minutes)
    python benchmarks/gpu.py --device cpu --quick --images photos/     # smoke run of every path on a CPU

Compiled artifacts are cached between rows by torch (Inductor's FX graph cache and AOTAutograd's
cache, on by default): rows whose graphs match compile much faster than the first.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import cpu_model, peak_rss_mib  # noqa: E402
from train_step import MODELS, step_config, view_sizes  # noqa: E402

from soco_pretrain.config import apply_overrides  # noqa: E402
from soco_pretrain.data.synthetic import synthetic_batch  # noqa: E402
from soco_pretrain.engine.skips import SkipLog  # noqa: E402
from soco_pretrain.presets import load_preset  # noqa: E402
from soco_pretrain.train.fixed_batch import job_for_batch
from soco_pretrain.train.loop import Position, PretrainStep  # noqa: E402

# variant -> (channels_last, compile, extra overrides); None keeps the preset's (soco pretrain's default)
VARIANTS: dict[str, tuple[bool | None, bool | None, tuple[str, ...]]] = {
    "defaults": (None, None, ()),
    "eager": (False, False, ()),
    "channels_last": (True, False, ()),
    "packed": (True, False, ("model.roi_pool=packed",)),
    "compile": (True, True, ()),
    "cudagraph": (True, True, ("train.compile_mode=reduce-overhead",)),
    "cudagraph+packed": (True, True, ("train.compile_mode=reduce-overhead", "model.roi_pool=packed")),
}
COMPILED = ("compile", "cudagraph", "cudagraph+packed")  # and "defaults" on CUDA (train.compile=auto)
PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
# Cost guesses (s) for the budget before anything was measured; replaced by measured figures.
FIRST_COMPILE_S, EAGER_ROW_S, E2E_S = 300.0, 20.0, 45.0
# Compiling another graph (another mode, batch or roi_pool) took 0.74 of the first compile's time
# on the CPU (328 s vs 443 s, --device cpu --quick, compile then cudagraph rows).
LATER_COMPILE_SHARE = 0.75


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


def compiles(variant: str, device) -> bool:
    return variant in COMPILED or (variant == "defaults" and device.type == "cuda")


def compiled_graph(model: str, batch: int, variant: str, precision: str) -> tuple:
    """What makes torch compile anew: rows with the same key reuse the code compiled for the first
    (measured on the CPU: a second model instance of the same config compiled in 1.3 s, not 254 s;
    torch.compile's guards check shapes and dtypes, not which module instance it is)."""
    overrides = VARIANTS[variant][2]
    return (
        model,
        batch,
        precision,
        *sorted(o for o in overrides if o.startswith(("train.compile_mode", "model.roi_pool"))),
    )


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


def device_batch(batch: dict, device, channels_last: bool) -> dict:
    """The batch's tensors (and lists of tensors) on ``device``; paths and the like as they are."""

    def move(v):
        return v.to(device) if isinstance(v, torch.Tensor) else v

    out = {k: [move(t) for t in v] if isinstance(v, list) else move(v) for k, v in batch.items()}
    if channels_last:
        out["views"] = [v.contiguous(memory_format=torch.channels_last) for v in out["views"]]
    return out


def row_config(name: str, batch_size: int, variant: str, precision: str, size: int, extra=()):
    preset = MODELS[name][0]
    channels_last, compile, overrides = VARIANTS[variant]
    return step_config(preset, size, batch_size, precision, channels_last, compile, extra=(*overrides, *extra))


def build_step(cfg, name: str, batch_size: int, size: int, k: int, device):
    """(step function, job, batch) for ``soco pretrain``'s step under ``cfg`` on a synthetic batch."""
    n_views = MODELS[name][1]
    batch = synthetic_batch(cfg.data.views, batch_size, k, n_views)
    batch = device_batch(batch, device, device.type == "cuda" and cfg.train.channels_last)
    job = job_for_batch(cfg, batch, device)
    run_step = PretrainStep(job, Position(), SkipLog())
    job.model.train()
    counter = iter(range(1 << 40))
    return (lambda: run_step(next(counter))), job, batch


def count_flops(model, batch, precision: str, device) -> float:
    """FLOPs of one forward + backward (eager), per image."""
    dtype = PRECISIONS[precision]
    counter = FlopCounterMode(display=False)
    with counter:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss, _ = model(batch)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch["valid"].shape[0]


def bench_row(spec, args, device, state) -> dict:
    name, batch_size, variant, precision = spec
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    cfg = row_config(name, batch_size, variant, precision, args.size)
    step, job, batch = build_step(cfg, name, batch_size, args.size, args.k, device)
    for _ in range(args.warmup):
        step()
    sync(device)
    warm_s = time.perf_counter() - started
    times = Clock(device).time(step, args.steps)
    if device.type == "cuda":
        memory = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        memory = peak_rss_mib() / 1024
    key = (name, precision)
    if key not in state["flops"]:
        state["flops"][key] = count_flops(job.core, batch, precision, device)
    step_s = float(np.median(times))
    images_per_s = batch_size / step_s
    tflops = state["flops"][key] * images_per_s / 1e12
    if (name, batch_size, variant) == ("FPN", args.batches[0], "defaults"):
        state["default_step"] = (step, job)  # the sync check and the profile use this very step
    return {
        "model": name,
        "batch": batch_size,
        "variant": variant,
        "precision": precision,
        "settings": settings(job, device),
        "images_per_s": images_per_s,
        "ms": 1000 * step_s,
        "spread_ms": 1000 * (max(times) - min(times)),
        "gflop_per_image": state["flops"][key] / 1e9,
        "tflops": tflops,
        "pct_matmul": 100 * tflops / state["matmul"],
        "peak_gib": memory,
        "warmup_s": warm_s,
    }


def settings(job, device) -> str:
    """The speed settings the row's job resolved, e.g. 'torch.compile, cudnn.benchmark, TF32, channels_last'."""
    parts = [job.speed.describe()] if job.speed.describe() else []
    if job.cfg.train.channels_last and device.type == "cuda":
        parts.append("channels_last")
    if job.cfg.model.roi_pool == "packed":
        parts.append("roi_pool=packed")
    return ", ".join(parts) or "eager"


# ---------------------------------------------------------------- 3. host syncs, 4. profile


def sync_check(step, device) -> str:
    if device.type != "cuda":
        return "skipped (needs CUDA; tests/test_step_sync.py counts host reads on a CPU)"
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


def profile_step(step, device, out_dir: Path | None) -> str:
    from torch.profiler import ProfilerActivity, profile

    step()
    sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(3):
            step()
        sync(device)
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    if out_dir is not None:
        (out_dir / "profile_fpn.txt").write_text(prof.key_averages().table(sort_by=sort, row_limit=80))
    return prof.key_averages().table(sort_by=sort, row_limit=20)


# ---------------------------------------------------------------- 5. GPU vs CPU


def numerics_check(args, device) -> dict:
    """One fp32 step (TF32 off, eager, NCHW) from the same weights on the same small batch, on the
    CPU and on ``device``: loss difference, and the largest difference of the weight updates
    relative to the largest update (the target's EMA included)."""
    size, batch_size = (64, 2) if args.quick else (128, 4)
    cfg = row_config("FPN", batch_size, "eager", "fp32", size, extra=("train.tf32=false",))
    batch = synthetic_batch(cfg.data.views, batch_size, args.k, 3)
    results = {}
    for dev in (torch.device("cpu"), device):
        job = job_for_batch(cfg, device_batch(batch, dev, False), dev)
        before = {k: v.detach().cpu().clone() for k, v in job.core.state_dict().items() if v.is_floating_point()}
        job.model.train()
        out = PretrainStep(job, Position(), SkipLog())(0)
        after = {k: v.detach().cpu() for k, v in job.core.state_dict().items() if k in before}
        results[dev.type] = (float(out.loss[0]), {k: after[k] - before[k] for k in before})
    (cpu_loss, cpu_delta), (dev_loss, dev_delta) = results["cpu"], results[device.type]
    scale = max(float(d.abs().max()) for d in cpu_delta.values())
    worst = max(cpu_delta, key=lambda k: float((cpu_delta[k] - dev_delta[k]).abs().max()))
    return {
        "loss_cpu": cpu_loss,
        "loss_device": dev_loss,
        "loss_abs_diff": abs(cpu_loss - dev_loss),
        "update_rel_diff": float((cpu_delta[worst] - dev_delta[worst]).abs().max()) / max(scale, 1e-30),
        "worst_tensor": worst,
        "batch": batch_size,
        "size": size,
    }


# ---------------------------------------------------------------- 6. RoIAlign alone


def roi_rows(args, device) -> list[dict]:
    """pool_boxes alone, per level vs packed, at the views' sizes (benchmarks/roi_pool.py)."""
    from roi_pool import time_pool

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    batch, sizes = args.batches[0], sorted(set(view_sizes(args.size)[:3]), reverse=True)
    repeat, gpu = max(args.steps, 5), device.type == "cuda"
    return [time_pool(method, batch, args.k, size, device, dtype, repeat=repeat, memory=gpu)
            for size in sizes for method in ("per_level", "packed")]  # fmt: skip


# ---------------------------------------------------------------- 7. end to end


def replicate(images: Path, store_dir: Path | None, copies: int, work: Path) -> tuple[Path, Path | None]:
    """An image folder of ``copies`` hard-linked (or copied) replicas with a proposal store to
    match (None: no store given), so that an epoch of a small photo set spans many batches."""
    import shutil

    from soco_pretrain.images import list_images
    from soco_pretrain.proposals.store import load, read_manifest, write_store

    store = load(store_dir) if store_dir is not None else None
    rels = store.paths if store is not None else list_images(images).paths
    folder, paths = work / "images", []
    for c in range(copies):
        for rel in rels:
            dst = folder / f"copy{c}" / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(images / rel, dst)
            except OSError:
                shutil.copy2(images / rel, dst)
            paths.append(f"copy{c}/{rel}")
    if store is None:
        return folder, None
    arrays = store.arrays()
    counts = np.diff(arrays["offsets"])
    out = write_store(
        work / "proposals",
        paths,
        np.concatenate([arrays["boxes"]] * copies),
        np.concatenate([[0], np.cumsum(np.tile(counts, copies))]).astype(arrays["offsets"].dtype),
        np.tile(arrays["sizes"], (copies, 1)),
        np.tile(arrays["status"], copies),
        np.tile(arrays["raw_counts"], copies),
        read_manifest(store_dir),
    )
    return folder, out


def end_to_end(args, device, decode: str, images: Path, proposals: Path | None, work: Path) -> dict:
    """``soco pretrain``'s loop (pretrain()) with its defaults for this device, FPN, batch
    ``--batches[0]`` per process, ``data.decode=decode``."""
    from soco_pretrain.engine.metrics import read_metrics
    from soco_pretrain.train.loop import pretrain

    b = args.batches[0]
    sizes = view_sizes(args.size)
    overrides = [
        f"train.batch_size={b}",
        f"train.per_device_batch={b}",
        f"train.workers={args.workers}",
        f"train.log_every={args.e2e_log_every}",
        "train.checkpoint_every=1000000",
        f"data.decode={decode}",
        *(f"data.views.v{i + 1}_size={s}" for i, s in enumerate(sizes)),
        "data.views.no_proposals=whole_image",
    ]
    if device.type != "cuda":
        overrides.append("data.augment.device=gpu")  # decode=device needs it; on a CPU it means "in the main process"
    if proposals is None:
        overrides.append("data.views.proposal_source=random")
    if args.e2e_no_compile:
        overrides.append("train.compile=false")
    run = work / f"run-{decode}"
    summary = pretrain(apply_overrides(load_preset("fpn-100ep"), overrides), str(images),
                       str(proposals) if proposals is not None else None, run, max_steps=args.e2e_steps,
                       resume="none", progress=False, device=device.type)  # fmt: skip
    rows = read_metrics(run)
    steady = rows[1:] or rows  # the first window holds worker start-up, compiling and autotuning
    return {
        "decode": decode,
        "batch": b,
        "workers": args.workers,
        "images_per_s": float(np.mean([r["images_per_s"] for r in steady])),
        "data_wait": float(np.mean([r["data_wait"] for r in steady])),
        "steps": summary.step,
        "windows": len(steady),
        "compile": not args.e2e_no_compile and device.type == "cuda",
    }


# ---------------------------------------------------------------- output


def step_table(rows: list[dict], matmul: float) -> str:
    lines = [
        f"| model | batch | variant | settings | precision | images/s | ms/step (spread) | GFLOP/image | TFLOP/s | "
        f"% of matmul ({matmul:.0f}) | peak memory GiB | build + warm-up s |",
        "|---|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['variant']} | {r['settings']} | {r['precision']} | "
            f"{r['images_per_s']:.1f} | {r['ms']:.1f} ({r['spread_ms']:.1f}) | {r['gflop_per_image']:.1f} | "
            f"{r['tflops']:.1f} | {r['pct_matmul']:.1f} | {r['peak_gib']:.1f} | {r['warmup_s']:.0f} |"
        )
    return "\n".join(lines)


def memory_table(rows: list[dict], card_gib: float | None, size: int) -> str:
    """Measured peak per model and batch against train/memory.py's estimate and the auto batch."""
    from soco_pretrain.train.memory import auto_per_device_batch, estimate_gib

    arch = {"FPN": ("fpn", False), "C4": ("c4", False), "SoCo*": ("fpn", True)}
    lines = [
        "| model | batch | variant | precision | measured peak GiB | memory.py estimate GiB | auto batch, this card |",
        "|---|---:|---|---|---:|---:|---:|",
    ]
    for r in rows:
        a, star = arch[r["model"]]
        est = estimate_gib(a, star, r["batch"], size, r["precision"])
        auto = auto_per_device_batch(a, star, card_gib, 2048, 1, size, r["precision"]) if card_gib else "-"
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['variant']} | {r['precision']} | {r['peak_gib']:.1f} | "
            f"{est:.1f} | {auto} |"
        )
    return "\n".join(lines)


def e2e_table(rows: list[dict], step_rate: float | None) -> str:
    lines = [
        "| JPEG decode | compiled | batch | workers | images/s | x defaults step | data wait |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ratio = f"{r['images_per_s'] / step_rate:.2f}" if step_rate else "-"
        lines.append(
            f"| {r['decode']} | {'yes' if r['compile'] else 'no'} | {r['batch']} | {r['workers']} | "
            f"{r['images_per_s']:.1f} | {ratio} | {100 * r['data_wait']:.1f}% |"
        )
    return "\n".join(lines)


def machine(device) -> str:
    import torchvision

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "no GPU"
    return (
        f"{gpu}; {cpu_model()}, {os.cpu_count()} cores; python {platform.python_version()}, "
        f"torch {torch.__version__}, torchvision {torchvision.__version__}"
    )


# ---------------------------------------------------------------- the plan


def plan(args, device) -> list[tuple]:
    """Tasks in priority order: ("step", (model, batch, variant, precision)) | ("sync",) |
    ("profile",) | ("numerics",) | ("roi",) | ("e2e", decode)."""
    b0, p = args.batches[0] if args.batches else None, args.precision
    wanted = [(m, b, v, p) for m in args.models for b in args.batches for v in args.variants
              if not (m == "C4" and "packed" in v)  # C4 pools from one map: nothing to pack
              and not (args.quick and device.type == "cpu" and m != "FPN" and v in COMPILED)]  # fmt: skip
    first = [s for s in (("FPN", b0, "channels_last", p), ("FPN", b0, "defaults", p)) if s in wanted]
    tasks: list[tuple] = [("step", s) for s in first]
    if ("FPN", b0, "defaults", p) in first:  # both use that row's step
        tasks += [("sync",), ("profile",)]
    tasks += [("numerics",), ("roi",)]
    if args.images is not None:
        tasks += [("e2e", d) for d in args.decodes]
    rest = [s for s in wanted if s not in first and not (s[2] == "eager" and s[1] != b0)]  # NCHW once
    cheap = [s for s in rest if not compiles(s[2], device)]
    costly = [s for s in rest if compiles(s[2], device) and s[1] == b0]
    costly += [s for s in rest if compiles(s[2], device) and s[1] != b0]
    extra = [("FPN", b0, "channels_last", q) for q in args.extra_precisions if "FPN" in args.models and b0]
    return tasks + [("step", s) for s in cheap + extra + costly]


def estimate_s(task: tuple, state: dict, device, args) -> float:
    """Seconds a task should take: compiling dominates, unless this process compiled its graph already."""
    if task[0] == "step":
        model, batch, variant, precision = task[1]
        if not compiles(variant, device) or compiled_graph(model, batch, variant, precision) in state["compiled"]:
            return EAGER_ROW_S
        return state.get("compile_s", FIRST_COMPILE_S)
    if task[0] == "e2e":
        if args.e2e_no_compile or device.type != "cuda":
            return E2E_S
        same = compiled_graph("FPN", args.batches[0], "defaults", args.precision) in state["compiled"]
        return E2E_S + (0.0 if same else state.get("compile_s", FIRST_COMPILE_S))
    return EAGER_ROW_S


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (smoke run)")
    p.add_argument("--models", default=",".join(MODELS), help=f"subset of {', '.join(MODELS)}")
    p.add_argument("--batches", default="128,256", help="batch sizes (default 128,256; the first is the main one)")
    p.add_argument(
        "--variants",
        default=",".join(v for v in VARIANTS if v != "compile"),
        help=f"subset of {', '.join(VARIANTS)} (compile: as defaults on CUDA, so not by default)",
    )
    p.add_argument("--precision", default="bf16", choices=list(PRECISIONS), help="precision of the main rows")
    p.add_argument("--extra-precisions", default="fp16,fp32", help="extra FPN channels_last rows at the first batch")
    p.add_argument("--size", type=int, default=224, help="V1/V2 size in px (paper 224)")
    p.add_argument("--k", type=int, default=4, help="proposals per image (paper 4)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per row (median)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per row first")
    p.add_argument("--matmul-n", type=int, default=8192)
    p.add_argument("--budget-s", type=float, default=None, help="start no task that would end after this many seconds")
    p.add_argument("--images", type=Path, default=None, help="real photos for the end-to-end rows")
    p.add_argument("--proposals", type=Path, default=None, help="their proposal store (none: random boxes)")
    p.add_argument("--copies", type=int, default=8, help="replicas of the photo set (longer epochs)")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2), help="loader processes")
    p.add_argument("--decodes", default="worker,device", help="data.decode values of the end-to-end runs")
    p.add_argument("--e2e-steps", type=int, default=40)
    p.add_argument("--e2e-log-every", type=int, default=10)
    p.add_argument("--e2e-no-compile", action="store_true", help="end-to-end runs without torch.compile")
    p.add_argument("--out", type=Path, default=None, help="folder for results.json and the profile")
    p.add_argument("--quick", action="store_true", help="tiny sizes: check every code path (CPU smoke)")
    args = p.parse_args(argv)
    split = lambda text: [x.strip() for x in text.split(",") if x.strip()]  # noqa: E731
    args.models, args.variants, args.decodes = split(args.models), split(args.variants), split(args.decodes)
    args.batches = [int(b) for b in split(args.batches)]
    args.extra_precisions = split(args.extra_precisions)
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
            args.e2e_no_compile = True  # (train.compile=auto is off on a CPU anyway)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    t0 = time.perf_counter()
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
    results: dict = {"machine": machine(device), "args": {k: str(v) for k, v in vars(args).items()}}

    def save():
        if args.out is not None:
            (args.out / "results.json").write_text(json.dumps(results, indent=1, default=str))

    def log(msg):
        print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", file=sys.stderr, flush=True)

    state: dict = {
        "flops": {},
        "compiled": set(),
        "matmul": matmul_tflops(device, args.matmul_n, 30 if device.type == "cuda" else 3),
    }
    results["matmul_tflops"] = state["matmul"]
    log(f"matmul {args.matmul_n}^3: {state['matmul']:.1f} TFLOP/s")

    rows, e2e, skipped, failed = [], [], [], []
    work = tempfile.TemporaryDirectory()
    for task in plan(args, device):
        estimate = estimate_s(task, state, device, args)
        if args.budget_s is not None and time.perf_counter() - t0 + estimate > args.budget_s:
            skipped.append(task)
            continue
        started = time.perf_counter()
        try:
            kind = task[0]
            if kind == "step":
                row = bench_row(task[1], args, device, state)
                rows.append(row)
                if compiles(task[1][2], device):
                    state["compiled"].add(compiled_graph(*task[1]))
                    if "compile_s" not in state:  # another graph: much of the work again
                        state["compile_s"] = max(60.0, LATER_COMPILE_SHARE * row["warmup_s"])
                log(f"{task[1]}: {row['images_per_s']:.1f} images/s, {row['tflops']:.1f} TFLOP/s, "
                    f"{row['peak_gib']:.1f} GiB, warm-up {row['warmup_s']:.0f}s ({row['settings']})")  # fmt: skip
                results["steps"] = rows
            elif kind in ("sync", "profile"):
                if "default_step" not in state:
                    raise RuntimeError("needs the FPN defaults row, which did not run")
                step = state["default_step"][0]
                if kind == "sync":
                    results["sync"] = sync_check(step, device)
                    log(f"host syncs in the default step: {results['sync']}")
                else:
                    results["profile"] = profile_step(step, device, args.out)
                    log("profile done")
                    state.pop("default_step")  # frees the compiled job's memory for the next rows
            elif kind == "numerics":
                results["numerics"] = numerics_check(args, device)
                log(f"GPU vs CPU, fp32: {results['numerics']}")
            elif kind == "roi":
                results["roi"] = roi_rows(args, device)
                log(f"RoIAlign alone: {results['roi']}")
            elif kind == "e2e":
                if "e2e_data" not in state:
                    state["e2e_data"] = replicate(args.images, args.proposals, args.copies, Path(work.name))
                e2e.append(end_to_end(args, device, task[1], *state["e2e_data"], Path(work.name)))
                log(f"end to end (decode {task[1]}): {e2e[-1]}")
                results["end_to_end"] = e2e
        except Exception as exc:  # noqa: BLE001 - one failing task must not lose the others
            log(f"{task}: FAILED {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}")
            failed.append((task, f"{type(exc).__name__}: {exc}"[:500], traceback.format_exc()[-2000:]))
        log(f"{task[0]} took {time.perf_counter() - started:.0f}s")
        results["skipped"], results["failed"] = [list(map(str, s)) for s in skipped], failed
        save()
    work.cleanup()

    card_gib = torch.cuda.get_device_properties(device).total_memory / 2**30 if device.type == "cuda" else None
    if "profile" in results:
        print(f"\nTop operators of the default FPN step (3 steps, {args.precision}):\n")
        print(results["profile"])
    views = "+".join(map(str, view_sizes(args.size)))
    print(f"\nSoCo training steps, synthetic batch on the device (views {views} px, K={args.k}; median of "
          f"{args.steps} steps after {args.warmup} warm-up):\n")  # fmt: skip
    print(step_table(rows, state["matmul"]))
    print("\nPeak memory against train/memory.py's estimate (eager bf16 fit):\n")
    print(memory_table(rows, card_gib, args.size))
    print(f"\nHost-device syncs inside the default step: {results.get('sync', 'not run')}")
    if "numerics" in results:
        n = results["numerics"]
        print(f"\nGPU vs CPU, fp32 without TF32 (FPN, batch {n['batch']}, {n['size']} px, one step): loss "
              f"{n['loss_cpu']:.6f} vs {n['loss_device']:.6f} (|diff| {n['loss_abs_diff']:.2e}); weight updates "
              f"differ by at most {n['update_rel_diff']:.2e} of the largest update ({n['worst_tensor']})")  # fmt: skip
    if "roi" in results:
        from roi_pool import table as roi_table

        print(f"\nRoIAlign alone (pool_boxes, every slot of one view, batch {args.batches[0]}, K={args.k}):\n")
        print(roi_table(results["roi"]))
    if e2e:
        main_row = ("FPN", args.batches[0], "defaults")
        step_rate = next((r["images_per_s"] for r in rows if (r["model"], r["batch"], r["variant"]) == main_row), None)
        print(f"\nEnd to end on real photos (soco pretrain's loop with its defaults, FPN, batch {args.batches[0]}, "
              f"{args.workers} workers; mean over logged windows after the first):\n")  # fmt: skip
        print(e2e_table(e2e, step_rate))
    if skipped:
        print(f"\nnot run (budget): {', '.join(str(s) for s in skipped)}")
    if failed:
        print(f"\nfailed: {'; '.join(f'{t}: {why}' for t, why, _ in failed)}")
    print(f"\nMachine: {machine(device)}; matmul {state['matmul']:.0f} TFLOP/s measured; total "
          f"{time.perf_counter() - t0:.0f} s")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
