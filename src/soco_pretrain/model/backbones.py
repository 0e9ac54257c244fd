"""The ResNet backbones SoCo can pretrain: torchvision's ResNet-18/34/50/101/152 and ResNeXt.

``model.backbone`` names a torchvision builder (``torchvision.models.resnet50`` ...); the module
is built with ``weights=None`` (nothing is downloaded), trainable ``BatchNorm2d`` (never
FrozenBatchNorm) and the run's ``zero_init_residual``. State-dict keys are torchvision's, so a
backbone exported from SoCo loads into ``torchvision.models.<name>()`` and a torchvision file
loads into SoCo (``soco pretrain --init``).

Channel counts are derived from the built module (:func:`stage_channels`), never written out: a
basic-block ResNet (18, 34) has C2..C5 = 64, 128, 256, 512, a bottleneck one (50, 101, 152 and
the ResNeXts) 256, 512, 1024, 2048.

The paper pretrains ResNet-50 only (section 4.1); the others are this library's extension, with
the same recipe. The C4 variant uses res5 as the R-CNN head, which Detectron2 and MMDetection
build from bottleneck blocks only, so ``model.arch=c4`` needs a bottleneck backbone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torchvision
from torch import nn


@dataclass(frozen=True)
class Backbone:
    """What the exporters and the docs need to know about a backbone besides its module."""

    name: str  # torchvision builder name = model.backbone value
    depth: int  # 18, 34, 50, 101, 152
    bottleneck: bool  # Bottleneck blocks (conv1-3) rather than BasicBlocks (conv1-2)
    groups: int = 1  # ResNeXt cardinality
    width_per_group: int = 64  # ResNeXt bottleneck width (64 for plain ResNets)

    @property
    def label(self) -> str:
        """Short name in tables and logs: R50, R101, X101-32x8d."""
        if self.groups > 1:
            return f"X{self.depth}-{self.groups}x{self.width_per_group}d"
        return f"R{self.depth}"


BACKBONES: dict[str, Backbone] = {
    b.name: b
    for b in (
        Backbone("resnet18", 18, bottleneck=False),
        Backbone("resnet34", 34, bottleneck=False),
        Backbone("resnet50", 50, bottleneck=True),  # the paper's (section 4.1)
        Backbone("resnet101", 101, bottleneck=True),
        Backbone("resnet152", 152, bottleneck=True),
        Backbone("resnext50_32x4d", 50, bottleneck=True, groups=32, width_per_group=4),
        Backbone("resnext101_32x8d", 101, bottleneck=True, groups=32, width_per_group=8),
        Backbone("resnext101_64x4d", 101, bottleneck=True, groups=64, width_per_group=4),
    )
}
DEFAULT_BACKBONE = "resnet50"  # paper 4.1


def backbone_info(name: str) -> Backbone:
    """The :class:`Backbone` called ``name``; ``ValueError`` (one line) for an unknown one."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r} (choose {', '.join(BACKBONES)})")
    return BACKBONES[name]


def build_resnet(name: str, zero_init_residual: bool = True) -> nn.Module:
    """torchvision's ResNet/ResNeXt ``name``, random init, trainable ``BatchNorm2d``."""
    backbone_info(name)
    builder = getattr(torchvision.models, name)
    return builder(weights=None, norm_layer=nn.BatchNorm2d, zero_init_residual=zero_init_residual)


def stage_channels(resnet: nn.Module) -> tuple[int, int, int, int]:
    """Output channels of ``layer1``..``layer4`` (C2..C5), read from the built module."""
    out = []
    for name in ("layer1", "layer2", "layer3", "layer4"):
        last = getattr(resnet, name)[-1]
        norm = last.bn3 if hasattr(last, "bn3") else last.bn2
        out.append(int(norm.num_features))
    return (out[0], out[1], out[2], out[3])


def backbone_of_state(state: dict, prefix: str = "") -> str | None:
    """The :data:`BACKBONES` name whose torchvision ResNet ``state`` holds under ``prefix``, read
    from the tensors: blocks per stage (depth), block kind (a ``conv3`` is a bottleneck) and the
    first 3x3 conv's groups and width (ResNeXt). None when ``state`` has no ResNet there;
    ``ValueError`` (one line) for a ResNet of no known shape."""
    blocks = []
    for layer in range(1, 5):
        n = 0
        while f"{prefix}layer{layer}.{n}.conv1.weight" in state:
            n += 1
        blocks.append(n)
    if not all(blocks):
        return None
    bottleneck = f"{prefix}layer1.0.conv3.weight" in state
    width, per_group = (int(d) for d in state[f"{prefix}layer1.0.conv2.weight"].shape[:2])
    groups = width // max(1, per_group)
    depth = sum(blocks) * (3 if bottleneck else 2) + 2  # + stem conv and fc: 50 = 16 x 3 + 2
    for b in BACKBONES.values():
        # torchvision: layer1's 3x3 has width_per_group x groups channels (64 for plain ResNets)
        if (b.depth, b.bottleneck, b.groups, b.width_per_group * b.groups) == (depth, bottleneck, groups, width):
            return b.name
    raise ValueError(
        f"a ResNet of {depth} layers ({'x'.join(map(str, blocks))} blocks, {groups} groups of width "
        f"{per_group}) is none of the known backbones ({', '.join(BACKBONES)})"
    )
