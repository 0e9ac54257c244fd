"""torchvision: a plain state dict, Mask R-CNN v2 names (fpn) or the ResNet's own names (c4).

``SoCoEncoder`` is built from torchvision's own modules (model/encoder.py), so the FPN names are
the detector's as they are (``backbone.*``; the box head under ``roi_heads.``): those of
``maskrcnn_resnet50_fpn_v2`` for ResNet-50 and of the same layout around any other backbone
(``transfer.detector.build_detector(..., backbone=NAME)``); the names do not depend on the
backbone beyond its ResNet body. The C4 encoder's ``backbone.*`` is ``torchvision.models.NAME``
without ``fc``. Every backbone/arch pair the config allows exports.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch

from ...files import atomic_write
from ...model.backbones import backbone_info, build_resnet
from ...weights.keymaps import torchvision_c4, torchvision_fpn
from ..detector import build_detector
from .common import Exporter, Written


def missing_keys(arch: str, exported: set[str], backbone: str = "resnet50") -> dict[str, int]:
    """Keys of the real torchvision model (Mask R-CNN v2 around ``backbone``, or the bare
    ``backbone`` for c4) that the export does not hold, per module."""
    with torch.device("meta"):  # names and shapes only: no memory, no init cost
        model = build_detector(91, backbone=backbone) if arch == "fpn" else build_resnet(backbone)
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


class TorchvisionExporter(Exporter):
    name = "torchvision"
    mappers = {"fpn": torchvision_fpn, "c4": torchvision_c4}  # weights/keymaps.py
    config_suffix = None  # torchvision has no config files

    def write(self, state: dict, source, out: Path, config_out: Path | None, stamp: dict) -> Written:
        missing = missing_keys(source.arch, set(state), source.backbone)
        atomic_write(out, lambda f: torch.save(state, f))  # a plain state dict: no room for the stamp
        return Written(layout(source.arch, source.backbone), missing)


def layout(arch: str, backbone: str) -> str:
    """The report's one-line description of a torchvision export of ``backbone`` in ``arch``."""
    if arch == "c4":
        return (
            f"state dict of torchvision {backbone} keys (conv1, bn1, layer1-4; no fc): the C4 "
            f"backbone, res5 included (load into torchvision.models.{backbone} with strict=False)"
        )
    build = (
        "maskrcnn_resnet50_fpn_v2"
        if backbone == "resnet50"
        else f"soco_pretrain.transfer.detector.build_detector(N, backbone={backbone!r})"
    )
    label = backbone_info(backbone).label
    return f"state dict for torchvision Mask R-CNN v2 {label}-FPN ({build}; load_state_dict(..., strict=False))"
