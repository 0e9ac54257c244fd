"""Linear probe (paper appendix B): a linear classifier on frozen ResNet-50 features.

``linear_probe(weights, train_dir, val_dir, out_dir) -> dict`` trains ``Linear(2048, classes)``
on the global-average-pooled output of a frozen ResNet-50 and writes ``OUT/metrics.json``
(top-1 / top-5 on the validation folder), ``OUT/metrics.jsonl`` (one line per epoch) and
``OUT/checkpoints/last.pt`` (``resume="auto"`` continues from it).

The recipe (defaults of :class:`LinearConfig`, each with its source):

- Paper B: "Only the backbone (ResNet-50) weights are leveraged ... all of the dedicated modules
  (e.g. FPN) are dropped"; backbone parameters and batch statistics fixed; random resized crop
  224 + random flip; 100 epochs, SGD momentum 0.9, batch 256, initial lr 30, weight decay 0;
  test: resize to 256 (bilinear), centre crop 224.
- Where the paper is silent, the released code (hologerry/SoCo ``main_linear.py``,
  ``contrast/option.py``, ``contrast/lr_scheduler.py``, ``contrast/data/transform.py``):
  per-iteration cosine decay to 1e-6 after a 5-epoch linear warm-up from lr/100; crop area
  scale [0.08, 1] (torchvision's RandomResizedCrop, ``--crop 0.08``); the test resize is of the
  *shorter side* to 256 (``transforms.Resize(image_size + 32)``), aspect kept -- the paper's
  "256x256" read as the common practice it cites. ``schedule="steps"`` gives MoCo's protocol
  instead (x0.1 at 60 % and 80 % of training; with ``warmup_epochs=0`` exactly MoCo's).
- Our choices: lr scaled linearly with the batch (``base_lr x batch / 256``, as pretraining's
  rule, paper 4.1; exactly 30 at the paper's batch); classifier init N(0, 0.01) weights and
  zero bias (MoCo's ``main_lincls.py``, the protocol SoCo's numbers match); ImageNet
  normalisation; training drops no partial batch.

Which SoCo network: ``soco_weights="online"`` by default -- the released ``main_linear.py`` loads
``module.encoder.*`` (the online network; the EMA target is ``encoder_k`` there), as BYOL
evaluates its online encoder, and as ``soco export`` does. ``"target"`` takes the EMA network.
For ``model.arch=fpn`` the ResNet is ``encoder.backbone.body.*``; for ``c4`` ``encoder.backbone.*``.
A torchvision export (``soco export --to torchvision``: ``backbone.body.*`` or plain ResNet keys)
or any plain ResNet-50 state dict loads too; ``"none"`` is the random-init baseline.

Speed: the backbone runs in eval mode under ``torch.no_grad`` (BN statistics frozen, no
activations kept), only the classifier gets gradients. Randomness is per sample
(``np.random.default_rng([seed, epoch, index])``) and the order per epoch, so results do not
depend on the number of loader workers and a resumed run repeats an uninterrupted one.
Unreadable images are skipped, counted and listed in ``metrics.json``.
"""

from __future__ import annotations

from ..errors import UserError
import logging
import math
import re
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..images import ImageError, list_images, load_rgb
from ..config import LinearConfig  # the options live with every command's config
from ..files import atomic_write_json

SCHEDULES = ("cosine", "steps")
SOCO_WEIGHTS = ("online", "target")
FEATURE_DIM = 2048  # ResNet-50 pooled features
METRICS_JSON = "metrics.json"
CHECKPOINT = "last.pt"
# MoCo's step schedule (main_lincls.py: --schedule 60 80 of 100 epochs, x0.1 each).
STEP_MILESTONES = (0.6, 0.8)
MAX_LISTED = 100  # skipped files listed in metrics.json (all are counted)

log = logging.getLogger("soco_pretrain.transfer.linear")


class LinearError(UserError):
    """Bad input for the linear probe (weights, folders, classes, options); one line."""


# ---------------------------------------------------------------- weights


