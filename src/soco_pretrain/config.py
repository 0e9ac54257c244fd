"""Configuration dataclasses with the paper's defaults, YAML round trip and dotted overrides.

Every default names its source: the paper (section), the released code (hologerry/SoCo, see
README "Faithfulness"), or "our choice" with the reason. Later stages add their own sections
(model, train, ...) next to ``data``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, get_type_hints


@dataclass
class ViewsConfig:
    """How the views and their boxes are built (paper section 3.2, Figure 1)."""

    v1_size: int = 224  # paper 3.2: V1 is the image resized to 224x224
    v2_size: int = 224  # paper 3.2: V2 is resized to the size of V1
    v3_size: int = 112  # paper 3.2 / Table 5: V3 = V2 downsampled to 112x112
    v4_size: int = 192  # paper 4.1 (SoCo*): an extra view of 192x192
    soco_star: bool = False  # paper 4.1: SoCo* adds V4 (four views)
    crop_scale: tuple[float, float] = (0.5, 1.0)  # paper 3.2: crop area fraction of V1 in [0.5, 1]
    # Our choice (the paper is silent): torchvision RandomResizedCrop's aspect range, which is also
    # the released code's. V2 is then resized to a square, so the object's aspect changes a little.
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    # "v1" (paper 3.2: V2 is a crop of V1) or "original" (released code: crop of the original image
    # mapped to the same relative rectangle; sharper, one resampling instead of two).
    v2_source: str = "v1"
    # "downsample" (paper: V3 = V2 resized to 112) or "independent_crop" (released FPN code: an
    # independent crop, scale crop_scale, resized to 112, with its own proposals).
    v3: str = "downsample"
    hflip_p: float = 0.5  # BYOL augmentation: horizontal flip, per view, boxes flipped with it
    # Our choice (paper: "proposals outside of V2 are dropped", no threshold given): a proposal is
    # visible in a cropped view when at least this fraction of its area lies inside the crop; its
    # box is then clipped to the crop. 0 reproduces the released code (any overlap).
    min_visible: float = 0.5
    num_proposals: int = 4  # paper 3.2 / Table 5c: K = 4 proposals per image per step
    # "mask": fewer than K proposals -> padded slots with valid=False (never in the loss);
    # "repeat": the released code's duplicate padding (all slots valid).
    pad: str = "mask"
    # Box jitter (paper 3.2): x += r*w, y += r*h, w += r*w, h += r*h (centre form), r ~ U[-0.1, 0.1],
    # with probability 0.5 per proposal. "paper" = that, applied independently to each proposal in
    # each view; "released" = corner form, four independent r, view-1 copies only; "none".
    jitter: str = "paper"
    jitter_ratio: float = 0.1  # paper 3.2
    jitter_p: float = 0.5  # paper 3.2
    # Scale-aware assignment (paper 3.3): area <= 48^2 -> P2, <= 96^2 -> P3, <= 192^2 -> P4, else P5,
    # area in the view's own pixels; a box exactly on a boundary goes to the lower level.
    level_bounds: tuple[int, int, int] = (48, 96, 192)
    # Images without proposals: "error" (count and list them) or "whole_image" (released fallback).
    no_proposals: str = "error"
    # Where the boxes come from (ablations: paper Table 4 row 1, Table 5c):
    # "selective_search": the proposal store given to the dataset (soco proposals; paper 3.2, default);
    # "whole_image": the image itself is the one box (Table 4's image-level baseline; the other K-1
    #   slots are padding, see `pad`); no store needed;
    # "random": num_proposals random boxes per image, new ones every sample (Table 5c "Random"),
    #   drawn with the sample's rng in the original image: log-uniform w/h in [1/3, 3] and
    #   sqrt(wh)/sqrt(WH) uniform in [0.3, 0.8] (the paper's filter rules; our choice of laws),
    #   uniform position; no store needed;
    # "coco": the boxes of a COCO JSON's annotations (proposal_json, e.g. ground truth), joined to
    #   the images by file_name; crowd and empty boxes skipped (our choice); no store needed.
    proposal_source: str = "selective_search"
    proposal_json: str | None = None  # the COCO JSON of proposal_source=coco
    # Our choice: off (the user's boxes as given); true applies the paper's filter (3.2) to them.
    proposal_json_filter: bool = False


@dataclass
class AugmentConfig:
    """BYOL's photometric augmentation without its random crop (paper 3.2; BYOL Table 6)."""

    enabled: bool = True  # off for tests and pictures
    colour_jitter_p: float = 0.8  # BYOL: colour jitter with probability 0.8
    brightness: float = 0.4  # BYOL
    contrast: float = 0.4  # BYOL
    saturation: float = 0.2  # BYOL
    hue: float = 0.1  # BYOL
    grayscale_p: float = 0.2  # BYOL
    blur_p: tuple[float, float] = (1.0, 0.1)  # BYOL: view 1 always, view 2 with p 0.1
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # BYOL
    solarize_p: tuple[float, float] = (0.0, 0.2)  # BYOL: view 1 never, view 2 with p 0.2
    # Which BYOL parameter set each SoCo view uses. V1 plays BYOL's first view; V2, V3 and V4 the
    # second (our reading of "each view is randomly and independently augmented": independent
    # draws, BYOL's asymmetric parameters between the V1 side and the V2/V3 side).
    view_params: tuple[int, ...] = (0, 1, 1, 1)
    # "cpu": per image in the workers; "gpu": batched on the training device (workers only decode,
    # crop and resize: about half their work, benchmarks/data.py); "auto": gpu when training on
    # CUDA (a compiled H200 step needs ~1100 images/s, more than 16 cores deliver with the
    # photometric part in the workers; README "Training step on a GPU"), cpu otherwise.
    device: str = "auto"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)  # ImageNet normalisation
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)


