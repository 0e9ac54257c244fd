"""Export SoCo weights to the detectors people use: torchvision, Detectron2, MMDetection.

``export(RUN or checkpoint, to=..., weights=..., out=FILE) -> KeyReport``. What is exported is
the pretrained encoder (paper 4.2: "all the pretrained weights except for projection and
prediction are loaded"): for ``model.arch=fpn`` the ResNet-50, the FPN and the 4conv1fc box head;
for ``c4`` the ResNet-50 (res5 being the C4 detector's box head).

Which network (``--weights``): **online** by default. The paper does not say; BYOL, which SoCo
follows, keeps the online encoder at the end of training, and the released SoCo converters
(hologerry/SoCo ``converter_detectron2/*.py``, ``converter_mmdetection/*.py``) read
``module.encoder.*`` / ``module.neck.*`` / ``module.head.*`` -- the online network; the target
is ``encoder_k``/``neck_k``/``head_k`` there and is never exported (their ``--ema`` flag reads a
separate ``model_ema`` entry, not the target). ``--weights target`` exports the EMA network.

Layouts (the key lists are written out independently in tests/test_export.py):

- torchvision, arch fpn: a plain state dict with ``torchvision.models.detection.
  maskrcnn_resnet50_fpn_v2`` names (``backbone.body.*``, ``backbone.fpn.*``,
  ``roi_heads.box_head.*``); ``load_state_dict(strict=False)`` leaves missing only what SoCo
  does not pretrain (``rpn.*``, ``roi_heads.box_predictor.*``, ``roi_heads.mask_head.*``,
  ``roi_heads.mask_predictor.*``). Arch c4: plain ``torchvision.models.resnet50`` keys
  (``conv1``, ``bn1``, ``layer1``..``layer4``; only ``fc`` missing) -- torchvision has no C4 Mask
  R-CNN, so this is the backbone for a linear probe or a hand-built C4 detector.
- Detectron2 (names of Detectron2 v0.6): a pickle ``{"model": {name: float32 ndarray},
  "__author__": "soco-pretrain", "matching_heuristics": True}``. FPN: ``backbone.bottom_up.stem
  / res2..res5``, ``backbone.fpn_lateral2..5`` / ``fpn_output2..5`` (torchvision's
  ``inner_blocks[i]`` / ``layer_blocks[i]`` act on C(i+2)), ``roi_heads.box_head.conv1..4`` and
  ``fc1``; every norm as ``<conv>.norm.{weight,bias,running_mean,running_var}`` (no
  ``num_batches_tracked``, as Detectron2's model-zoo pickles; momentum BatchNorm never reads it).
  C4: ``backbone.stem``, ``backbone.res2..res4`` and ``roi_heads.res5`` (Res5ROIHeads). A
  ready config is written beside it (``FILE.yaml``).
- MMDetection (names of MMDetection v3.3.0): ``torch.save({"state_dict": ..., "meta": ...})``.
  FPN: ``backbone.*`` (mmdet's ResNet keys equal torchvision's), ``neck.lateral_convs.i.conv/bn``,
  ``neck.fpn_convs.i.conv/bn``, ``roi_head.bbox_head.shared_convs.i.conv/bn``,
  ``roi_head.bbox_head.shared_fcs.0``. C4: ``backbone.*`` (stages 1-3) and
  ``roi_head.shared_head.layer4.*`` (mmdet's ResLayer shared head). A config (``FILE.py``)
  is written beside it.

When the run has a data manifest (``RUN/data_manifest.json``), it is copied beside the export
as ``FILE.manifest.json`` (the leak guard of fine-tuning finds it there) and its ``set_hash`` and
count go into the detectron2 payload / mmdet ``meta`` as ``data_manifest_hash`` and
``data_manifest_count``; the torchvision file stays a plain state dict.

Every file is written atomically (temporary file + ``os.replace``).
"""

from __future__ import annotations

from ..errors import UserError
import json
import pickle
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..data.manifest import manifest_for_weights, sidecar_path
from ..files import atomic_write, atomic_write_json

TARGETS = ("torchvision", "detectron2", "mmdet")
WEIGHTS = ("online", "target")
DEFAULT_WEIGHTS = "online"  # BYOL + released SoCo converters; see the module docstring
ARCHS = ("fpn", "c4")
DETECTRON2_VERSION = "v0.6"
MMDET_VERSION = "v3.3.0"
_PREFIX = {"online": "encoder.", "target": "target_encoder."}
_BN = "(weight|bias|running_mean|running_var)"
_BN_ALL = "(weight|bias|running_mean|running_var|num_batches_tracked)"