def _resolve_weights(weights) -> Path | None:
    """``none`` -> None; a run folder -> its checkpoints/last.pt (else the newest step_N.pt)."""
    from .weights import WeightsError, resolve_checkpoint

    if weights is None or str(weights).lower() == "none":
        return None
    try:
        return resolve_checkpoint(weights)  # the one run-folder lookup (transfer/weights.py)
    except WeightsError as exc:
        raise LinearError(str(exc)) from None


def _resnet_keys() -> dict[str, torch.Size]:
    from torchvision.models import resnet50

    with torch.device("meta"):
        model = resnet50(weights=None)
    return {k: v.shape for k, v in model.state_dict().items() if not k.startswith("fc.")}


def _backbone_state(path: Path, soco_weights: str) -> tuple[dict, dict]:
    """The ResNet-50 tensors of a checkpoint file (torchvision resnet50 names) and what they were."""
    from ..train.checkpoint import CheckpointError, load_checkpoint

    try:
        state = load_checkpoint(path)
    except CheckpointError as exc:
        cause = type(exc.__cause__).__name__ if exc.__cause__ is not None else "unreadable"
        raise LinearError(f"{path}: not a readable checkpoint "
                          f"(torch.load(weights_only=True) failed: {cause})") from None
    if not isinstance(state, dict):
        raise LinearError(f"{path}: not a checkpoint or state dict")
    reference = _resnet_keys()
    model = state.get("model")
    from .weights import PREFIXES, WeightsError, soco_weights_of

    try:
        soco = soco_weights_of(state, path)  # the one SoCo checkpoint reader (transfer/weights.py)
    except WeightsError as exc:  # an unknown model.arch
        raise LinearError(str(exc)) from None
    if soco is not None:  # a SoCo checkpoint: the online (encoder.*) or target network's ResNet
        model = soco.model
        prefixes = [PREFIXES[soco_weights] + ("backbone.body." if soco.arch == "fpn" else "backbone.")]
        source = {"kind": "soco", "arch": soco.arch, "soco_weights": soco_weights, "step": soco.step}
    else:  # a plain state dict: torchvision detection export (backbone.body.*) or ResNet-50 keys
        model = state.get("state_dict", state) if isinstance(state.get("state_dict"), dict) else state
        prefixes = ["backbone.body.", "", "backbone.", "module."]
        source = {"kind": "state_dict"}
    for prefix in prefixes:
        found = {k: model[prefix + k] for k in reference if prefix + k in model}
        if len(found) == len(reference):
            break
    else:
        absent = [k for k in reference if prefixes[0] + k not in model]
        raise LinearError(f"{path}: no complete ResNet-50 under {prefixes[0] or '(no prefix)'}* "
                          f"({len(absent)} of {len(reference)} tensors missing, e.g. {prefixes[0]}{absent[0]})")
    for key, shape in reference.items():
        if tuple(found[key].shape) != tuple(shape):
            raise LinearError(f"{path}: {prefix}{key} has shape {tuple(found[key].shape)}, "
                              f"ResNet-50's is {tuple(shape)}")
    source["prefix"] = prefix
    return found, source


def load_backbone(weights, soco_weights: str = "online") -> tuple[nn.Module, dict]:
    """A torchvision ResNet-50 with ``fc = Identity`` (2048-d pooled features), loaded from
    ``weights`` (run folder, SoCo checkpoint, ResNet-50 / torchvision-export state dict, or
    "none" = torchvision's random init, seeded by the caller). Returns (model, description)."""
    from torchvision.models import resnet50

    if soco_weights not in SOCO_WEIGHTS:
        raise LinearError(f"unknown --soco-weights {soco_weights!r} (choose online or target)")
    path = _resolve_weights(weights)
    model = resnet50(weights=None)
    model.fc = nn.Identity()
    if path is None:
        return model, {"weights": "none", "kind": "random_init"}
    state, source = _backbone_state(path, soco_weights)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not missing and not unexpected, (missing, unexpected)  # _backbone_state checked the keys
    return model, {"weights": str(path), **source}


