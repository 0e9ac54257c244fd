"""Object-level kNN evaluation: the cheap signal of whether pretraining made better object features.

``knn_eval(weights, train_json, train_images, val_json, val_images, out)`` embeds the labelled
boxes of two COCO-format sets with the network being pretrained and classifies every val object
by its nearest train objects; ``ObjectMonitor`` runs the same protocol on a small labelled set
every N steps of ``soco pretrain``. The protocol (our choices; the paper evaluates by fine-tuning
only):

- **Objects**: every non-crowd annotation whose box, clipped to its image, is at least
  ``min_box`` (32) px wide and high in the original image. Crowd boxes hold several objects and
  COCO's "small" objects (< 32x32) are a few pixels once the image is resized to 224: both are
  counted in ``skipped`` and left out. A box entirely outside its image is an error.
- **Input**: each image resized to ``size`` x ``size`` (the pretraining V1 view, paper 3.2: the
  whole image resized to 224x224, aspect not kept), ImageNet-normalised, no augmentation.
- **Feature**: what the detector reuses for the box: RoIAlign from the FPN level the box is
  assigned to at that size (paper 3.3 scale-aware assignment), then the 4conv1fc box head
  (1024-d); for C4, RoIAlign 14x14 on C4, res5 and global average pooling (2048-d). The projector
  is not used (it is dropped for transfer).
- **BatchNorm**: ``bn="precise"`` (default) re-estimates every BatchNorm's running statistics over
  the kNN train images (a cumulative average over batches, as Detectron2's precise BN), then
  embeds in eval mode: features do not depend on how images are batched, and random init,
  pretrained runs and supervised weights are normalised the same way. ``"running"`` keeps the
  weights' own statistics.
- **kNN**: cosine similarity, the ``k`` = 20 nearest train objects each vote for their class
  with weight exp(cos / T), T = 0.07 (the weighted kNN of Wu et al. 2018, used by DINO and most
  SSL papers). Neighbours from the same image file are excluded (a monitor split shares none;
  a user's two JSONs might). Reports top-1, top-5 and the mean per-class top-1 (one class can
  dominate: "person" is about a quarter of COCO objects), the majority-class rate for scale, and
  per category.
- **Effective rank** (Roy and Vetterli 2007): exp of the entropy of the normalised singular values
  of the val feature matrix; about 1 when the features collapsed to one direction, up to
  min(objects, dims) when they spread. Reported so that collapse is visible.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import nn
from tqdm import tqdm

from ..config import CONFIG_FILE, AugmentConfig, KnnOptions, ModelConfig, from_dict
from ..data.augment import normalise, to_float01
from ..data.boxes import assign_levels, resize_boxes
from ..data.manifest import check_weights_no_leak
from ..data.views import resize_square
from ..engine.precise_bn import averaged_statistics, batch_norms
from ..errors import UserError
from ..files import atomic_write_json
from ..images import ImageError, load_rgb
from ..model.encoder import SoCoEncoder
from ..transfer.coco import clip_box, load_coco, select_fraction
from ..weights import WeightsError, encoder_target, load, read_weights
from .readout import (
    centre_normalise,
    class_metrics,
    handmade_features,
    keep_frequent,
    knn_scores,
    logistic_scores,
    majority,
)

KNN_FILE = "knn.json"
PAPER_LEVEL_BOUNDS = (48, 96, 192)  # paper 3.3, for 224 px views
PAPER_SIZE = 224  # paper 3.2: V1 is 224x224
BN_MODES = ("precise", "running")


# ---------------------------------------------------------------- labelled objects


@dataclass
class ObjectSet:
    """The usable labelled boxes of a COCO set, grouped by image."""

    source: str  # the JSON, for messages
    paths: list[Path]
    sizes: list[tuple[int, int]]  # (width, height) from the JSON
    boxes: list[np.ndarray]  # per image (n, 4) float32 x1, y1, x2, y2 in original pixels
    labels: list[np.ndarray]  # per image (n,) int64 index into ``categories``
    categories: list[str]  # names, in category-id order
    cat_ids: list[int]
    skipped: dict[str, int] = field(default_factory=dict)  # crowd, small

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_objects(self) -> int:
        return int(sum(len(b) for b in self.boxes))

    def subset(self, indices) -> ObjectSet:
        idx = list(indices)
        return ObjectSet(
            self.source,
            [self.paths[i] for i in idx],
            [self.sizes[i] for i in idx],
            [self.boxes[i] for i in idx],
            [self.labels[i] for i in idx],
            self.categories,
            self.cat_ids,
            dict(self.skipped),
        )


def load_objects(json_path, image_root=None, min_box: float = 32.0, categories: ObjectSet | None = None) -> ObjectSet:
    """Read a COCO JSON's usable objects (see the module docstring). ``categories``: use another
    set's category list (val against train); a category id it lacks is an error."""
    json_path = Path(json_path)
    root = Path(image_root) if image_root is not None else json_path.parent
    coco = load_coco(json_path, root)  # a bad file: PathError naming it
    if not coco.anns:
        raise UserError(f"{json_path}: has no annotations (kNN needs labelled boxes)")
    names = {c["id"]: str(c.get("name", c["id"])) for c in coco.categories}
    if categories is None:
        cat_ids = [c["id"] for c in coco.categories]
        cat_names = [names[c] for c in cat_ids]
    else:
        cat_ids, cat_names = categories.cat_ids, categories.categories
        # Labels are matched by id; an id that names another class in the two files would score
        # every such object as wrong (or right by accident): refuse, naming the first one.
        train_names = dict(zip(cat_ids, cat_names))
        for cid, name in names.items():
            if cid in train_names and train_names[cid] != name:
                raise UserError(
                    f"{json_path}: category id {cid} is {name!r} here but {train_names[cid]!r} in "
                    f"{categories.source}: both JSONs must give each id the same class"
                )
    label_of = {cid: i for i, cid in enumerate(cat_ids)}
    paths, sizes, boxes, labels = [], [], [], []
    skipped = {"crowd": 0, "small": 0, "images_without_objects": 0}
    for image in coco.images:
        w, h = image["width"], image["height"]
        kept_boxes, kept_labels = [], []
        for a in coco.anns.get(image["id"], []):
            if a.get("iscrowd", 0):
                skipped["crowd"] += 1
                continue
            box = clip_box(a["bbox"], w, h)
            if box is None:
                raise UserError(
                    f"{json_path}: annotation {a.get('id', '?')} box {a['bbox']} lies outside its image "
                    f"{image['file_name']} ({w}x{h})"
                )
            if box[2] - box[0] < min_box or box[3] - box[1] < min_box:
                skipped["small"] += 1
                continue
            if a["category_id"] not in label_of:
                raise UserError(
                    f"{json_path}: annotation {a.get('id', '?')} has category id {a['category_id']}, "
                    f"unknown to {categories.source if categories else json_path}"
                )
            kept_boxes.append(box)
            kept_labels.append(label_of[a["category_id"]])
        if not kept_boxes:
            skipped["images_without_objects"] += 1
            continue
        paths.append(coco.image_path(image))
        sizes.append((w, h))
        boxes.append(np.asarray(kept_boxes, dtype=np.float32))
        labels.append(np.asarray(kept_labels, dtype=np.int64))
    if not paths:
        raise UserError(f"{json_path}: no usable object (non-crowd boxes of at least {min_box:g}x{min_box:g} px)")
    return ObjectSet(str(json_path), paths, sizes, boxes, labels, cat_names, cat_ids, skipped)


