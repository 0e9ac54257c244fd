"""A supervised ResNet trained on the labelled object crops of a COCO JSON: the positive control of
the object probe, and a stand-in for "the weights users already have" where none can be downloaded.

**Positive control.** ``soco knn --objects crop`` must tell pretrained features from random init.
Before trusting a "no difference" there, check that the probe sees a difference at all: the same
backbone trained *with labels* for the same number of optimiser steps and the same batch as the
pretraining, then read by the same probe. If it does not beat random init clearly, the probe is
broken (or the budget is too small for any learning to show).

What is trained, and how (our choices, torchvision's ImageNet recipe in small):

- **Objects**: every usable object of TRAIN_JSON, read by the probe's own reader
  (``evaluate.knn.load_objects``: non-crowd boxes of at least ``--min-box`` px); with
  ``--min-instances N`` only the classes with at least N of them (the probe's filter).
- **Crops**: cut by the probe's own code (``evaluate.crops.CropSet`` -> ``cut_crop``: the box grown
  by ``--context``, squared, mean-colour fill outside the photo, resized to ``--size``), kept in
  memory as uint8. Training sees a random resized crop of each square (area 0.6-1, aspect 3/4-4/3,
  bilinear back to ``--size``) and a horizontal flip; the probe sees the whole square.
- **Network**: ``model/backbones.build_resnet(--arch)``, the very ResNet soco's encoder builds
  (random init, trainable BatchNorm2d, zero-init residual), and a linear ``fc`` for the classes.
  Seeded: the ResNet before step 0 is the one ``soco knn --weights none --seed S --set
  backbone=ARCH`` reads (the same torch seed, built first).
- **Optimiser**: SGD, momentum 0.9, weight decay 1e-4 (also on BN and biases, as torchvision),
  cross-entropy; lr = ``--lr`` x batch / 256, linear warm-up over the first 5% of the steps, then
  cosine to 0.
- **Budget**: ``--steps N --batch B`` optimiser steps (a pretraining's budget; the epochs follow),
  or ``--epochs E`` (E x objects // B steps). Batches are consecutive slices of a stream of seeded
  permutations of the crops.
- **Determinism**: torch and numpy seeded from ``--seed``, every random draw from one torch
  generator: the same seed, inputs and thread count give a bit-identical file on a CPU.

Writes a plain torchvision state dict (``fc`` included), atomically: it loads into
``torchvision.models.ARCH(num_classes=K)`` and is read by ``soco knn --weights FILE`` as a ResNet
(``--objects crop --features c5,c4``: the pooled stages). Beside it, ``OUT.json`` (OUT without its
suffix) holds the figures and the arguments. Ends with one line: steps, images seen, train top-1
of the last 100 steps, seconds, the file.

    python benchmarks/supervised_crops.py --train-json train.json --images imgs/ --arch resnet18 \\
        --size 64 --steps 500 --batch 32 -o sup_r18.pth
    soco knn --weights sup_r18.pth --objects crop --features c5,c4 --size 64 ...

Only TRAIN_JSON's images are used: the probe's queries (VAL_JSON's) are never seen. Bad input
(a missing JSON or image folder, no usable object, bad options) is one line and exit status 2.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections import deque
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from soco_pretrain.config import AugmentConfig
from soco_pretrain.data.augment import normalise
from soco_pretrain.errors import RunError, SocoError, UserError
from soco_pretrain.evaluate.crops import CropSet
from soco_pretrain.evaluate.knn import load_objects
from soco_pretrain.files import atomic_write, atomic_write_json
from soco_pretrain.model.backbones import BACKBONES, build_resnet

SCALE = (0.6, 1.0)  # random resized crop: fraction of the square's area
RATIO = (3 / 4, 4 / 3)  # and aspect (torchvision's default)
WARMUP = 0.05  # fraction of the steps with a linear warm-up
MOMENTUM, WEIGHT_DECAY = 0.9, 1e-4
LAST = 100  # train accuracy is reported over the last LAST steps


class SupervisedError(UserError):
    """Bad input or options of this script (one line, exit status 2)."""


def load_crops(train_json, images, size: int, context: float, min_box: float, min_instances: int):
    """(uint8 crops (N, 3, size, size), labels (N,) over the kept classes, kept class names, info)."""
    objects = load_objects(train_json, images, min_box)
    crops = CropSet(objects, size, context, workers=0)
    counts = torch.bincount(crops.labels, minlength=len(objects.categories))
    kept = counts >= max(1, min_instances)
    names = [objects.categories[c] for c in range(len(objects.categories)) if kept[c]]
    if len(names) < 2:
        raise SupervisedError(
            f"{train_json}: only {len(names)} class(es) have at least {max(1, min_instances)} usable objects; "
            "a classifier needs two (lower --min-instances or --min-box)"
        )
    remap = torch.full((len(objects.categories),), -1, dtype=torch.int64)
    remap[kept] = torch.arange(len(names))
    keep = kept[crops.labels]
    info = {
        "images": len(objects) - len(crops.failed),
        "unreadable_images": len(crops.failed),
        "skipped": objects.skipped,
        "crops_clipped": crops.clipped,
        "dropped_classes": {
            objects.categories[c]: int(counts[c]) for c in range(len(counts)) if not kept[c] and counts[c] > 0
        },
    }
    return crops.crops[keep], remap[crops.labels[keep]], names, info


def random_resized_crops(batch: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
    """Normalised float (n, 3, size, size): a random resized crop (SCALE, RATIO) and a horizontal
    flip of each uint8 square of ``batch``, every draw from ``gen``."""
    n, _, side, _ = batch.shape
    area = torch.empty(n).uniform_(*SCALE, generator=gen) * side * side
    ratio = torch.exp(torch.empty(n).uniform_(math.log(RATIO[0]), math.log(RATIO[1]), generator=gen))
    w = torch.sqrt(area * ratio).round().clamp(1, side).long()
    h = torch.sqrt(area / ratio).round().clamp(1, side).long()
    x0 = (torch.rand(n, generator=gen) * (side - w + 1)).long()
    y0 = (torch.rand(n, generator=gen) * (side - h + 1)).long()
    flip = (torch.rand(n, generator=gen) < 0.5).tolist()
    out = []
    for i in range(n):
        x, y = int(x0[i]), int(y0[i])
        crop = batch[i : i + 1, :, y : y + int(h[i]), x : x + int(w[i])].float()
        crop = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        out.append(crop.flip(3) if flip[i] else crop)
    return normalise(torch.cat(out).div_(255.0), AugmentConfig())  # the probe's normalisation


def learning_rate(step: int, total: int, peak: float) -> float:
    """Linear warm-up over the first WARMUP of ``total`` steps (at least one), then cosine to 0."""
    warmup = max(1, round(WARMUP * total))
    if step < warmup:
        return peak * (step + 1) / warmup
    return 0.5 * peak * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def build_classifier(arch: str, classes: int, seed: int) -> nn.Module:
    """soco's ResNet ``arch`` (seeded as ``soco knn --weights none --seed``) with an fc for ``classes``."""
    torch.manual_seed(seed)
    model = build_resnet(arch)
    model.fc = nn.Linear(model.fc.in_features, classes)
    return model


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="supervised_crops.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--train-json", required=True, help="COCO JSON whose labelled objects are the classes")
    parser.add_argument("--images", required=True, help="its image folder")
    parser.add_argument("-o", "--out", required=True, help="output state dict (.pth); OUT.json is written beside it")
    parser.add_argument("--arch", default="resnet50", choices=list(BACKBONES),
                        help="a model.backbone value (default resnet50, as benchmarks/warm_start.sh expects; "
                        "resnet18 for the CPU experiment)")  # fmt: skip
    parser.add_argument("--size", type=int, default=96, help="crop side in px, as the probe's --size (default 96)")
    budget = parser.add_mutually_exclusive_group(required=True)
    budget.add_argument("--steps", type=int, help="optimiser steps (a pretraining's budget)")
    budget.add_argument("--epochs", type=int, help="or passes over the crops: epochs x objects // batch steps")
    parser.add_argument("--batch", type=int, default=32, help="crops per step (default 32)")
    parser.add_argument("--lr", type=float, default=0.1, help="peak lr for batch 256, scaled linearly (0.1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--context", type=float, default=1.2, help="crop side / box side, as the probe's (1.2)")
    parser.add_argument("--min-box", type=float, default=32.0, help="smallest box side in px, as the probe's (32)")
    parser.add_argument(
        "--min-instances", type=int, default=0, help="train only on classes with at least N objects (default 0: all)"
    )
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    problems = []
    if args.steps is not None and args.steps < 1:
        problems.append(f"--steps must be at least 1, got {args.steps}")
    if args.epochs is not None and args.epochs < 1:
        problems.append(f"--epochs must be at least 1, got {args.epochs}")
    if args.batch < 2:
        problems.append(f"--batch must be at least 2 (BatchNorm), got {args.batch}")
    if args.size < 32:
        problems.append(f"--size must be at least 32 px (the probe's smallest), got {args.size}")
    if not args.lr > 0:
        problems.append(f"--lr must be positive, got {args.lr}")
    if args.context < 1:
        problems.append(f"--context must be at least 1, got {args.context}")
    if args.min_box < 0 or args.min_instances < 0:
        problems.append("--min-box and --min-instances must be at least 0")
    if Path(args.out).suffix == ".json":
        problems.append(f"-o {args.out}: the state dict's name must not end in .json (OUT.json is written beside it)")
    if problems:
        raise SupervisedError("; ".join(problems))