# Paper 4.2 / released Detectron2 configs (hologerry/SoCo detectron2_configs): RGB input
# normalised with the ImageNet mean/std in 0-255 (torchvision's normalisation, which SoCo
# pretrains with), stride in the 3x3 conv (torchvision ResNet), weight decay 2.5e-5.
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)
FINETUNE_WEIGHT_DECAY = 2.5e-5


class ExportError(UserError):
    """Bad input to export (no checkpoint, not a SoCo checkpoint, unknown arch); one line."""


# ---------------------------------------------------------------- the key report


@dataclass
class ModuleCount:
    """Keys of one module: ``loaded`` (exported into the detector module), ``missing`` (detector
    keys SoCo does not pretrain: the detector initialises them) or ``unused`` (checkpoint keys
    left out of the export)."""

    module: str
    loaded: int = 0
    missing: int = 0
    unused: int = 0
    note: str = ""


@dataclass
class KeyReport:
    """What one export wrote and which keys went where."""

    target: str
    arch: str
    weights: str
    checkpoint: Path
    step: int | None
    out: Path
    layout: str  # one line: what the file holds and whose names it uses
    config_out: Path | None = None
    detector: list[ModuleCount] = field(default_factory=list)  # loaded / missing per detector module
    checkpoint_unused: list[ModuleCount] = field(default_factory=list)  # per checkpoint module
    mapping: dict[str, str] = field(default_factory=dict)  # exported name -> checkpoint key
    notes: list[str] = field(default_factory=list)
    manifest_hash: str | None = None  # set_hash of the run's data manifest, if it has one
    manifest_count: int | None = None
    manifest_out: Path | None = None  # the sidecar OUT.manifest.json

    @property
    def loaded(self) -> int:
        return sum(row.loaded for row in self.detector)

    @property
    def missing(self) -> int:
        return sum(row.missing for row in self.detector)

    @property
    def unused(self) -> int:
        return sum(row.unused for row in self.checkpoint_unused)

    def format(self) -> str:
        """A small table for the console: one row per detector module, then per checkpoint module."""
        step = "" if self.step is None else f", step {self.step}"
        lines = [
            (f"exported the {self.weights} network ({_PREFIX[self.weights]}*) of {self.checkpoint} "
             f"(arch {self.arch}{step}) for {self.target}"),
            f"wrote {self.out}: {self.layout}",
        ]
        if self.config_out is not None:
            lines.append(f"wrote {self.config_out}: config for a Mask R-CNN fine-tune from these weights")
        if self.manifest_hash is not None:
            lines.append(f"wrote {self.manifest_out}: data manifest of the run, {self.manifest_count} images, "
                         f"set hash {self.manifest_hash[:12]}")
        rows = [(f"detector: {r.module}", r.loaded, r.missing, None, r.note) for r in self.detector]
        rows += [(f"checkpoint: {r.module}", None, None, r.unused, r.note) for r in self.checkpoint_unused]
        total = ("total", self.loaded, self.missing, self.unused, "")
        width = max(len(r[0]) for r in rows + [total]) + 2

        def line(name, *counts_and_note):
            *counts, note = counts_and_note
            cells = "".join(f"{'-' if c is None else c:>9}" for c in counts)
            return f"{name:<{width}}{cells}  {note}".rstrip()

        rule = "-" * (width + 27)
        lines += ["", f"{'module':<{width}}{'loaded':>9}{'missing':>9}{'unused':>9}", rule]
        lines += [line(*r) for r in rows]
        lines += [rule, line(*total), ""]
        lines.append("missing = detector keys SoCo does not pretrain (the detector initialises them); "
                     "unused = checkpoint keys not exported")
        lines += self.notes
        return "\n".join(lines)


# ---------------------------------------------------------------- reading the checkpoint


@dataclass
class EncoderWeights:
    """One network's encoder from a SoCo checkpoint: keys without the ``encoder.`` prefix."""

    state: dict[str, torch.Tensor]
    arch: str
    weights: str
    checkpoint: Path
    step: int | None
    unused: dict[str, int]  # checkpoint "model" keys not in this encoder, per top-level module