def split_by_image(objects: ObjectSet, val_fraction: float, seed: int) -> tuple[ObjectSet, ObjectSet]:
    """(train, val) with a seeded ``val_fraction`` of the images in val (at least one in each)."""
    if len(objects) < 2:
        raise UserError(f"{objects.source}: needs at least 2 images with objects to split into kNN train and val")
    order = np.random.default_rng(seed).permutation(len(objects))
    n_val = min(len(objects) - 1, max(1, round(val_fraction * len(objects))))
    return objects.subset(sorted(order[n_val:].tolist())), objects.subset(sorted(order[:n_val].tolist()))


def fraction_of(objects: ObjectSet, fraction: float, seed: int) -> ObjectSet:
    """A seeded ``fraction`` of the images (the same subset rule as ``soco finetune --fraction``)."""
    if fraction >= 1.0:
        return objects
    chosen = select_fraction(list(range(len(objects))), fraction, seed)
    return objects.subset(chosen)


# ---------------------------------------------------------------- images -> tensors


def load_checked(objects: ObjectSet, i: int) -> tuple[np.ndarray | None, str]:
    """(RGB uint8 image, "") of image ``i``, or (None, a one-line reason): unreadable, or another
    size than its JSON says (its boxes would be wrong)."""
    path = objects.paths[i]
    try:
        image = load_rgb(path)
    except ImageError as exc:
        return None, str(exc)
    h, w = image.shape[:2]
    if (w, h) != tuple(objects.sizes[i]):
        return None, f"{path}: image is {w}x{h} but the JSON says {objects.sizes[i][0]}x{objects.sizes[i][1]}"
    return image, ""


class CheckedImages(torch.utils.data.Dataset):
    """Per image of an ObjectSet: ``{"index": i, **self.encode(image, i)}``, or ``{"index": i,
    "error": reason}`` for an image ``load_checked`` refuses (the caller lists it)."""

    def __init__(self, objects: ObjectSet):
        self.objects = objects

    def __len__(self) -> int:
        return len(self.objects)

    def __getitem__(self, i: int) -> dict:
        image, error = load_checked(self.objects, i)
        if image is None:
            return {"index": i, "error": error}
        return {"index": i, **self.encode(image, i)}

    def encode(self, image: np.ndarray, i: int) -> dict:
        raise NotImplementedError


