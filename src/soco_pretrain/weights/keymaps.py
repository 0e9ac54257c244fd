"""Key maps between the names soco's weights go by: SoCo encoder keys, torchvision detector keys
and the names of each export target (torchvision, Detectron2, MMDetection, a bare ResNet).

A *mapper* takes an encoder key (``SoCoEncoder`` names = torchvision's) and returns (exported
name, detector module) or None for a key the target does not take. ``soco export`` renames with
them (``transfer/export``); the reader inverts the Detectron2 and MMDetection ones
(:func:`inverse`) to read such files back. The names follow the libraries' own sources:

- Detectron2 v0.6: modeling/backbone/resnet.py (``stem.conv1``, ``res2..res5``, BottleneckBlock
  ``conv1..3`` / BasicBlock ``conv1..2`` with ``shortcut``, every conv with ``.norm``),
  backbone/fpn.py (``fpn_lateral{s}`` / ``fpn_output{s}`` on stage s = 2..5),
  roi_heads/box_head.py (FastRCNNConvFCHead ``conv1..4``, ``fc1``), roi_heads/roi_heads.py
  (Res5ROIHeads owns ``res5``). Norms carry no ``num_batches_tracked``.
- MMDetection v3.3.0: backbones/resnet.py (torchvision's ResNet keys), necks/fpn.py
  (``lateral_convs.i`` / ``fpn_convs.i`` ConvModules ``.conv`` + ``.bn``),
  bbox_heads/convfc_bbox_head.py (``shared_convs.0..3``, ``shared_fcs.0``),
  shared_heads/res_layer.py (ResLayer(stage=3) registers ``layer4``).
- torchvision: ``maskrcnn_resnet50_fpn_v2`` names (fpn), ``torchvision.models.<backbone>`` (c4
  and the bare ResNet).
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

from ..config import ModelConfig

ARCHS = ("fpn", "c4")  # SoCoEncoder's model.arch values (model/encoder.py)
NETWORKS = ("online", "target")
PREFIXES = {"online": "encoder.", "target": "target_encoder."}  # SoCoModel attribute names
BN = "(weight|bias|running_mean|running_var)"  # BatchNorm keys without num_batches_tracked
BN_ALL = "(weight|bias|running_mean|running_var|num_batches_tracked)"

Mapper = Callable[[str], "tuple[str, str] | None"]


# ---------------------------------------------------------------- encoder <-> detector keys


def encoder_key_to_detector(key: str, arch: str) -> str | None:
    """A SoCo encoder key -> detector key (FPN: backbone.* as is, box_head.* ->
    roi_heads.box_head.*; C4: backbone.X -> backbone.body.X, fc dropped)."""
    if arch == "fpn":
        if key.startswith("backbone."):
            return key
        return "roi_heads." + key if key.startswith("box_head.") else None
    if key.startswith("backbone.") and not key.startswith("backbone.fc."):
        return "backbone.body." + key[len("backbone.") :]
    return None


def detector_key_to_encoder(key: str, arch: str) -> str | None:
    """A detector key -> SoCo encoder key of ``arch`` (the inverse of
    :func:`encoder_key_to_detector`); None for keys the encoder has no place for."""
    if arch == "fpn":
        if key.startswith(("backbone.body.", "backbone.fpn.")):
            return key
        return key[len("roi_heads.") :] if key.startswith("roi_heads.box_head.") else None
    return "backbone." + key[len("backbone.body.") :] if key.startswith("backbone.body.") else None


def detector_key_to_resnet(key: str) -> str | None:
    """A detector key -> ``torchvision.models.<backbone>`` key (the body: backbone.body.X -> X)."""
    return key[len("backbone.body.") :] if key.startswith("backbone.body.") else None


def encoder_to_detector(encoder: dict, arch: str) -> dict:
    """A SoCo encoder state dict -> detector keys (:func:`encoder_key_to_detector`)."""
    return {k: v for k, v in ((encoder_key_to_detector(key, arch), v) for key, v in encoder.items()) if k is not None}


def detector_to_encoder(state: dict, arch: str) -> dict:
    """Detector keys -> SoCo encoder keys of ``arch``; keys the encoder has no place for are left out."""
    return {k: v for k, v in ((detector_key_to_encoder(key, arch), v) for key, v in state.items()) if k is not None}


def encoder_modules(arch: str) -> tuple[str, ...]:
    """The SoCo encoder's module groups of a load report, the ResNet body first."""
    return ("backbone.body", "backbone.fpn", "box_head") if arch == "fpn" else ("backbone",)


