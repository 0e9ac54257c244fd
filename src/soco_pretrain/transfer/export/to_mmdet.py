"""MMDetection (names of MMDetection v3.3.0): ``{"state_dict", "meta"}`` and a ready config.

Names: mmdet/models/backbones/resnet.py (its ResNet keys equal torchvision's), necks/fpn.py
(``lateral_convs.i`` / ``fpn_convs.i`` ConvModules with ``.conv`` and ``.bn``, i = 0..3 on
C2..C5), roi_heads/bbox_heads/convfc_bbox_head.py (Shared4Conv1FCBBoxHead ``shared_convs.0..3``,
``shared_fcs.0``) and roi_heads/shared_heads/res_layer.py (ResLayer(stage=3) registers
``layer4``). Norms keep ``num_batches_tracked`` (BatchNorm2d / SyncBatchNorm state dicts).

Every backbone: mmdet's ResNet (depth 18..152; BasicBlock ``conv1/bn1, conv2/bn2``, Bottleneck
``conv1..3/bn1..3``, ``downsample.0/.1``) and ResNeXt (backbones/resnext.py: ``type='ResNeXt'``,
``groups``, ``base_width``; width = planes x base_width / 64 x groups, as torchvision's) name
their tensors as torchvision does, so the mapping is the same for all; the config sets the type,
depth (and groups / base_width) and the neck's in_channels from the backbone's channels. C4 has
no ResNeXt: the ResLayer shared head builds res5 from ``ResNet.arch_settings[depth]``, plain
bottlenecks without groups; such a pair is refused in one line.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ...files import atomic_write, atomic_write_text
from ...model.backbones import backbone_info
from ...weights.keymaps import mmdet_c4, mmdet_fpn
from .common import (
    FINETUNE_WEIGHT_DECAY,
    MMDET_VERSION,
    Exporter,
    Written,
    config_values,
    render_template,
    resnet_channels,
    unsupported,
)

_NORM = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _layer(name: str) -> list[str]:  # a Conv2d / Linear with bias
    return [f"{name}.weight", f"{name}.bias"]


def _conv_module(name: str) -> list[str]:  # ConvModule(norm_cfg=BN): conv without bias + bn
    return [f"{name}.conv.weight"] + [f"{name}.bn.{p}" for p in _NORM]


def not_pretrained(arch: str) -> dict[str, list[str]]:
    """Keys of the config's Mask R-CNN that SoCo does not pretrain, per module (MMDetection
    v3.3.0): dense_heads/rpn_head.py (rpn_conv, rpn_cls, rpn_reg), bbox_heads/bbox_head.py
    (fc_cls, fc_reg), mask_heads/fcn_mask_head.py (convs.0..3 ConvModule with bn for FPN; none
    for C4; upsample, conv_logits)."""
    mask_convs = 4 if arch == "fpn" else 0
    return {
        "rpn_head": [k for n in ("rpn_conv", "rpn_cls", "rpn_reg") for k in _layer(f"rpn_head.{n}")],
        "roi_head.bbox_head": [k for n in ("fc_cls", "fc_reg") for k in _layer(f"roi_head.bbox_head.{n}")],
        "roi_head.mask_head": (
            [k for i in range(mask_convs) for k in _conv_module(f"roi_head.mask_head.convs.{i}")]
            + [k for n in ("upsample", "conv_logits") for k in _layer(f"roi_head.mask_head.{n}")]
        ),
    }


def check_pair(backbone: str, arch: str) -> None:
    """:class:`UserError` (one line) for a pair MMDetection has no model for (module docstring)."""
    info = backbone_info(backbone)
    if arch == "c4" and (info.groups > 1 or not info.bottleneck):
        raise unsupported(
            "mmdet", backbone, arch, "its C4 shared head (ResLayer) builds res5 from plain ResNet bottlenecks only"
        )


def backbone_values(backbone: str) -> dict:
    """The config's backbone type/depth (+ ResNeXt groups, base_width) and the neck's in_channels."""
    info = backbone_info(backbone)
    arch = f"type='ResNet', depth={info.depth}"
    if info.groups > 1:
        arch = f"type='ResNeXt', depth={info.depth}, groups={info.groups}, base_width={info.width_per_group}"
    return {
        "label": info.label,
        "depth": info.depth,
        "backbone_arch": arch,
        "in_channels": ", ".join(str(c) for c in resnet_channels(backbone)),
    }


class MmdetExporter(Exporter):
    name = "mmdet"
    mappers = {"fpn": mmdet_fpn, "c4": mmdet_c4}  # weights/keymaps.py
    config_suffix = ".py"

    def write(self, state: dict, source, out: Path, config_out: Path | None, stamp: dict) -> Written:
        check_pair(source.backbone, source.arch)  # before anything is written
        meta = {
            "author": "soco-pretrain",
            "source": str(source.checkpoint),
            "weights": source.weights,
            "arch": source.arch,
            "backbone": source.backbone,
            "step": source.step,
            "naming": f"MMDetection {MMDET_VERSION}",
            **stamp,
        }
        atomic_write(out, lambda f: torch.save({"state_dict": state, "meta": meta}, f))
        atomic_write_text(config_out, self.config(source, out.resolve()))
        return Written(
            layout=(
                f"MMDetection checkpoint {{'state_dict', 'meta'}}, names of MMDetection {MMDET_VERSION} "
                f"Mask R-CNN {backbone_info(source.backbone).label}-{source.arch.upper()}"
            ),
            missing={module: len(keys) for module, keys in not_pretrained(source.arch).items()},
            config_out=config_out,
        )

    def config(self, source, weights_path: Path) -> str:
        """An MMDetection 3.x config inheriting the model zoo's Mask R-CNN R50-FPN or R50-C4 1x,
        with the run's backbone."""
        return render_template(
            f"mmdet_{source.arch}.py.tmpl",
            **config_values(source),
            **backbone_values(source.backbone),
            weights_path=repr(str(weights_path)),
            weight_decay=str(FINETUNE_WEIGHT_DECAY),
        )