def train(args: argparse.Namespace) -> dict:
    """Train, write the state dict and OUT.json; returns OUT.json's content."""
    check_args(args)
    start = time.perf_counter()
    crops, labels, classes, info = load_crops(
        args.train_json, args.images, args.size, args.context, args.min_box, args.min_instances
    )
    n = len(labels)
    steps = args.steps if args.steps is not None else args.epochs * max(1, n // args.batch)
    print(
        f"{n} object crops of {len(classes)} classes at {args.size} px from {args.train_json} "
        f"({info['images']} images); {steps} steps of batch {args.batch} = {steps * args.batch / n:.1f} epochs",
        flush=True,
    )
    np.random.seed(args.seed)
    model = build_classifier(args.arch, len(classes), args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    peak = args.lr * args.batch / 256
    optimizer = torch.optim.SGD(model.parameters(), lr=peak, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    model.train()
    stream = torch.empty(0, dtype=torch.int64)  # the next indices of consecutive seeded permutations
    last: deque[tuple[int, int]] = deque(maxlen=LAST)
    every = max(1, steps // 10)
    train_start = time.perf_counter()
    for step in range(steps):
        while len(stream) < args.batch:
            stream = torch.cat([stream, torch.randperm(n, generator=gen)])
        idx, stream = stream[: args.batch], stream[args.batch :]
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, peak)
        logits = model(random_resized_crops(crops[idx], args.size, gen))
        loss = F.cross_entropy(logits, labels[idx])
        if not torch.isfinite(loss):
            raise RunError(f"non-finite loss at step {step + 1}: lower --lr (now {args.lr})")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        last.append((int((logits.argmax(1) == labels[idx]).sum()), len(idx)))
        if (step + 1) % every == 0 or step + 1 == steps:
            recent = 100 * sum(c for c, _ in last) / sum(s for _, s in last)
            print(
                f"step {step + 1}/{steps}: loss {loss.item():.3f}, train top-1 of the last {len(last)} steps "
                f"{recent:.1f}%, lr {optimizer.param_groups[0]['lr']:.4g}",
                flush=True,
            )
    train_seconds = time.perf_counter() - train_start
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    out = Path(args.out)
    atomic_write(out, lambda f: torch.save(state, f))
    report = {
        "weights": str(out),
        "arch": args.arch,
        "steps": steps,
        "batch": args.batch,
        "images_seen": steps * args.batch,
        "epochs": round(steps * args.batch / n, 3),
        "objects": n,
        "classes": classes,
        "last_steps": len(last),
        "train_top1_last": round(100 * sum(c for c, _ in last) / sum(s for _, s in last), 2),
        "final_loss": round(float(loss.item()), 4),
        "seconds": round(time.perf_counter() - start, 1),
        "seconds_per_step": round(train_seconds / steps, 4),
        "threads": torch.get_num_threads(),
        **info,
        "args": vars(args),
    }
    atomic_write_json(out.with_suffix(".json"), report)
    print(
        f"{steps} steps of batch {args.batch} ({report['images_seen']} crops seen, {report['epochs']:.1f} epochs), "
        f"train top-1 of the last {len(last)} steps {report['train_top1_last']:.1f}%, {report['seconds']:.0f} s "
        f"({report['seconds_per_step']:.2f} s/step) -> {out}",
        flush=True,
    )
    return report


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        train(args)
    except SocoError as exc:
        print(f"supervised_crops.py: error: {exc.one_line()}", file=sys.stderr, flush=True)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
