"""Linear probe (paper appendix B): a linear classifier on frozen ResNet-50 features.

``linear_probe(weights, train_dir, val_dir, out_dir) -> dict`` trains ``Linear(2048, classes)``
on the global-average-pooled output of a frozen ResNet-50 (or the weights' own backbone: a SoCo
run's ``model.backbone``, else the one a state dict's shapes name, ``model/backbones.py``; the
classifier takes its C5 channels) and writes ``OUT/metrics.json``
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
or any plain torchvision ResNet / ResNeXt state dict loads too; ``"none"`` is the random-init baseline.

Speed: the backbone runs in eval mode under ``torch.no_grad`` (BN statistics frozen, no
activations kept), only the classifier gets gradients. Randomness is per sample
(``np.random.default_rng([seed, epoch, index])``) and the order per epoch, so results do not
depend on the number of loader workers and a resumed run repeats an uninterrupted one.
Memory: the default batch (256 at 224 px) fits a 24 GB CPU machine whole, so there is no
per-device split or accumulation here (unlike ``soco finetune``): one step of the whole probe
peaked at 3.6 GiB resident in the main process and 0.94 GiB in each loader worker (VmHWM, CPU,
one thread; 8 workers, the most by default, make about 11 GiB).
Unreadable images are skipped, counted and listed in ``metrics.json``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torchvision
import torchvision.transforms.v2.functional as F
from torch import nn
from tqdm import tqdm

from ..config import LinearConfig, resume_free_keys  # the options live with every command's config
from ..data.boxes import sample_crop
from ..data.loader import default_workers
from ..engine.loader import build_loader
from ..engine.run import run
from ..engine.schedule import lr_at as warmup_cosine
from ..engine.schedule import scaled_lr, warmup_multistep
from ..engine.skips import SkipLog
from ..engine.trainer import Hook, StepOutput, Trainer, set_lr
from ..errors import UserError
from ..files import atomic_write_json
from ..images import ImageError, list_images, load_rgb
from ..model.backbones import backbone_info, stage_channels
from ..weights import PREFIXES, WeightsError, load_into, match, read_weights, refusal, resnet_target, resolve_checkpoint

SOCO_WEIGHTS = ("online", "target")
FEATURE_DIM = 2048  # ResNet-50 pooled features (other backbones: feature_dim)
METRICS_JSON = "metrics.json"
CHECKPOINT = "last.pt"
# MoCo's step schedule (main_lincls.py: --schedule 60 80 of 100 epochs, x0.1 each).
STEP_MILESTONES = (0.6, 0.8)
MAX_LISTED = 100  # skipped files listed in metrics.json (all are counted)


# ---------------------------------------------------------------- weights


# The probe's load policy (weights/load.py): strict. Its backbone is frozen, so every tensor of
# the ResNet must come from the file: a partly random frozen backbone would measure nothing.
POLICY = "strict"


def _resolve_weights(weights) -> Path | None:
    """``none`` -> None; a run folder -> its checkpoints/last.pt (else the newest step_N.pt)."""
    if weights is None or str(weights).lower() == "none":
        return None
    try:
        return resolve_checkpoint(weights)  # the one run-folder lookup (weights/read.py)
    except WeightsError as exc:
        raise UserError(str(exc)) from None


def _title(backbone: str) -> str:
    """ResNet-50, ResNeXt-101 32x8d: the backbone's name in messages."""
    b = backbone_info(backbone)
    return f"ResNet-{b.depth}" if b.groups == 1 else f"ResNeXt-{b.depth} {b.groups}x{b.width_per_group}d"


def _backbone_state(path: Path, soco_weights: str):
    """(the file as the weights layer reads it, what it is: with ``backbone``, the torchvision
    name of its ResNet; ResNet-50 when it holds none, the load then says what is missing)."""
    try:
        found = read_weights(path, soco_weights)  # every format soco reads (weights/read.py)
        backbone = found.backbone or "resnet50"
    except WeightsError as exc:
        raise UserError(str(exc)) from None
    if found.soco is not None:  # a SoCo checkpoint: the online (encoder.*) or target network's ResNet
        prefix = PREFIXES[soco_weights] + ("backbone.body." if found.soco.arch == "fpn" else "backbone.")
        source = {"kind": "soco", "arch": found.soco.arch, "soco_weights": soco_weights, "step": found.soco.step}
        source["prefix"] = prefix
    else:  # a state dict: a torchvision ResNet or detector, an export of any target
        source = {"kind": "state_dict", "format": found.description}
    source["backbone"] = backbone
    return found, source


