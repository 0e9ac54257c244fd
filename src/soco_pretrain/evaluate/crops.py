"""Object crops for the probe: each labelled box cut from its original photo, with context.

At a whole-image input of 64-224 px most COCO boxes are a few pixels wide, under one feature cell
of C4/C5, so a probe that pools them from the resized image measures little (the README's
coco_pool table: every init at its floor). Cropping each box from the original photo and resizing
the crop gives every object the same number of pixels (the crop-then-embed protocol of
small-scale SSL probes; our choice, the paper evaluates by fine-tuning only):

- the box is grown by ``context`` (1.2: 10% of its width and height on each side) around its
  centre, then grown along its shorter side to a square, so the object keeps its aspect;
- the square is clipped to the photo; what lies outside is filled with the ImageNet mean colour
  (zero after normalisation), and such crops are counted (``clipped``);
- the square is resized to ``size`` x ``size`` (bilinear, antialiased, as every view).

``crop_square`` is the geometry alone; ``cut_crop`` the pixels.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from tqdm import tqdm

from ..config import AugmentConfig
from ..data.augment import normalise, to_float01
from ..data.boxes import assign_levels
from ..data.views import resize_square
from ..engine.precise_bn import averaged_statistics, batch_norms
from ..errors import UserError
from .knn import CheckedImages

# ImageNet mean (data.augment's normalisation) as uint8: the fill is zero once normalised.
FILL = (124, 116, 104)


def crop_square(box, width: int, height: int, context: float = 1.2) -> tuple[tuple[int, int, int, int], bool]:
    """The integer square ``(x0, y0, x1, y1)`` (possibly reaching outside the photo) cut for ``box``
    (x1, y1, x2, y2 in photo pixels), and whether it reaches outside the ``width`` x ``height`` photo."""
    x1, y1, x2, y2 = (float(v) for v in box)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    # Rounded to 9 decimals first: 50 x 1.1 is 55.000000000000007 in floating point, not 56 px.
    side = round(max(x2 - x1, y2 - y1, 1.0) * context, 9)
    x0 = math.floor(round(cx - side / 2, 9))
    y0 = math.floor(round(cy - side / 2, 9))
    n = max(1, math.ceil(side))
    square = (x0, y0, x0 + n, y0 + n)
    clipped = x0 < 0 or y0 < 0 or x0 + n > width or y0 + n > height
    return square, clipped


def cut_crop(image: np.ndarray, box, size: int, context: float = 1.2) -> tuple[np.ndarray, bool]:
    """(size, size, 3) uint8 crop of ``box`` from an (H, W, 3) uint8 ``image``, and whether it was clipped."""
    h, w = image.shape[:2]
    (x0, y0, x1, y1), clipped = crop_square(box, w, h, context)
    n = x1 - x0
    canvas = np.empty((n, n, 3), dtype=np.uint8)
    canvas[:] = FILL
    sx0, sy0, sx1, sy1 = max(0, x0), max(0, y0), min(w, x1), min(h, y1)
    if sx1 > sx0 and sy1 > sy0:
        canvas[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = image[sy0:sy1, sx0:sx1]
    return resize_square(canvas, size), clipped


class CropImages(CheckedImages):
    """Per image of an ObjectSet: its objects' crops as a (n, 3, S, S) uint8 tensor (or an error message)."""

    def __init__(self, objects, size: int, context: float):
        super().__init__(objects)
        self.size, self.context = int(size), float(context)

    def encode(self, image: np.ndarray, i: int) -> dict:
        cut = [cut_crop(image, box, self.size, self.context) for box in self.objects.boxes[i]]
        crops = torch.from_numpy(np.stack([c for c, _ in cut])).permute(0, 3, 1, 2).contiguous()
        return {"crops": crops, "clipped": sum(int(c) for _, c in cut)}


class CropSet:
    """Every object crop of an ObjectSet, decoded once and kept in memory (uint8: 1,000 crops of
    96 px are 28 MB), with their labels and image index; unreadable images are listed in ``failed``."""

    def __init__(self, objects, size: int, context: float, workers: int = 0, progress: bool = False, desc: str = ""):
        self.objects, self.size, self.context = objects, int(size), float(context)
        self.failed: dict[str, str] = {}
        self.clipped = 0
        crops, labels, image_index = [], [], []
        loader = torch.utils.data.DataLoader(
            CropImages(objects, size, context), batch_size=8, num_workers=workers, collate_fn=list
        )
        with tqdm(total=len(objects), desc=desc or "crops", unit="img", disable=not progress, leave=False) as bar:
            for items in loader:
                bar.update(len(items))
                for it in items:
                    if "error" in it:
                        print(f"warning: skipped {it['error']}", flush=True)
                        self.failed[str(objects.paths[it["index"]])] = it["error"]
                        continue
                    crops.append(it["crops"])
                    labels.append(torch.from_numpy(objects.labels[it["index"]]))
                    image_index.append(torch.full((len(it["crops"]),), it["index"], dtype=torch.int64))
                    self.clipped += it["clipped"]
        if not crops:
            raise UserError(
                f"{objects.source}: no image could be read (first failure: {next(iter(self.failed.values()), 'none')})"
            )
        self.crops = torch.cat(crops)
        self.labels = torch.cat(labels)
        self.image_index = torch.cat(image_index)

    def __len__(self) -> int:
        return len(self.labels)

    def select(self, keep: torch.Tensor) -> None:
        """Keep only the crops where ``keep`` (bool, one per crop) is true."""
        self.crops, self.labels, self.image_index = self.crops[keep], self.labels[keep], self.image_index[keep]


