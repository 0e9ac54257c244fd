"""Benchmark: our selective search against the reference, on one core.

Both run on the same decoded photos in one process; the first (numba-compiling) call is a
warm-up and not timed. Prints a markdown table (seconds per image, speed-up, boxes before and
after the paper filter, whether the boxes are identical) and the machine it ran on.

    python benchmarks/proposals.py                          # 7 photos bundled with scikit-image
    python benchmarks/proposals.py --images /path/to/photos --limit 20
    python benchmarks/proposals.py --huge                   # plus a 4000x3000 photo, full path
    python benchmarks/proposals.py --no-reference --limit 200   # ours only

With the defaults the run takes about a minute or two (the reference costs 1-4 s per photo).
"""

from __future__ import annotations

import os

# One core for everything, set before numpy/numba are imported.
for _var in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

# The reference calls skimage's LBP on floats; its warning would repeat for every photo.
warnings.filterwarnings("ignore", message="Applying `local_binary_pattern`")

from bench_common import cpu_model, peak_rss_mib, reset_peak_rss  # noqa: E402  (benchmarks/bench_common.py)

from soco_pretrain.demo import bundled_photo_paths  # noqa: E402
from soco_pretrain.images import list_images, load_rgb_bounded  # noqa: E402
from soco_pretrain.proposals.filters import PRESETS, filter_boxes  # noqa: E402
from soco_pretrain.proposals.selective_search import selective_search  # noqa: E402

PAPER = PRESETS["paper"]
HUGE_SIZE = (4000, 3000)


def search(image: np.ndarray) -> np.ndarray:
    return selective_search(image, PAPER.scale, PAPER.sigma, PAPER.min_size)


def machine() -> str:
    import numba
    import PIL
    import skimage

    cpu = cpu_model()
    return (
        f"{cpu}, {os.cpu_count()} cores (benchmark uses 1 thread); python {platform.python_version()}, "
        f"numpy {np.__version__}, scikit-image {skimage.__version__}, numba {numba.__version__}, "
        f"pillow {PIL.__version__}"
    )


def photo_paths(images: str | None, limit: int | None) -> list[Path]:
    if images is None:
        paths = list(bundled_photo_paths().values())
    else:
        found = list_images(images)
        paths = [found.abspath(i) for i in range(len(found))]
    return paths[:limit] if limit else paths


def timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start


def warm_up(image: np.ndarray, with_reference: bool) -> None:
    # Full size: the first full-size call is still ~0.2 s slower than later ones after a
    # small warm-up (allocator/page faults), which would bias the first row.
    search(image)  # numba compiles here
    if with_reference:
        from soco_pretrain.proposals.reference import reference_selective_search

        reference_selective_search(image[::4, ::4].copy(), PAPER.scale, PAPER.sigma, PAPER.min_size)


def bench_photos(paths: list[Path], max_side: int, with_reference: bool) -> list[dict]:
    from soco_pretrain.proposals.reference import reference_selective_search

    rows = []
    for k, path in enumerate(paths):
        image, _, _ = load_rgb_bounded(path, max_side)
        if k == 0:
            warm_up(image, with_reference)
        h, w = image.shape[:2]
        ours, t_ours = timed(search, image)
        kept, _ = filter_boxes(ours, w, h, PAPER)
        row = {"image": path.name, "size": f"{w}x{h}", "ours": t_ours, "boxes": len(ours), "kept": len(kept)}
        if with_reference:
            ref, t_ref = timed(reference_selective_search, image, PAPER.scale, PAPER.sigma, PAPER.min_size)
            row.update(reference=t_ref, speedup=t_ref / t_ours, same=bool(np.array_equal(ours, ref)))
        rows.append(row)
        print(
            f"  {k + 1}/{len(paths)} {path.name}: {t_ours:.3f} s"
            + (f", reference {row['reference']:.2f} s" if with_reference else ""),
            file=sys.stderr,
            flush=True,
        )
    return rows


def huge_child(max_side: int) -> None:
    """Run in a fresh process so its peak RSS is the huge image's alone (printed as JSON)."""
    from PIL import Image

    photo = bundled_photo_paths()["astronaut"]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "huge.jpg"
        with Image.open(photo) as im:
            im.convert("RGB").resize(HUGE_SIZE, Image.BICUBIC).save(path, quality=90)
        warm_up(load_rgb_bounded(photo, max_side)[0], with_reference=False)
        reset = reset_peak_rss()
        rss_before = peak_rss_mib()
        start = time.perf_counter()
        image, (width, height), factor = load_rgb_bounded(path, max_side)
        boxes = search(image)
        kept, _ = filter_boxes(boxes, image.shape[1], image.shape[0], PAPER)
        seconds = time.perf_counter() - start
    print(
        json.dumps(
            {
                "size": f"{width}x{height}",
                "searched": f"{image.shape[1]}x{image.shape[0]}",
                "seconds": seconds,
                "boxes": len(boxes),
                "kept": len(kept),
                "rss_before_mib": rss_before,
                "peak_rss_mib": peak_rss_mib(),
                "peak_reset": reset,
            }
        )
    )