# ---------------------------------------------------------------- export targets


def torchvision_fpn(key: str):
    if key.startswith("backbone.body."):
        return key, "backbone.body"
    if key.startswith("backbone.fpn."):
        return key, "backbone.fpn"
    if key.startswith("box_head."):
        return f"roi_heads.{key}", "roi_heads.box_head"
    return None


def torchvision_c4(key: str):
    if key.startswith("backbone."):
        return key[len("backbone.") :], "resnet"
    return None


RESNET_GROUP = "resnet"  # the report's module name of a bare exported ResNet


def resnet_fpn(key: str):
    if key.startswith("backbone.body."):
        return key[len("backbone.body.") :], RESNET_GROUP
    return None  # the FPN and the box head have no place in a ResNet


def resnet_c4(key: str):
    if key.startswith("backbone."):
        return key[len("backbone.") :], RESNET_GROUP
    return None


def _detectron2_resnet(key: str) -> str | None:
    """torchvision ResNet key -> Detectron2 ResNet key (stem, resN.i.convK(.norm), shortcut)."""
    if key.endswith("num_batches_tracked"):
        return None
    if key == "conv1.weight":
        return "stem.conv1.weight"
    if m := re.fullmatch(rf"bn1\.{BN}", key):
        return f"stem.conv1.norm.{m[1]}"
    m = re.fullmatch(r"layer([1-4])\.(\d+)\.(.+)", key)
    if m is None:
        return None
    block, rest = f"res{int(m[1]) + 1}.{m[2]}", m[3]
    if c := re.fullmatch(r"conv([1-3])\.weight", rest):
        return f"{block}.conv{c[1]}.weight"
    if c := re.fullmatch(rf"bn([1-3])\.{BN}", rest):
        return f"{block}.conv{c[1]}.norm.{c[2]}"
    if rest == "downsample.0.weight":
        return f"{block}.shortcut.weight"
    if c := re.fullmatch(rf"downsample\.1\.{BN}", rest):
        return f"{block}.shortcut.norm.{c[1]}"
    return None


def detectron2_fpn(key: str):
    if key.startswith("backbone.body."):
        name = _detectron2_resnet(key[len("backbone.body.") :])
        return None if name is None else (f"backbone.bottom_up.{name}", "backbone.bottom_up")
    # torchvision FPN: inner_blocks[i] (1x1 lateral) and layer_blocks[i] (3x3 output) act on
    # C(i+2) -> P(i+2); Detectron2 names them by that stage: fpn_lateral{i+2}, fpn_output{i+2}.
    if m := re.fullmatch(rf"backbone\.fpn\.(inner|layer)_blocks\.([0-3])\.(?:0\.weight|1\.{BN})", key):
        kind = "lateral" if m[1] == "inner" else "output"
        name = f"backbone.fpn_{kind}{int(m[2]) + 2}"
        return (f"{name}.weight" if m[3] is None else f"{name}.norm.{m[3]}"), "backbone.fpn_lateral/output"
    if m := re.fullmatch(rf"box_head\.([0-3])\.(?:0\.weight|1\.{BN})", key):
        name = f"roi_heads.box_head.conv{int(m[1]) + 1}"
        return (f"{name}.weight" if m[2] is None else f"{name}.norm.{m[2]}"), "roi_heads.box_head"
    if m := re.fullmatch(r"box_head\.5\.(weight|bias)", key):  # the fc after Flatten (index 4)
        return f"roi_heads.box_head.fc1.{m[1]}", "roi_heads.box_head"
    return None


def detectron2_c4(key: str):
    if not key.startswith("backbone."):
        return None
    name = _detectron2_resnet(key[len("backbone.") :])
    if name is None:
        return None
    if name.startswith("res5."):  # Res5ROIHeads owns res5
        return f"roi_heads.{name}", "roi_heads.res5"
    return f"backbone.{name}", "backbone"


