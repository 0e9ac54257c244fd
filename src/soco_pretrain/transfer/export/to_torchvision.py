"""torchvision: a plain state dict, ``maskrcnn_resnet50_fpn_v2`` names (fpn) or ``resnet50`` names (c4).

``SoCoEncoder`` is built from torchvision's own modules (model/encoder.py), so the FPN names are
the detector's as they are (``backbone.*``; the box head under ``roi_heads.``); the C4 encoder's
``backbone.*`` is a ResNet-50 without ``fc``.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch

from ...files import atomic_write
from .common import Exporter, Written


def _fpn(key: str):
    if key.startswith("backbone.body."):
        return key, "backbone.body"
    if key.startswith("backbone.fpn."):
        return key, "backbone.fpn"
    if key.startswith("box_head."):
        return f"roi_heads.{key}", "roi_heads.box_head"
    return None


def _c4(key: str):
    if key.startswith("backbone."):
        return key[len("backbone.") :], "resnet50"
    return None


def missing_keys(arch: str, exported: set[str]) -> dict[str, int]:
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


class TorchvisionExporter(Exporter):
    name = "torchvision"
    mappers = {"fpn": _fpn, "c4": _c4}
    config_suffix = None  # torchvision has no config files

    def write(self, state: dict, source, out: Path, config_out: Path | None, stamp: dict) -> Written:
        missing = missing_keys(source.arch, set(state))
        atomic_write(out, lambda f: torch.save(state, f))  # a plain state dict: no room for the stamp
        if source.arch == "fpn":
            layout = "state dict for torchvision maskrcnn_resnet50_fpn_v2 (load_state_dict(..., strict=False))"
        else:
            layout = (
                "state dict of torchvision resnet50 keys (conv1, bn1, layer1-4; no fc): the C4 "
                "backbone, res5 included (load into torchvision.models.resnet50 with strict=False)"
            )
        return Written(layout, missing)
