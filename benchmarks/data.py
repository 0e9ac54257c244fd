"""Benchmark: the data pipeline's images/s per CPU core against plain PIL + torchvision v2.

One thread, no loader workers (what one DataLoader worker does per image). Each row is timed
in this run on the same decoded files, after a warm-up:

- baseline: decode (PIL), resize to 224, RandomResizedCrop to 224 (scale [0.5, 1]), resize to
  112 (and, for 4 views, RandomResizedCrop to 192), then BYOL's photometric augmentation per
  view with torchvision.transforms.v2 (flip, colour jitter, grayscale, blur, solarize,
  normalise) -- the same work per image as ours, without boxes;
- ours, CPU photometric: ``SoCoDataset[i]`` (decode, views with boxes and levels, augment_cpu);
- ours, GPU photometric: the workers' part (``augment.device="gpu"``: decode, views, boxes,
  uint8 tensors) + ``soco_collate`` + ``BatchAugment`` on a batch -- on the CPU device here
  (one thread), and on CUDA as an extra row when a GPU is present;
- ours, decode on the device (``data.decode="device"``): the workers' part (read the file's
  bytes, parse its header, draw the geometry, collate; files other than RGB/grey JPEG are still
  decoded there, the row says how many) + ``render_batch`` (decode_jpeg, crops, resizes, flips)
  + ``BatchAugment`` -- on the CPU device here, and render_batch on CUDA as an extra row when a
  GPU is present. Only meaningful on JPEGs: ``--jpeg 90`` re-encodes the images first (every
  row then reads the same JPEG files; skimage's bundled photos are mostly PNG).

Proposals are generated into a temporary store first (selective search, paper preset; images
left without proposals use the whole image). Prints a markdown table and the machine.

    python benchmarks/data.py                                   # skimage's 7 bundled photos
    python benchmarks/data.py --images /path/to/photos --limit 32
    python benchmarks/data.py --jpeg 90                         # the photos as JPEG (decode rows)

A default run takes about 70 s.
"""

from __future__ import annotations

import os

for _var in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from bench_common import cpu_model, peak_rss_mib, reset_peak_rss  # noqa: E402  (benchmarks/bench_common.py)
from PIL import Image  # noqa: E402
from torchvision.transforms import v2  # noqa: E402

from soco_pretrain.config import AugmentConfig, DataConfig, ViewsConfig  # noqa: E402
from soco_pretrain.data.augment import BatchAugment, blur_kernel_size  # noqa: E402
from soco_pretrain.data.dataset import SoCoDataset  # noqa: E402
from soco_pretrain.data.decode import render_batch  # noqa: E402
from soco_pretrain.data.loader import augment_batch, soco_collate  # noqa: E402
from soco_pretrain.demo import bundled_photo_paths  # noqa: E402
from soco_pretrain.images import list_images, load_rgb  # noqa: E402
from soco_pretrain.proposals import generate  # noqa: E402

torch.set_num_threads(1)


# ---------------------------------------------------------------- measuring


def measure(passes: dict, n_images: int, seconds: float) -> dict:
    """Time whole passes, interleaved: round after round, each entry of ``passes`` (name ->
    fn() doing the same work every time, returning an optional dict of per-stage seconds) runs
    once, until ``seconds`` per entry have gone by (at least 3 rounds). ``n_images``: images
    processed by one pass.

    Returns name -> {"sec": seconds per image of the fastest pass, "split": each stage's seconds
    per image in its fastest pass, "peak": peak RSS MiB during its passes}. Interleaving and the fastest
    pass (as timeit does) keep a busy shared machine from favouring whichever row ran when it
    was quiet.
    """
    for fn in passes.values():  # warm-up: first calls, lazy imports, caches
        fn()
    best = {name: {"sec": float("inf"), "split": {}, "peak": 0.0} for name in passes}
    start, rounds = time.perf_counter(), 0
    while rounds < 3 or time.perf_counter() - start < seconds * len(passes):
        rounds += 1
        for name, fn in passes.items():
            reset_peak_rss()
            t0 = time.perf_counter()
            split = fn() or {}
            t = (time.perf_counter() - t0) / n_images
            entry = best[name]
            entry["peak"] = max(entry["peak"], peak_rss_mib())
            entry["sec"] = min(entry["sec"], t)
            for k, v in split.items():  # each stage's fastest pass too
                entry["split"][k] = min(entry["split"].get(k, float("inf")), v / n_images)
    return best