def read_backbone(weights, soco_weights: str = "online"):
    """(model, description, LoadReport or None for ``none``): :func:`load_backbone` with the
    weights layer's report of what loaded."""

    if soco_weights not in SOCO_WEIGHTS:
        raise UserError(f"unknown --soco-weights {soco_weights!r} (choose online or target)")
    path = _resolve_weights(weights)
    if path is None:
        model = torchvision.models.resnet50(weights=None)
        model.fc = nn.Identity()
        return model, {"weights": "none", "kind": "random_init"}, None
    found, source = _backbone_state(path, soco_weights)
    model = getattr(torchvision.models, source["backbone"])(weights=None)  # torchvision's init, as for none
    model.fc = nn.Identity()
    report = match(found.state, resnet_target(model, source["backbone"]), path=path, source=found.description)
    why = refusal(report, POLICY)
    if why is not None:
        raise UserError(f"{path}: no complete {_title(source['backbone'])} in the file: {why}")
    load_into(model, report)
    source["loaded"] = {m: f"{n}/{total}" for m, (n, total) in report.modules.items()}
    return model, {"weights": str(path), **source}, report


def load_backbone(weights, soco_weights: str = "online") -> tuple[nn.Module, dict]:
    """A torchvision ResNet with ``fc = Identity`` (pooled C5 features: 2048-d for ResNet-50),
    loaded from ``weights`` (run folder, SoCo checkpoint, any weights file soco reads: its own
    backbone, which must load whole; or "none" = torchvision's random-init ResNet-50, seeded by
    the caller). Returns (model, description); ``feature_dim(model)`` is the classifier's input size."""
    model, source, _ = read_backbone(weights, soco_weights)
    return model, source


def freeze(model: nn.Module) -> nn.Module:
    """No gradients and eval mode: BatchNorm uses (and never updates) its running statistics."""
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def feature_dim(model: nn.Module) -> int:
    """The pooled features' size of a torchvision ResNet: its C5 channels (2048 for ResNet-50)."""
    return stage_channels(model)[3]


def make_classifier(num_classes: int, features: int = FEATURE_DIM) -> nn.Linear:
    """Linear(features, classes): weights N(0, 0.01), bias 0 (MoCo main_lincls.py; our choice)."""
    fc = nn.Linear(features, num_classes)
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
    peak = scaled_lr(cfg.base_lr, cfg.batch_size)
    warmup = min(cfg.warmup_epochs * steps_per_epoch, total_steps)
    if cfg.schedule == "cosine":
        return warmup_cosine(step, total_steps, warmup, peak, cfg.warmup_start_factor, cfg.final_lr)
    milestones = tuple(round(m * total_steps) for m in STEP_MILESTONES)
    return warmup_multistep(step, milestones, 0.1, warmup, cfg.warmup_start_factor, peak)


# ---------------------------------------------------------------- data