@dataclass
class DataConfig:
    views: ViewsConfig = field(default_factory=ViewsConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    seed: int = 0  # base seed: same seed, same batches (per-sample RNG from seed, epoch, index)
    max_decode_retries: int = 10  # a sample whose image fails is replaced by the next index


@dataclass
class ModelConfig:
    """The pretraining network (paper section 3.3, 4.1)."""

    # "fpn": ResNet-50 + FPN (P2-P5) + RoIAlign 7x7 on each box's assigned level + 4conv1fc head;
    # "c4": RoIAlign 14x14 on C4 (stride 16), res5 as the head, global average pooling.
    arch: str = "fpn"
    roi_size: int = 7  # FPN: 7x7 as the Mask R-CNN box head (paper 4.1); C4 uses 14 (paper, Detectron2 C4)
    # Our choice: 2 sampling points per bin as torchvision's MultiScaleRoIAlign in Mask R-CNN v2
    # (the paper does not say); aligned=True (half-pixel correct, Detectron2's ROIAlignV2).
    roi_sampling_ratio: int = 2
    head_dim: int = 1024  # paper 4.1: 4 conv + 1 fc (1024), Mask R-CNN's box head
    proj_hidden: int = 4096  # paper 4.1: Linear(4096)-BN-ReLU-Linear(256), as BYOL
    proj_out: int = 256  # paper 4.1
    # Released code: the last BN of each residual block starts at zero (Goyal et al.); paper silent.
    zero_init_residual: bool = True
    bn_momentum: float = 0.1  # PyTorch default, as the released code; paper silent
    # "paper": mean over valid proposals of -2cos(v,v') - 2cos(v,v''), symmetrised (eq. 5-6);
    # "released": -2 x mean cosine per image over matched pairs, mean over images, terms summed.
    loss: str = "paper"


@dataclass
class TrainConfig:
    """Optimisation (paper section 4.1) and the training engine."""

    epochs: int = 100  # paper 4.1: 100-epoch schedule for ablations (400 for the best results)
    batch_size: int = 2048  # paper 4.1: total batch 2048 = per_gpu_batch x world size x accumulation
    # 0 = auto: the largest power of two that fits the device (train/memory.py: measured memory
    # per image; 64 on a CPU) and divides the batch per process; accumulation makes up the rest.
    per_device_batch: int = 0
    base_lr: float = 1.0  # paper 4.1: lr = 1.0 x batch / 256 (linear scaling)
    warmup_epochs: int = 10  # paper 4.1
    weight_decay: float = 1e-5  # paper 4.1
    momentum: float = 0.9  # LARS momentum, as BYOL / released code (paper silent)
    lars_eta: float = 0.001  # LARS trust coefficient, released code (paper silent)
    # Released code: warm-up starts at lr/100 and the cosine ends at 1e-6; paper: from 0 to 0.
    warmup_start_factor: float = 0.0
    final_lr: float = 0.0
    ema_tau: float = 0.99  # paper 4.1: tau from 0.99 increased to 1 (cosine, as BYOL)
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp16 | fp32
    channels_last: bool = True  # on GPU
    # auto: torch.compile on CUDA (benchmarks/gpu.py: 1.5x images/s for FPN on an H200), not on
    # CPUs; true | false force it.
    compile: str = "auto"
    workers: int = 8  # data-loader processes per device
    log_every: int = 10  # optimiser steps between metrics lines
    checkpoint_every: int = 1000  # optimiser steps between checkpoints (and one at the end)
    keep_checkpoints: int = 3  # numbered checkpoints kept besides last.pt
    seed: int = 0


@dataclass
class MonitorConfig:
    """Object-level kNN on a small labelled set during pretraining (evaluate/knn.py; our choices).

    Off unless ``json`` is set. The set's images are split by image (seeded) into kNN train and
    val; every ``every`` optimiser steps (and at step 0) rank 0 embeds both with copies of the
    online and target encoders and logs ``knn_top1`` and the effective ranks to metrics.jsonl.
    """

    json: str | None = None  # COCO-format JSON with labelled boxes; None = no monitor
    images: str | None = None  # folder of its file_names (default: the JSON's folder)
    every: int = 100  # optimiser steps between evaluations
    val_fraction: float = 0.5  # share of the images used as kNN queries, the rest as neighbours
    seed: int = 0  # of the split
    size: int = 0  # input size; 0 = data.views.v1_size (the size the network trains at)
    k: int = 20  # usual SSL kNN protocol (Wu et al. 2018)
    temperature: float = 0.07
    min_box: float = 32.0  # px in the original image, both sides
    batch: int = 16


@dataclass
class PretrainConfig:
    """Everything `soco pretrain` needs; saved as RUN/config.yaml and in every checkpoint."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)


# ---------------------------------------------------------------- generic helpers


def to_dict(cfg) -> dict:
    """Nested plain dict (tuples as lists) for YAML/JSON."""
    out = {}
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if is_dataclass(value):
            out[f.name] = to_dict(value)
        elif isinstance(value, tuple):
            out[f.name] = list(value)
        else:
            out[f.name] = value
    return out


def from_dict(cls, data: dict):
    """Build ``cls`` from a nested dict; unknown keys raise a one-line ValueError."""
    hints = get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} key(s): {', '.join(unknown)}")
    kwargs = {}
    for name, value in data.items():
        sub = hints[name]
        if is_dataclass(sub):
            kwargs[name] = from_dict(sub, value)
        elif isinstance(value, list):
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
    return cls(**kwargs)


def _parse_value(text: str, current: Any) -> Any:
    import yaml

    value = yaml.safe_load(text)
    if isinstance(current, str) and isinstance(value, bool):  # e.g. train.compile=true (auto|true|false)
        value = "true" if value else "false"
    if isinstance(current, bool) and not isinstance(value, bool):
        raise ValueError(f"expected true/false, got {text!r}")
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(current, tuple):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"expected a list like [1, 2], got {text!r}")
        value = tuple(value)
    elif current is not None and not isinstance(value, type(current)):
        raise ValueError(f"expected {type(current).__name__}, got {text!r}")
    return value


def apply_overrides(cfg, overrides: list[str]):
    """Apply ``key.sub=value`` strings (YAML values) to a copy of ``cfg``; clear one-line errors."""
    cfg = dataclasses.replace(cfg)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r}: expected key=value, e.g. views.num_proposals=8")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        target = cfg
        for i, part in enumerate(parts):
            if not is_dataclass(target) or part not in {f.name for f in fields(target)}:
                raise ValueError(f"override {item!r}: unknown key {'.'.join(parts[: i + 1])!r}")
            if i == len(parts) - 1:
                try:
                    value = _parse_value(text, getattr(target, part))
                except ValueError as exc:
                    raise ValueError(f"override {item!r}: {exc}") from None
                setattr(target, part, value)
            else:
                child = dataclasses.replace(getattr(target, part))
                setattr(target, part, child)
                target = child
    return cfg