def resolve_checkpoint(source) -> Path:
    """A run folder (its ``checkpoints/last.pt``, else the latest ``step_N.pt``) or a file."""
    from ..train.checkpoint import CheckpointManager

    path = Path(source)
    if path.is_dir():
        found = CheckpointManager(path).latest()  # the one run-folder lookup (pretrain's resume too)
        if found is None:
            raise ExportError(f"{path}: no checkpoint in {path / 'checkpoints'} (expected last.pt; is it a soco "
                              "pretrain run folder?)")
        return found
    if path.is_file():
        return path
    raise ExportError(f"{path}: no such run folder or checkpoint file")


def read_encoder(source, weights: str = DEFAULT_WEIGHTS) -> EncoderWeights:
    """Load a checkpoint and take the online (``encoder.*``) or target (``target_encoder.*``) encoder.

    Raises :class:`ExportError` (one line) for a missing or unreadable file, a file that is not a
    SoCo checkpoint, an unknown ``model.arch`` or encoder keys/shapes that differ from the
    detector's (e.g. a changed ``model.head_dim``).
    """
    from ..train.checkpoint import CheckpointError, load_checkpoint

    if weights not in WEIGHTS:
        raise ExportError(f"unknown weights {weights!r} (choose online or target)")
    path = resolve_checkpoint(source)
    try:
        state = load_checkpoint(path)
    except CheckpointError as exc:  # torch's own first line is long and often misleading here
        cause = type(exc.__cause__).__name__ if exc.__cause__ is not None else "unreadable"
        raise ExportError(f"{path}: not a SoCo checkpoint (torch.load(weights_only=True) failed: {cause})") from None
    model = state.get("model") if isinstance(state, dict) else None
    if not isinstance(model, dict) or not any(str(k).startswith("encoder.") for k in model):
        raise ExportError(f"{path}: not a SoCo checkpoint (no 'model' entry with encoder.* weights)")
    arch = _arch_of(state, model, path)
    prefix = _PREFIX[weights]
    encoder = {k[len(prefix):]: v for k, v in model.items() if k.startswith(prefix)}
    if not encoder:
        raise ExportError(f"{path}: has no {weights} network ({prefix}* keys)")
    _check_encoder(encoder, arch, path, prefix)
    unused = Counter(k.split(".", 1)[0] for k in model if not k.startswith(prefix))
    step = state.get("step")
    return EncoderWeights(encoder, arch, weights, path, int(step) if isinstance(step, int) else None, dict(unused))


def _arch_of(state: dict, model: dict, path: Path) -> str:
    config = state.get("config")
    arch = None
    if isinstance(config, dict) and isinstance(config.get("model"), dict):
        arch = config["model"].get("arch")
    if arch is None:  # no config saved: tell the two apart by the box head
        arch = "fpn" if any(k.startswith("encoder.box_head.") for k in model) else "c4"
    if arch not in ARCHS:
        raise ExportError(f"{path}: unknown model.arch {arch!r} (export knows {', '.join(ARCHS)})")
    return arch


def _reference_shapes(arch: str) -> dict[str, torch.Size]:
    """Key -> shape of the encoder the detectors expect (default ModelConfig), built on 'meta'."""
    from ..config import ModelConfig
    from ..model.encoder import SoCoEncoder

    with torch.device("meta"):
        encoder = SoCoEncoder(ModelConfig(arch=arch))
    return {k: v.shape for k, v in encoder.state_dict().items()}


def _check_encoder(encoder: dict, arch: str, path: Path, prefix: str) -> None:
    reference = _reference_shapes(arch)
    absent = [k for k in reference if k not in encoder]
    extra = [k for k in encoder if k not in reference]
    if absent or extra:
        what = f"lacks {prefix}{absent[0]}" if absent else f"has unexpected {prefix}{extra[0]}"
        raise ExportError(
            f"{path}: not a SoCo {arch} checkpoint this version can export ({what}; "
            f"{len(absent)} missing, {len(extra)} unexpected keys)"
        )
    for key, shape in reference.items():
        if encoder[key].shape != shape:
            raise ExportError(
                f"{path}: {prefix}{key} has shape {tuple(encoder[key].shape)}, the detector's is {tuple(shape)} "
                "(only the Mask R-CNN sizes export: model.head_dim=1024, model.roi_size=7)"
            )


# ---------------------------------------------------------------- name mapping

# Each mapper takes an encoder key (torchvision names) and returns (exported name, detector
# module) or None for a key the target does not take.
Mapper = Callable[[str], "tuple[str, str] | None"]