def freeze(model: nn.Module) -> nn.Module:
    """No gradients and eval mode: BatchNorm uses (and never updates) its running statistics."""
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def make_classifier(num_classes: int) -> nn.Linear:
    """Linear(2048, classes): weights N(0, 0.01), bias 0 (MoCo main_lincls.py; our choice)."""
    fc = nn.Linear(FEATURE_DIM, num_classes)
    nn.init.normal_(fc.weight, mean=0.0, std=0.01)
    nn.init.zeros_(fc.bias)
    return fc


# ---------------------------------------------------------------- schedule


def lr_at(step: int, total_steps: int, steps_per_epoch: int, cfg: LinearConfig) -> float:
    """Learning rate of optimiser step ``step`` (0-based), per iteration.

    Warm-up (``warmup_epochs``) linear from ``warmup_start_factor x peak`` to the peak, then
    "cosine": half a cosine to ``final_lr`` at ``total_steps`` (released code); "steps": the peak,
    x0.1 from 60 % and again from 80 % of ``total_steps`` (MoCo). peak = base_lr x batch / 256.
    """
    from ..train.schedule import lr_at as warmup_cosine
    from ..train.schedule import scaled_lr

    peak = scaled_lr(cfg.base_lr, cfg.batch_size)
    warmup = min(cfg.warmup_epochs * steps_per_epoch, total_steps)
    if cfg.schedule == "cosine":
        return warmup_cosine(step, total_steps, warmup, peak, cfg.warmup_start_factor, cfg.final_lr)
    if step < warmup:
        start = cfg.warmup_start_factor * peak
        return start + (peak - start) * step / warmup
    drops = sum(step >= round(m * total_steps) for m in STEP_MILESTONES)
    return peak * 0.1 ** drops


# ---------------------------------------------------------------- data


def scan_class_folder(root, what: str = "train") -> tuple[list[str], list[tuple[str, int]]]:
    """Classes (sorted sub-folder names, hidden ones skipped) and ``(relative path, label)`` per
    image found (recursively) in each, ImageFolder's layout. One-line LinearError if none."""
    root = Path(root)
    if not root.is_dir():
        raise LinearError(f"{root}: no such {what} folder (expected one sub-folder of images per class)")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise LinearError(f"{root}: no class folders in the {what} folder (expected ROOT/CLASS/IMAGE files)")
    samples, empty = [], []
    for label, name in enumerate(classes):
        found = list_images(root / name)
        if not found.paths:
            empty.append(name)
        samples += [(f"{name}/{p}", label) for p in found.paths]
    if empty and what == "train":  # a class without training images cannot be learned
        raise LinearError(f"{root}: {len(empty)} class folders have no images: {', '.join(empty[:5])}"
                          f"{' ...' if len(empty) > 5 else ''}")
    if not samples:
        raise LinearError(f"{root}: no images in the {what} class folders")
    return classes, samples