class _Images(CheckedImages):
    """Decoded, resized uint8 images (3, S, S) of an ObjectSet."""

    def __init__(self, objects: ObjectSet, size: int):
        super().__init__(objects)
        self.size = size

    def encode(self, image: np.ndarray, i: int) -> dict:
        view = resize_square(image, self.size)
        return {"image": torch.from_numpy(np.ascontiguousarray(view)).permute(2, 0, 1)}


def _batches(objects: ObjectSet, size: int, batch: int, workers: int, limit: int | None = None):
    indices = list(range(len(objects) if limit is None else min(limit, len(objects))))
    dataset = torch.utils.data.Subset(_Images(objects, size), indices)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch, shuffle=False, num_workers=workers, collate_fn=list, persistent_workers=False
    )
    yield from loader


def _view_inputs(items: list[dict], objects: ObjectSet, size: int, bounds, device):
    """Stack the images and their boxes (in view pixels, padded to the batch's most objects)."""
    images = torch.stack([it["image"] for it in items])
    x = normalise(to_float01(images), AugmentConfig()).to(device)
    counts = [len(objects.boxes[it["index"]]) for it in items]
    K = max(counts)
    boxes = np.zeros((len(items), K, 4), dtype=np.float32)
    levels = np.zeros((len(items), K), dtype=np.int64)
    valid = np.zeros((len(items), K), dtype=bool)
    for b, it in enumerate(items):
        w, h = objects.sizes[it["index"]]
        view_boxes = resize_boxes(objects.boxes[it["index"]], (w, h), (size, size))
        n = len(view_boxes)
        boxes[b, :n], levels[b, :n], valid[b, :n] = view_boxes, assign_levels(view_boxes, bounds), True
    return (
        x,
        torch.from_numpy(boxes).to(device),
        torch.from_numpy(levels).to(device),
        torch.from_numpy(valid).to(device),
    )


def _objects_forward(encoder, x, boxes, levels, valid) -> torch.Tensor:
    """Encoder output of the valid slots only: padded slots skip the head (the costly part here;
    images hold 1 to 20+ objects). The head's BatchNorms then see exactly the valid rows."""
    rois = encoder.pool(encoder.features(x), boxes, levels, valid)
    return encoder.head(rois[valid.reshape(-1)])


class Embedder:
    """Runs encoders over an ObjectSet's images; decoding failures are counted and listed."""

    def __init__(
        self,
        size: int,
        level_bounds,
        batch: int = 16,
        workers: int = 0,
        device="cpu",
        progress=False,
        cache: bool = False,
    ):
        self.size, self.bounds, self.batch, self.workers = int(size), tuple(level_bounds), batch, workers
        self.device, self.progress = torch.device(device), progress
        self.failed: dict[str, str] = {}  # path -> reason
        # cache: keep the decoded, resized images (the monitor's small set is embedded many times;
        # 343 images at 96 px are 9 MB)
        self._cache: dict[tuple[str, int, int], list[list[dict]]] | None = {} if cache else None

    def _iterate(self, objects: ObjectSet, desc: str, limit: int | None = None):
        total = len(objects) if limit is None else min(limit, len(objects))
        key = (objects.source, id(objects), total)
        if self._cache is not None and key in self._cache:
            yield from self._cache[key]
            return
        kept = []
        with tqdm(total=total, desc=desc, unit="img", disable=not self.progress, leave=False) as bar:
            for items in _batches(objects, self.size, self.batch, self.workers, limit):
                bar.update(len(items))
                good = []
                for it in items:
                    if "error" in it:
                        if str(objects.paths[it["index"]]) not in self.failed:
                            print(f"warning: skipped {it['error']}", flush=True)
                        self.failed[str(objects.paths[it["index"]])] = it["error"]
                    else:
                        good.append(it)
                if good:
                    kept.append(good)
                    yield good
        if self._cache is not None:
            self._cache[key] = kept

    @torch.no_grad()
    def precise_bn(self, encoders: list[nn.Module], objects: ObjectSet, limit: int) -> None:
        """Running statistics of every BatchNorm = the average of batch statistics over ``objects``."""
        try:
            with averaged_statistics(batch_norms(encoders)):
                for enc in encoders:
                    enc.train()
                for items in self._iterate(objects, "kNN: BatchNorm statistics", limit):
                    inputs = _view_inputs(items, objects, self.size, self.bounds, self.device)
                    for enc in encoders:
                        _objects_forward(enc, *inputs)
        finally:
            for enc in encoders:
                enc.eval()

    @torch.no_grad()
    def embed(self, encoders: list[nn.Module], objects: ObjectSet, desc: str):
        """Per encoder an (N, D) float32 feature matrix, plus the labels and image index of the N objects."""
        for enc in encoders:
            enc.eval()
        feats: list[list[torch.Tensor]] = [[] for _ in encoders]
        labels, image_index = [], []
        for items in self._iterate(objects, desc):
            x, boxes, levels, valid = _view_inputs(items, objects, self.size, self.bounds, self.device)
            for out, enc in zip(feats, encoders):
                out.append(_objects_forward(enc, x, boxes, levels, valid).float().cpu())
            for it in items:
                labels.append(torch.from_numpy(objects.labels[it["index"]]))
                image_index.append(torch.full((len(objects.labels[it["index"]]),), it["index"], dtype=torch.int64))
        if not labels:
            raise UserError(
                f"{objects.source}: no image could be read (first failure: {next(iter(self.failed.values()), 'none')})"
            )
        return [torch.cat(f) for f in feats], torch.cat(labels), torch.cat(image_index)


