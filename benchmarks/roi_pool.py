"""Benchmark: pooling every box slot from FPN maps, ``model.roi_pool`` per_level vs packed.

``pool_boxes`` alone (model/encoder.py), forward and forward + backward, on random FPN-shaped
maps (256 channels, P2..P5 of a ``size`` px view: ceil(size / stride) a side) and random boxes of
16 px to the whole view, levels from the paper's scale-aware assignment, K boxes per image, all
valid. "per_level" runs one RoIAlign per level over every slot and selects; "packed" copies the
four maps into one canvas and runs one RoIAlign. The backward is ``torch.autograd.grad`` of the
pooled rows w.r.t. the four maps (what the FPN receives).

Peak memory is what one forward + backward adds above its inputs: on a GPU
torch.cuda.max_memory_allocated minus the memory allocated before; on a CPU the process's peak
resident memory (VmHWM, reset first) minus its resident memory then, measured after all timings
with glibc told to return every freed block of 64 KiB or more to the system at once (mallopt) and
the heap trimmed first (malloc_trim), so the figure follows live tensors, not the heap's cache.
CPU times include page faults of fresh large allocations (the canvas is one), which can be slow
on some machines; a GPU's caching allocator has none.

    python benchmarks/roi_pool.py                               # CPU: batch 16, views 224 and 112
    python benchmarks/roi_pool.py --threads 1                   # steadier on shared cores
    python benchmarks/roi_pool.py --device cuda --batch 128     # the GPU case (fp32)
    python benchmarks/roi_pool.py --device cuda --batch 128 --dtype bf16   # maps in bf16, autocast

``time_pool`` is importable (benchmarks/gpu.py).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import cpu_model, peak_rss_mib, reset_peak_rss  # noqa: E402

from soco_pretrain.config import ViewsConfig  # noqa: E402
from soco_pretrain.data.boxes import assign_levels  # noqa: E402
from soco_pretrain.model.encoder import FPN_CHANNELS, FPN_STRIDES, ROI_POOLS, pool_boxes  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ROI_SIZE, SAMPLING_RATIO = 7, 2  # model.roi_size, model.roi_sampling_ratio defaults


def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def _malloc_returns_memory() -> bool:
    """glibc: mmap (and so unmap on free) every block >= 64 KiB, so RSS follows live tensors."""
    libc = _libc()
    try:
        return bool(libc and libc.mallopt(-3, 64 * 1024))  # M_MMAP_THRESHOLD; stops its dynamic growth
    except AttributeError:
        return False


def _trim_heap() -> None:
    """Give the heap's free pages back (glibc malloc_trim), so reusing them shows in RSS again."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_inputs(batch: int, k: int, size: int, device, dtype, seed: int = 0):
    """FPN-shaped maps (requires_grad) and (boxes, levels, valid) as a SoCo batch holds them."""
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    maps = [
        torch.randn(batch, FPN_CHANNELS, -(-size // s), -(-size // s), generator=gen)
        .to(device=device, dtype=dtype)
        .requires_grad_()
        for s in FPN_STRIDES
    ]
    wh = rng.uniform(16, size, (batch, k, 2))
    xy = rng.uniform(0, 1, (batch, k, 2)) * (size - wh)
    boxes = np.concatenate([xy, xy + wh], axis=2).astype(np.float32)
    levels = assign_levels(boxes.reshape(-1, 4), ViewsConfig().level_bounds).reshape(batch, k)
    return (
        maps,
        torch.from_numpy(boxes).to(device),
        torch.from_numpy(levels).to(device),
        torch.ones(batch, k, dtype=torch.bool, device=device),
    )


def time_pool(
    method: str,
    batch: int,
    k: int,
    size: int,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    repeat: int = 10,
    memory: bool = True,
) -> dict:
    """Median ms of pool_boxes(method) forward and forward + backward, and (``memory``) the peak
    memory (MiB) one forward + backward adds above its inputs. Non-fp32 maps run under
    torch.autocast (as in training; torchvision's RoIAlign then computes in fp32)."""
    if method not in ROI_POOLS:
        raise ValueError(f"method must be one of {ROI_POOLS}, got {method!r}")
    device = torch.device(device)
    maps, boxes, levels, valid = random_inputs(batch, k, size, device, dtype)
    grad_out = torch.randn(batch * k, FPN_CHANNELS, ROI_SIZE, ROI_SIZE, device=device, dtype=dtype)

    def forward():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            return pool_boxes(maps, FPN_STRIDES, boxes, levels, valid, ROI_SIZE, SAMPLING_RATIO, method=method)

    def forward_backward():
        out = forward()
        return torch.autograd.grad(out, maps, grad_out.to(out.dtype))

    def timed(fn) -> float:
        for _ in range(2):  # warm-up
            fn()
        _sync(device)
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times.append(time.perf_counter() - t0)
        return 1000 * float(np.median(times))

    ms_fwd = timed(forward)
    ms_fwd_bwd = timed(forward_backward)
    peak = float("nan")
    if memory and device.type == "cuda":
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        forward_backward()
        _sync(device)
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    elif memory:
        _trim_heap()  # blocks freed by the timed calls would otherwise be reused unseen
        if reset_peak_rss():
            base = _rss_mib()
            forward_backward()
            peak = peak_rss_mib() - base
    return {
        "method": method,
        "size": size,
        "batch": batch,
        "k": k,
        "dtype": str(dtype).removeprefix("torch."),
        "ms_fwd": ms_fwd,
        "ms_fwd_bwd": ms_fwd_bwd,
        "peak_mib": peak,
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| method | view (px) | ms fwd | ms fwd+bwd | fwd+bwd / per_level | peak memory (MiB) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    base = {r["size"]: r["ms_fwd_bwd"] for r in rows if r["method"] == "per_level"}
    for r in rows:
        ratio = r["ms_fwd_bwd"] / base[r["size"]] if r["size"] in base else float("nan")
        lines.append(
            f"| {r['method']} | {r['size']} | {r['ms_fwd']:.2f} | {r['ms_fwd_bwd']:.2f} | {ratio:.2f} "
            f"| {r['peak_mib']:.0f} |"
        )
    return "\n".join(lines)


def machine(device: torch.device) -> str:
    import torchvision

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "no GPU used"
    return (
        f"{cpu_model()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}; {gpu}; "
        f"python {platform.python_version()}, torch {torch.__version__}, torchvision {torchvision.__version__}"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch", type=int, default=None, help="images (default: 16 on CPU, 128 on GPU)")
    parser.add_argument("--k", type=int, default=4, help="box slots per image (default 4, the paper's)")
    parser.add_argument("--sizes", default="224,112", help="view sizes in px (default 224,112: the paper's views)")
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="map dtype (non-fp32: autocast)")
    parser.add_argument("--repeat", type=int, default=None, help="timed calls per row (default: 5 CPU, 50 GPU)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--methods", default=",".join(ROI_POOLS), help="comma-separated subset of the methods")
    args = parser.parse_args(argv)
    if args.threads:  # on shared cores, OpenMP threads spinning against other processes add noise
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device")
    gpu = device.type == "cuda"
    batch = args.batch or (128 if gpu else 16)
    repeat = args.repeat or (50 if gpu else 5)
    cases = [(method, int(size)) for size in args.sizes.split(",") for method in args.methods.split(",")]
    # CPU: times with glibc's usual heap first; then memory, with freed blocks returned at once
    # (that setting page-faults every large allocation afresh, which would distort the times).
    rows = [time_pool(m, batch, args.k, size, device, DTYPES[args.dtype], repeat, memory=gpu) for m, size in cases]
    if not gpu and _malloc_returns_memory():
        for row, (m, size) in zip(rows, cases):
            row["peak_mib"] = time_pool(m, batch, args.k, size, device, DTYPES[args.dtype], 1)["peak_mib"]
    print(f"pool_boxes: batch {batch}, K {args.k}, {FPN_CHANNELS} channels, {args.dtype}, median of {repeat}\n")
    print(table(rows))
    print(f"\n{machine(device)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