class ClassFolderDataset(torch.utils.data.Dataset):
    """Images of a class folder as normalised float tensors, ``ds[(epoch, i)] -> dict``.

    train: random resized crop to ``image_size`` + flip, drawn from the per-sample rng
    ``[seed, epoch, i]``; test: shorter side resized to ``cfg.test_resize()``, centre crop. A file
    that fails to decode gives ``image=None`` and ``error=(path, reason)`` (the batch drops it).
    """

    def __init__(self, root, samples, cfg: LinearConfig, train: bool):
        self.root, self.samples, self.cfg, self.train = Path(root), samples, cfg, train

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key):
        import torchvision.transforms.v2.functional as F

        from ..data.boxes import sample_crop

        epoch, index = key if isinstance(key, tuple) else (0, key)
        rel, label = self.samples[index]
        path = self.root / rel
        try:
            image = load_rgb(path)
        except ImageError as exc:
            return {"image": None, "label": label, "error": (exc.path, exc.reason)}
        cfg = self.cfg
        if not image.flags.writeable:  # PIL's buffer: torch wants a writable array
            image = image.copy()
        t = torch.from_numpy(image).permute(2, 0, 1)  # uint8 3xHxW
        if self.train:
            rng = np.random.default_rng([cfg.seed, int(epoch), int(index)])
            x0, y0, x1, y1 = (int(v) for v in sample_crop(rng, t.shape[2], t.shape[1], cfg.crop_scale, cfg.crop_ratio))
            t = F.resize(t[:, y0:y1, x0:x1].contiguous(), [cfg.image_size] * 2,
                         interpolation=F.InterpolationMode.BILINEAR, antialias=True)
            if rng.random() < cfg.hflip_p:
                t = t.flip(2)
        else:
            t = F.resize(t, cfg.test_resize(), interpolation=F.InterpolationMode.BILINEAR, antialias=True)
            t = F.center_crop(t, [cfg.image_size] * 2)
        x = t.float().div_(255.0)
        x = F.normalize(x, list(cfg.mean), list(cfg.std))
        return {"image": x, "label": label, "error": None}


def _note_skipped(skipped: dict, errors) -> None:
    """Record unreadable files (path -> reason); warn once per file (every epoch meets it again)."""
    for path, reason in errors:
        if path not in skipped:
            log.warning("skipped unreadable image %s: %s", path, reason)
            skipped[path] = reason


def _collate(items: list[dict]) -> dict:
    good = [it for it in items if it["image"] is not None]
    return {
        "images": torch.stack([it["image"] for it in good]) if good else None,
        "labels": torch.tensor([it["label"] for it in good], dtype=torch.int64),
        "errors": [it["error"] for it in items if it["error"] is not None],
    }


def _loader(dataset, keys: list, batch_size: int, workers: int, device: torch.device):
    # keys are (epoch, index) pairs in the order to serve; batches never mix epochs.
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=keys, num_workers=workers,
                                       collate_fn=_collate, pin_memory=device.type == "cuda")


# ---------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(backbone, classifier, dataset, cfg: LinearConfig, device, workers: int, skipped: dict,
             progress: bool = False) -> dict:
    """Top-1 and top-k (k = min(5, classes)) accuracy in percent over the decodable images."""
    from tqdm import tqdm

    k = min(5, classifier.out_features)
    correct1 = correctk = seen = 0
    keys = [(0, i) for i in range(len(dataset))]
    bar = tqdm(total=len(dataset), desc="evaluate", unit="img", disable=not progress, dynamic_ncols=True)
    for batch in _loader(dataset, keys, cfg.batch_size, workers, torch.device(device)):
        _note_skipped(skipped, batch["errors"])
        if batch["images"] is not None:
            logits = classifier(backbone(batch["images"].to(device, non_blocking=True)))
            labels = batch["labels"].to(device)
            top = logits.topk(k, dim=1).indices
            hit = top == labels[:, None]
            correct1 += int(hit[:, 0].sum())
            correctk += int(hit.any(dim=1).sum())
            seen += len(labels)
        bar.update(len(batch["labels"]) + len(batch["errors"]))
    bar.close()
    if seen == 0:
        raise LinearError(f"{dataset.root}: no validation image could be decoded")
    return {"top1": 100.0 * correct1 / seen, "top5": 100.0 * correctk / seen, "top5_k": k, "evaluated_images": seen}


# ---------------------------------------------------------------- the probe


def _check_config(cfg: LinearConfig) -> None:
    if cfg.schedule not in SCHEDULES:
        raise LinearError(f"unknown schedule {cfg.schedule!r} (choose {' or '.join(SCHEDULES)})")
    for name in ("epochs", "batch_size", "image_size"):
        if getattr(cfg, name) < 1:
            raise LinearError(f"{name} must be at least 1, got {getattr(cfg, name)}")
    if cfg.warmup_epochs < 0 or cfg.eval_every < 0:
        raise LinearError("warmup_epochs and eval_every must be >= 0")