# ---------------------------------------------------------------- kNN and spread


def effective_rank(feats: torch.Tensor) -> float:
    """exp(entropy of the normalised singular values) of an (N, D) matrix (Roy and Vetterli 2007)."""
    s = torch.linalg.svdvals(feats.double())
    total = s.sum()
    if not torch.isfinite(total) or total <= 0:
        return float("nan") if not torch.isfinite(total) else 0.0
    p = s / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def knn_metrics(scores: torch.Tensor, labels: torch.Tensor, train_labels: torch.Tensor, categories: list[str]) -> dict:
    """top1 / top5 / mean per-class top1 (percent), the majority-class rate and a per-category table."""
    result = class_metrics(scores, labels, categories)
    floor = majority(train_labels, labels, categories)
    return {
        "top1": result["top1"],
        "top5": result["top5"],
        "mean_class_top1": result["balanced"],
        "majority_class": floor["class"],
        "majority_top1": floor["top1"],
        "per_class": result["per_class"],
    }


@dataclass
class Probe:
    """How objects are embedded and read out (KnnOptions / MonitorConfig resolved for one set-up)."""

    objects: str = "roi"  # roi: boxes pooled from the whole resized image | crop: each box cut out
    size: int = PAPER_SIZE
    level_bounds: tuple[float, ...] = PAPER_LEVEL_BOUNDS
    features: tuple[str, ...] = ("head",)  # the first is the primary one (flat figures, monitor)
    context: float = 1.2
    k: int = 20
    temperature: float = 0.07
    bn: str = "precise"
    precise_images: int = 1000
    min_instances: int = 0
    centre: bool = True
    baselines: bool = False  # hand-made descriptor and shuffled labels (the majority class always)
    seed: int = 0
    batch: int = 16
    workers: int = 0

    @classmethod
    def of(cls, options, size: int, level_bounds) -> Probe:
        """The probe of a KnnOptions or MonitorConfig: the fields they share by name (the monitor has
        no bn / precise_images / centre / baselines / workers fields and gets these defaults)."""
        given = {f.name: getattr(options, f.name) for f in fields(cls) if hasattr(options, f.name)}
        given.update(size=size, level_bounds=tuple(level_bounds))
        given["features"] = cls.features_for(options.objects, options.features)
        return cls(**given)

    @staticmethod
    def features_for(objects: str, features) -> tuple[str, ...]:
        """The feature sets of a mode (None: its default), refusing what the mode cannot embed."""
        from .crops import FEATURES  # here, not at the top: crops imports this module

        if objects not in OBJECT_MODES:
            raise UserError(f"objects must be one of {', '.join(OBJECT_MODES)}, got {objects!r}")
        if not features:
            return ("c5", "head") if objects == "crop" else ("head",)
        features = tuple(features)
        unknown = [f for f in features if f not in FEATURES]
        if unknown:
            raise UserError(
                f"features: unknown {', '.join(map(repr, unknown))} (expected some of {', '.join(FEATURES)})"
            )
        if objects == "roi" and features != ("head",):
            raise UserError(
                "features: --objects roi embeds each box through the detector path only (head); "
                "c4 / c5 pooling needs --objects crop"
            )
        return tuple(dict.fromkeys(features))


OBJECT_MODES = ("roi", "crop")


class _Embedded:
    """The labelled objects of one set as features: per encoder {feature: (N, D)}, labels (N,),
    file keys (N,) for the same-image exclusion, and the crops when the hand-made floor needs them."""

    def __init__(self, feats, labels, image_index, objects: ObjectSet, crops=None):
        self.feats, self.labels, self.image_index, self.objects, self.crops = feats, labels, image_index, objects, crops