# ---------------------------------------------------------------- the baseline


def byol_v2(param_set: int, size: int, cfg: AugmentConfig) -> v2.Compose:
    """BYOL's photometric augmentation of one view with torchvision.transforms.v2 (+ the flip).

    On uint8 tensors, converted to float at the end: measured faster here than float kernels
    (22 vs 30 ms per 224-px view on one core) and as fast as v2 on PIL images, so the strongest
    plain variant.
    """
    return v2.Compose(
        [
            v2.ToImage(),
            v2.RandomHorizontalFlip(0.5),
            v2.RandomApply(
                [v2.ColorJitter(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue)], p=cfg.colour_jitter_p
            ),
            v2.RandomGrayscale(cfg.grayscale_p),
            v2.RandomApply([v2.GaussianBlur(blur_kernel_size(size), sigma=cfg.blur_sigma)], p=cfg.blur_p[param_set]),
            v2.RandomSolarize(128, p=cfg.solarize_p[param_set]),  # 0.5 on [0, 1] = 128 on uint8
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(cfg.mean, cfg.std),
        ]
    )


class Baseline:
    """Plain PIL + torchvision v2 per image: the views' pixels and photometric ops, no boxes."""

    def __init__(self, paths: list[Path], views: ViewsConfig, aug: AugmentConfig):
        self.paths = paths
        self.v = views
        self.crop = v2.RandomResizedCrop(views.v2_size, scale=views.crop_scale, ratio=views.crop_ratio)
        self.crop4 = v2.RandomResizedCrop(views.v4_size, scale=views.crop_scale, ratio=views.crop_ratio)
        sizes = [views.v1_size, views.v2_size, views.v3_size] + ([views.v4_size] if views.soco_star else [])
        self.photometric = [byol_v2(aug.view_params[k], s, aug) for k, s in enumerate(sizes)]

    def __call__(self, i: int) -> list[torch.Tensor]:
        with Image.open(self.paths[i]) as im:
            image = im.convert("RGB")
        s1 = self.v.v1_size
        v1 = image.resize((s1, s1), Image.BILINEAR)
        v2_ = self.crop(v1)
        views = [v1, v2_, v2_.resize((self.v.v3_size, self.v.v3_size), Image.BILINEAR)]
        if self.v.soco_star:
            views.append(self.crop4(v1))
        return [t(view) for t, view in zip(self.photometric, views)]


# ---------------------------------------------------------------- rows


