"""torchvision-backbone (alias timm): the pretrained ResNet alone, ``torchvision.models.<backbone>`` keys.

A plain state dict (``torch.save``) for an image classifier, a linear probe or any detector that
starts from an ImageNet-style ResNet: ``torchvision.models.resnet50().load_state_dict(sd,
strict=False)`` leaves missing only ``fc.weight`` and ``fc.bias`` (SoCo has no classifier) and
nothing unexpected. FPN runs give their body (``backbone.body.X`` -> ``X``); C4 runs their
``backbone.X`` (res5 = ``layer4`` included: in the C4 encoder it is the box head, in a ResNet
it is the last stage).

timm's ResNet/ResNeXt use the same names for the models this library trains, so the same file
loads into ``timm.create_model("<backbone>")``. Checked against huggingface/pytorch-image-models
``timm/models/resnet.py``: ``ResNet.__init__`` makes the default stem (``stem_type=''``) a single
``conv1`` Conv2d + ``bn1``, stages named ``layer1``..``layer4`` (``make_blocks``: "weight compat
requires it") of ``nn.Sequential`` blocks, ``Bottleneck`` with ``conv1/bn1, conv2/bn2,
conv3/bn3`` (``BasicBlock``: ``conv1/bn1, conv2/bn2``), ``downsample`` = ``nn.Sequential(conv,
norm)`` (``downsample_conv``: ``.0``, ``.1``), classifier ``fc``; the registered ``resnet18/34/
50/101/152``, ``resnext50_32x4d``, ``resnext101_32x8d`` and ``resnext101_64x4d`` use that stem
and conv downsampling (not the ``d``/``c`` variants' deep stem or average-pool downsample) and
the same widths (``floor(planes * base_width / 64) * cardinality``). timm is not a dependency;
the tests check the torchvision model only.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch
import torchvision

from ...files import atomic_write
from ...weights.keymaps import RESNET_GROUP, resnet_c4, resnet_fpn
from .common import Exporter, Written

GROUP = RESNET_GROUP  # the report's module name for the exported ResNet


def resnet_missing(backbone: str, exported: set[str]) -> dict[str, int]:
    """Keys of ``torchvision.models.<backbone>()`` the export does not hold, per top-level module."""
    with torch.device("meta"):  # names only: no memory, no init cost
        model = getattr(torchvision.models, backbone)(weights=None)
    keys = model.state_dict()
    unexpected = sorted(exported - set(keys))
    if unexpected:  # a mapping bug, never the user's input
        raise RuntimeError(f"backbone export has keys torchvision {backbone} lacks: {unexpected[:3]}")
    return dict(Counter(key.split(".", 1)[0] for key in keys if key not in exported))


class BackboneExporter(Exporter):
    name = "torchvision-backbone"
    mappers = {"fpn": resnet_fpn, "c4": resnet_c4}  # weights/keymaps.py
    config_suffix = None

    def write(self, state: dict, source, out: Path, config_out: Path | None, stamp: dict) -> Written:
        missing = resnet_missing(source.backbone, set(state))
        atomic_write(out, lambda f: torch.save(state, f))  # a plain state dict, as torchvision's own files
        layout = (
            f"state dict for torchvision.models.{source.backbone} / timm {source.backbone} "
            f"(strict=False: only fc missing)"
        )
        return Written(layout, missing)
