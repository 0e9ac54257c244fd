"""``soco demo``: the whole pipeline on photos bundled with scikit-image, offline.

A plain sequence of steps; later stages (pretraining, export) add theirs at the end.
"""

from __future__ import annotations

import shutil
from pathlib import Path

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
STEPS = 6
# Tiny pretraining in the demo (our choice): 20 optimiser steps of the tiny preset, the whole
# schedule (1 warm-up step, cosine to 0) squeezed into them; about 1-2 minutes on 2 CPU cores.
DEMO_PRETRAIN_STEPS = 20


def _step(number: int, text: str) -> None:
    print(f"[{number}/{STEPS}] {text}", flush=True)


def bundled_photo_paths() -> dict[str, Path]:
    """The bundled photo files, checked to exist (a trimmed skimage install may lack them)."""
    import skimage.data

    data_dir = Path(skimage.data.__file__).parent
    paths = {name: data_dir / file for name, file in PHOTOS.items()}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"scikit-image's bundled photos are missing ({', '.join(missing)}); reinstall scikit-image"
        )
    return paths


def write_photos(images_dir: Path, max_side: int | None = None) -> list[Path]:
    """Write the 7 bundled photos as PNG into ``images_dir`` (optionally shrunk to ``max_side``)."""
    from PIL import Image

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
                    im.thumbnail((max_side, max_side), Image.BILINEAR)
                im.save(target)
        written.append(target)
    return written


def run_demo(out_dir, workers: int = 1, max_side: int | None = None,
             pretrain_steps: int = DEMO_PRETRAIN_STEPS) -> dict[str, Path]:
    """Run the demo into ``out_dir``: DIR/images, DIR/proposals, DIR/pictures, DIR/views, DIR/run.

    ``max_side`` shrinks the photos first (tests use it to stay fast). ``pretrain_steps``: tiny
    pretraining steps (0 skips pretraining and its curves). Returns the paths.
    """
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
    from .config import DataConfig
    from .data import SoCoDataset
    from .viz import show_views

    config = DataConfig()
    config.views.no_proposals = "whole_image"  # tiny demo photos may keep no proposal
    views_written = show_views(SoCoDataset(images, proposals, config), views, num=3, seed=0)

    run = out_dir / "run"
    curves = []
    if pretrain_steps > 0:
        _step(5, f"tiny SoCo pretraining ({pretrain_steps} steps, R50-FPN, tiny preset) into {run}")
        from .config import apply_overrides
        from .presets import load_preset
        from .train.loop import pretrain

        # The schedule's length is the demo's steps (7 photos < batch 8: one step per epoch).
        cfg = apply_overrides(load_preset("tiny"), [f"train.epochs={pretrain_steps}",
                                                    f"train.workers={min(workers, 2)}"])
        pretrain(cfg, images, proposals, run, resume="none")

        _step(6, f"plotting the training curves into {run}")
        from . import viz

        if hasattr(viz, "plot_curves"):
            curves = viz.plot_curves(run)

    print()
    print("demo done:")
    print(f"  photos:    {images}")
    print(f"  proposals: {proposals}")
    print(f"  pictures:  {pictures}  ({len(written)} files: one per photo, contact_sheet.png, stats.png, stats.json)")
    print(f"  views:     {views}  ({len(views_written)} files: V1, V2, V3 of 3 photos with boxes and levels)")
    if pretrain_steps > 0:
        print(f"  run:       {run}  (config.yaml, metrics.jsonl, checkpoints/last.pt"
              + (f", {', '.join(p.name for p in curves)})" if curves else ")"))
    return {"images": images, "proposals": proposals, "pictures": pictures, "views": views, "run": run}