def make_passes(source, store, paths, batch: int, epochs: int, device: str = "cpu") -> dict:
    """name -> fn() for every row: one pass = ``epochs`` epochs over the images, the same random
    draws every time it runs (so the fastest pass measures the work, not luckier draws)."""
    n = len(paths)
    passes = {}

    def decode_pass():
        for _ in range(epochs):
            for p in paths:
                load_rgb(p)

    passes["decode"] = decode_pass
    for nv in (3, 4):
        views = ViewsConfig(soco_star=nv == 4, no_proposals="whole_image")
        base = Baseline(paths, views, AugmentConfig())
        cpu_ds = SoCoDataset(source, store, DataConfig(views=views))
        gpu_cfg = DataConfig(views=views, augment=AugmentConfig(device="gpu"))
        gpu_ds = SoCoDataset(source, store, gpu_cfg)
        augmenter = BatchAugment(gpu_cfg.augment)

        def baseline_pass(base=base):
            torch.manual_seed(0)  # torchvision's transforms draw from the global generator
            for _ in range(epochs):
                for i in range(n):
                    base(i)

        def cpu_pass(ds=cpu_ds):
            for epoch in range(epochs):
                for i in range(n):
                    ds[(epoch, i)]

        def batched_pass(ds=gpu_ds, cfg=gpu_cfg, augmenter=augmenter, device=device):
            split = {"workers": 0.0, "augment": 0.0}
            generator = torch.Generator().manual_seed(0)
            for epoch, lo in ((e, lo) for e in range(epochs) for lo in range(0, n, batch)):
                t0 = time.perf_counter()
                collated = soco_collate([ds[(epoch, i)] for i in range(lo, min(lo + batch, n))])
                t1 = time.perf_counter()
                augment_batch(collated, augmenter, cfg.augment.view_params, generator, device=device)
                if device != "cpu":
                    torch.cuda.synchronize()
                split["workers"] += t1 - t0
                split["augment"] += time.perf_counter() - t1
            return split

        dev_cfg = dataclasses.replace(gpu_cfg, decode="device")
        dev_ds = SoCoDataset(source, store, dev_cfg)

        def device_decode_pass(ds=dev_ds, cfg=dev_cfg, augmenter=augmenter, device=device):
            split = {"workers": 0.0, "render": 0.0, "augment": 0.0, "in_worker": 0}
            generator = torch.Generator().manual_seed(0)
            for epoch, lo in ((e, lo) for e in range(epochs) for lo in range(0, n, batch)):
                t0 = time.perf_counter()
                collated = soco_collate([ds[(epoch, i)] for i in range(lo, min(lo + batch, n))])
                t1 = time.perf_counter()
                rendered = render_batch(collated, cfg.views, device)
                if device != "cpu":
                    torch.cuda.synchronize()
                t2 = time.perf_counter()
                augment_batch(rendered, augmenter, cfg.augment.view_params, generator, device=device)
                if device != "cpu":
                    torch.cuda.synchronize()
                split["workers"] += t1 - t0
                split["render"] += t2 - t1
                split["augment"] += time.perf_counter() - t2
                split["in_worker"] += sum(p is not None for p in collated["pixels"])
            return split

        passes[f"baseline{nv}"] = baseline_pass
        passes[f"cpu{nv}"] = cpu_pass
        passes[f"batched{nv}"] = batched_pass
        passes[f"device{nv}"] = device_decode_pass
    return passes


def _cuda_row(label: str, views: int, photometric: str, sec: float) -> dict:
    """A table row timed on the GPU alone (no vs-baseline ratio: the baseline is a CPU path)."""
    return {"pipeline": label, "views": views, "photometric": photometric, "sec": sec, "peak": None,
            "device_only": True}  # fmt: skip