def bench_huge(max_side: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--huge-child", "--max-side", str(max_side)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(rows: list[dict], with_reference: bool) -> str:
    head = ["image", "searched size", "ours s", "boxes", "kept (paper)"]
    if with_reference:
        head[3:3] = ["reference s", "speed-up"]
        head.append("identical")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["image"], r["size"], f"{r['ours']:.3f}", str(r["boxes"]), str(r["kept"])]
        if with_reference:
            cells[3:3] = [f"{r['reference']:.2f}", f"{r['speedup']:.0f}x"]
            cells.append("yes" if r["same"] else "**NO**")
        lines.append("| " + " | ".join(cells) + " |")
    ours = [r["ours"] for r in rows]
    for label, fn in (("median", statistics.median), ("total", sum)):
        cells = [
            f"**{label}**",
            "",
            f"{fn(ours):.3f}",
            f"{fn([r['boxes'] for r in rows]):.0f}",
            f"{fn([r['kept'] for r in rows]):.0f}",
        ]
        if with_reference:
            ref = [r["reference"] for r in rows]
            speed = fn([r["speedup"] for r in rows]) if label == "median" else sum(ref) / sum(ours)
            cells[3:3] = [f"{fn(ref):.2f}", f"{speed:.0f}x"]
            cells.append(f"{sum(r['same'] for r in rows)}/{len(rows)}" if label == "total" else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def stage_times(image: np.ndarray, repeats: int = 5) -> dict:
    """Best-of-``repeats`` milliseconds of each stage of our search on one image."""
    import importlib

    ss = importlib.import_module("soco_pretrain.proposals.selective_search")
    h, w = image.shape[:2]
    stages = {}

    def best(name, fn, *a):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            out = fn(*a)
            times.append(time.perf_counter() - start)
        stages[name] = 1e3 * min(times)
        return out

    costs = best("smoothing + edge costs", ss._edge_costs, image, PAPER.sigma)
    order = best("np.argsort of costs", np.argsort, costs)
    roots = best(
        "Felzenszwalb union-find",
        ss._felzenszwalb_segments,
        order,
        costs,
        h,
        w,
        float(PAPER.scale),
        int(PAPER.min_size),
    )
    regions = best(
        "regions + LBP + histograms",
        ss._regions,
        image,
        roots,
        ss._V_LUT,
        ss._LBP_LUT,
        float(ss._LBP_CP[1]),
        ss.COLOUR_BINS,
        ss.TEXTURE_BINS,
    )
    best("grouping", ss._group, *regions, h * w)
    return stages


def print_stages(paths: list[Path], max_side: int) -> None:
    print("\nWhere our time goes (ms, best of 5; share of the sum):\n")
    names = None
    for path in paths:
        image, _, _ = load_rgb_bounded(path, max_side)
        search(image)  # compile / warm
        stages = stage_times(image)
        if names is None:
            names = list(stages)
            print("| image | " + " | ".join(names) + " | sum |")
            print("|---" * (len(names) + 2) + "|")
        total = sum(stages.values())
        cells = [f"{stages[n]:.1f} ({100 * stages[n] / total:.0f}%)" for n in names]
        print(f"| {path.name} | " + " | ".join(cells) + f" | {total:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", help="image folder or list file (default: scikit-image's bundled photos)")
    parser.add_argument("--limit", type=int, default=None, help="first N images (default: 7 bundled / 8 from --images)")
    parser.add_argument(
        "--max-side",
        type=int,
        default=PAPER.max_side,
        help=f"search larger images resized to this long side (default {PAPER.max_side}, as the pipeline)",
    )
    parser.add_argument("--no-reference", action="store_true", help="time only our search")
    parser.add_argument("--huge", action="store_true", help="add a 4000x3000 photo through load + search + filter")
    parser.add_argument("--stages", action="store_true", help="also print the time of each stage of our search")
    parser.add_argument("--huge-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.huge_child:
        huge_child(args.max_side)
        return

    limit = args.limit if args.limit is not None else (None if args.images is None else 8)
    paths = photo_paths(args.images, limit)
    if not paths:
        sys.exit(f"no images found in {args.images}")
    with_reference = not args.no_reference
    print(f"benchmarking {len(paths)} images (max side {args.max_side}, one thread)...", file=sys.stderr)
    rows = bench_photos(paths, args.max_side, with_reference)
    peak = peak_rss_mib()
    huge = bench_huge(args.max_side) if args.huge else None

    print(
        f"\nSelective search, paper preset (scale {PAPER.scale}, sigma {PAPER.sigma}, min_size {PAPER.min_size}), "
        f"seconds per image on one core, warm-up excluded:\n"
    )
    print(table(rows, with_reference))
    print(f"\nPeak RSS of this run: {peak:.0f} MiB" + (" (includes the reference)" if with_reference else ""))
    if huge:
        print(
            f"\nHuge photo ({huge['size']} JPEG, searched at {huge['searched']}): load_rgb_bounded + search + "
            f"filter {huge['seconds']:.2f} s, {huge['boxes']} boxes, {huge['kept']} kept; peak RSS "
            f"{huge['peak_rss_mib']:.0f} MiB (after warm-up, before the image: {huge['rss_before_mib']:.0f} MiB"
            + ("" if huge["peak_reset"] else "; peak not resettable here, includes numba compile")
            + ")"
        )
    if args.stages:
        print_stages(paths, args.max_side)
    print(f"\nMachine: {machine()}")


if __name__ == "__main__":
    main()