def _embed_sets(nets, train: ObjectSet, val: ObjectSet, p: Probe, device, progress: bool, cache: dict | None):
    """(_Embedded train, _Embedded val, {failed path: reason}, clipped crops) for either mode."""
    if p.objects == "crop":
        from .crops import CropEmbedder, CropSet  # here, not at the top: crops imports this module

        sets = []
        for objects, desc in ((train, "crops: train objects"), (val, "crops: val objects")):
            key = (objects.source, id(objects), p.size, p.context)
            crop_set = (cache or {}).get(key) or CropSet(objects, p.size, p.context, p.workers, progress, desc)
            if cache is not None:
                cache[key] = crop_set
            sets.append(crop_set)
        crops = CropEmbedder(p.size, p.level_bounds, max(p.batch, 16), device, progress)
        if p.bn == "precise":
            # the crops of the first precise_images images (a CropSet keeps the images' order)
            crops.precise_bn(nets, sets[0], p.features, int((sets[0].image_index < p.precise_images).sum()))
        out = []
        for crop_set, objects in zip(sets, (train, val)):
            feats = crops.embed(nets, crop_set, p.features)
            out.append(_Embedded(feats, crop_set.labels, crop_set.image_index, objects, crop_set.crops))
        failed = {**sets[0].failed, **sets[1].failed}
        return out[0], out[1], failed, sets[0].clipped + sets[1].clipped
    embedder = (cache or {}).get("embedder") or Embedder(p.size, p.level_bounds, p.batch, p.workers, device, progress,
                                                        cache=cache is not None)  # fmt: skip
    if cache is not None:
        cache["embedder"] = embedder
    if p.bn == "precise":
        embedder.precise_bn(nets, train, p.precise_images)
    out = []
    for objects, desc in ((train, "kNN: train objects"), (val, "kNN: val objects")):
        feats, labels, image_index = embedder.embed(nets, objects, desc)
        out.append(_Embedded([{"head": f} for f in feats], labels, image_index, objects))
    return out[0], out[1], dict(embedder.failed), 0


def _readouts(train_x, train_y, val_x, val_y, categories, p: Probe, train_keys, val_keys) -> dict:
    """kNN (centred + L2 unless p.centre is off) and logistic regression metrics of one feature set."""
    tx, vx = centre_normalise(train_x, val_x) if p.centre else (train_x, val_x)
    knn = class_metrics(
        knn_scores(tx, train_y, vx, len(categories), p.k, p.temperature, train_keys, val_keys), val_y, categories
    )
    logistic = class_metrics(logistic_scores(train_x, train_y, val_x, len(categories), p.seed), val_y, categories)
    return {"knn": knn, "logistic": logistic}


def probe_encoders(encoders: Mapping[str, nn.Module], train: ObjectSet, val: ObjectSet, p: Probe, device="cpu",
                   progress: bool = False, cache: dict | None = None) -> dict:  # fmt: skip
    """The probe (module docstring) for each named encoder (modified in place when bn=precise).

    Returns ``{"encoders": {name: {feature: {"knn", "logistic", "erank", "dims"}}}, "majority",
    "classes": {"kept", "dropped"}, "objects": {...}, "images": {"train", "val"} (embedded, so
    unreadable ones are left out), "failed", and with p.baselines "handmade"
    (crop mode) and "shuffled" (the first encoder's primary feature with permuted train labels)}``.
    ``cache``: a dict kept between calls (the monitor) so images are decoded once."""
    if p.bn not in BN_MODES:
        raise UserError(f"bn must be one of {', '.join(BN_MODES)}, got {p.bn!r}")
    counts = np.bincount(np.concatenate(train.labels), minlength=len(train.categories))
    if (counts >= max(1, p.min_instances)).sum() < 2:  # before any image is decoded
        raise UserError(
            f"{train.source}: only {int((counts >= max(1, p.min_instances)).sum())} class(es) have at least "
            f"{p.min_instances} train objects; a probe needs two: lower --min-instances"
        )
    nets = list(encoders.values())
    tr, va, failed, clipped = _embed_sets(nets, train, val, p, torch.device(device), progress, cache)
    train_keep, val_keep, kept, dropped = keep_frequent(tr.labels, va.labels, train.categories, p.min_instances)
    if len(kept) < 2:
        raise UserError(
            f"{train.source}: only {len(kept)} class(es) have at least {p.min_instances} train objects; "
            "a probe needs two: lower --min-instances"
        )
    # Labels re-indexed over the kept classes; val objects of dropped classes are left out (counted).
    remap = torch.full((len(train.categories),), -1, dtype=torch.int64)
    remap[[train.categories.index(n) for n in kept]] = torch.arange(len(kept))
    train_y, val_y = remap[tr.labels[train_keep]], remap[va.labels[val_keep]]
    if len(val_y) == 0:
        raise UserError(f"{val.source}: no val object of a kept class ({', '.join(kept)})")
    keys: dict[str, int] = {}  # same-file exclusion: image keys shared between the sets (resolved path)

    def file_keys(emb: _Embedded, keep) -> torch.Tensor:
        paths = [str(Path(emb.objects.paths[i]).resolve()) for i in emb.image_index[keep].tolist()]
        return torch.tensor([keys.setdefault(path, len(keys)) for path in paths], dtype=torch.int64)

    train_keys, val_keys = file_keys(tr, train_keep), file_keys(va, val_keep)
    result: dict = {"encoders": {}}
    for (name, _), train_feats, val_feats in zip(encoders.items(), tr.feats, va.feats):
        per_feature = {}
        for feature in p.features:
            tx, vx = train_feats[feature][train_keep], val_feats[feature][val_keep]
            per_feature[feature] = {
                **_readouts(tx, train_y, vx, val_y, kept, p, train_keys, val_keys),
                "erank": round(effective_rank(vx), 2),
                "dims": int(vx.shape[1]),
            }
        result["encoders"][name] = per_feature
    result["majority"] = majority(train_y, val_y, kept)
    if p.baselines:
        first = tr.feats[0][p.features[0]][train_keep], va.feats[0][p.features[0]][val_keep]
        shuffled = train_y[torch.randperm(len(train_y), generator=torch.Generator().manual_seed(p.seed))]
        result["shuffled"] = _readouts(first[0], shuffled, first[1], val_y, kept, p, train_keys, val_keys)
        if tr.crops is not None and va.crops is not None:
            hand = handmade_features(tr.crops[train_keep]), handmade_features(va.crops[val_keep])
            result["handmade"] = _readouts(hand[0], train_y, hand[1], val_y, kept, p, train_keys, val_keys)
    result["classes"] = {"kept": kept, "dropped": dropped}
    result["objects"] = {
        "train": int(len(train_y)),
        "val": int(len(val_y)),
        "val_of_dropped_classes": int((~val_keep).sum()),
        "train_of_dropped_classes": int((~train_keep).sum()),
        "crops_clipped": int(clipped),
    }
    # Images counted as embedded, not as listed: an unreadable one (in ``failed``) adds no object.
    result["images"] = {"train": len(tr.image_index.unique()), "val": len(va.image_index.unique())}
    result["failed"] = failed
    return result


