"""``soco demo``: the whole pipeline on photos bundled with scikit-image, offline.

A plain sequence of steps: photos, proposals, pictures, views, tiny pretraining, curves, then
stage 5: export to torchvision and a short Mask R-CNN fine-tune with COCO AP on a labelled set
the demo paints onto the same photos.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from .config import DataConfig, apply_overrides
from .errors import UserError

# Photos shipped inside scikit-image's wheel (skimage/data/*): nothing is downloaded.
# name -> file in skimage's data directory.
PHOTOS = {
    "astronaut": "astronaut.png",
    "coffee": "coffee.png",
    "chelsea": "chelsea.png",
    "rocket": "rocket.jpg",
    "motorcycle_left": "motorcycle_left.png",
    "motorcycle_right": "motorcycle_right.png",
    "camera": "camera.png",
}
STEPS = 8
# Tiny pretraining in the demo (our choice): 20 optimiser steps of the tiny preset, the whole
# schedule (1 warm-up step, cosine to 0) squeezed into them; about 1-2 minutes on 2 CPU cores.
DEMO_PRETRAIN_STEPS = 20
# Fine-tune in the demo (our choice): 16 iterations of batch 2 at 160 px (short side) from the
# demo's weights, on shapes painted onto the 7 photos, evaluated on the same 7 images. It shows
# the export -> fine-tune -> COCO AP path working; with this budget the AP is near 0 (the paper's
# 1x schedule is 90k iterations at batch 16 and 800 px).
DEMO_FINETUNE_ITERS = 16


def _step(number: int, text: str) -> None:
    print(f"[{number}/{STEPS}] {text}", flush=True)


def bundled_photo_paths() -> dict[str, Path]:
    """The bundled photo files, checked to exist (a trimmed skimage install may lack them)."""
    # here, not at the top: soco --help imports this module (cli/demo.py reads its defaults)
    import skimage.data

    data_dir = Path(skimage.data.__file__).parent
    paths = {name: data_dir / file for name, file in PHOTOS.items()}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise UserError(f"scikit-image's bundled photos are missing ({', '.join(missing)}); reinstall scikit-image")
    return paths


def write_photos(images_dir: Path, max_side: int | None = None) -> list[Path]:
    """Write the 7 bundled photos as PNG into ``images_dir`` (optionally shrunk to ``max_side``)."""
    from PIL import Image  # here, not at the top: soco --help imports this module

    images_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, source in bundled_photo_paths().items():
        target = images_dir / f"{name}.png"
        if source.suffix == ".png" and not max_side:
            shutil.copyfile(source, target)
        else:
            with Image.open(source) as im:
                im.load()
                if max_side:
                    im.thumbnail((max_side, max_side), Image.Resampling.BILINEAR)
                im.save(target)
        written.append(target)
    return written


def run_demo(
    out_dir,
    workers: int = 1,
    max_side: int | None = None,
    pretrain_steps: int = DEMO_PRETRAIN_STEPS,
    finetune_iters: int = DEMO_FINETUNE_ITERS,
) -> dict[str, Path]:
    """Run the demo into ``out_dir``: DIR/images, DIR/proposals, DIR/pictures, DIR/views, DIR/run,
    DIR/export, DIR/labelled, DIR/finetune.

    ``max_side`` shrinks the photos first (tests use it to stay fast). ``pretrain_steps``: tiny
    pretraining steps (0 skips pretraining, its curves, export and fine-tune). ``finetune_iters``:
    fine-tune iterations (0 skips the fine-tune). Returns the paths.
    """
    # here, not at the top: soco --help imports this module (cli/demo.py reads its defaults):
    # each step imports what it runs
    from .proposals import generate
    from .proposals.store import load
    from .viz import show_proposals

    out_dir = Path(out_dir)
    images = out_dir / "images"
    proposals = out_dir / "proposals"
    pictures = out_dir / "pictures"

    _step(1, f"writing {len(PHOTOS)} photos bundled with scikit-image to {images}")
    write_photos(images, max_side)

    _step(2, f"computing selective-search proposals (paper preset, {workers} workers) into {proposals}")
    summary = generate(images, proposals, preset="paper", workers=workers, progress=True)
    print(summary.format(), flush=True)

    _step(3, f"drawing proposals and statistics into {pictures}")
    written = show_proposals(load(proposals), images, pictures, num=len(PHOTOS), per_image=10, seed=0)

    views = out_dir / "views"
    _step(4, f"drawing the training views V1-V3 with their boxes and FPN levels into {views}")
    from .data import SoCoDataset
    from .viz import show_views

    config = DataConfig()
    config.views.no_proposals = "whole_image"  # tiny demo photos may keep no proposal
    views_written = show_views(SoCoDataset(images, proposals, config), views, num=3, seed=0)

    run = out_dir / "run"
    curves = []
    if pretrain_steps > 0:
        _step(5, f"tiny SoCo pretraining ({pretrain_steps} steps, R50-FPN, tiny preset) into {run}")
        from .presets import load_preset
        from .train.loop import pretrain

        # The schedule's length is the demo's steps (7 photos < batch 8: one step per epoch).
        cfg = apply_overrides(
            load_preset("tiny"), [f"train.epochs={pretrain_steps}", f"train.workers={min(workers, 2)}"]
        )
        pretrain(cfg, images, proposals, run, resume="none")

        _step(6, f"plotting the training curves into {run}")
        from . import viz

        if hasattr(viz, "plot_curves"):
            curves = viz.plot_curves(run)

    export_file = out_dir / "export" / "soco_r50fpn_torchvision.pth"
    finetune_dir = out_dir / "finetune"
    metrics = None
    if pretrain_steps > 0:
        _step(7, f"exporting the pretrained encoder for torchvision Mask R-CNN v2 to {export_file}")
        from .transfer.export import export

        print(export(run, "torchvision", out=export_file).format(), flush=True)

    if pretrain_steps > 0 and finetune_iters > 0:
        labelled = out_dir / "labelled"
        _step(
            8,
            f"fine-tuning Mask R-CNN v2 from it ({finetune_iters} iterations) on shapes painted onto "
            f"the photos ({labelled}), COCO AP into {finetune_dir}",
        )
        from PIL import Image

        from .transfer.finetune import finetune
        from .transfer.shapes import make_shapes_set

        photos = {}
        for path in sorted(images.glob("*.png")):
            with Image.open(path) as im:
                photos[path.stem] = im.convert("RGB")
        coco_json = make_shapes_set(photos, labelled, seed=0)
        size = 160 if not max_side else min(160, max_side)
        metrics = finetune(
            export_file,
            coco_json,
            labelled / "images",
            coco_json,
            labelled / "images",
            finetune_dir,
            max_iters=finetune_iters,
            batch_size=2,
            train_sizes=(size,),
            max_size=2 * size,
            test_size=size,
            roi_batch=64,
            test_proposals=100,
            detections=20,
            precise_bn=2,
            workers=min(workers, 2),
            log_every=4,
            resume="none",
        )

    print()
    print("demo done:")
    print(f"  photos:    {images}")
    print(f"  proposals: {proposals}")
    print(f"  pictures:  {pictures}  ({len(written)} files: one per photo, contact_sheet.png, stats.png, stats.json)")
    print(f"  views:     {views}  ({len(views_written)} files: V1, V2, V3 of 3 photos with boxes and levels)")
    if pretrain_steps > 0:
        print(
            f"  run:       {run}  (config.yaml, metrics.jsonl, checkpoints/last.pt"
            + (f", {', '.join(p.name for p in curves)})" if curves else ")")
        )
    if pretrain_steps > 0:
        print(f"  export:    {export_file}  (loads into torchvision maskrcnn_resnet50_fpn_v2 with strict=False)")
    if metrics:
        ap = "  ".join(f"{kind} AP {metrics[kind]['AP']:.1f}" for kind in ("bbox", "segm") if kind in metrics)
        print(
            f"  finetune:  {finetune_dir}  (metrics.json: {ap}; a {finetune_iters}-iteration budget, so expect about 0)"
        )
    return {
        "images": images,
        "proposals": proposals,
        "pictures": pictures,
        "views": views,
        "run": run,
        "export": export_file,
        "finetune": finetune_dir,
    }
