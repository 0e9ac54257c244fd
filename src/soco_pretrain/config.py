"""Configuration dataclasses with the paper's defaults: one config system for every command.

Every default names its source: the paper (section), the released code (hologerry/SoCo, see
README "Faithfulness"), or "our choice" with the reason.

- ``PretrainConfig`` (data / model / train / monitor; ``soco pretrain``, RUN/config.yaml, every
  checkpoint) and the options of the other commands: ``FinetuneOptions`` (``soco finetune``),
  ``LinearConfig`` (``soco linear``), ``KnnOptions`` (``soco knn``), ``SearchConfig``
  (``soco proposals``). Each command's flags are generated from these fields (cli/), so a default
  lives only here. A field's metadata (:func:`opt`) holds its help, its flag (if any) and whether
  it is part of the recipe or only says how a run runs; soco compare's recipe and the resume
  policies (``RESUME_FREE``) are generated from the same metadata.
- Values are type-checked against the annotations wherever they come from (a YAML file, a preset,
  ``--set key=value``, a flag): int, float, bool, str, Literal choices, Optional, tuples and lists
  of them. Errors are one line naming the key, the value and what is expected. A float field also
  takes a numeric string (YAML 1.1 reads ``1e-5`` as a string); an int field takes only ints.
- Ranges are checked once per dataclass, in its ``__post_init__`` (so also for the Python API).
- ``resolve`` layers defaults < preset < ``--config`` file < flags < ``--set`` and remembers where
  every key's value came from (``soco config show``).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import re
import types
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from .errors import UserError

CONFIG_FILE = "config.yaml"  # RUN/config.yaml: a run's resolved pretraining config
CONFIG_VERSION = 1  # PretrainConfig.version this code writes; files without the key are version 1


class ConfigError(UserError):
    """A config key, value or file the user can fix (exit status 2). One line: ``WHERE KEY=VALUE:
    PROBLEM``, WHERE being the file, preset or ``--set`` the value came from. ``key`` / ``problem``
    are kept for callers that re-word it (a flag's argparse message)."""

    def __init__(self, message: str, key: str | None = None, value: Any = None, problem: str | None = None):
        super().__init__(message)
        self.key, self.value, self.problem = key, value, problem

    @classmethod
    def bad(cls, key: str, value: Any, problem: str, where: str = "", shown: str | None = None) -> ConfigError:
        shown = _show(value) if shown is None else shown
        return cls(f"{where}{key}={shown}: {problem}", key, value, problem)

    def located(self, prefix: str = "", where: str = "") -> ConfigError:
        """The same error for the key under ``prefix`` (``data.views.``) and from ``where``."""
        if self.key is None or self.problem is None:
            return ConfigError(f"{where}{self}") if where else self
        return ConfigError.bad(prefix + self.key, self.value, self.problem, where)


# ---------------------------------------------------------------- range rules (used by __post_init__)

# A rule is (test, text): ``test(value)`` is true for a valid value; ``text`` completes "must be ...".
_AT_LEAST_0 = (lambda v: v >= 0, "at least 0")
_AT_LEAST_1 = (lambda v: v >= 1, "at least 1")
_POSITIVE = (lambda v: v > 0, "positive")
_UNIT = (lambda v: 0 <= v <= 1, "in [0, 1]")
_FRACTION = (lambda v: 0 < v <= 1, "in (0, 1]")
_OPEN_UNIT = (lambda v: 0 < v < 1, "in (0, 1)")
_MOMENTUM = (lambda v: 0 <= v < 1, "in [0, 1)")
_SCALE_PAIR = (lambda v: 0 < v[0] <= v[1] <= 1, "two values 0 < low <= high <= 1")
_POSITIVE_PAIR = (lambda v: 0 < v[0] <= v[1], "two values 0 < low <= high")
_UNIT_EACH = (lambda v: all(0 <= p <= 1 for p in v), "probabilities in [0, 1]")
_POSITIVE_EACH = (lambda v: len(v) > 0 and all(p > 0 for p in v), "positive numbers")
_INCREASING = (
    lambda v: len(v) > 0 and v[0] > 0 and all(a < b for a, b in zip(v, v[1:])),
    "increasing positive numbers",
)
# Every seed field: the tightest range of what the seeds feed. KnnOptions.seed and monitor.seed
# reach scikit-learn's random_state (numpy's RandomState: 0 <= seed < 2**32); the others
# torch.manual_seed (< 2**64, room left for the loops' seed * 1_000_003 + step) and numpy's
# default_rng (no negative seeds). One range for every seed field, so none is a surprise.
_SEED = (lambda v: 0 <= v < 2**32, f"in [0, {2**32 - 1}] (below 2**32)")


# model.backbone values: the torchvision ResNets / ResNeXts of model/backbones.py. Its table
# (BACKBONES) is the source; these are written out here only because config.py imports no torch
# (``soco --help`` stays fast), and a test checks that they agree with it.
BackboneName = Literal[
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "resnext101_64x4d",
]
BASIC_BLOCK_BACKBONES = ("resnet18", "resnet34")  # BACKBONES' entries without bottleneck blocks


def _at_least(lo):
    return (lambda v: v >= lo, f"at least {lo}")


# ---------------------------------------------------------------- field metadata: one option vocabulary

# An option either changes the results ("recipe") or only how a run runs: processes, devices,
# logging, checkpoints, progress ("run"). The CLI's flags, soco compare's recipe and the resume
# policies (what a resumed run may change) are all generated from this one declaration.
OptionKind = Literal["recipe", "run"]


def opt(
    default: Any = dataclasses.MISSING,
    *,
    help: str = "",
    kind: OptionKind = "recipe",
    flag: str | bool = True,
    metavar: str | None = None,
    resume_free: bool | None = None,
    parse: Literal["sizes", "list"] | None = None,
    lr: tuple[Literal["peak", "base"], int] | None = None,
) -> Any:
    """A dataclass field with its option metadata.

    ``help``: the flag's help (``{default}`` is replaced by the default). ``flag``: True for
    ``--field-name``, a string for another spelling (``--no-progress`` on a bool field sets it
    False), False for no flag (still a ``--set`` key). ``resume_free``: whether a resumed run may
    change it (default: run options only; a recipe option that only changes the evaluation may
    too). ``parse``: the text form of a tuple flag ("sizes": PX, PX,PX or LO-HI; "list": a,b,c).
    ``lr``: this field is the learning rate, stored as the absolute "peak" or the "base" rate at
    the given reference batch (the CLI adds the other spelling, ``--base-lr`` or ``--lr``).
    """
    meta = {"help": help, "kind": kind, "flag": flag, "metavar": metavar, "resume_free": resume_free,
            "parse": parse, "lr": lr}  # fmt: skip
    return field(default=default, metadata=meta)


def option_meta(f: dataclasses.Field) -> dict:
    """A field's option metadata, with the defaults of :func:`opt` for a field declared without it."""
    meta = dict(f.metadata)
    meta.setdefault("kind", "recipe")
    meta.setdefault("flag", False)  # a field without opt() has no flag (PretrainConfig: --set only)
    for key in ("help", "metavar", "resume_free", "parse", "lr"):
        meta.setdefault(key, None)
    return meta


def flag_name(f: dataclasses.Field) -> str | None:
    """The flag of field ``f``: ``--field-name`` unless its metadata names another; None: no flag."""
    flag = option_meta(f)["flag"]
    if flag is True:
        return "--" + f.name.replace("_", "-")
    return flag or None


def is_resume_free(f: dataclasses.Field) -> bool:
    meta = option_meta(f)
    return meta["kind"] == "run" if meta["resume_free"] is None else bool(meta["resume_free"])


def option_names(cls, kind: OptionKind) -> tuple[str, ...]:
    """The fields of options dataclass ``cls`` of one kind, in field order."""
    return tuple(f.name for f in fields(cls) if f.init and option_meta(f)["kind"] == kind)


def resume_free_keys(cls, prefix: str = "") -> tuple[str, ...]:
    """The keys a resumed run may change (engine.run matches them as prefixes of dotted keys): each
    resume-free field, a resume-free section as ``section.``, and those inside other sections."""
    keys: list[str] = []
    for f in fields(cls):
        tp = field_types(cls).get(f.name)
        if is_resume_free(f):
            keys.append(f"{prefix}{f.name}." if _is_config(tp) else prefix + f.name)
        elif _is_config(tp):
            keys += resume_free_keys(tp, f"{prefix}{f.name}.")
    return tuple(keys)


def _default_of(cls, name: str) -> Any:
    """``cls``'s default for field ``name`` (so another class can reuse it, written once)."""
    return next(f.default for f in fields(cls) if f.name == name)


@functools.cache
def field_types(cls) -> dict[str, Any]:
    """{field name: resolved annotation} of a config dataclass, in field order."""
    hints = get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls) if f.init}