# ---------------------------------------------------------------- weights -> encoder


def _run_config(weights: Path) -> dict | None:
    """The resolved config of the soco pretrain run that ``weights`` (folder or checkpoint) belongs to."""
    for folder in (weights, weights.parent.parent):
        path = folder / CONFIG_FILE
        if path.is_file():
            try:
                data = yaml.safe_load(path.read_text(encoding="utf-8"))
            except (OSError, yaml.YAMLError) as exc:
                data = None
                print(
                    f"note: {path} is unreadable ({type(exc).__name__}): kNN uses the default model "
                    "settings and input size",
                    flush=True,
                )
            return data if isinstance(data, dict) else None
    return None


# kNN's load policy (weights/load.py): report. The ResNet body must load whole (features of a
# partly random encoder measure nothing); the FPN and box head load what the file has, the rest
# is seeded and listed in knn.json's "loaded".
LOAD_POLICY = "report"


def build_encoder(weights, soco_weights: str = "online", seed: int = 0, backbone: str | None = None):
    """(SoCoEncoder, info) from ``weights``: "none" (random init, seeded), or any file the weights
    layer reads (weights/read.py): a soco pretrain run folder or checkpoint, a torchvision state
    dict (Mask R-CNN v2 keys: FPN; a ResNet's keys alone: C4, the res5 head on C4 features), an
    export. info: arch, description, size / level bounds of the run (if any), loaded tensors per
    module and the layer's LoadReport (``report``)."""
    if weights is None or str(weights).lower() == "none":
        torch.manual_seed(seed)  # soco pretrain's train.seed: the network its run starts from
        cfg = ModelConfig(backbone=backbone or ModelConfig.backbone)  # type: ignore[arg-type]
        description = f"random init (seed {seed}, {cfg.backbone})"
        return SoCoEncoder(cfg), {"arch": "fpn", "description": description, "run": None}
    path = Path(weights)
    # The one weights layer: WeightsError (one line) for files that are not weights.
    found = read_weights(path, soco_weights)
    run = _run_config(path) if path.exists() else None
    model_cfg = ModelConfig()
    if run and isinstance(run.get("model"), dict):
        try:
            model_cfg = from_dict(ModelConfig, run["model"])
        except (TypeError, ValueError) as exc:
            print(f"note: the run's model settings do not load ({exc}); kNN builds the default encoder", flush=True)
            model_cfg = ModelConfig()
    # a soco run's own; else FPN when the file has an FPN or box head, else C4 (checked by the reader)
    model_cfg.arch = found.arch  # type: ignore[assignment]
    try:  # a soco run's model.backbone, else the one the ResNet's shapes name; default ResNet-50
        model_cfg.backbone = found.backbone or model_cfg.backbone  # type: ignore[assignment]
    except WeightsError as exc:
        raise UserError(str(exc)) from None
    if backbone is not None and backbone != model_cfg.backbone:
        raise UserError(f"{path}: holds a {model_cfg.backbone}, not the --set backbone={backbone} asked for")
    torch.manual_seed(seed)  # whatever the file does not hold (e.g. an FPN for a plain ResNet) is seeded
    encoder = SoCoEncoder(model_cfg)
    shapes = {k: v.shape for k, v in encoder.state_dict().items()}
    report = load(encoder, found, encoder_target(shapes, model_cfg.arch, model_cfg.backbone), LOAD_POLICY,
                  error=UserError)  # fmt: skip
    return encoder, {
        "arch": model_cfg.arch,
        "description": found.description,
        "run": run,
        "loaded": {m: f"{n}/{total}" for m, (n, total) in report.modules.items()},
        "report": report,
    }