def rows_from(results: dict, batch: int, cuda: dict | None) -> list[dict]:
    r = results
    rows = [
        {
            "pipeline": "decode only (load_rgb), for scale",
            "views": "-",
            "photometric": "-",
            "sec": r["decode"]["sec"],
            "peak": r["decode"]["peak"],
        }
    ]
    for nv in (3, 4):
        base = r[f"baseline{nv}"]["sec"]
        batched = r[f"batched{nv}"]
        workers = batched["split"]["workers"]
        rows += [
            {
                "pipeline": "baseline: PIL + torchvision v2, no boxes",
                "views": nv,
                "photometric": "CPU, per image",
                "sec": base,
                "peak": r[f"baseline{nv}"]["peak"],
                "ratio": 1.0,
            },
            {
                "pipeline": "soco_pretrain SoCoDataset",
                "views": nv,
                "photometric": "CPU, augment_cpu",
                "sec": r[f"cpu{nv}"]["sec"],
                "peak": r[f"cpu{nv}"]["peak"],
                "ratio": base / r[f"cpu{nv}"]["sec"],
            },
            {
                "pipeline": "soco_pretrain, workers' part (decode, views, boxes, collate)",
                "views": nv,
                "photometric": "none (on the device)",
                "sec": workers,
                "peak": batched["peak"],
                "ratio": base / workers,
            },
            {
                "pipeline": f"  + BatchAugment on the CPU device, batch {batch} "
                f"({batched['split']['augment'] * 1e3:.1f} ms/image)",
                "views": nv,
                "photometric": "batched, CPU device",
                "sec": batched["sec"],
                "peak": batched["peak"],
                "ratio": base / batched["sec"],
            },
        ]
        if cuda:
            label = f"  BatchAugment on CUDA alone, batch {batch}, incl. copy to the GPU"
            rows.append(_cuda_row(label, nv, "batched, CUDA", cuda[f"batched{nv}"]["split"]["augment"]))
        dev = r[f"device{nv}"]
        split = dev["split"]
        # in_worker is a count per image of the fastest pass: the share of files decoded in the worker.
        in_worker = f"; {split['in_worker']:.0%} of files not JPEG, decoded there" if split["in_worker"] else ""
        rows += [
            {
                "pipeline": "soco_pretrain data.decode=device, workers' part "
                f"(bytes, header, geometry, collate{in_worker})",
                "views": nv,
                "photometric": "none (on the device)",
                "sec": split["workers"],
                "peak": dev["peak"],
                "ratio": base / split["workers"],
            },
            {
                "pipeline": f"  render_batch on the CPU device alone, batch {batch} "
                "(decode_jpeg, crops, resizes, flips)",
                "views": nv,
                "photometric": "-",
                "sec": split["render"],
                "peak": dev["peak"],
            },
            {
                "pipeline": "  + render_batch + BatchAugment on the CPU device "
                f"({split['augment'] * 1e3:.1f} ms/image augment)",
                "views": nv,
                "photometric": "batched, CPU device",
                "sec": dev["sec"],
                "peak": dev["peak"],
                "ratio": base / dev["sec"],
            },
        ]
        if cuda:
            label = f"  render_batch on CUDA alone, batch {batch} (nvJPEG decode, crops, resizes, flips)"
            rows.append(_cuda_row(label, nv, "-", cuda[f"device{nv}"]["split"]["render"]))
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| pipeline | views | photometric | ms / image | images/s per core | vs baseline | peak RSS MiB |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        rate = 1 / r["sec"]
        per = "(GPU) " + f"{rate:.0f}" if r.get("device_only") else f"{rate:.1f}"
        ratio = f"{r['ratio']:.2f}x" if "ratio" in r else ""
        peak = f"{r['peak']:.0f}" if r.get("peak") else ""
        name = r["pipeline"]
        lines.append(
            f"| {name} | {r['views']} | {r['photometric']} | {r['sec'] * 1e3:.2f} | {per} | {ratio} | {peak} |"
        )
    return "\n".join(lines)


def machine() -> str:
    import PIL
    import torchvision

    cpu = cpu_model()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{cpu}, {os.cpu_count()} cores (benchmark uses 1 thread), {gpu}; python {platform.python_version()}, "
        f"torch {torch.__version__}, torchvision {torchvision.__version__}, pillow {PIL.__version__}, "
        f"numpy {np.__version__}"
    )


def device_vs_cpu_views(source, store, batch: int) -> str:
    """Max and mean |CUDA - CPU| of render_batch's uint8 views for the first batch (decode=device,
    paper views): nvJPEG and CUDA's resize against libjpeg-turbo and the CPU kernel."""
    views = ViewsConfig(no_proposals="whole_image")
    cfg = DataConfig(views=views, augment=AugmentConfig(device="gpu"), decode="device")
    ds = SoCoDataset(source, store, cfg)
    collated = soco_collate([ds[(0, i)] for i in range(min(batch, len(ds)))])
    on_cpu = render_batch(collated, cfg.views, "cpu")["views"]
    on_gpu = render_batch(collated, cfg.views, "cuda")["views"]
    diffs = [(g.cpu().int() - c.int()).abs() for g, c in zip(on_gpu, on_cpu)]
    return ", ".join(f"V{v + 1} max {d.max().item()} mean {d.float().mean().item():.3f}" for v, d in enumerate(diffs))