def _union_args(tp):
    return get_args(tp) if get_origin(tp) in (Union, types.UnionType) else None


def literal_choices(tp) -> tuple | None:
    """The choices of a Literal (or Optional Literal) annotation, else None."""
    args = _union_args(tp)
    if args is not None:
        inner = [a for a in args if a is not type(None)]
        return literal_choices(inner[0]) if len(inner) == 1 else None
    return get_args(tp) if get_origin(tp) is Literal else None


def _validate(obj, rules: dict, optional: tuple[str, ...] = ()) -> None:
    """Check ``obj``'s fields against ``rules`` ({name or names: rule}); the first failing one
    raises a one-line ConfigError naming the field (its parent's path is added by the caller).
    Fields in ``optional`` may also be None. Every ``Literal`` field is checked against its
    choices too, so a Python caller gets the same one-line error as ``--set``."""
    cls: type = obj.__class__  # plain ``type``: mypy takes type(obj) for unhashable
    for name, tp in field_types(cls).items():
        choices = literal_choices(tp)
        value = getattr(obj, name)
        # inf (YAML .inf, or 1e400 read as a float) and nan pass every comparison-based rule below
        # (nan fails them with a misleading text): refused here, for every float and list of floats.
        if not _finite(value):
            raise ConfigError.bad(name, value, "must be a finite number (not inf or nan)")
        if choices is None or value is None or value in choices:
            continue
        raise ConfigError.bad(name, value, f"must be one of {', '.join(map(str, choices))}")
    for names, (test, text) in rules.items():
        for name in (names,) if isinstance(names, str) else names:
            value = getattr(obj, name)
            if value is None and name in optional:
                continue
            try:
                ok = bool(test(value))
            except (TypeError, IndexError):  # a wrong type through the Python API
                ok = False
            if not ok:
                raise ConfigError.bad(name, value, f"must be {text}")


