"""Detectron2 (names of Detectron2 v0.6): a pickle of float32 arrays and a ready config.

Names: detectron2/modeling/backbone/resnet.py (``stem.conv1``, ``res2..res5``; BottleneckBlock
``conv1..3``, BasicBlock (R18/34) ``conv1..2``, both with ``shortcut`` where the channels change,
every conv with ``.norm``), backbone/fpn.py (``fpn_lateral{s}`` / ``fpn_output{s}`` on stage
s = 2..5), roi_heads/box_head.py (FastRCNNConvFCHead ``conv1..4``, ``fc1``) and
roi_heads/roi_heads.py (Res5ROIHeads owns ``res5``). Norms carry no ``num_batches_tracked``, as
Detectron2's model-zoo pickles (momentum BatchNorm never reads it).

Every backbone: ``build_resnet_backbone`` takes MODEL.RESNETS.DEPTH 18..152, NUM_GROUPS and
WIDTH_PER_GROUP (ResNeXt: bottleneck width = groups x width, doubled per stage, as torchvision's),
RES2_OUT_CHANNELS (64 for R18/34, which it asserts; 256 for bottlenecks) and STRIDE_IN_1X1 False
(torchvision strides in the 3x3). C4 needs a bottleneck backbone (Res5ROIHeads builds res5 from
BottleneckBlock), which the config already requires.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

from ...files import atomic_write, atomic_write_text
from ...model.backbones import backbone_info
from ...weights.keymaps import detectron2_c4, detectron2_fpn
from .common import (
    DETECTRON2_VERSION,
    FINETUNE_WEIGHT_DECAY,
    Exporter,
    Written,
    config_values,
    render_template,
    resnet_channels,
    unsupported,
)

_NORM = ("weight", "bias", "running_mean", "running_var")


def _layer(name: str) -> list[str]:  # a Conv2d / Linear with bias
    return [f"{name}.weight", f"{name}.bias"]


def _normed(name: str) -> list[str]:  # a Conv2d(bias=False, norm=BN)
    return [f"{name}.weight"] + [f"{name}.norm.{p}" for p in _NORM]


def not_pretrained(arch: str) -> dict[str, list[str]]:
    """Keys of the config's Mask R-CNN that SoCo does not pretrain, per module (Detectron2 v0.6):
    proposal_generator/rpn.py StandardRPNHead (conv, objectness_logits, anchor_deltas),
    roi_heads/fast_rcnn.py FastRCNNOutputLayers (cls_score, bbox_pred), roi_heads/mask_head.py
    MaskRCNNConvUpsampleHead (mask_fcn1..4 with norm for FPN, NUM_CONV 4; none for C4, NUM_CONV 0;
    deconv, predictor)."""
    mask_convs = 4 if arch == "fpn" else 0
    return {
        "proposal_generator.rpn_head": [
            k
            for n in ("conv", "objectness_logits", "anchor_deltas")
            for k in _layer(f"proposal_generator.rpn_head.{n}")
        ],
        "roi_heads.box_predictor": [
            k for n in ("cls_score", "bbox_pred") for k in _layer(f"roi_heads.box_predictor.{n}")
        ],
        "roi_heads.mask_head": (
            [k for i in range(1, mask_convs + 1) for k in _normed(f"roi_heads.mask_head.mask_fcn{i}")]
            + [k for n in ("deconv", "predictor") for k in _layer(f"roi_heads.mask_head.{n}")]
        ),
    }


def check_pair(backbone: str, arch: str) -> None:
    """:class:`UserError` (one line) for a pair Detectron2 has no model for."""
    if arch == "c4" and not backbone_info(backbone).bottleneck:
        raise unsupported("detectron2", backbone, arch, "Res5ROIHeads builds res5 from bottleneck blocks only")


def resnet_values(backbone: str) -> dict:
    """MODEL.RESNETS settings of ``backbone`` (build_resnet_backbone's keys) for the templates."""
    info = backbone_info(backbone)
    return {
        "label": info.label,
        "depth": info.depth,
        "num_groups": info.groups,
        "width_per_group": info.width_per_group,
        "res2_out_channels": resnet_channels(backbone)[0],
    }


class Detectron2Exporter(Exporter):
    name = "detectron2"
    mappers = {"fpn": detectron2_fpn, "c4": detectron2_c4}  # weights/keymaps.py
    config_suffix = ".yaml"

    def write(self, state: dict, source, out: Path, config_out: Path | None, stamp: dict) -> Written:
        check_pair(source.backbone, source.arch)  # before anything is written
        payload = {
            "model": {k: v.numpy() for k, v in state.items()},
            "__author__": "soco-pretrain",
            "matching_heuristics": True,
            **stamp,
        }
        atomic_write(out, lambda f: pickle.dump(payload, f, protocol=pickle.HIGHEST_PROTOCOL))
        atomic_write_text(config_out, self.config(source, out.resolve()))
        return Written(
            layout=(
                f"Detectron2 pickle, names of Detectron2 {DETECTRON2_VERSION} Mask R-CNN "
                f"{backbone_info(source.backbone).label}-{source.arch.upper()} (load with MODEL.WEIGHTS)"
            ),
            missing={module: len(keys) for module, keys in not_pretrained(source.arch).items()},
            config_out=config_out,
            notes=(
                "num_batches_tracked is left out (Detectron2 checkpoints carry none; "
                "Detectron2 may list it as missing: harmless)",
            ),
        )

    def config(self, source, weights_path: Path) -> str:
        """A self-contained Detectron2 v0.6 config (Base-RCNN-FPN/C4 settings inlined)."""
        return render_template(
            f"detectron2_{source.arch}.yaml.tmpl",
            **config_values(source),
            **resnet_values(source.backbone),
            weights_path=json.dumps(str(weights_path)),
            weight_decay_fixed=f"{FINETUNE_WEIGHT_DECAY:.6f}",
        )
