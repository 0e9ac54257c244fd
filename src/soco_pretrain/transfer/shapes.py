"""A small labelled COCO-format set made by pasting coloured shapes onto photos (tests, demo).

Each photo gets a few filled rectangles (category "box") and ellipses (category "disc") in
random solid colours; each object is annotated with its ``bbox`` and polygon ``segmentation``
(the very polygon that was painted, so the masks are exact). Category ids are deliberately not
contiguous (3 and 7) to exercise the id <-> label mapping. Optionally one crowd region per set
(``iscrowd=1``, compressed RLE) is added to the first image. Deterministic for a seed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_util

CATEGORIES = [{"id": 3, "name": "box", "supercategory": "shape"}, {"id": 7, "name": "disc", "supercategory": "shape"}]


def _polygon(kind: str, x: float, y: float, w: float, h: float, points: int = 20) -> list[float]:
    if kind == "box":
        return [x, y, x + w, y, x + w, y + h, x, y + h]
    cx, cy, rx, ry = x + w / 2, y + h / 2, w / 2, h / 2
    out = []
    for k in range(points):
        t = 2 * math.pi * k / points
        out += [cx + rx * math.cos(t), cy + ry * math.sin(t)]
    return out


def make_shapes_set(
    photos: dict,
    out_dir,
    json_name: str = "instances.json",
    objects: tuple[int, int] = (2, 3),
    crowd: bool = True,
    seed: int = 0,
) -> Path:
    """Write ``out_dir/images/NAME.png`` (photos with shapes) and ``out_dir/json_name``; returns the JSON path.

    ``photos``: name -> PIL image or (H, W[, 3]) array (grey photos become RGB when painted).
    ``objects``: (min, max) shapes per image; ``crowd``: add one crowd RLE region to the first image.
    """
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images, annotations = [], []
    for image_id, (name, photo) in enumerate(photos.items(), start=1):
        im = photo if isinstance(photo, Image.Image) else Image.fromarray(np.asarray(photo))
        im = im.convert("RGB")
        W, H = im.size
        draw = ImageDraw.Draw(im)
        for _ in range(int(rng.integers(objects[0], objects[1] + 1))):
            kind = "box" if rng.random() < 0.5 else "disc"
            w, h = (float(v) for v in rng.uniform(0.2, 0.45, 2) * (W, H))
            x, y = float(rng.uniform(0, W - w)), float(rng.uniform(0, H - h))
            poly = [round(v, 2) for v in _polygon(kind, x, y, w, h)]
            draw.polygon(poly, fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
            rle = mask_util.merge(mask_util.frPyObjects([poly], H, W))
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": 3 if kind == "box" else 7,
                    "bbox": [round(x, 2), round(y, 2), round(w, 2), round(h, 2)],
                    "segmentation": [poly],
                    "area": float(mask_util.area(rle)),
                    "iscrowd": 0,
                }
            )
        if crowd and image_id == 1:  # a crowd region in the bottom-right corner
            mask = np.zeros((H, W), np.uint8)
            mask[H * 3 // 4 :, W * 3 // 4 :] = 1
            rle = mask_util.encode(np.asfortranarray(mask))
            x0, y0, w0, h0 = (float(v) for v in mask_util.toBbox(rle))
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": 3,
                    "bbox": [x0, y0, w0, h0],
                    "area": float(mask_util.area(rle)),
                    "iscrowd": 1,
                    "segmentation": {"size": [H, W], "counts": rle["counts"].decode("ascii")},
                }
            )
        im.save(out_dir / "images" / f"{name}.png")
        images.append({"id": image_id, "file_name": f"{name}.png", "width": W, "height": H})
    path = out_dir / json_name
    path.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": CATEGORIES}), encoding="utf-8"
    )
    return path