def _finite(value) -> bool:
    """False for a float that is inf or nan, or a list / tuple holding one."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return all(_finite(v) for v in value)
    return True


# ---------------------------------------------------------------- soco knn (also the monitor's defaults)


@dataclass
class KnnOptions:
    """kNN protocol settings (evaluate/knn.py docstring); defaults are the usual SSL kNN protocol."""

    k: int = opt(20, help="neighbours (default {default})", metavar="K")
    temperature: float = opt(0.07, help="vote weight exp(cos/T) (default {default})", metavar="T")
    # at least 32 (FPN's coarsest stride)
    size: int | None = opt(
        None,
        help="square input size (default: the run's data.views.v1_size, else 224; soco compare: the first run's, "
        "for every init)",
        metavar="PX",
    )
    level_bounds: tuple[float, float, float] | None = opt(
        None, help="FPN level bounds (default: the run's if its size is used, else scaled)", flag=False
    )
    min_box: float = opt(
        32.0,
        help="leave out boxes narrower or lower than this in the original image (default {default:g})",
        metavar="PX",
    )
    batch: int = opt(16, help="images per forward pass (default {default})", flag="--batch-size", metavar="N")
    bn: Literal["precise", "running"] = opt(
        "precise",
        help="precise: BatchNorm statistics re-estimated on the kNN train images; running: the weights' own "
        "(default {default})",
    )
    precise_images: int = opt(1000, help="at most this many train images for the BN statistics", flag=False)
    seed: int = opt(0, help="seed of random init and of --fraction (default {default})")
    train_fraction: float = opt(
        1.0,
        help="seeded random fraction of the train images used as neighbours (default {default:g})",
        flag="--fraction",
        metavar="F",
    )
    soco_weights: Literal["online", "target"] = opt(
        "online", help="for a run/checkpoint: the online or target (EMA) encoder (default {default})"
    )
    allow_leak: bool = opt(False, help="evaluate even if val images were in the pretraining set", kind="run")
    workers: int = opt(2, help="image-decoding processes (default {default})", kind="run", metavar="N")
    device: Literal["cpu", "cuda"] | None = opt(None, help="default: cuda when available", kind="run")
    progress: bool = opt(True, help="no progress bars", kind="run", flag="--no-progress")
    # For --weights none: the ResNet of the random-init encoder (None: resnet50, the paper's); a
    # value that contradicts the weights' own backbone is refused.
    backbone: BackboneName | None = opt(
        None, help="for --weights none: the random-init ResNet (default resnet50)", flag=False
    )
    # roi: every box RoIAligned from the whole image resized to `size` (how the detector sees it);
    # crop: every box cut from the original photo with `context`, padded to a square and resized to
    # `size` (every object gets the same pixels: the probe for small inputs). evaluate/knn.py.
    objects: Literal["roi", "crop"] = opt(
        "roi",
        help="roi: each box RoIAligned from the whole resized image (the detector's view); crop: each box cut "
        "from its photo with --context, squared, resized to --size (default {default})",
    )
    # Feature sets, the first one primary (its figures are knn.json's flat ones): c5 / c4 = the
    # ResNet's globally pooled C5 / C4 (crop only), head = the detector path.
    features: tuple[Literal["c5", "c4", "head"], ...] | None = opt(
        None,
        help="comma list, the first primary: c5 / c4 (pooled ResNet stage, crop only), head (detector path) "
        "(default: crop c5,head; roi head)",
        metavar="LIST",
        parse="list",
    )
    # our choice: SimpleShot-style probes
    context: float = opt(1.2, help="crop side = box's longer side x this (default {default:g})", metavar="F")
    min_instances: int = opt(
        0,
        help="leave out classes with fewer train objects, counted and listed (default {default}: keep all)",
        metavar="N",
    )
    centre: bool = opt(
        True, help="subtract the train objects' mean feature before the cosine kNN (SimpleShot's CL2N)", flag=False
    )
    # The probe's floors in the same report: a colour-histogram + HOG descriptor (crop only) and
    # shuffled train labels (must land at the majority class's share).
    baselines: bool = opt(True, help="also report the colour/HOG and shuffled-label floors", flag=False)

    def __post_init__(self):
        _validate(
            self,
            {
                ("k", "batch", "precise_images"): _AT_LEAST_1,
                "min_instances": _AT_LEAST_0,
                "context": _at_least(1.0),
                "size": _at_least(32),
                "level_bounds": _INCREASING,
                ("min_box", "workers"): _AT_LEAST_0,
                "temperature": _POSITIVE,
                "train_fraction": _FRACTION,
                "seed": _SEED,
            },
            optional=("size", "level_bounds"),
        )


KNN_PRESETS: dict[str, dict] = {"default": {}}  # the usual SSL kNN protocol (Wu et al. 2018; evaluate/knn.py)


# ---------------------------------------------------------------- soco pretrain


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
    v2_source: Literal["v1", "original"] = "v1"
    # "downsample" (paper: V3 = V2 resized to 112) or "independent_crop" (released FPN code: an
    # independent crop, scale crop_scale, resized to 112, with its own proposals).
    v3: Literal["downsample", "independent_crop"] = "downsample"
    hflip_p: float = 0.5  # BYOL augmentation: horizontal flip, per view, boxes flipped with it
    # Our choice (paper: "proposals outside of V2 are dropped", no threshold given): a proposal is
    # visible in a cropped view when at least this fraction of its area lies inside the crop; its
    # box is then clipped to the crop. 0 reproduces the released code (any overlap).
    min_visible: float = 0.5
    num_proposals: int = 4  # paper 3.2 / Table 5c: K = 4 proposals per image per step
    # "mask": fewer than K proposals -> padded slots with valid=False (never in the loss);
    # "repeat": the released code's duplicate padding (all slots valid).
    pad: Literal["mask", "repeat"] = "mask"
    # Box jitter (paper 3.2): x += r*w, y += r*h, w += r*w, h += r*h (centre form), r ~ U[-0.1, 0.1],
    # with probability 0.5 per proposal. "paper" = that, applied independently to each proposal in
    # each view; "released" = corner form, four independent r, view-1 copies only; "none".
    jitter: Literal["paper", "released", "none"] = "paper"
    jitter_ratio: float = 0.1  # paper 3.2
    jitter_p: float = 0.5  # paper 3.2
    # Scale-aware assignment (paper 3.3): area <= 48^2 -> P2, <= 96^2 -> P3, <= 192^2 -> P4, else P5,
    # area in the view's own pixels; a box exactly on a boundary goes to the lower level.
    level_bounds: tuple[int, int, int] = (48, 96, 192)
    # Images without proposals: "error" (count and list them) or "whole_image" (released fallback).
    no_proposals: Literal["error", "whole_image"] = "error"
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
    proposal_source: Literal["selective_search", "whole_image", "random", "coco"] = "selective_search"
    proposal_json: str | None = None  # the COCO JSON of proposal_source=coco
    # Our choice: off (the user's boxes as given); true applies the paper's filter (3.2) to them.
    proposal_json_filter: bool = False

    def __post_init__(self):
        _validate(
            self,
            {
                ("v1_size", "v2_size", "v3_size", "v4_size", "num_proposals"): _AT_LEAST_1,
                "crop_scale": _SCALE_PAIR,
                "crop_ratio": _POSITIVE_PAIR,
                ("hflip_p", "min_visible", "jitter_p"): _UNIT,
                "jitter_ratio": (lambda v: 0 <= v < 1, "in [0, 1) (a fraction of the box's width and height)"),
                "level_bounds": _INCREASING,
            },
        )


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
    view_params: tuple[Literal[0, 1], ...] = (0, 1, 1, 1)
    # "cpu": per image in the workers; "gpu": batched on the training device (workers only decode,
    # crop and resize: about half their work, benchmarks/data.py); "auto": gpu when training on
    # CUDA (a compiled H200 step needs ~1100 images/s, more than 16 cores deliver with the
    # photometric part in the workers; README "Training step on a GPU"), cpu otherwise.
    device: Literal["auto", "cpu", "gpu"] = opt("auto", kind="run")
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)  # ImageNet normalisation
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    def __post_init__(self):
        _validate(
            self,
            {
                ("colour_jitter_p", "grayscale_p"): _UNIT,
                ("brightness", "contrast", "saturation"): _AT_LEAST_0,
                # torchvision's bound: a hue shift is a fraction of the colour wheel
                "hue": (lambda v: 0 <= v <= 0.5, "in [0, 0.5]"),
                ("blur_p", "solarize_p"): _UNIT_EACH,
                "blur_sigma": _POSITIVE_PAIR,
                "view_params": (
                    lambda v: len(v) >= 3 and all(p in (0, 1) for p in v),
                    "a list of 0 (BYOL view 1) or 1 (BYOL view 2), one per view (3 or 4)",
                ),
                "std": _POSITIVE_EACH,
            },
        )


@dataclass
class DataConfig:
    views: ViewsConfig = field(default_factory=ViewsConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    seed: int = 0  # base seed: same seed, same batches (per-sample RNG from seed, epoch, index)
    max_decode_retries: int = 10  # a sample whose image fails is replaced by the next index
    # Where JPEGs are decoded. "worker": the loader workers decode (PIL), draw the geometry and
    # render the uint8 views. "device": workers read the file's bytes and draw the geometry only
    # (from the header); the training device decodes the JPEGs in one batched
    # torchvision.io.decode_jpeg call and renders crops, resizes and flips there (data/decode.py;
    # other files, e.g. PNG or CMYK JPEG, are still decoded in the workers). Needs the photometric
    # augmentation on the device too (augment.device gpu or auto). Default "worker": the device
    # path has not been measured on a GPU yet.
    decode: Literal["worker", "device"] = opt("worker", kind="run")

    def __post_init__(self):
        _validate(self, {"max_decode_retries": _AT_LEAST_0, "seed": _SEED})
        # Rules across the two sections (each section checks its own fields).
        views, aug = self.views, self.augment
        if self.decode == "device" and aug.device == "cpu":
            raise ConfigError.bad(
                "decode",
                "device",
                "needs augment.device=gpu or auto (the workers hold no pixels to augment)",
            )
        n_views = 4 if views.soco_star else 3
        if len(aug.view_params) < n_views:
            raise ConfigError.bad(
                "augment.view_params", aug.view_params, f"names {len(aug.view_params)} views; {n_views} are built"
            )
        if views.proposal_source == "coco" and not views.proposal_json:
            raise ConfigError.bad(
                "views.proposal_source",
                "coco",
                "needs views.proposal_json=PATH (a COCO JSON whose boxes are the proposals)",
            )


@dataclass
class ModelConfig:
    """The pretraining network (paper section 3.3, 4.1)."""

    # "fpn": ResNet-50 + FPN (P2-P5) + RoIAlign 7x7 on each box's assigned level + 4conv1fc head;
    # "c4": RoIAlign 14x14 on C4 (stride 16), res5 as the head, global average pooling.
    arch: Literal["fpn", "c4"] = "fpn"
    # torchvision ResNet / ResNeXt (model/backbones.py); the paper pretrains ResNet-50 (4.1).
    # c4 needs a bottleneck one (res5 is the R-CNN head; Detectron2 and MMDetection build it
    # from bottleneck blocks).
    backbone: BackboneName = "resnet50"
    # Warm start (soco pretrain --init FILE): weights loaded into the online and target networks
    # before step 0 of a fresh run (transfer/warm_start.py): a torchvision ResNet or detection
    # state dict, a Detectron2 / MMDetection checkpoint, a safetensors export, a soco run or
    # export. None = random init (the paper). A resumed run takes its weights from the checkpoint.
    init: str | None = None
    # Load an init file whose backbone does not match completely (what matches loads, the rest
    # keeps its random init); without it such a file is refused.
    init_partial: bool = False
    roi_size: int = 7  # FPN: 7x7 as the Mask R-CNN box head (paper 4.1); C4 uses 14 (paper, Detectron2 C4)
    # Our choice: 2 sampling points per bin as torchvision's MultiScaleRoIAlign in Mask R-CNN v2
    # (the paper does not say); aligned=True (half-pixel correct, Detectron2's ROIAlignV2).
    # 0 = adaptive (torchvision's and Detectron2's meaning).
    roi_sampling_ratio: int = 2
    # How FPN boxes are pooled (same result for boxes inside the image; model/encoder.py):
    # "per_level": one RoIAlign per level over every slot, each slot keeps its level's (4x the
    # work, static shapes); "packed": the levels packed into one canvas, ONE RoIAlign (boxes
    # clamped to their level's map). Default per_level until packed is timed on a GPU.
    roi_pool: Literal["per_level", "packed"] = opt("per_level", kind="run")
    head_dim: int = 1024  # paper 4.1: 4 conv + 1 fc (1024), Mask R-CNN's box head
    proj_hidden: int = 4096  # paper 4.1: Linear(4096)-BN-ReLU-Linear(256), as BYOL
    proj_out: int = 256  # paper 4.1
    # Released code: the last BN of each residual block starts at zero (Goyal et al.); paper silent.
    zero_init_residual: bool = True
    bn_momentum: float = 0.1  # PyTorch default, as the released code; paper silent
    # "paper": mean over valid proposals of -2cos(v,v') - 2cos(v,v''), symmetrised (eq. 5-6);
    # "released": -2 x mean cosine per image over matched pairs, mean over images, terms summed.
    loss: Literal["paper", "released"] = "paper"

    def __post_init__(self):
        _validate(
            self,
            {
                ("roi_size", "head_dim", "proj_hidden", "proj_out"): _AT_LEAST_1,
                "roi_sampling_ratio": _AT_LEAST_0,
                "bn_momentum": _UNIT,
            },
        )
        if self.arch == "c4" and self.backbone in BASIC_BLOCK_BACKBONES:
            raise ConfigError.bad(
                "backbone",
                self.backbone,
                "has basic blocks; model.arch=c4 needs a bottleneck ResNet (resnet50 or larger)",
            )


@dataclass
class TrainConfig:
    """Optimisation (paper section 4.1) and the training engine."""

    epochs: int = 100  # paper 4.1: 100-epoch schedule for ablations (400 for the best results)
    batch_size: int = 2048  # paper 4.1: total batch 2048 = per_gpu_batch x world size x accumulation
    # 0 = auto: the largest power of two that fits the device (train/memory.py: measured memory
    # per image; 64 on a CPU) and divides the batch per process; accumulation makes up the rest.
    per_device_batch: int = opt(0, kind="run")
    base_lr: float = 1.0  # paper 4.1: lr = 1.0 x batch / 256 (linear scaling)
    warmup_epochs: int = 10  # paper 4.1
    # Warm-up length in optimiser steps; set (>= 0), it replaces warmup_epochs, so a short run
    # leaves warm-up when it should. None: warmup_epochs. Our small-budget option, not the paper's.
    warmup_steps: int | None = None
    weight_decay: float = 1e-5  # paper 4.1
    # lars: the paper's (4.1). sgd: torch.optim.SGD with train.momentum, no Nesterov, biases and
    # norm parameters without weight decay (as LARS); lr = base_lr x batch / 256 all the same, so
    # lower base_lr with it (lightly's small-batch BYOL example: SGD lr 0.06 at batch 256). Our
    # small-budget option, not the paper's.
    optimizer: Literal["lars", "sgd"] = "lars"
    momentum: float = 0.9  # LARS (and SGD) momentum, as BYOL / released code (paper silent)
    lars_eta: float = 0.001  # LARS trust coefficient, released code (paper silent)
    # Released code: warm-up starts at lr/100 and the cosine ends at 1e-6; paper: from 0 to 0.
    warmup_start_factor: float = 0.0
    final_lr: float = 0.0
    ema_tau: float = 0.99  # paper 4.1: tau from 0.99 increased to 1 (cosine, as BYOL)
    # cosine: the paper's (4.1, BYOL's) ema_tau -> 1 over the run. constant: ema_tau every step
    # (our small-budget option, not the paper's; lightly's BYOL example keeps 0.99).
    ema_schedule: Literal["cosine", "constant"] = "cosine"
    # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp16 | fp32
    precision: Literal["auto", "bf16", "fp16", "fp32"] = opt("auto", kind="run")
    channels_last: bool = opt(True, kind="run")  # on GPU
    # null (YAML; "auto" is read as null too): torch.compile on CUDA (benchmarks/gpu.py: 1.5x
    # images/s for FPN on an H200), not on CPUs; true | false force it.
    compile: bool | None = opt(None, kind="run")
    # torch.compile mode: "default" (measured above); "reduce-overhead" also captures the compiled
    # step's kernels as CUDA graphs (one launch per graph instead of thousands: the eager step's
    # host time exceeded its device time); "max-autotune" tunes the matmuls/convs too (long compile).
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    # cuDNN autotuning (cudnn.benchmark): every step has the same shapes, so tuning once pays.
    # null ("auto"): on for CUDA; true | false force it.
    cudnn_benchmark: bool | None = opt(None, kind="run")
    # TF32 tensor cores for the fp32 matmuls and convolutions on CUDA (the fp32 parts under autocast,
    # and train.precision=fp32): 10-bit mantissa products, fp32 accumulation. false: full fp32.
    # Our choice: the default step already multiplies in bf16 (7-bit mantissa), so TF32 costs the
    # fp32 parts no precision that matters, and its matmuls run several times faster.
    tf32: bool = opt(True, kind="run")
    # On CUDA, the next batch is copied and (data.augment.device=gpu) augmented on a side stream
    # while the current step runs; false: on the default stream when the step asks for it. Our
    # choice: results are the same either way (tests/test_step_sync.py), only the overlap differs.
    prefetch: bool = opt(True, kind="run")
    workers: int = opt(8, kind="run")  # data-loader processes per device
    log_every: int = opt(10, kind="run")  # optimiser steps between metrics lines
    checkpoint_every: int = opt(1000, kind="run")  # optimiser steps between checkpoints (and one at the end)
    # numbered checkpoints kept; last.pt is a hard link to the newest (0: only last.pt, a file of its own)
    keep_checkpoints: int = opt(3, kind="run")
    # Seconds a collective waits for the other processes before the run stops naming the ones that
    # did not answer (a dead process is seen at once on gloo; this bounds a hung one). Our choice:
    # 10 minutes, torch's nccl default and a third of gloo's, generous for rank 0 writing a
    # checkpoint or running the monitor while the others wait; tests set a few seconds.
    dist_timeout_s: float = opt(600.0, kind="run")
    seed: int = 0
    # Parts of the online network kept as they start (our extension for warm starts; the paper
    # trains everything): none | stem (conv1 + bn1) | backbone (the whole ResNet before the
    # RoIAlign: for c4 res2-res4, res5 being the head) | backbone+fpn (fpn only). Frozen
    # parameters get no gradient and no optimiser state; their BatchNorms run in eval mode (the
    # running statistics they start with), in the target network too.
    freeze: Literal["none", "stem", "backbone", "backbone+fpn"] = "none"

    def __post_init__(self):
        _validate(
            self,
            {
                ("epochs", "batch_size", "log_every", "checkpoint_every"): _AT_LEAST_1,
                ("per_device_batch", "warmup_epochs", "warmup_steps", "workers", "keep_checkpoints"): _AT_LEAST_0,
                ("weight_decay", "warmup_start_factor", "final_lr"): _AT_LEAST_0,
                ("base_lr", "lars_eta", "dist_timeout_s"): _POSITIVE,
                "momentum": _MOMENTUM,
                "ema_tau": _UNIT,
                "seed": _SEED,
            },
            optional=("warmup_steps",),
        )
        for name in ("compile", "cudnn_benchmark"):
            object.__setattr__(self, name, auto_bool(name, getattr(self, name)))


def auto_bool(key: str, value) -> bool | None:
    """A true/false/auto setting: None (auto), True or False. The strings "auto", "true" and
    "false" (how the setting was written before it was a bool) are read as those."""
    if value is None or isinstance(value, bool):
        return value
    text = str(value).lower()
    if text not in ("auto", "true", "false"):
        raise ConfigError.bad(key, value, "expected true, false or null (auto)")
    return None if text == "auto" else text == "true"


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
    # The probe, as soco knn's options of the same names, with their defaults (KnnOptions: the
    # usual SSL kNN protocol): k, temperature, min_box (px in the original image, both sides), batch,
    # roi | crop, feature sets (None: the mode's default; the monitor embeds and logs the first
    # only), crop context, classes with fewer objects on the neighbour side left out.
    k: int = _default_of(KnnOptions, "k")
    temperature: float = _default_of(KnnOptions, "temperature")
    min_box: float = _default_of(KnnOptions, "min_box")
    batch: int = _default_of(KnnOptions, "batch")
    objects: Literal["roi", "crop"] = _default_of(KnnOptions, "objects")
    features: tuple[Literal["c5", "c4", "head"], ...] | None = _default_of(KnnOptions, "features")
    context: float = _default_of(KnnOptions, "context")
    min_instances: int = _default_of(KnnOptions, "min_instances")

    def __post_init__(self):
        _validate(
            self,
            {
                "min_instances": _AT_LEAST_0,
                "context": _at_least(1.0),
                ("every", "k", "batch"): _AT_LEAST_1,
                ("size", "min_box"): _AT_LEAST_0,
                "val_fraction": _OPEN_UNIT,
                "temperature": _POSITIVE,
                "seed": _SEED,
            },
        )


@dataclass
class PretrainConfig:
    """Everything `soco pretrain` needs; saved as RUN/config.yaml and in every checkpoint."""

    # Format version of this config (RUN/config.yaml, checkpoints). A file without it is version 1;
    # a newer one is refused rather than half-read.
    version: int = opt(CONFIG_VERSION, kind="run")
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # the monitor only watches: a resumed run may add, change or drop it
    monitor: MonitorConfig = field(default_factory=MonitorConfig, metadata={"kind": "run"})

    def __post_init__(self):
        _validate(self, {"version": _AT_LEAST_1})
        if self.train.freeze == "backbone+fpn" and self.model.arch != "fpn":
            raise ConfigError.bad("train.freeze", self.train.freeze, "needs model.arch=fpn (c4 has no FPN)")
        if self.version > CONFIG_VERSION:
            raise ConfigError.bad(
                "version",
                self.version,
                f"written by a newer soco_pretrain (this one reads "
                f"config version {CONFIG_VERSION}); upgrade soco_pretrain to read it",
            )


# ---------------------------------------------------------------- soco finetune


@dataclass
class FinetuneOptions:
    """Everything besides the data paths; defaults are the paper's / released configs' recipe."""

    schedule: Literal["1x", "2x"] = opt(
        "1x", help="1x: 90k iterations at batch 16, 2x: 180k (default {default}); ignored with --max-iters"
    )
    max_iters: int | None = opt(
        None,
        help="schedule length: train N iterations in all, in place of --schedule (warm-up and lr drops at 2/3 "
        "and 8/9 of N follow it; not an early stop)",
        metavar="N",
    )
    fraction: float = opt(
        1.0,
        help="seeded random fraction of the training images, e.g. 0.05 or 0.10 (default {default:g}; paper 4.5)",
        metavar="F",
    )
    seed: int = opt(0, help="seed of the subset, data order, flips and new heads (default {default})")
    batch_size: int = opt(16, help="total batch over all processes (default {default}, paper 4.2)", metavar="N")
    # None: 0.02 x batch_size / 16 (paper 4.2, linear scaling); soco finetune --base-lr sets it too
    lr: float | None = opt(
        None,
        help="absolute peak learning rate, whatever the batch (default: --base-lr 0.02 scaled by "
        "batch-size / 16, paper 4.2)",
        metavar="LR",
        lr=("peak", 16),
    )
    momentum: float = opt(0.9, help="SGD momentum (paper 4.2 / Detectron2)", flag=False)
    weight_decay: float = opt(2.5e-5, help="weight decay (paper 4.2, released SoCo_FPN_*.yaml)", flag=False)
    weight_decay_norm: float = opt(
        0.0, help="weight decay of norm layers (Detectron2 SOLVER.WEIGHT_DECAY_NORM)", flag=False
    )
    warmup_iters: int = opt(1000, help="linear warm-up iterations at batch 16 (paper 4.2)", flag=False)
    warmup_factor: float = opt(0.001, help="warm-up starts at lr x this (Detectron2 SOLVER.WARMUP_FACTOR)", flag=False)
    gamma: float = opt(0.1, help="lr factor at each drop (paper 4.2: drops twice by 10)", flag=False)
    train_sizes: tuple[int, ...] = opt(
        (640, 672, 704, 736, 768, 800),
        help="training short side(s), one drawn per image: PX, PX,PX,... or LO-HI in steps of 32 "
        "(default {default}, Detectron2)",
        metavar="SIZES",
        parse="sizes",
    )
    test_size: int | None = opt(
        None,
        help="evaluation short side (default: the largest --train-sizes, 800)",
        metavar="PX",
        resume_free=True,
    )
    max_size: int = opt(1333, help="long-side cap (default {default}; Detectron2 MAX_SIZE_TRAIN / _TEST)", metavar="PX")
    roi_batch: int = opt(
        512, help="RoIs sampled per training image for the box head (default {default}, Detectron2)", metavar="N"
    )
    rpn_train_proposals: int = opt(
        1000, help="RPN proposals kept per image in training (Detectron2 FPN POST_NMS_TOPK_TRAIN)", flag=False
    )
    test_proposals: int = opt(
        1000,
        help="RPN proposals per image at test time (default {default}, Detectron2)",
        metavar="N",
        resume_free=True,
    )
    detections: int = opt(
        100, help="detections kept per image (default {default}, COCO)", metavar="N", resume_free=True
    )
    boxes_only: bool = opt(False, help="Faster R-CNN and bbox AP even if the data has masks")
    # None: the weights' own (a SoCo run's model.backbone, else read from the weights' shapes),
    # resnet50 for --weights none (transfer/detector.py detector_backbone)
    backbone: BackboneName | None = opt(
        None,
        help="the detector's ResNet (default: the weights' own; resnet50 for --weights none); refused when it "
        "contradicts the weights",
    )
    # = transfer.detector.DEFAULT_SOCO_WEIGHTS, as soco export (a test checks)
    soco_weights: Literal["online", "target"] = opt(
        "online",
        help="for a run/checkpoint: the online (as soco export) or target (EMA) encoder (default {default})",
    )
    precise_bn: int = opt(
        200,
        help="re-estimate BN statistics over N training batches before evaluating (default {default}, released "
        "config; at most the iterations; 0 = off)",
        metavar="N",
        resume_free=True,
    )
    precision: Literal["fp32", "bf16", "fp16"] = opt(
        "fp32",
        help="fp32 (as Detectron2) or bf16/fp16 autocast (fp16: CUDA only; default {default})",
        resume_free=True,
    )
    workers: int = opt(4, help="data-loader processes per device (default {default})", kind="run", metavar="N")
    log_every: int = opt(20, help="metrics.jsonl period (default {default})", kind="run", metavar="N")
    checkpoint_every: int = opt(
        5000,
        help="checkpoint period in iterations (default {default}; always one at the end)",
        kind="run",
        metavar="N",
    )
    eval_every: int = opt(
        0, help="also evaluate every N iterations (default {default}: only at the end)", kind="run", metavar="N"
    )
    eval_only: bool = opt(
        False, help="only evaluate: OUT's last checkpoint if any (with --resume auto), else --weights", kind="run"
    )
    resume: str = opt(
        "auto",
        help="auto: continue from OUT/checkpoints/last.pt if any (default); none: start over; or a checkpoint file",
        kind="run",
        metavar="auto|none|PATH",
    )
    device: Literal["cpu", "cuda"] | None = opt(None, help="default: cuda when available", kind="run")
    progress: bool = opt(True, help="no progress bars", kind="run", flag="--no-progress")
    # 0 = auto: the largest divisor of batch_size / processes that fits the device's memory
    # (train/memory.py); gradient accumulation makes up the batch
    per_device_batch: int = opt(
        0,
        help="images per forward pass on each process, gradient accumulation makes up --batch-size "
        "(default {default}: auto, the largest that fits the memory)",
        kind="run",
        metavar="N",
    )

    def __post_init__(self):
        _validate(
            self,
            {
                ("max_iters", "test_size"): _AT_LEAST_1,
                (
                    "batch_size",
                    "max_size",
                    "roi_batch",
                    "rpn_train_proposals",
                    "test_proposals",
                    "detections",
                    "log_every",
                    "checkpoint_every",
                ): _AT_LEAST_1,
                (
                    "warmup_iters",
                    "precise_bn",
                    "workers",
                    "eval_every",
                    "weight_decay",
                    "weight_decay_norm",
                    "per_device_batch",
                ): _AT_LEAST_0,
                "fraction": _FRACTION,
                ("lr", "gamma"): _POSITIVE,
                "momentum": _MOMENTUM,
                "warmup_factor": _FRACTION,
                "train_sizes": (lambda v: len(v) > 0 and all(s >= 1 for s in v), "positive sizes"),
                "seed": _SEED,
            },
            optional=("max_iters", "test_size", "lr"),
        )


# Named option sets of soco finetune --preset (over the defaults above).
FINETUNE_PRESETS: dict[str, dict] = {
    "1x": {},  # paper 4.2: the 1x schedule (the defaults)
    "2x": {"schedule": "2x"},  # paper 4.2 / released R_50_FPN_2x: 180k iterations at batch 16
    # README "Fine-tune and measure": what to shrink on a CPU
    "cpu": {
        "batch_size": 2,
        "train_sizes": [320],
        "max_size": 512,
        "roi_batch": 128,
        "test_proposals": 300,
        "detections": 50,
        "precise_bn": 20,
    },
}


# ---------------------------------------------------------------- soco linear


@dataclass
class LinearConfig:
    """Hyper-parameters of the linear probe (transfer/linear.py docstring: sources)."""

    epochs: int = opt(100, help="epochs (default {default}, paper B)", metavar="N")
    batch_size: int = opt(256, help="batch size (default {default}, paper B)", metavar="N")
    # paper B: lr 30 at batch 256; lr = base_lr x batch_size / 256 (our choice)
    base_lr: float = opt(
        30.0,
        help="learning rate at batch 256, scaled by batch-size / 256 (default {default:g}, paper B)",
        metavar="LR",
        lr=("base", 256),
    )
    momentum: float = opt(0.9, help="SGD momentum (paper B)", flag=False)
    weight_decay: float = opt(0.0, help="weight decay (paper B)", flag=False)
    schedule: Literal["cosine", "steps"] = opt(
        "cosine", help="cosine (released code) or steps (MoCo: x0.1 at 60%% and 80%%) (default {default})"
    )
    warmup_epochs: int = opt(
        5, help="linear warm-up from lr/100 (default {default}, released code; 0 = none)", metavar="N"
    )
    warmup_start_factor: float = opt(
        0.01, help="warm-up starts at lr x this (released: warmup_multiplier 100)", flag=False
    )
    final_lr: float = opt(1e-6, help="the cosine's last lr (released: CosineAnnealingLR eta_min)", flag=False)
    image_size: int = opt(
        224, help="crop size (default {default}, paper B); the test resize is PX x 256/224", metavar="PX"
    )
    resize_size: int | None = opt(
        None, help="test resize of the shorter side (default: image_size x 256/224; paper B: 256)", flag=False
    )
    crop_scale: tuple[float, float] = opt(
        (0.08, 1.0), help="RandomResizedCrop area range (released --crop 0.08)", flag=False
    )
    crop_ratio: tuple[float, float] = opt((3 / 4, 4 / 3), help="RandomResizedCrop aspect range", flag=False)
    hflip_p: float = opt(0.5, help="random horizontal flip probability (paper B)", flag=False)
    mean: tuple[float, float, float] = opt((0.485, 0.456, 0.406), help="ImageNet normalisation mean", flag=False)
    std: tuple[float, float, float] = opt((0.229, 0.224, 0.225), help="ImageNet normalisation std", flag=False)
    workers: int | None = opt(
        None, help="data-loader processes (default: usable cores, at most 8)", kind="run", metavar="N"
    )
    eval_every: int = opt(
        0,
        help="also evaluate every N epochs into metrics.jsonl (default {default}: only at the end)",
        kind="run",
        metavar="N",
    )
    seed: int = opt(0, help="random seed (default {default})")

    def __post_init__(self):
        _validate(
            self,
            {
                ("epochs", "batch_size", "image_size", "resize_size"): _AT_LEAST_1,
                ("warmup_epochs", "eval_every", "workers", "weight_decay", "final_lr"): _AT_LEAST_0,
                "base_lr": _POSITIVE,
                "momentum": _MOMENTUM,
                ("warmup_start_factor", "hflip_p"): _UNIT,
                "crop_scale": _SCALE_PAIR,
                "crop_ratio": _POSITIVE_PAIR,
                "std": _POSITIVE_EACH,
                "seed": _SEED,
            },
            optional=("resize_size", "workers"),
        )

    def test_resize(self) -> int:
        return self.resize_size if self.resize_size else round(self.image_size * 256 / 224)


# Named option sets of soco linear --preset.
LINEAR_PRESETS = {
    "paper": {},  # paper appendix B + the released code (the defaults)
    "moco": {"schedule": "steps", "warmup_epochs": 0},  # README "Linear probe": MoCo's x0.1 at 60 %/80 %
    "cpu": {"epochs": 5, "batch_size": 32, "image_size": 96},  # soco linear --help: a CPU-sized baseline
}


# ---------------------------------------------------------------- soco proposals


@dataclass(frozen=True)
class SearchConfig:
    """Selective-search parameters plus the filter applied to its boxes (no defaults: the
    presets below are complete)."""

    scale: float = opt(help="override the preset's scale (Felzenszwalb)", metavar="S")
    sigma: float = opt(help="override the preset's sigma (Felzenszwalb smoothing)", metavar="S")
    min_size: int = opt(help="override the preset's min_size (Felzenszwalb, pixels)", metavar="N")
    min_box_side: int = opt(help="keep only boxes with w, h >= this (0 = off)", flag=False)
    # released code: if nothing survives, try looser rules (see filter_boxes)
    fallbacks: bool = opt(help="if no box survives the filter, try looser rules (released code)", flag=False)
    # Our choice: images with a long side > 1000 px are searched on a copy resized to 1000 px and
    # the boxes scaled back. The search costs 7-8x per doubling beyond 1000 px (minutes and GBs
    # for a 4000x3000 photo), while capping *all* images (say at 500 px) changes the proposals
    # (a box recall of about 0.55 against the full-size search): so only genuinely large images
    # are capped. None/0 = never.
    max_side: int | None = opt(
        1000,
        help="search larger images on a copy resized to this long side (0 = never; preset default {default})",
        metavar="PX",
    )
    ratio: tuple[float, float] = opt((1 / 3, 3.0), help="keep boxes with w/h in this range (paper 3.2)", flag=False)
    rel_size: tuple[float, float] = opt(
        (0.3, 0.8), help="keep boxes with sqrt(wh/WH) in this range (paper 3.2)", flag=False
    )

    def __post_init__(self):
        # Tuples survive a JSON round trip as lists; normalise so equality still holds.
        object.__setattr__(self, "ratio", tuple(float(v) for v in self.ratio))
        object.__setattr__(self, "rel_size", tuple(float(v) for v in self.rel_size))
        _validate(
            self,
            {
                "scale": _POSITIVE,
                ("sigma", "min_size", "min_box_side", "max_side"): _AT_LEAST_0,
                "ratio": _POSITIVE_PAIR,
                "rel_size": (lambda v: 0 <= v[0] <= v[1], "two values 0 <= low <= high"),
            },
            optional=("max_side",),
        )

    def to_dict(self) -> dict:
        """Plain JSON-able dict of every parameter."""
        d = dataclasses.asdict(self)
        d["ratio"], d["rel_size"] = list(self.ratio), list(self.rel_size)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> SearchConfig:
        return from_dict(cls, d)

    def with_overrides(self, overrides: dict | None) -> SearchConfig:
        """A copy with some fields replaced; an unknown name raises a one-line ValueError."""
        if not overrides:
            return self
        names = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ConfigError(f"unknown search parameter(s) {unknown}; known: {sorted(names)}")
        return dataclasses.replace(self, **overrides)


SEARCH_PRESETS = {
    # Paper, appendix A.1: selective search scale 500, sigma 0.9, min_size 10; paper section 3.2:
    # the ratio and relative-size filter only, no fallback (an image may end with no box).
    "paper": SearchConfig(scale=500, sigma=0.9, min_size=10, min_box_side=0, fallbacks=False),
    # Released code (hologerry/SoCo): scale 300, min_size 100, the filter
    # also needs w, h >= 32 px, and images left with no box fall back to looser rules.
    "released": SearchConfig(scale=300, sigma=0.9, min_size=100, min_box_side=32, fallbacks=True),
}


# ---------------------------------------------------------------- typed dict <-> dataclass


def _is_config(tp) -> bool:
    return isinstance(tp, type) and is_dataclass(tp)


def _show(value) -> str:
    """A value as it would be written in YAML/JSON (strings quoted: "100" is visibly not 100)."""
    if isinstance(value, tuple):
        value = list(value)
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def _kind(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (list, tuple)):
        return f"a list of {len(value)}"
    return {int: "an int", float: "a float", str: "a string", dict: "a mapping"}.get(type(value), type(value).__name__)


def describe(tp) -> str:
    """What a value of annotation ``tp`` looks like, for messages: "int", "one of fpn, c4", ..."""
    args = _union_args(tp)
    if args is not None and set(args) == {bool, type(None)}:
        return "true, false or null (auto)"
    if args is not None:
        text = " or ".join(describe(a) for a in args if a is not type(None))
        return text + (" or null" if type(None) in args else "")
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(str(c) for c in get_args(tp))
    if get_origin(tp) in (tuple, list):
        elems = get_args(tp)
        if get_origin(tp) is tuple and not (len(elems) == 2 and elems[1] is Ellipsis):
            return f"a list of {len(elems)} {_plural(elems[0])}"
        return f"a list of {_plural(elems[0])}"
    return {bool: "true/false", int: "int", float: "float", str: "str"}.get(tp, getattr(tp, "__name__", str(tp)))


def _plural(tp) -> str:
    if get_origin(tp) is Literal:
        return "values in {" + ", ".join(str(c) for c in get_args(tp)) + "}"
    return {int: "ints", float: "floats", str: "strings", bool: "true/false values"}.get(tp, describe(tp))


_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _convert(value, tp) -> tuple[bool, Any]:
    """(ok, value converted to annotation ``tp``): bool/int/float/str, Literal, Optional, tuples."""
    args = _union_args(tp)
    if args is not None:
        if value is None and type(None) in args:
            return True, None
        if set(args) == {bool, type(None)} and str(value).lower() in ("auto", "true", "false"):
            return True, auto_bool("", value)  # train.compile: auto (its spelling before it was a bool)
        for arg in args:
            if arg is not type(None):
                ok, out = _convert(value, arg)
                if ok:
                    return True, out
        return False, None
    origin = get_origin(tp)
    if origin is Literal:
        choices = get_args(tp)
        return next(((True, c) for c in choices if type(c) is type(value) and c == value), (False, None))
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            return False, None
        elems = get_args(tp)
        if origin is tuple and not (len(elems) == 2 and elems[1] is Ellipsis):
            if len(value) != len(elems):
                return False, None
        else:
            elems = (elems[0],) * len(value)
        out = []
        for item, elem in zip(value, elems):
            ok, converted = _convert(item, elem)
            if not ok:
                return False, None
            out.append(converted)
        return True, tuple(out) if origin is tuple else out
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:  # ints stay ints: 1.0 or "100" is not an int
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, value  # an int is a valid float (kept as written: stored files stay as they were)
        if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):  # YAML 1.1 reads 1e-5 as a string
            return True, float(value)
        return False, None
    if tp is str:
        return isinstance(value, str), value
    if tp is Any:
        return True, value
    return isinstance(value, tp), value


def _coerce(value, tp, key: str, where: str = "", shown: str | None = None):
    ok, out = _convert(value, tp)
    if ok:
        return out
    expected = describe(tp)
    if literal_choices(tp) is None:
        expected += f", got {_kind(value)}"
    raise ConfigError.bad(key, value, f"expected {expected}", where, shown)


# Option keys that were renamed (options class -> {old: new}): a file or --set with the old key
# is told the new one.
RENAMED_KEYS: dict[str, dict[str, str]] = {"FinetuneOptions": {"batch": "batch_size"}}


def _unknown(cls, key: str, name: str, where: str) -> ConfigError:
    names = list(field_types(cls))
    renamed = RENAMED_KEYS.get(cls.__name__, {}).get(name)
    if renamed:
        return ConfigError(f"{where}unknown key {key!r}: renamed {key[: -len(name)] + renamed!r}", key=None)
    close = difflib.get_close_matches(name, names, n=1)
    parent = key[: -len(name)]
    hint = f"; did you mean {parent + close[0]!r}?" if close else f"; {cls.__name__} keys: {', '.join(names)}"
    return ConfigError(f"{where}unknown key {key!r}{hint}", key=None)


def _tree(cfg) -> dict:
    """{field: value} of a config, nested configs as dicts (values as they are, tuples kept)."""
    return {
        f.name: _tree(getattr(cfg, f.name)) if is_dataclass(getattr(cfg, f.name)) else getattr(cfg, f.name)
        for f in fields(cfg)
        if f.init
    }


def _merge(cls, tree: dict, data, label: str, sources: dict, prefix: str = "", where: str = "") -> None:
    """Type-check the nested mapping ``data`` against ``cls`` and write it into ``tree``."""
    if not isinstance(data, dict):
        what = prefix.rstrip(".") or "the config"
        raise ConfigError(f"{where}{what}: expected a mapping of {cls.__name__} keys, got {_kind(data)}")
    types_ = field_types(cls)
    for name, value in data.items():
        key = f"{prefix}{name}"
        if name not in types_:
            raise _unknown(cls, key, str(name), where)
        tp = types_[name]
        if _is_config(tp):
            _merge(tp, tree.setdefault(name, {}), value, label, sources, key + ".", where)
        else:
            tree[name] = _coerce(value, tp, key, where)
            sources[key] = label


def _build(cls, tree: dict, prefix: str = ""):
    types_ = field_types(cls)
    kwargs = {
        name: _build(types_[name], value, f"{prefix}{name}.") if _is_config(types_[name]) else value
        for name, value in tree.items()
    }
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise exc.located(prefix) from None
    except TypeError as exc:  # a required field missing (SearchConfig)
        missing = [
            n
            for n, f in ((f.name, f) for f in fields(cls))
            if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        if not missing:
            raise
        raise ConfigError(f"missing {cls.__name__} key(s): {', '.join(prefix + n for n in missing)}") from exc


def to_dict(cfg) -> dict:
    """Nested plain dict (tuples as lists) for YAML/JSON."""
    out: dict[str, Any] = {}
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if is_dataclass(value):
            out[f.name] = to_dict(value)
        elif isinstance(value, tuple):
            out[f.name] = list(value)
        else:
            out[f.name] = value
    return out


def from_dict(cls, data: dict, where: str = ""):
    """Build ``cls`` from a nested dict over its defaults, every value type-checked; unknown keys,
    wrong types and out-of-range values raise a one-line ConfigError (a ValueError). ``where``
    prefixes messages (e.g. the file's name)."""
    tree: dict = {}
    _merge(cls, tree, data, "file", {}, where=where)
    try:
        return _build(cls, tree)
    except ConfigError as exc:
        raise exc.located(where=where) from None


# ---------------------------------------------------------------- --set, files, layers and sources


def split_override(item: str) -> tuple[str, str]:
    if "=" not in item:
        raise ConfigError(f"--set {item}: expected key=value, e.g. train.epochs=200")
    key, text = item.split("=", 1)
    return key.strip(), text


def _text_value(text: str, tp):
    """The value of ``--set key=TEXT``: YAML (numbers, true/false, null, [lists]); a plain string
    field takes the text as it is (a folder named 2024 stays "2024")."""
    import yaml

    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    accepts_str = tp is str or (_union_args(tp) is not None and str in _union_args(tp))
    if accepts_str and value is not None and not isinstance(value, str):
        return text
    return value


def _set(cls, tree: dict, item: str, label: str, sources: dict) -> None:
    key, text = split_override(item)
    parts = key.split(".")
    node, owner = tree, cls
    for i, part in enumerate(parts):
        sub = ".".join(parts[: i + 1])
        types_ = field_types(owner)
        if part not in types_:
            raise ConfigError(f"--set {item}: " + str(_unknown(owner, sub, part, "")))
        tp = types_[part]
        last = i == len(parts) - 1
        if not last:
            if not _is_config(tp):
                raise ConfigError(f"--set {item}: {sub} is a value, not a section")
            node, owner = node.setdefault(part, {}), tp
        elif _is_config(tp):
            _merge(tp, node.setdefault(part, {}), _text_value(text, dict), label, sources, sub + ".", f"--set {item}: ")
        else:
            value = _coerce(_text_value(text, tp), tp, sub, "--set ", text)
            if tp is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)  # --set x=1 on a float field gives 1.0 (files keep what they hold)
            node[part] = value
            sources[sub] = label