def scan_class_folder(root, what: str = "train") -> tuple[list[str], list[tuple[str, int]]]:
    """Classes (sorted sub-folder names, hidden ones skipped) and ``(relative path, label)`` per
    image found (recursively) in each, ImageFolder's layout. One-line UserError if none."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: no such {what} folder (expected one sub-folder of images per class)")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise UserError(f"{root}: no class folders in the {what} folder (expected ROOT/CLASS/IMAGE files)")
    samples, empty = [], []
    for label, name in enumerate(classes):
        found = list_images(root / name)
        if not found.paths:
            empty.append(name)
        samples += [(f"{name}/{p}", label) for p in found.paths]
    if empty and what == "train":  # a class without training images cannot be learned
        raise UserError(
            f"{root}: {len(empty)} class folders have no images: {', '.join(empty[:5])}"
            f"{' ...' if len(empty) > 5 else ''}"
        )
    if not samples:
        raise UserError(f"{root}: no images in the {what} class folders")
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
            t = F.resize(
                t[:, y0:y1, x0:x1].contiguous(),
                [cfg.image_size] * 2,
                interpolation=F.InterpolationMode.BILINEAR,
                antialias=True,
            )
            if rng.random() < cfg.hflip_p:
                t = t.flip(2)
        else:
            t = F.resize(t, cfg.test_resize(), interpolation=F.InterpolationMode.BILINEAR, antialias=True)
            t = F.center_crop(t, [cfg.image_size] * 2)
        x = t.float().div_(255.0)
        x = F.normalize(x, list(cfg.mean), list(cfg.std))
        return {"image": x, "label": label, "error": None}


def _collate(items: list[dict]) -> dict:
    good = [it for it in items if it["image"] is not None]
    return {
        "images": torch.stack([it["image"] for it in good]) if good else None,
        "labels": torch.tensor([it["label"] for it in good], dtype=torch.int64),
        "errors": [it["error"] for it in items if it["error"] is not None],
    }


def _loader(dataset, keys: list, batch_size: int, workers: int, device: torch.device):
    # keys are (epoch, index) pairs in the order to serve; batches never mix epochs.
    return build_loader(
        dataset, batch_size, sampler=keys, collate_fn=_collate, workers=workers, pin_memory=device.type == "cuda"
    )


# ---------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(
    backbone, classifier, dataset, cfg: LinearConfig, device, workers: int, skipped: SkipLog, progress: bool = False
) -> dict:
    """Top-1 and top-k (k = min(5, classes)) accuracy in percent over the decodable images."""
    k = min(5, classifier.out_features)
    correct1 = correctk = seen = 0
    keys = [(0, i) for i in range(len(dataset))]
    bar = tqdm(total=len(dataset), desc="evaluate", unit="img", disable=not progress, dynamic_ncols=True)
    for batch in _loader(dataset, keys, cfg.batch_size, workers, torch.device(device)):
        skipped.update(batch["errors"])
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
        raise UserError(f"{dataset.root}: no validation image could be decoded")
    return {"top1": 100.0 * correct1 / seen, "top5": 100.0 * correctk / seen, "top5_k": k, "evaluated_images": seen}


# ---------------------------------------------------------------- the probe


@dataclass
class Job:
    """One linear-probe invocation: data, frozen backbone, classifier, optimiser."""

    cfg: LinearConfig
    classes: list
    train_set: ClassFolderDataset
    val_set: ClassFolderDataset
    backbone: nn.Module
    classifier: nn.Linear
    optimizer: torch.optim.Optimizer
    source: dict  # which weights the backbone holds
    device: torch.device
    workers: int
    steps_per_epoch: int
    total_steps: int


def build_job(weights, train_dir, val_dir, cfg: LinearConfig, soco_weights: str, device) -> Job:
    classes, train_samples = scan_class_folder(train_dir, "train")
    val_classes, val_samples = scan_class_folder(val_dir, "val")
    if val_classes != classes:
        only_train = sorted(set(classes) - set(val_classes))
        only_val = sorted(set(val_classes) - set(classes))
        raise UserError(
            f"{val_dir}: the val class folders differ from the train ones "
            f"(missing in val: {', '.join(only_train[:5]) or '-'}; "
            f"not in train: {', '.join(only_val[:5]) or '-'})"
        )
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(cfg.seed)  # the random-init baseline and the classifier's init
    backbone, source = load_backbone(weights, soco_weights)
    classifier = make_classifier(len(classes), feature_dim(backbone)).to(dev)
    optimizer = torch.optim.SGD(
        classifier.parameters(), lr=cfg.base_lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    train_set = ClassFolderDataset(train_dir, train_samples, cfg, train=True)
    steps_per_epoch = math.ceil(len(train_set) / cfg.batch_size)
    return Job(
        cfg=cfg,
        classes=classes,
        train_set=train_set,
        val_set=ClassFolderDataset(val_dir, val_samples, cfg, train=False),
        backbone=freeze(backbone).to(dev),
        classifier=classifier,
        optimizer=optimizer,
        source=source,
        device=dev,
        workers=default_workers() if cfg.workers is None else int(cfg.workers),
        steps_per_epoch=steps_per_epoch,
        total_steps=cfg.epochs * steps_per_epoch,
    )


@dataclass
class EpochState:
    """The epoch, its steps done, and the training loss and accuracy of its steps since the last
    record (device sums, read when the record is written)."""

    epoch: int = 0
    in_epoch: int = 0
    loss_sum: torch.Tensor | float = 0.0
    correct: torch.Tensor | int = 0
    seen: int = 0

    def epoch_done(self, steps_per_epoch: int) -> bool:
        return self.in_epoch >= steps_per_epoch


class LinearStep:
    """One SGD step of the classifier on frozen features (no activations kept for the backbone);
    the loss and the correct count stay on the device until a record reads them."""

    def __init__(self, job: Job, state: EpochState, skipped: SkipLog):
        self.job, self.state, self.skipped = job, state, skipped
        self.batches: Iterator | None = None

    def __call__(self, step: int) -> StepOutput:
        job, st, cfg = self.job, self.state, self.job.cfg
        if st.epoch_done(job.steps_per_epoch):
            st.epoch, st.in_epoch, self.batches = st.epoch + 1, 0, None
        if self.batches is None:  # per-epoch order; a resumed run skips the batches done
            order = np.random.default_rng([cfg.seed, st.epoch]).permutation(len(job.train_set))
            keys = [(st.epoch, int(i)) for i in order[st.in_epoch * cfg.batch_size :]]
            self.batches = iter(_loader(job.train_set, keys, cfg.batch_size, job.workers, job.device))
        batch = next(self.batches)
        lr = lr_at(step, job.total_steps, job.steps_per_epoch, cfg)
        set_lr(job.optimizer, lr)
        self.skipped.update(batch["errors"])
        loss_terms, n = None, 0
        if batch["images"] is not None:
            with torch.no_grad():  # frozen backbone: no activations kept
                features = job.backbone(batch["images"].to(job.device, non_blocking=True))
            labels = batch["labels"].to(job.device)
            logits = job.classifier(features)
            loss = nn.functional.cross_entropy(logits, labels)
            job.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            job.optimizer.step()
            n = len(labels)
            value = loss.detach()
            loss_terms = [value]
            st.loss_sum = st.loss_sum + value * n
            st.correct = st.correct + (logits.argmax(1) == labels).sum()
            st.seen += n
        st.in_epoch += 1
        if st.epoch_done(job.steps_per_epoch):
            self.batches = None
        return StepOutput(loss=loss_terms, images=n, scalars={"lr": lr})

    def close(self) -> None:
        self.batches = None


class ValidationHook(Hook):
    """Validation top-1/top-5 at the end and every ``eval_every`` epochs (into the epoch's record)."""

    def __init__(self, job: Job, state: EpochState, skipped: SkipLog, progress: bool):
        self.job, self.state, self.skipped, self.progress = job, state, skipped, progress
        self.result: dict | None = None

    def after_step(self, trainer) -> None:
        job, every = self.job, self.job.cfg.eval_every
        epoch_end = self.state.epoch_done(job.steps_per_epoch)
        if not (trainer.is_last or (every and epoch_end and (self.state.epoch + 1) % every == 0)):
            return
        with trainer.side_work():
            self.result = self.run(progress=self.progress and trainer.is_last)
        trainer.record.update(val_top1=self.result["top1"], val_top5=self.result["top5"])

    def run(self, progress: bool) -> dict:
        job = self.job
        return evaluate(
            job.backbone, job.classifier, job.val_set, job.cfg, job.device, job.workers, self.skipped, progress=progress
        )


def _epoch_record(state: EpochState, steps_per_epoch: int, trainer, window) -> dict:
    seen = state.seen
    record = {
        "lr": trainer.output.scalars["lr"],
        "train_loss": float(state.loss_sum) / seen if seen else None,
        "train_top1": 100.0 * float(state.correct) / seen if seen else None,
        "images_per_s": round(window.images_per_s, 2),
        "epoch_done": state.epoch_done(steps_per_epoch),
    }
    state.loss_sum, state.correct, state.seen = 0.0, 0, 0  # the next record's window starts here
    return record


# Settings a resumed probe may change: how it runs, not what it trains (engine.run).
RESUME_FREE = resume_free_keys(LinearConfig)  # config.py: the fields declared kind="run"


class LinearStage:
    """The linear probe on the engine (``engine.run``; one process): the job, the step, the
    validation hook, what a checkpoint holds, the summary."""

    command = "linear probe"
    distributed = False
    trains = True
    keep_checkpoints = 0
    run_keys: tuple[str, ...] = RESUME_FREE

    def __init__(self, weights, train_dir, val_dir, out, cfg: LinearConfig, soco_weights: str, progress: bool):
        self.weights, self.train_dir, self.val_dir = weights, train_dir, val_dir
        self.out, self.cfg, self.soco_weights, self.progress = Path(out), cfg, soco_weights, progress
        self.state, self.skipped = EpochState(), SkipLog(warn=True)
        self.is_main = True

    def check(self, info, fresh: bool) -> None:
        pass  # the inputs are checked while building (before anything is written but the lock)

    def build(self, info) -> None:
        self.job = build_job(self.weights, self.train_dir, self.val_dir, self.cfg, self.soco_weights, info.device)
        self.device, self.total_steps = self.job.device, self.job.total_steps
        self.validation = ValidationHook(self.job, self.state, self.skipped, self.progress)

    # -- checkpoints
    def recipe(self) -> dict:
        return asdict(self.job.cfg)

    def recipe_of(self, checkpoint: dict, path: Path, accept_changes: bool) -> dict:
        job = self.job
        if not isinstance(checkpoint, dict) or not {"classifier", "optimizer", "step"} <= set(checkpoint):
            raise UserError(f"{path}: not a soco linear-probe checkpoint; use another --out or --resume none")
        source = checkpoint.get("source", {})
        if (
            checkpoint.get("classes") != job.classes
            or source.get("weights") != job.source["weights"]
            or source.get("soco_weights") != job.source.get("soco_weights")
        ):
            raise UserError(f"{path}: made with other weights or classes; use another --out or --resume none")
        return checkpoint.get("config", {})

    def state_dict(self, step: int) -> dict:
        job, state = self.job, self.state
        return {
            "classifier": job.classifier.state_dict(),
            "optimizer": job.optimizer.state_dict(),
            "epoch": state.epoch,
            "batch_in_epoch": state.in_epoch,
            "classes": job.classes,
            "source": job.source,
            "config": asdict(job.cfg),
            "skipped": dict(self.skipped.reasons),
        }

    def load_state_dict(self, checkpoint: dict, path: Path) -> None:
        self.job.classifier.load_state_dict(checkpoint["classifier"])
        self.job.optimizer.load_state_dict(checkpoint["optimizer"])
        self.state.epoch, self.state.in_epoch = int(checkpoint["epoch"]), int(checkpoint["batch_in_epoch"])
        self.skipped.update(checkpoint.get("skipped", {}).items())

    def resumed_line(self, checkpoint: dict, path: Path) -> str:
        return f"resumed from {path} at step {int(checkpoint['step'])} (epoch {self.state.epoch})"

    # -- the run
    def finished_result(self, start: int) -> None:
        return None

    def begin(self, start: int, stop: int, resumed_from) -> None:
        pass

    def make_step(self, start: int) -> LinearStep:
        return LinearStep(self.job, self.state, self.skipped)

    def record_due(self, trainer) -> bool:
        """Records, validation and checkpoints at every epoch's end and at the last step."""
        return trainer.is_last or self.state.epoch_done(self.job.steps_per_epoch)

    def metrics(self) -> dict:
        state, steps = self.state, self.job.steps_per_epoch
        return {
            "desc": "linear probe",
            "tensorboard": False,
            "log_due": self.record_due,
            "check_every": 1 if self.device.type == "cpu" else steps,
            "base": lambda tr: {"epoch": state.epoch},
            "record": lambda tr, w: _epoch_record(state, steps, tr, w),
            "hint": "Try a lower --lr.",
        }

    def checkpoint_due(self, trainer) -> bool:
        return self.record_due(trainer)

    def hooks(self, writer: Hook, checkpointer: Hook) -> list[Hook]:
        return [self.validation, writer, checkpointer]

    def finish(self, trainer: Trainer, start: int, seconds: float) -> dict:
        result = self.validation.result
        if result is None:  # resumed a finished run: evaluate its classifier again
            result = self.validation.run(progress=self.progress)
        return _write_summary(self.job, self.out, trainer.step, result, self.skipped, seconds)


def linear_probe(
    weights,
    train_dir,
    val_dir,
    out_dir,
    config: LinearConfig | None = None,
    soco_weights: str = "online",
    resume: str = "auto",
    max_steps: int | None = None,
    device: str | None = None,
    progress: bool = True,
    overwrite: bool = False,
    accept_changes: bool = False,
    **overrides,
) -> dict:
    """Train and evaluate the linear probe; returns what ``OUT/metrics.json`` holds.

    ``weights``: a SoCo run folder or checkpoint, a torchvision ResNet state dict, or "none".
    ``train_dir`` / ``val_dir``: class folders (ROOT/CLASS/IMAGE), the same class names in both.
    ``config``: LinearConfig (paper B defaults); ``overrides``: its fields by name (e.g.
    ``epochs=2``). ``resume``: "auto" continues from OUT/checkpoints/last.pt when present,
    "none" starts over (a folder holding another run's checkpoint needs ``overwrite``, which
    moves that run aside); a checkpoint made with other settings (outside RESUME_FREE) is
    refused naming them unless ``accept_changes``. ``max_steps``: stop after this many optimiser
    steps in total (the schedule keeps its length), then evaluate. ``device``: "cpu" / "cuda"
    (default: CUDA if available). The output folder is locked for the run. Raises UserError
    (one line) for bad input, UserError.
    """
    cfg = replace(config or LinearConfig(), **overrides)  # checked by LinearConfig itself
    if resume not in ("auto", "none"):
        raise UserError(f"resume={resume!r}: expected auto or none")
    if max_steps is not None and max_steps < 0:
        raise UserError(f"max_steps must be >= 0, got {max_steps}")
    stage = LinearStage(weights, train_dir, val_dir, out_dir, cfg, soco_weights, progress)
    return run(stage, out_dir, resume=resume, accept_changes=accept_changes, overwrite=overwrite,
               max_steps=max_steps, device=device, progress=progress)  # fmt: skip


def _write_summary(job: Job, out: Path, step: int, result: dict, skipped: SkipLog, seconds: float) -> dict:
    """OUT/metrics.json (atomic) and the one-line result."""
    cfg, listed = job.cfg, skipped.files
    summary = {
        "top1": result["top1"],
        "top5": result["top5"],
        "top5_k": result["top5_k"],  # min(5, classes): top-5 is top-k with k = this
        "classes": job.classes,
        "train_images": len(job.train_set),
        "val_images": len(job.val_set),
        "evaluated_images": result["evaluated_images"],
        "skipped": {"count": len(listed), "files": [{"path": p, "reason": r} for p, r in listed[:MAX_LISTED]]},
        "step": step,
        "total_steps": job.total_steps,
        "epochs_done": step / job.steps_per_epoch,
        "finished": step >= job.total_steps,
        "peak_lr": scaled_lr(cfg.base_lr, cfg.batch_size),
        "weights": job.source,
        "device": str(job.device),
        "seconds": round(seconds, 2),
        "config": asdict(cfg),
    }
    atomic_write_json(out / METRICS_JSON, summary)
    print(
        f"linear probe: top-1 {summary['top1']:.2f} %, top-{result['top5_k']} {summary['top5']:.2f} % "
        f"on {result['evaluated_images']} val images ({len(job.classes)} classes); "
        f"{len(listed)} unreadable files skipped; {out / METRICS_JSON}",
        flush=True,
    )
    return summary
