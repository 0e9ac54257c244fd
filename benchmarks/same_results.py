"""Does a refactor change results? Run the same small pipeline with whichever soco_pretrain is
importable and print digests of what it produced; run it with two checkouts and diff the outputs.

    PYTHONPATH=/path/to/old/checkout/src python benchmarks/same_results.py > before.txt
    python benchmarks/same_results.py > after.txt
    diff before.txt after.txt      # only the "code:" line differs when results are bit-identical

What it runs (one thread, CPU, seeded): ``pretrain()`` of a ResNet-18-FPN on four scikit-image
photos with random boxes, stopped after 2 steps and resumed to 4 (the checkpoint's weights and
LARS momentum); ``soco export --to torchvision`` of that run (the exported tensors); ``soco knn``
of it (crop probe, pooled C5) on a shapes set made from other photos (the report's figures).
About two minutes on 2 cores.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path

import torch
from PIL import Image
from skimage import data as skimage_data

import soco_pretrain
from soco_pretrain.cli import main
from soco_pretrain.config import apply_overrides
from soco_pretrain.engine.checkpoint import load_checkpoint
from soco_pretrain.presets import load_preset
from soco_pretrain.train.loop import pretrain
from soco_pretrain.transfer.shapes import make_shapes_set


def digest(tensors: dict) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors, key=str):
        value = tensors[key]
        if isinstance(value, torch.Tensor):
            h.update(str(key).encode())
            h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def photo(name: str, size=(160, 120)) -> Image.Image:
    return Image.fromarray(getattr(skimage_data, name)()).convert("RGB").resize(size)


def main_() -> int:
    torch.set_num_threads(1)
    print("code:", soco_pretrain.__file__)
    tmp = Path(tempfile.mkdtemp(prefix="same_results_"))
    images = tmp / "images"
    images.mkdir()
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        photo(name).save(images / f"{name}.png")
    cfg = apply_overrides(
        load_preset("tiny"),
        ["data.views.proposal_source=random", "train.epochs=2", "train.batch_size=2", "train.per_device_batch=2",
         "train.workers=0", "train.checkpoint_every=1", "model.backbone=resnet18", "data.views.v1_size=64",
         "data.views.v2_size=64", "data.views.v3_size=32", "data.views.v4_size=32"],
    )  # fmt: skip
    run = tmp / "run"
    pretrain(cfg, images, None, run, max_steps=2, progress=False)
    pretrain(cfg, images, None, run, progress=False)  # resumed at step 2
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    momentum = {k: v["momentum_buffer"] for k, v in state["optimizer"]["state"].items() if "momentum_buffer" in v}
    lines = [
        f"pretrain step {state['step']} weights {digest(state['model'])} momentum {digest(momentum)}",
    ]
    if main(["export", str(run), "--to", "torchvision", "-o", str(tmp / "tv.pth")]) != 0:
        return 1
    lines.append(f"export torchvision {digest(torch.load(tmp / 'tv.pth', weights_only=True))}")
    shapes = make_shapes_set({n: photo(n, (144, 108)) for n in ("camera", "coins", "moon", "page")}, tmp / "shapes")
    knn = ["knn", "--weights", str(run), "--train-json", str(shapes), "--train-images", str(shapes.parent / "images"),
           "--val-json", str(shapes), "--val-images", str(shapes.parent / "images"), "-o", str(tmp / "knn"),
           "--objects", "crop", "--size", "48", "--min-box", "8", "--workers", "0", "--no-progress",
           "--allow-leak", "--set", "baselines=false"]  # fmt: skip
    if main(knn) != 0:
        return 1
    report = json.loads((tmp / "knn" / "knn.json").read_text())
    figures = {k: report[k] for k in ("top1", "top5", "mean_class_top1", "logistic_balanced") if k in report}
    lines.append(f"knn {json.dumps(figures, sort_keys=True)}")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main_())