def apply_overrides(cfg, overrides: list[str]):
    """Apply ``key.sub=value`` strings (YAML values, type-checked) to a copy of ``cfg``; one-line
    ConfigError (a ValueError) for an unknown key, a wrong type, a bad choice or a bad range."""
    new, _ = resolve(type(cfg), [("--set", list(overrides))], base=cfg)
    return new


def where_of(label: str) -> str:
    """The message prefix of a source label: "" (default), "--set ", "FILE: ", "preset x: "."""
    if label == "default":
        return ""
    if label == "--set":
        return "--set "
    if label.startswith("file "):
        return label[5:] + ": "
    return label + ": "


def resolve(cls, layers: list[tuple[str, Any]], base=None, base_label: str = "default"):
    """(config, sources): ``base`` (default ``cls()``) with each layer applied in order. A layer is
    (label, mapping) (a preset, a file, a flag's value) or ("--set", ["key=value", ...]). sources
    maps every dotted key to the label of the layer that set it last (``base_label`` if none)."""
    base = cls() if base is None else base
    tree = _tree(base)
    sources = {key: base_label for key, _ in flatten(base)}
    for label, data in layers:
        if isinstance(data, list):
            for item in data:
                _set(cls, tree, item, label, sources)
        else:
            _merge(cls, tree, data, label, sources, where=where_of(label))
    try:
        return _build(cls, tree), sources
    except ConfigError as exc:
        raise exc.located(where=where_of(sources.get(exc.key or "", base_label))) from None


