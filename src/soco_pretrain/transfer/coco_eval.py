"""COCO evaluation for ``soco finetune``: detector outputs -> COCO results -> pycocotools AP.

Numbers are reported as Detectron2's COCOEvaluator does (the paper's code base, section 4.2):
AP, AP50, AP75, APs, APm, APl in percent. pycocotools' -1 ("no ground truth in this area
range") is kept as -1 (Detectron2 writes NaN, which JSON cannot hold).

Masks: torchvision's Mask R-CNN already pastes each instance's mask into the full image
(``paste_masks_in_image``) at the original size; they are thresholded at 0.5 (Detectron2's
paste threshold) and RLE-encoded.
"""

from __future__ import annotations

import contextlib
import copy
import io

import numpy as np
import torch
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")  # COCOeval.stats[0:6]
MASK_THRESHOLD = 0.5


def to_coco_results(output: dict, image_id: int, label_to_cat: dict[int, int], masks: bool) -> list[dict]:
    """One image's torchvision detections (boxes xyxy in image pixels) as COCO result dicts."""
    boxes = output["boxes"].detach().float().cpu()
    scores = output["scores"].detach().float().cpu().tolist()
    labels = output["labels"].detach().cpu().tolist()
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    rles = None
    if masks and len(scores):
        binary = (output["masks"][:, 0] > MASK_THRESHOLD).cpu().numpy().astype(np.uint8)
        rles = mask_util.encode(np.asfortranarray(binary.transpose(1, 2, 0)))
    results = []
    for k, (box, score, label) in enumerate(zip(xywh, scores, labels)):
        result = {
            "image_id": int(image_id),
            "category_id": int(label_to_cat[int(label)]),
            "bbox": [round(v, 3) for v in box],
            "score": float(score),
        }
        if rles is not None:
            rle = rles[k]
            result["segmentation"] = {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}
        results.append(result)
    return results


def ground_truth(data: dict):
    """A pycocotools COCO object from a JSON dict, filling fields COCOeval needs but users omit
    (annotation ``id``, ``iscrowd``, ``area``); quiet."""
    data = copy.copy(data)
    annotations = []
    for k, a in enumerate(data.get("annotations", [])):
        a = dict(a)
        a.setdefault("id", k + 1)
        a.setdefault("iscrowd", 0)
        if "area" not in a:
            a["area"] = float(a["bbox"][2] * a["bbox"][3])
        annotations.append(a)
    data["annotations"] = annotations
    gt = COCO()
    gt.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    return gt


def _detections(gt, results: list[dict]):
    """COCO object of the results; an empty one (AP 0) when there are none (loadRes fails on [])."""
    with contextlib.redirect_stdout(io.StringIO()):
        if results:
            return gt.loadRes(copy.deepcopy(results))
        dt = COCO()
        dt.dataset = {
            "images": list(gt.dataset["images"]),
            "categories": list(gt.dataset.get("categories", [])),
            "annotations": [],
        }
        dt.createIndex()
        return dt


def coco_evaluate(gt_data, results: list[dict], iou_types=("bbox", "segm"), image_ids=None) -> dict:
    """COCOeval of ``results`` against ``gt_data`` (a COCO JSON dict or a pycocotools COCO).

    ``image_ids``: evaluate only these images (default: every image of the ground truth).
    Returns ``{iou_type: {"AP": ..., "AP50": ..., ...}}`` in percent (-1 where pycocotools gives -1).
    """
    gt = gt_data if hasattr(gt_data, "getAnnIds") else ground_truth(gt_data)
    dt = _detections(gt, results)
    out = {}
    for iou_type in iou_types:
        evaluator = COCOeval(gt, dt, iou_type)
        if image_ids is not None:
            evaluator.params.imgIds = sorted(int(i) for i in image_ids)
        with contextlib.redirect_stdout(io.StringIO()):
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        out[iou_type] = {
            name: (round(float(value) * 100.0, 4) if value >= 0 else -1.0)
            for name, value in zip(METRIC_NAMES, evaluator.stats[: len(METRIC_NAMES)])
        }
    return out


def format_metrics(metrics: dict) -> str:
    """Lines like ``bbox  AP 12.3  AP50 25.0 ...`` for the console."""
    lines = []
    for iou_type in ("bbox", "segm"):
        if iou_type in metrics:
            values = "  ".join(f"{k} {v:.1f}" for k, v in metrics[iou_type].items())
            lines.append(f"{iou_type:<5} {values}")
    return "\n".join(lines)