def resolve_geometry(size: int | None, level_bounds, run: dict | None) -> tuple[int, tuple[float, ...]]:
    """Input size and FPN level bounds: given values win; a run's own V1 size and bounds next;
    otherwise 224 and the paper's bounds, scaled by size / 224 for other sizes."""
    views = ((run or {}).get("data") or {}).get("views") or {}
    run_size = views.get("v1_size")
    if size is None:
        size = int(run_size) if run_size else PAPER_SIZE
    if level_bounds is None:
        if run_size and int(run_size) == size and views.get("level_bounds"):
            level_bounds = tuple(views["level_bounds"])
        else:
            level_bounds = tuple(round(b * size / PAPER_SIZE, 2) for b in PAPER_LEVEL_BOUNDS)
    if size < 32:
        raise UserError(f"kNN input size must be at least 32 px, got {size}")
    return int(size), tuple(float(b) for b in level_bounds)


def common_size(weights_paths) -> int:
    """The input size a comparison should use for every init: the V1 size of the first path that
    belongs to a soco pretrain run, else 224 (arms must see objects at the same scale)."""
    for weights in weights_paths:
        run = _run_config(Path(weights))
        size = ((run or {}).get("data") or {}).get("views", {}).get("v1_size")
        if size:
            return int(size)
    return PAPER_SIZE


# ---------------------------------------------------------------- soco knn