def mmdet_fpn(key: str):
    if key.startswith("backbone.body."):  # mmdet ResNet: conv1, bn1, layerN.i.convK/bnK/downsample.{0,1}
        return f"backbone.{key[len('backbone.body.') :]}", "backbone"
    if m := re.fullmatch(rf"backbone\.fpn\.(inner|layer)_blocks\.([0-3])\.(?:0\.weight|1\.{BN_ALL})", key):
        kind = "lateral_convs" if m[1] == "inner" else "fpn_convs"
        name = f"neck.{kind}.{m[2]}"  # ConvModule: .conv, .bn
        return (f"{name}.conv.weight" if m[3] is None else f"{name}.bn.{m[3]}"), "neck"
    if m := re.fullmatch(rf"box_head\.([0-3])\.(?:0\.weight|1\.{BN_ALL})", key):
        name = f"roi_head.bbox_head.shared_convs.{m[1]}"
        return (f"{name}.conv.weight" if m[2] is None else f"{name}.bn.{m[2]}"), "roi_head.bbox_head"
    if m := re.fullmatch(r"box_head\.5\.(weight|bias)", key):
        return f"roi_head.bbox_head.shared_fcs.0.{m[1]}", "roi_head.bbox_head"
    return None


def mmdet_c4(key: str):
    if key.startswith("backbone.layer4."):  # mmdet ResLayer(stage=3) registers it as layer4
        return f"roi_head.shared_head.{key[len('backbone.') :]}", "roi_head.shared_head"
    if key.startswith("backbone."):
        return key, "backbone"
    return None


MAPPERS: dict[str, dict[str, Mapper]] = {
    "torchvision": {"fpn": torchvision_fpn, "c4": torchvision_c4},
    "detectron2": {"fpn": detectron2_fpn, "c4": detectron2_c4},
    "mmdet": {"fpn": mmdet_fpn, "c4": mmdet_c4},
    "torchvision-backbone": {"fpn": resnet_fpn, "c4": resnet_c4},
}


# ---------------------------------------------------------------- reading exported names back


def _resnet_keys(max_blocks: int = 64) -> list[str]:
    """Every torchvision ResNet/ResNeXt key up to ``max_blocks`` blocks per stage (152 has 36)."""
    norm = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    keys = ["conv1.weight"] + [f"bn1.{n}" for n in norm]
    for layer in range(1, 5):
        for block in range(max_blocks):
            p = f"layer{layer}.{block}."
            for i in (1, 2, 3):
                keys += [f"{p}conv{i}.weight"] + [f"{p}bn{i}.{n}" for n in norm]
            keys += [f"{p}downsample.0.weight"] + [f"{p}downsample.1.{n}" for n in norm]
    return keys


_INVERSES: dict = {}


def inverse(target: str, arch: str) -> dict[str, str]:
    """Exported name -> encoder key of ``soco export --to target`` for ``arch`` (any backbone)."""
    if (target, arch) not in _INVERSES:
        # here, not at the top: model/ imports torchvision (~1 s); reading weights needs no model
        from ..model.encoder import SoCoEncoder

        body = _resnet_keys()
        if arch == "fpn":
            with torch.device("meta"):  # the FPN and box-head keys do not depend on the backbone
                heads = [
                    k for k in SoCoEncoder(ModelConfig(arch="fpn")).state_dict() if not k.startswith("backbone.body.")
                ]
            candidates = [f"backbone.body.{k}" for k in body] + heads
        else:
            candidates = [f"backbone.{k}" for k in body]
        mapper = MAPPERS[target][arch]
        found = {}
        for key in candidates:
            mapped = mapper(key)
            if mapped is not None:
                found[mapped[0]] = key
        _INVERSES[(target, arch)] = found
    return _INVERSES[(target, arch)]


def from_exported(state: dict, target: str) -> tuple[dict, str]:
    """A state dict in ``target``'s names (detectron2, mmdet) -> (detector keys, arch); the arch
    whose names cover more of the file wins (Detectron2/MMDetection FPN and C4 name the ResNet apart)."""
    best: tuple[int, str, dict] | None = None
    for arch in ARCHS:
        names = inverse(target, arch)
        hits = sum(k in names for k in state)
        if best is None or hits > best[0]:
            best = (hits, arch, names)
    assert best is not None
    _, arch, names = best
    encoder = {names[k]: v for k, v in state.items() if k in names}
    return encoder_to_detector(encoder, arch), arch