def _d2_resnet(key: str) -> str | None:
    """torchvision ResNet key -> Detectron2 ResNet key (stem, resN.i.convK(.norm), shortcut)."""
    if key.endswith("num_batches_tracked"):
        return None
    if key == "conv1.weight":
        return "stem.conv1.weight"
    if m := re.fullmatch(rf"bn1\.{_BN}", key):
        return f"stem.conv1.norm.{m[1]}"
    m = re.fullmatch(r"layer([1-4])\.(\d+)\.(.+)", key)
    if m is None:
        return None
    block, rest = f"res{int(m[1]) + 1}.{m[2]}", m[3]
    if c := re.fullmatch(r"conv([1-3])\.weight", rest):
        return f"{block}.conv{c[1]}.weight"
    if c := re.fullmatch(rf"bn([1-3])\.{_BN}", rest):
        return f"{block}.conv{c[1]}.norm.{c[2]}"
    if rest == "downsample.0.weight":
        return f"{block}.shortcut.weight"
    if c := re.fullmatch(rf"downsample\.1\.{_BN}", rest):
        return f"{block}.shortcut.norm.{c[1]}"
    return None


def _torchvision_fpn(key: str):
    if key.startswith("backbone.body."):
        return key, "backbone.body"
    if key.startswith("backbone.fpn."):
        return key, "backbone.fpn"
    if key.startswith("box_head."):
        return f"roi_heads.{key}", "roi_heads.box_head"
    return None


def _torchvision_c4(key: str):
    if key.startswith("backbone."):
        return key[len("backbone."):], "resnet50"
    return None


def _detectron2_fpn(key: str):
    if key.startswith("backbone.body."):
        name = _d2_resnet(key[len("backbone.body."):])
        return None if name is None else (f"backbone.bottom_up.{name}", "backbone.bottom_up")
    # torchvision FPN: inner_blocks[i] (1x1 lateral) and layer_blocks[i] (3x3 output) act on
    # C(i+2) -> P(i+2); Detectron2 names them by that stage: fpn_lateral{i+2}, fpn_output{i+2}.
    if m := re.fullmatch(rf"backbone\.fpn\.(inner|layer)_blocks\.([0-3])\.(?:0\.weight|1\.{_BN})", key):
        kind = "lateral" if m[1] == "inner" else "output"
        name = f"backbone.fpn_{kind}{int(m[2]) + 2}"
        return (f"{name}.weight" if m[3] is None else f"{name}.norm.{m[3]}"), "backbone.fpn_lateral/output"
    if m := re.fullmatch(rf"box_head\.([0-3])\.(?:0\.weight|1\.{_BN})", key):
        name = f"roi_heads.box_head.conv{int(m[1]) + 1}"
        return (f"{name}.weight" if m[2] is None else f"{name}.norm.{m[2]}"), "roi_heads.box_head"
    if m := re.fullmatch(r"box_head\.5\.(weight|bias)", key):  # the fc after Flatten (index 4)
        return f"roi_heads.box_head.fc1.{m[1]}", "roi_heads.box_head"
    return None


def _detectron2_c4(key: str):
    if not key.startswith("backbone."):
        return None
    name = _d2_resnet(key[len("backbone."):])
    if name is None:
        return None
    if name.startswith("res5."):  # Res5ROIHeads owns res5
        return f"roi_heads.{name}", "roi_heads.res5"
    return f"backbone.{name}", "backbone"


def _mmdet_fpn(key: str):
    if key.startswith("backbone.body."):  # mmdet ResNet: conv1, bn1, layerN.i.convK/bnK/downsample.{0,1}
        return f"backbone.{key[len('backbone.body.'):]}", "backbone"
    if m := re.fullmatch(rf"backbone\.fpn\.(inner|layer)_blocks\.([0-3])\.(?:0\.weight|1\.{_BN_ALL})", key):
        kind = "lateral_convs" if m[1] == "inner" else "fpn_convs"
        name = f"neck.{kind}.{m[2]}"  # ConvModule: .conv, .bn
        return (f"{name}.conv.weight" if m[3] is None else f"{name}.bn.{m[3]}"), "neck"
    if m := re.fullmatch(rf"box_head\.([0-3])\.(?:0\.weight|1\.{_BN_ALL})", key):
        name = f"roi_head.bbox_head.shared_convs.{m[1]}"
        return (f"{name}.conv.weight" if m[2] is None else f"{name}.bn.{m[2]}"), "roi_head.bbox_head"
    if m := re.fullmatch(r"box_head\.5\.(weight|bias)", key):
        return f"roi_head.bbox_head.shared_fcs.0.{m[1]}", "roi_head.bbox_head"
    return None