def knn_eval(weights, train_json, train_images, val_json, val_images, out, options: KnnOptions | None = None) -> dict:
    """Object kNN of ``val_json``'s objects against ``train_json``'s with the encoder of ``weights``;
    writes ``out/knn.json`` and returns it (metrics in percent, see the module docstring)."""
    o = options or KnnOptions()  # checked by KnnOptions itself
    start = time.perf_counter()
    device = torch.device(o.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    train = fraction_of(load_objects(train_json, train_images, o.min_box), o.train_fraction, o.seed)
    val = load_objects(val_json, val_images, o.min_box, categories=train)
    if not o.allow_leak:
        check_weights_no_leak([("--weights", weights)], val.paths, "val", lambda line: print(line, flush=True))
    encoder, info = build_encoder(weights, o.soco_weights, o.seed, o.backbone)
    size, bounds = resolve_geometry(o.size, o.level_bounds, info.get("run"))
    if o.progress:
        loaded = ", ".join(f"{m} {n}" for m, n in info.get("loaded", {}).items())
        print(
            f"kNN of {val.num_objects} val objects ({len(val)} images) against {train.num_objects} train objects "
            f"({len(train)} images): {info['description']}, {info['arch'].upper()} at {size} px"
            + (f"; loaded {loaded}" if loaded else ""),
            flush=True,
        )
    probe = Probe.of(o, size, bounds)
    probed = probe_encoders({"encoder": encoder.to(device)}, train, val, probe, device, o.progress)
    primary = probed["encoders"]["encoder"][probe.features[0]]
    knn, logistic = primary["knn"], primary["logistic"]
    report = {
        "weights": str(weights),
        "description": info["description"],
        "arch": info["arch"],
        "objects": probe.objects,
        "primary_feature": probe.features[0],
        # the primary feature's figures, flat (soco compare reads these)
        "top1": knn["top1"],
        "top5": knn["top5"],
        "mean_class_top1": knn["balanced"],
        "logistic_top1": logistic["top1"],
        "logistic_balanced": logistic["balanced"],
        "person_auroc": logistic["person_auroc"],
        "knn_person_auroc": knn["person_auroc"],
        "erank": primary["erank"],
        "dims": primary["dims"],
        "majority_class": probed["majority"]["class"],
        "majority_top1": probed["majority"]["top1"],
        "majority_balanced": probed["majority"]["balanced"],
        "features": {
            f: {"knn": _brief(v["knn"]), "logistic": _brief(v["logistic"]), "erank": v["erank"], "dims": v["dims"]}
            for f, v in probed["encoders"]["encoder"].items()
        },
        "baselines": {
            name: {r: _brief(probed[name][r]) for r in ("knn", "logistic")}
            for name in ("handmade", "shuffled")
            if name in probed
        },
        "classes": probed["classes"],
        "num_train_objects": probed["objects"]["train"],
        "num_val_objects": probed["objects"]["val"],
        # objects and images that were embedded: an unreadable image's are in skipped.unreadable
        "num_train_images": probed["images"]["train"],
        "num_val_images": probed["images"]["val"],
        "skipped": {
            "train": train.skipped,
            "val": val.skipped,
            "dropped_classes": {
                "train_objects": probed["objects"]["train_of_dropped_classes"],
                "val_objects": probed["objects"]["val_of_dropped_classes"],
            },
            "unreadable": probed["failed"],
        },
        "crops_clipped": probed["objects"]["crops_clipped"],
        "size": size,
        "level_bounds": list(bounds),
        "options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(o).items()},
        "loaded": info.get("loaded", {}),
        "seconds": round(time.perf_counter() - start, 1),
        "per_class": knn["per_class"],
        "per_class_logistic": logistic["per_class"],
    }
    out = Path(out)
    atomic_write_json(out / KNN_FILE, report)
    print(summary_line(report) + f" -> {out / KNN_FILE}", flush=True)
    return report


def _brief(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k != "per_class"}


def summary_line(report: dict) -> str:
    """One line of a knn.json: the primary feature's readouts against the floors."""
    floors = f"majority class '{report['majority_class']}' {report['majority_top1']:.1f}% top-1"
    hand = report.get("baselines", {}).get("handmade")
    if hand:
        floors += f", hand-made descriptor balanced {hand['logistic']['balanced']:.1f}%"
    shuffled = report.get("baselines", {}).get("shuffled")
    if shuffled:
        floors += f", shuffled labels balanced {shuffled['logistic']['balanced']:.1f}%"
    auroc = f", person AUROC {report['person_auroc']:.1f}" if report.get("person_auroc") is not None else ""
    return (
        f"{report['objects']} probe, {report['primary_feature']} features: balanced accuracy logistic "
        f"{report['logistic_balanced']:.2f}% / kNN {report['mean_class_top1']:.2f}%, kNN top-1 {report['top1']:.2f}%"
        f"{auroc}, effective rank {report['erank']:.1f} of {report['dims']} ({floors}; "
        f"{len(report['classes']['kept'])} classes)"
    )


# ---------------------------------------------------------------- monitor during pretraining


class ObjectMonitor:
    """The kNN protocol on a small labelled set, split by image, run every N pretraining steps.

    The encoders are evaluated on fresh copies (plain BatchNorm, precise statistics), so the
    training networks, their BatchNorm buffers and every random stream are left untouched.
    """

    def __init__(self, cfg, device, progress: bool = False):
        m = cfg.monitor
        if not (
            isinstance(m.every, int)
            and m.every >= 1
            and 0 < m.val_fraction < 1
            and m.k >= 1
            and m.temperature > 0
            and m.batch >= 1
            and m.size >= 0
        ):
            raise UserError(
                f"monitor settings: need every >= 1, 0 < val_fraction < 1, k >= 1, temperature > 0, "
                f"batch >= 1, size >= 0; got every={m.every}, val_fraction={m.val_fraction}, k={m.k}, "
                f"temperature={m.temperature}, batch={m.batch}, size={m.size}"
            )
        self.cfg, self.every = cfg, int(m.every)
        objects = load_objects(m.json, m.images, m.min_box)
        self.train, self.val = split_by_image(objects, m.val_fraction, m.seed)
        size, bounds = resolve_geometry(
            m.size or cfg.data.views.v1_size,
            None,
            {"data": {"views": {"v1_size": cfg.data.views.v1_size, "level_bounds": list(cfg.data.views.level_bounds)}}},
        )
        # bn precise, centred, no floors (the defaults); only the primary feature set, the one the
        # curve logs: embedding and fitting the others every evaluation would be thrown away
        probe = Probe.of(m, size, bounds)
        self.probe = replace(probe, features=probe.features[:1])
        self.device, self.progress = device, progress
        self.cache: dict = {}  # decoded images / crops, kept between evaluations

        with torch.random.fork_rng(devices=[]):  # building them must not move the training RNG
            self.copies = {name: SoCoEncoder(cfg.model).to(device) for name in ("online", "target")}

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def __call__(self, model) -> dict:
        """{knn_top1, knn_top5, knn_mean_class_top1, knn_target_top1, probe_balanced (logistic),
        probe_target_balanced, erank_online, erank_target} for a SoCoModel, from the primary feature."""
        for name, source in (("online", model.encoder), ("target", model.target_encoder)):
            self.copies[name].load_state_dict(source.state_dict())  # SyncBN or not: the same keys
        with torch.random.fork_rng(devices=[]):  # the probe's seeded parts must not move training's RNG
            results = probe_encoders(self.copies, self.train, self.val, self.probe, self.device, self.progress,
                                     self.cache)["encoders"]  # fmt: skip
        primary = self.probe.features[0]
        online, target = results["online"][primary], results["target"][primary]
        return {
            "knn_top1": online["knn"]["top1"],
            "knn_top5": online["knn"]["top5"],
            "knn_mean_class_top1": online["knn"]["balanced"],
            "knn_target_top1": target["knn"]["top1"],
            "probe_balanced": online["logistic"]["balanced"],
            "probe_target_balanced": target["logistic"]["balanced"],
            "erank_online": online["erank"],
            "erank_target": target["erank"],
        }


def describe(result: dict) -> str:
    return (
        f"kNN top-1 {result['knn_top1']:.1f}% (target {result['knn_target_top1']:.1f}%), logistic balanced "
        f"accuracy {result['probe_balanced']:.1f}% (target {result['probe_target_balanced']:.1f}%), effective rank "
        f"online {result['erank_online']:.1f} / target {result['erank_target']:.1f}"
    )