def as_jpeg(paths: list, folder: Path, quality: int) -> list[Path]:
    """The images re-encoded as RGB JPEG of ``quality`` in ``folder`` (same stems)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for k, p in enumerate(paths):
        target = folder / f"{k:04d}_{Path(p).stem}.jpg"
        with Image.open(p) as im:
            im.convert("RGB").save(target, "JPEG", quality=quality)
        out.append(target)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", help="image folder or list file (default: scikit-image's bundled photos)")
    parser.add_argument("--limit", type=int, default=None, help="first N images of --images (default 32)")
    parser.add_argument("--proposals", help="an existing proposal store for --images (default: generate one)")
    parser.add_argument("--seconds", type=float, default=3.0, help="minimum timed seconds per row (default 3)")
    parser.add_argument("--batch", type=int, default=32, help="batch size of the batched path (default 32)")
    parser.add_argument(
        "--jpeg",
        type=int,
        default=None,
        metavar="QUALITY",
        help="re-encode the images as JPEG of this quality first (every row reads them; the "
        "data.decode=device rows need JPEGs to mean anything)",
    )
    parser.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="epochs over the images per timed pass (default: about 28 images per pass)",
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="soco-bench-data-") as tmp:
        tmp = Path(tmp)
        if args.images is None:
            paths = list(bundled_photo_paths().values())
        else:
            found = list_images(args.images)
            paths = [found.abspath(i) for i in range(len(found))][: args.limit or 32]
        if not paths:
            sys.exit(f"no images found in {args.images}")
        if args.jpeg:
            paths = as_jpeg(paths, tmp / "jpeg", args.jpeg)
        if args.proposals and args.images and not args.limit and not args.jpeg:
            source, store = args.images, args.proposals
        else:
            # A list file of absolute paths: the store and the dataset name the images the same way.
            source = tmp / "images.txt"
            source.write_text("".join(f"{Path(p).resolve()}\n" for p in paths))
            store = tmp / "proposals"
            print(f"generating proposals for {len(paths)} images...", file=sys.stderr)
            t0 = time.perf_counter()
            summary = generate(source, store, workers=min(4, os.cpu_count() or 1), progress=False)
            print(f"  {time.perf_counter() - t0:.1f} s, {summary.boxes} boxes", file=sys.stderr)
        ds = SoCoDataset(source, store, DataConfig(views=ViewsConfig(no_proposals="whole_image")))
        paths = [ds.images.abspath(i) for i in range(len(ds))]
        sizes = [load_rgb(p).shape[1::-1] for p in paths]
        print(f"benchmarking {len(paths)} images, one thread...", file=sys.stderr)
        batch = min(args.batch, len(paths))
        epochs = args.epochs or max(1, round(28 / len(paths)))
        per_pass = epochs * len(paths)
        results = measure(make_passes(source, store, paths, batch, epochs), per_pass, args.seconds)
        cuda, cuda_diff = None, None
        if torch.cuda.is_available():
            gpu = make_passes(source, store, paths, batch, epochs, device="cuda")
            timed = {k: v for k, v in gpu.items() if k.startswith(("batched", "device"))}
            cuda = measure(timed, per_pass, args.seconds)
            cuda_diff = device_vs_cpu_views(source, store, batch)
        rows = rows_from(results, batch, cuda)

    mean_px = np.mean([w * h for w, h in sizes])
    print(
        f"\nData pipeline per image on one CPU core (torch.set_num_threads(1), no loader workers); "
        f"{len(paths)} images x {epochs} epochs per pass, mean {mean_px / 1e6:.2f} Mpx"
        f"{f', re-encoded as JPEG quality {args.jpeg}' if args.jpeg else ''}, "
        f"{len(ds.without_proposals)} without proposals "
        f"(whole image used); paper view settings; warm-up excluded:\n"
    )
    print(table(rows))
    print(
        "\nvs baseline = baseline ms / ours ms for the same number of views (> 1: ours is faster). "
        "Peak RSS: this process during the row's passes. Rows interleaved, fastest pass of each."
    )
    if cuda_diff is not None:
        print(f"\nrender_batch on CUDA (nvJPEG, CUDA resize) vs on the CPU, one batch: {cuda_diff}")
    print(f"\nMachine: {machine()}")


if __name__ == "__main__":
    main()
