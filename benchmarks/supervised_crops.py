"""Make a supervised ResNet checkpoint where none can be downloaded: a torchvision ResNet trained
briefly to classify the labelled object crops of a COCO JSON.

The warm-start comparison (benchmarks/warm_start.sh) needs "the weights users already have", a
supervised backbone; nothing may be downloaded here, so this script makes one from labels the
experiment already holds: every usable object of TRAIN_JSON (non-crowd boxes of at least 32 px,
read by soco's own kNN reader, ``evaluate.knn.load_objects``) is cropped from its photo, resized
to ``--size`` + 1/8 and classified by a torchvision ResNet (``weights=None``) with SGD
(momentum 0.9, weight decay 1e-4, cosine lr from ``--lr``; torchvision's ImageNet recipe in
small), random crops of ``--size`` and flips. It is a weak stand-in for an ImageNet backbone
(minutes on a CPU, ~1,600 objects), and the README says so. Only TRAIN_JSON's images are used:
the comparison's kNN queries (VAL_JSON's) are never seen.

    python benchmarks/supervised_crops.py --train-json train.json --images imgs/ -o sup_r50.pth
    python -c "import torch, torchvision; torchvision.models.resnet50().load_state_dict(torch.load('sup_r50.pth'))"

Writes a plain torchvision state dict (``fc`` included), atomically, and prints the training
accuracy of the last epoch and the wall time.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
import torchvision
from PIL import Image

from soco_pretrain.evaluate.knn import load_objects
from soco_pretrain.files import atomic_write
from soco_pretrain.images import load_rgb

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)  # torchvision's ImageNet normalisation
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def crops(json_path, images, size: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(uint8 crops (N, 3, S, S) with S = size * 9 / 8, labels (N,), number of classes)."""
    objects = load_objects(json_path, images)
    side = size * 9 // 8
    out, labels = [], []
    for path, boxes, classes in zip(objects.paths, objects.boxes, objects.labels):
        photo = Image.fromarray(load_rgb(path))
        for box, label in zip(boxes, classes):
            crop = photo.crop(tuple(float(v) for v in box)).resize((side, side), Image.BILINEAR)
            out.append(torch.from_numpy(np.array(crop)).permute(2, 0, 1))  # a writable copy
            labels.append(int(label))
    return torch.stack(out), torch.tensor(labels), len(objects.categories)


def augment(batch: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
    """Random size x size crops and horizontal flips of uint8 crops -> normalised float."""
    n, _, side, _ = batch.shape
    x0 = torch.randint(0, side - size + 1, (n,), generator=gen)
    y0 = torch.randint(0, side - size + 1, (n,), generator=gen)
    flip = torch.rand(n, generator=gen) < 0.5
    out = torch.stack([batch[i, :, y0[i] : y0[i] + size, x0[i] : x0[i] + size] for i in range(n)])
    out = torch.where(flip.view(n, 1, 1, 1), out.flip(3), out)
    return (out.float() / 255 - MEAN) / STD


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-json", required=True, help="COCO JSON whose labelled objects are the classes")
    parser.add_argument("--images", required=True, help="its image folder")
    parser.add_argument("-o", "--out", required=True, help="output state dict (.pth)")
    parser.add_argument("--arch", default="resnet50", help="torchvision ResNet builder (default resnet50)")
    parser.add_argument("--size", type=int, default=96, help="crop size in px (default 96)")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.1, help="peak lr for batch 256, scaled linearly (0.1)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    start = time.perf_counter()
    images, labels, classes = crops(args.train_json, args.images, args.size)
    print(f"{len(labels)} object crops of {classes} classes from {args.train_json}", flush=True)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    model = getattr(torchvision.models, args.arch)(weights=None, num_classes=classes)
    lr = args.lr * args.batch / 256
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    steps_per_epoch = len(labels) // args.batch
    total = args.epochs * steps_per_epoch
    model.train()
    step = 0
    for epoch in range(args.epochs):
        order = torch.randperm(len(labels), generator=gen)
        correct = seen = 0
        for i in range(steps_per_epoch):
            idx = order[i * args.batch : (i + 1) * args.batch]
            for group in optimizer.param_groups:  # cosine over the whole run
                group["lr"] = 0.5 * lr * (1 + math.cos(math.pi * step / total))
            logits = model(augment(images[idx], args.size, gen))
            loss = torch.nn.functional.cross_entropy(logits, labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            correct += int((logits.argmax(1) == labels[idx]).sum())
            seen += len(idx)
            step += 1
        print(
            f"epoch {epoch + 1}/{args.epochs}: loss {loss.item():.3f}, train top-1 {100 * correct / seen:.1f}%",
            flush=True,
        )
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_write(args.out, lambda f: torch.save(state, f))
    print(f"wrote {args.out} ({args.arch}, {classes} classes) in {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