def _mmdet_c4(key: str):
    if key.startswith("backbone.layer4."):  # mmdet ResLayer(stage=3) registers it as layer4
        return f"roi_head.shared_head.{key[len('backbone.'):]}", "roi_head.shared_head"
    if key.startswith("backbone."):
        return key, "backbone"
    return None


_MAPPERS: dict[tuple[str, str], Mapper] = {
    ("torchvision", "fpn"): _torchvision_fpn,
    ("torchvision", "c4"): _torchvision_c4,
    ("detectron2", "fpn"): _detectron2_fpn,
    ("detectron2", "c4"): _detectron2_c4,
    ("mmdet", "fpn"): _mmdet_fpn,
    ("mmdet", "c4"): _mmdet_c4,
}


def convert(encoder: dict[str, torch.Tensor], arch: str, to: str):
    """Rename an encoder state dict for ``to``.

    Returns ``(state, mapping, groups, dropped)``: the renamed tensors (same objects), exported
    name -> encoder key, exported name -> detector module, and the encoder keys left out.
    """
    if to not in TARGETS:
        raise ExportError(f"unknown target {to!r} (choose {', '.join(TARGETS)})")
    if arch not in ARCHS:
        raise ExportError(f"unknown model.arch {arch!r} (export knows {', '.join(ARCHS)})")
    mapper = _MAPPERS[(to, arch)]
    state, mapping, groups, dropped = {}, {}, {}, []
    for key, tensor in encoder.items():
        found = mapper(key)
        if found is None:
            dropped.append(key)
            continue
        name, group = found
        if name in state:  # a mapping bug, never the user's input
            raise RuntimeError(f"two keys export to {name}: {mapping[name]} and {key}")
        state[name], mapping[name], groups[name] = tensor, key, group
    return state, mapping, groups, dropped


# ---------------------------------------------------------------- what the detector adds

# Keys of the detector SoCo does not pretrain, per module, for the configs written here.
# Detectron2 v0.6 (modeling/proposal_generator/rpn.py StandardRPNHead: conv, objectness_logits,
# anchor_deltas; roi_heads/fast_rcnn.py FastRCNNOutputLayers: cls_score, bbox_pred;
# roi_heads/mask_head.py MaskRCNNConvUpsampleHead: mask_fcn1..4 with norm (FPN, NUM_CONV 4) or
# none (C4, NUM_CONV 0), deconv, predictor); norms counted without num_batches_tracked.
# MMDetection v3.3.0 (dense_heads/rpn_head.py: rpn_conv, rpn_cls, rpn_reg; bbox_heads/bbox_head.py:
# fc_cls, fc_reg; mask_heads/fcn_mask_head.py: convs.0..3 ConvModule with bn (FPN) or none (C4),
# upsample, conv_logits).
_NOT_PRETRAINED = {
    ("detectron2", "fpn"): {"proposal_generator.rpn_head": 6, "roi_heads.box_predictor": 4,
                            "roi_heads.mask_head": 4 * 5 + 4},
    ("detectron2", "c4"): {"proposal_generator.rpn_head": 6, "roi_heads.box_predictor": 4,
                           "roi_heads.mask_head": 4},
    ("mmdet", "fpn"): {"rpn_head": 6, "roi_head.bbox_head": 4, "roi_head.mask_head": 4 * 6 + 4},
    ("mmdet", "c4"): {"rpn_head": 6, "roi_head.bbox_head": 4, "roi_head.mask_head": 4},
}


def _torchvision_missing(arch: str, exported: set[str]) -> dict[str, int]:
    """Keys of the real torchvision model that the export does not hold, per module."""
    from torchvision.models import resnet50
    from torchvision.models.detection import maskrcnn_resnet50_fpn_v2

    with torch.device("meta"):  # names and shapes only: no memory, no init cost
        if arch == "fpn":
            model = maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None)
        else:
            model = resnet50(weights=None)
    keys = model.state_dict()
    unexpected = sorted(exported - set(keys))
    if unexpected:  # a mapping bug, never the user's input
        raise RuntimeError(f"torchvision export has keys the model lacks: {unexpected[:3]}")
    missing = Counter()
    for key in keys:
        if key not in exported:
            parts = key.split(".")
            missing[".".join(parts[:2]) if parts[0] == "roi_heads" else parts[0]] += 1
    return dict(missing)