def field_problem(cls, base, name: str, value) -> str | None:
    """What is wrong with ``value`` for field ``name`` by ``cls``'s own range rules (None: fine)."""
    try:
        dataclasses.replace(base, **{name: value})
    except ConfigError as exc:
        if exc.key == name:
            return exc.problem
    return None


def load_file(path) -> dict:
    """The mapping of a YAML config file; one-line ConfigError if missing or not a mapping."""
    from pathlib import Path

    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read YAML ({' '.join(str(exc).split())})") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got {_kind(data)}")
    return data


def flatten(cfg, prefix: str = "") -> list[tuple[str, Any]]:
    """[(dotted key, value)] of every leaf, in field order."""
    out = []
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if is_dataclass(value):
            out += flatten(value, f"{prefix}{f.name}.")
        else:
            out.append((f"{prefix}{f.name}", value))
    return out


def format_sources(cfg, sources: dict) -> str:
    """One line per key: ``key: value  # source`` (values as YAML would read them back)."""
    rows = []
    for key, value in flatten(cfg):
        text = value if isinstance(value, str) and _plain_string(value) else _show(value)
        rows.append((f"{key}:", str(text), sources.get(key, "default")))
    w1 = max(len(r[0]) for r in rows)
    w2 = max(len(r[1]) for r in rows)
    return "\n".join(f"{k:<{w1}} {v:<{w2}}  # {s}" for k, v, s in rows)


def _plain_string(text: str) -> bool:
    import yaml

    try:
        return bool(text) and yaml.safe_load(text) == text and "#" not in text
    except yaml.YAMLError:
        return False