def _default_workers() -> int:
    from ..data.loader import default_workers

    return default_workers()


def linear_probe(weights, train_dir, val_dir, out_dir, config: LinearConfig | None = None,
                 soco_weights: str = "online", resume: str = "auto", max_iters: int | None = None,
                 device: str | None = None, progress: bool = True, **overrides) -> dict:
    """Train and evaluate the linear probe; returns what ``OUT/metrics.json`` holds.

    ``weights``: a SoCo run folder or checkpoint, a ResNet-50 state dict, or "none".
    ``train_dir`` / ``val_dir``: class folders (ROOT/CLASS/IMAGE), the same class names in both.
    ``config``: LinearConfig (paper B defaults); ``overrides``: its fields by name (e.g.
    ``epochs=2``). ``resume``: "auto" continues from OUT/checkpoints/last.pt when present,
    "none" starts over. ``max_iters``: stop after this many optimiser steps in total (the
    schedule keeps its length), then evaluate. ``device``: "cpu" / "cuda" (default: CUDA if
    available). Raises LinearError (one line) for bad input.
    """
    from tqdm import tqdm

    from ..train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
    from ..train.metrics import MetricsLogger
    from ..train.schedule import scaled_lr

    cfg = replace(config or LinearConfig(), **overrides)
    _check_config(cfg)
    if resume not in ("auto", "none"):
        raise LinearError(f"resume={resume!r}: expected auto or none")
    if max_iters is not None and max_iters < 0:
        raise LinearError(f"max_iters must be >= 0, got {max_iters}")
    out = Path(out_dir)
    classes, train_samples = scan_class_folder(train_dir, "train")
    val_classes, val_samples = scan_class_folder(val_dir, "val")
    if val_classes != classes:
        only_train = sorted(set(classes) - set(val_classes))
        only_val = sorted(set(val_classes) - set(classes))
        raise LinearError(f"{val_dir}: the val class folders differ from the train ones "
                          f"(missing in val: {', '.join(only_train[:5]) or '-'}; "
                          f"not in train: {', '.join(only_val[:5]) or '-'})")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    workers = _default_workers() if cfg.workers is None else int(cfg.workers)

    torch.manual_seed(cfg.seed)  # the random-init baseline and the classifier's init
    backbone, source = load_backbone(weights, soco_weights)
    backbone = freeze(backbone).to(dev)
    classifier = make_classifier(len(classes)).to(dev)
    optimizer = torch.optim.SGD(classifier.parameters(), lr=cfg.base_lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    train_set = ClassFolderDataset(train_dir, train_samples, cfg, train=True)
    val_set = ClassFolderDataset(val_dir, val_samples, cfg, train=False)
    steps_per_epoch = math.ceil(len(train_set) / cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    stop = total_steps if max_iters is None else min(total_steps, max_iters)

    # ---- resume
    ckpt_path = out / "checkpoints" / CHECKPOINT
    step, epoch, done_in_epoch, skipped = 0, 0, 0, {}
    if resume == "none" and (out / "metrics.jsonl").exists():
        (out / "metrics.jsonl").unlink()  # a fresh start: no stale epochs in the log
    if resume == "auto" and ckpt_path.is_file():
        try:
            state = load_checkpoint(ckpt_path, map_location=dev)
        except CheckpointError as exc:
            raise LinearError(f"{exc}; delete it or use --resume none") from None
        if state.get("classes") != classes or state.get("source", {}).get("weights") != source["weights"] \
                or state.get("source", {}).get("soco_weights") != source.get("soco_weights"):
            raise LinearError(f"{ckpt_path}: made with other weights or classes; use another --out or --resume none")
        classifier.load_state_dict(state["classifier"])
        optimizer.load_state_dict(state["optimizer"])
        step, epoch, done_in_epoch = int(state["step"]), int(state["epoch"]), int(state["batch_in_epoch"])
        skipped = dict(state.get("skipped", {}))
        print(f"resumed from {ckpt_path} at step {step} (epoch {epoch})", flush=True)

    def save():
        save_checkpoint(ckpt_path, {"classifier": classifier.state_dict(), "optimizer": optimizer.state_dict(),
                                    "step": step, "epoch": epoch, "batch_in_epoch": done_in_epoch,
                                    "classes": classes, "source": source, "config": asdict(cfg),
                                    "skipped": skipped})

    metrics = MetricsLogger(out, tensorboard=False)
    bar = tqdm(total=stop, initial=step, desc="linear probe", unit="step", disable=not progress, dynamic_ncols=True)
    start, result = time.perf_counter(), None
    try:
        while step < stop:
            if done_in_epoch >= steps_per_epoch:
                epoch, done_in_epoch = epoch + 1, 0
            order = np.random.default_rng([cfg.seed, epoch]).permutation(len(train_set))
            keys = [(epoch, int(i)) for i in order[done_in_epoch * cfg.batch_size:]]
            loss_sum, correct, seen, epoch_start = 0.0, 0, 0, time.perf_counter()
            for batch in _loader(train_set, keys, cfg.batch_size, workers, dev):
                lr = lr_at(step, total_steps, steps_per_epoch, cfg)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                _note_skipped(skipped, batch["errors"])
                if batch["images"] is not None:
                    with torch.no_grad():  # frozen backbone: no activations kept
                        features = backbone(batch["images"].to(dev, non_blocking=True))
                    labels = batch["labels"].to(dev)
                    logits = classifier(features)
                    loss = nn.functional.cross_entropy(logits, labels)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    loss_sum += float(loss.detach()) * len(labels)
                    correct += int((logits.argmax(1) == labels).sum())
                    seen += len(labels)
                step += 1
                done_in_epoch += 1
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{loss_sum / max(seen, 1):.3f}", lr=f"{lr:.3g}")
                if step >= stop:
                    break
            record = {"lr": lr, "train_loss": loss_sum / seen if seen else None,
                      "train_top1": 100.0 * correct / seen if seen else None,
                      "images_per_s": round(seen / max(time.perf_counter() - epoch_start, 1e-9), 2),
                      "epoch_done": done_in_epoch >= steps_per_epoch}
            last = step >= stop
            if last or (cfg.eval_every and done_in_epoch >= steps_per_epoch and (epoch + 1) % cfg.eval_every == 0):
                bar.clear()
                result = evaluate(backbone, classifier, val_set, cfg, dev, workers, skipped, progress=progress and last)
                record.update(val_top1=result["top1"], val_top5=result["top5"])
            metrics.log(step, epoch=epoch, **record)
            save()
    finally:
        bar.close()
        metrics.close()
    if result is None:  # resumed a finished run: evaluate its classifier again
        result = evaluate(backbone, classifier, val_set, cfg, dev, workers, skipped, progress=progress)
    listed = sorted(skipped.items())
    summary = {
        "top1": result["top1"],
        "top5": result["top5"],
        "top5_k": result["top5_k"],  # min(5, classes): top-5 is top-k with k = this
        "classes": classes,
        "train_images": len(train_set),
        "val_images": len(val_set),
        "evaluated_images": result["evaluated_images"],
        "skipped": {"count": len(listed), "files": [{"path": p, "reason": r} for p, r in listed[:MAX_LISTED]]},
        "step": step,
        "total_steps": total_steps,
        "epochs_done": step / steps_per_epoch,
        "finished": step >= total_steps,
        "peak_lr": scaled_lr(cfg.base_lr, cfg.batch_size),
        "weights": source,
        "device": str(dev),
        "seconds": round(time.perf_counter() - start, 2),
        "config": asdict(cfg),
    }
    atomic_write_json(out / METRICS_JSON, summary)
    print(f"linear probe: top-1 {summary['top1']:.2f} %, top-{result['top5_k']} {summary['top5']:.2f} % "
          f"on {result['evaluated_images']} val images ({len(classes)} classes); "
          f"{len(listed)} unreadable files skipped; {out / METRICS_JSON}", flush=True)
    return summary