# ---------------------------------------------------------------- writing files


def _write_text(path: Path, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def _default_config_path(out: Path, suffix: str) -> Path:
    candidate = out.with_suffix(suffix)
    return candidate if candidate != out else out.with_name(out.name + suffix)


def _d2_config(arch: str, weights_path: Path, source: EncoderWeights) -> str:
    """A self-contained Detectron2 v0.6 config (Base-RCNN-FPN/C4 settings inlined)."""
    head = f"""\
# Detectron2 {DETECTRON2_VERSION} config: Mask R-CNN R50-{arch.upper()}, COCO 1x, fine-tuned from SoCo
# weights ({source.weights} network of {source.checkpoint}). Written by `soco export`.
# The released SoCo fine-tune settings (hologerry/SoCo detectron2_configs/R_50_FPN_1x.yaml,
# SoCo_*.yaml) and paper section 4.2: SyncBN in every layer including the new ones, nothing
# frozen, RGB input with the ImageNet mean/std in 0-255 (SoCo pretrains on torchvision-normalised
# RGB), stride in the 3x3 conv (torchvision ResNet), SGD lr 0.02 at batch 16 with 1000 warm-up
# iterations, x0.1 at 2/3 and 8/9 of training, weight decay 2.5e-5.
# Self-contained (the Base-RCNN-{arch.upper()}.yaml settings are inlined), e.g.
#   python tools/train_net.py --config-file THIS.yaml --num-gpus 8
# 2x schedule: SOLVER.STEPS (120000, 160000) SOLVER.MAX_ITER 180000.
"""
    common_model = f"""\
  WEIGHTS: {json.dumps(str(weights_path))}
  MASK_ON: True
  PIXEL_MEAN: [{", ".join(map(str, PIXEL_MEAN))}]
  PIXEL_STD: [{", ".join(map(str, PIXEL_STD))}]
"""
    if arch == "fpn":
        model = f"""\
MODEL:
  META_ARCHITECTURE: "GeneralizedRCNN"
{common_model}  BACKBONE:
    NAME: "build_resnet_fpn_backbone"
    FREEZE_AT: 0
  RESNETS:
    DEPTH: 50
    OUT_FEATURES: ["res2", "res3", "res4", "res5"]
    NORM: "SyncBN"
    STRIDE_IN_1X1: False
  FPN:
    IN_FEATURES: ["res2", "res3", "res4", "res5"]
    NORM: "SyncBN"
  ANCHOR_GENERATOR:
    SIZES: [[32], [64], [128], [256], [512]]
    ASPECT_RATIOS: [[0.5, 1.0, 2.0]]
  RPN:
    IN_FEATURES: ["p2", "p3", "p4", "p5", "p6"]
    PRE_NMS_TOPK_TRAIN: 2000
    PRE_NMS_TOPK_TEST: 1000
    POST_NMS_TOPK_TRAIN: 1000
    POST_NMS_TOPK_TEST: 1000
  ROI_HEADS:
    NAME: "StandardROIHeads"
    IN_FEATURES: ["p2", "p3", "p4", "p5"]
  ROI_BOX_HEAD:
    NAME: "FastRCNNConvFCHead"
    NUM_CONV: 4
    NUM_FC: 1
    NORM: "SyncBN"
    POOLER_RESOLUTION: 7
  ROI_MASK_HEAD:
    NAME: "MaskRCNNConvUpsampleHead"
    NUM_CONV: 4
    NORM: "SyncBN"
    POOLER_RESOLUTION: 14
"""
    else:
        model = f"""\
MODEL:
  META_ARCHITECTURE: "GeneralizedRCNN"
{common_model}  BACKBONE:
    NAME: "build_resnet_backbone"
    FREEZE_AT: 0
  RESNETS:
    DEPTH: 50
    OUT_FEATURES: ["res4"]
    NORM: "SyncBN"
    STRIDE_IN_1X1: False
  RPN:
    PRE_NMS_TOPK_TEST: 6000
    POST_NMS_TOPK_TEST: 1000
  ROI_HEADS:
    NAME: "Res5ROIHeads"
  ROI_MASK_HEAD:
    NORM: "SyncBN"
"""
    rest = f"""\
INPUT:
  FORMAT: "RGB"
  MIN_SIZE_TRAIN: (640, 672, 704, 736, 768, 800)
DATASETS:
  TRAIN: ("coco_2017_train",)
  TEST: ("coco_2017_val",)
SOLVER:
  IMS_PER_BATCH: 16
  BASE_LR: 0.02
  WEIGHT_DECAY: {FINETUNE_WEIGHT_DECAY:.6f}
  WARMUP_ITERS: 1000
  STEPS: (60000, 80000)
  MAX_ITER: 90000
TEST:
  PRECISE_BN:
    ENABLED: True
VERSION: 2
"""
    return head + model + rest


def _mmdet_config(arch: str, weights_path: Path, source: EncoderWeights) -> str:
    """An MMDetection 3.x config inheriting the model zoo's Mask R-CNN R50-FPN or R50-C4 1x."""
    mean = ", ".join(map(str, PIXEL_MEAN))
    std = ", ".join(map(str, PIXEL_STD))
    head = f"""\
# MMDetection 3.x config (names of MMDetection {MMDET_VERSION}): Mask R-CNN R50-{arch.upper()}, COCO 1x,
# fine-tuned from SoCo weights ({source.weights} network of {source.checkpoint}). Written by `soco export`.
# The released SoCo fine-tune settings (its Detectron2 configs) and paper section 4.2: SyncBN in
# every layer including the new ones, nothing frozen, RGB input with the ImageNet mean/std,
# pytorch-style ResNet (stride in the 3x3 conv), weight decay 2.5e-5.
# The model-level init_cfg loads the whole export (backbone + neck + box head) after every
# module's own init; rpn_head, fc_cls/fc_reg and mask_head keep theirs.
#   python tools/train.py THIS.py        or   bash tools/dist_train.sh THIS.py 8
"""
    if arch == "fpn":
        body = f"""\
_base_ = 'mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py'

checkpoint = {str(weights_path)!r}
norm_cfg = dict(type='SyncBN', requires_grad=True)
model = dict(
    init_cfg=dict(type='Pretrained', checkpoint=checkpoint),
    data_preprocessor=dict(mean=[{mean}], std=[{std}], bgr_to_rgb=True),
    backbone=dict(frozen_stages=-1, norm_cfg=norm_cfg, norm_eval=False, style='pytorch', init_cfg=None),
    neck=dict(norm_cfg=norm_cfg),
    roi_head=dict(
        bbox_head=dict(type='Shared4Conv1FCBBoxHead', conv_out_channels=256, fc_out_channels=1024,
                       norm_cfg=norm_cfg),
        mask_head=dict(norm_cfg=norm_cfg)))
"""
    else:
        body = f"""\
_base_ = 'mmdet::mask_rcnn/mask-rcnn_r50-caffe-c4_1x_coco.py'

checkpoint = {str(weights_path)!r}
norm_cfg = dict(type='SyncBN', requires_grad=True)
model = dict(
    init_cfg=dict(type='Pretrained', checkpoint=checkpoint),
    data_preprocessor=dict(mean=[{mean}], std=[{std}], bgr_to_rgb=True),
    backbone=dict(frozen_stages=-1, norm_cfg=norm_cfg, norm_eval=False, style='pytorch', init_cfg=None),
    roi_head=dict(
        shared_head=dict(norm_cfg=norm_cfg, norm_eval=False, style='pytorch')))
"""
    tail = f"""\
optim_wrapper = dict(optimizer=dict(lr=0.02, weight_decay={FINETUNE_WEIGHT_DECAY}))
"""
    return head + body + tail


# ---------------------------------------------------------------- export


def export(
    source,
    to: str,
    weights: str = DEFAULT_WEIGHTS,
    out=None,
    config_out=None,
) -> KeyReport:
    """Export a SoCo run folder or checkpoint to ``out`` for ``to`` (torchvision, detectron2, mmdet).

    ``weights``: ``online`` (default; BYOL and the released converters) or ``target`` (EMA).
    ``config_out`` (detectron2: ``out`` with ``.yaml``; mmdet: ``.py``; torchvision: none) is a
    ready fine-tune config pointing at ``out``. Returns the :class:`KeyReport`.
    """
    if to not in TARGETS:
        raise ExportError(f"unknown target {to!r} (choose {', '.join(TARGETS)})")
    if out is None:
        raise ExportError("no output file given")
    out = Path(out)
    if out.is_dir():
        raise ExportError(f"{out}: is a directory (give a file name, e.g. {out / 'soco.pth'})")
    if config_out is not None and to == "torchvision":
        raise ExportError("a config file is written for detectron2 and mmdet only")
    if config_out is not None and Path(config_out).resolve() == out.resolve():
        raise ExportError(f"{out}: the config file cannot be the weights file")
    source_weights = read_encoder(source, weights)
    arch = source_weights.arch
    found = manifest_for_weights(source_weights.checkpoint)  # the run's data manifest, if any
    manifest = found[1] if found is not None else None
    stamp = {} if manifest is None else {"data_manifest_hash": manifest.get("set_hash"),
                                         "data_manifest_count": manifest.get("count")}
    state, mapping, groups, dropped = convert(source_weights.state, arch, to)
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}

    notes: list[str] = []
    if to == "torchvision":
        missing = _torchvision_missing(arch, set(state))
        atomic_write(out, lambda f: torch.save(state, f))
        if arch == "fpn":
            layout = ("state dict for torchvision maskrcnn_resnet50_fpn_v2 "
                      "(load_state_dict(..., strict=False))")
        else:
            layout = ("state dict of torchvision resnet50 keys (conv1, bn1, layer1-4; no fc): the C4 "
                      "backbone, res5 included (load into torchvision.models.resnet50 with strict=False)")
        config_path = None
    elif to == "detectron2":
        missing = dict(_NOT_PRETRAINED[(to, arch)])
        payload = {
            "model": {k: v.numpy() for k, v in state.items()},
            "__author__": "soco-pretrain",
            "matching_heuristics": True,
            **stamp,
        }
        atomic_write(out, lambda f: pickle.dump(payload, f, protocol=pickle.HIGHEST_PROTOCOL))
        layout = (f"Detectron2 pickle, names of Detectron2 {DETECTRON2_VERSION} Mask R-CNN R50-{arch.upper()} "
                  "(load with MODEL.WEIGHTS)")
        config_path = Path(config_out) if config_out is not None else _default_config_path(out, ".yaml")
        _write_text(config_path, _d2_config(arch, out.resolve(), source_weights))
        notes.append("num_batches_tracked is left out (Detectron2 checkpoints carry none; "
                     "Detectron2 may list it as missing: harmless)")
    else:
        missing = dict(_NOT_PRETRAINED[(to, arch)])
        meta = {
            "author": "soco-pretrain",
            "source": str(source_weights.checkpoint),
            "weights": weights,
            "arch": arch,
            "step": source_weights.step,
            "naming": f"MMDetection {MMDET_VERSION}",
            **stamp,
        }
        atomic_write(out, lambda f: torch.save({"state_dict": state, "meta": meta}, f))
        layout = (f"MMDetection checkpoint {{'state_dict', 'meta'}}, names of MMDetection {MMDET_VERSION} "
                  f"Mask R-CNN R50-{arch.upper()}")
        config_path = Path(config_out) if config_out is not None else _default_config_path(out, ".py")
        _write_text(config_path, _mmdet_config(arch, out.resolve(), source_weights))

    # The manifest beside every target (a torchvision state dict has no room for it): the leak
    # guard of finetune/knn finds it there; a stale one from an earlier export is removed.
    manifest_out = sidecar_path(out)
    if manifest is not None:
        atomic_write_json(manifest_out, manifest)
    else:
        manifest_out.unlink(missing_ok=True)

    loaded = Counter(groups.values())
    detector = [ModuleCount(module, loaded=n) for module, n in loaded.items()]
    known = {row.module: row for row in detector}
    for module, n in missing.items():
        if module in known:
            known[module].missing = n
        else:
            detector.append(ModuleCount(module, missing=n))
    unused_rows = []
    if dropped:
        kinds = sorted({k.rsplit(".", 1)[-1] for k in dropped})
        unused_rows.append(ModuleCount(_PREFIX[weights].rstrip("."), unused=len(dropped), note=", ".join(kinds)))
    for module, n in sorted(source_weights.unused.items()):
        unused_rows.append(ModuleCount(module, unused=n))
    return KeyReport(
        target=to,
        arch=arch,
        weights=weights,
        checkpoint=source_weights.checkpoint,
        step=source_weights.step,
        out=out,
        layout=layout,
        config_out=config_path,
        detector=detector,
        checkpoint_unused=unused_rows,
        mapping=mapping,
        notes=notes,
        manifest_hash=None if manifest is None else manifest.get("set_hash"),
        manifest_count=None if manifest is None else manifest.get("count"),
        manifest_out=manifest_out if manifest is not None else None,
    )