FEATURES = ("c5", "c4", "head")  # KnnOptions.features: pooled C5, pooled C4, the detector's box path


def _forward_crops(encoder, x: torch.Tensor, features: tuple[str, ...], bounds) -> dict[str, torch.Tensor]:
    """Features of a batch of normalised crops: globally pooled C4 / C5 of the ResNet, and the
    detector path (FPN + RoIAlign of the whole crop on its assigned level + box head; C4: RoIAlign
    on C4 + res5 + pooling), computing the backbone once."""
    out: dict[str, torch.Tensor] = {}
    size = x.shape[-1]
    if encoder.arch == "fpn":
        body = encoder.backbone.body(x)  # '0'..'3' = C2..C5 (torchvision IntermediateLayerGetter)
        c4, c5 = body["2"], body["3"]
        if "head" in features:
            fpn = encoder.backbone.fpn(body)
            maps = [fpn[str(i)] for i in range(4)]  # P2..P5
    else:
        r = encoder.backbone
        c4 = r.layer3(r.layer2(r.layer1(r.maxpool(r.relu(r.bn1(r.conv1(x)))))))
        c5 = r.layer4(c4) if "c5" in features else None
        maps = [c4]
    if "c5" in features:
        out["c5"] = c5.mean(dim=(2, 3))
    if "c4" in features:
        out["c4"] = c4.mean(dim=(2, 3))
    if "head" in features:
        n = x.shape[0]
        box = np.array([[0.0, 0.0, size, size]], dtype=np.float32)
        level = int(assign_levels(box, bounds)[0]) if encoder.arch == "fpn" else 0
        boxes = torch.tensor(box, device=x.device).expand(n, 1, 4).contiguous()
        levels = torch.full((n, 1), level, dtype=torch.int64, device=x.device)
        valid = torch.ones((n, 1), dtype=torch.bool, device=x.device)
        out["head"] = encoder.head(encoder.pool(dict(zip(("p2", "p3", "p4", "p5"), maps)), boxes, levels, valid))
    return out


class CropEmbedder:
    """Runs encoders over a CropSet in chunks of ``batch`` crops (the Embedder of ``--objects crop``)."""

    def __init__(self, size: int, level_bounds, batch: int = 64, device="cpu", progress: bool = False):
        self.size, self.bounds, self.batch = int(size), tuple(level_bounds), int(batch)
        self.device, self.progress = torch.device(device), progress

    def _chunks(self, crops: CropSet, limit: int | None = None):
        n = len(crops) if limit is None else min(limit, len(crops))
        for start in range(0, n, self.batch):
            chunk = crops.crops[start : min(n, start + self.batch)]
            yield normalise(to_float01(chunk), AugmentConfig()).to(self.device)

    @torch.no_grad()
    def precise_bn(self, encoders, crops: CropSet, features: tuple[str, ...], limit: int) -> None:
        """Every BatchNorm's running statistics = the average of its batch statistics over the crops."""
        try:
            with averaged_statistics(batch_norms(encoders)):
                for enc in encoders:
                    enc.train()
                for x in self._chunks(crops, limit):
                    if len(x) < 2:  # a BatchNorm cannot take statistics of one sample
                        continue
                    for enc in encoders:
                        _forward_crops(enc, x, features, self.bounds)
        finally:
            for enc in encoders:
                enc.eval()

    @torch.no_grad()
    def embed(self, encoders, crops: CropSet, features: tuple[str, ...]) -> list[dict[str, torch.Tensor]]:
        """Per encoder {feature: (N, D) float32} for every crop."""
        for enc in encoders:
            enc.eval()
        parts: list[dict[str, list[torch.Tensor]]] = [{f: [] for f in features} for _ in encoders]
        for x in self._chunks(crops):
            for store, enc in zip(parts, encoders):
                for name, value in _forward_crops(enc, x, features, self.bounds).items():
                    store[name].append(value.float().cpu())
        return [{f: torch.cat(v) for f, v in store.items()} for store in parts]
