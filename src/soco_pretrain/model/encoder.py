"""Object-level encoder: image -> per-proposal feature (paper section 3.3 eq. 1, section 4.1).

Built from the very modules torchvision uses for ``maskrcnn_resnet50_fpn_v2`` so pretrained
weights load into torchvision's Mask R-CNN v2 with no key mapping. The ResNet is
``model.backbone`` (``model/backbones.py``: torchvision's ResNet-18 ... 152 and ResNeXt; the
paper's is ResNet-50); every channel count below is read from the built module, never written
out (C5 = 2048 for bottleneck ResNets, 512 for ResNet-18/34).

- ``arch="fpn"``: ``self.backbone`` is torchvision's ``BackboneWithFPN`` (the ResNet body, every
  stage trainable, plain BatchNorm2d; FPN with BatchNorm, its in-channels derived by torchvision's
  ``_resnet_fpn_extractor`` from the ResNet). Its P6 ("pool") output is computed by the module
  but never used (paper: "we do not use P6"); keeping the module keeps the keys.
  ``self.box_head`` is ``FastRCNNConvFCHead((256, 7, 7), [256] * 4, [1024], BatchNorm2d)``, the v2
  box head (4 conv + 1 fc). Each box is pooled with RoIAlign 7x7 from its one assigned level
  (P2..P5, strides 4, 8, 16, 32), then goes through the head: (N, 1024).
- ``arch="c4"``: ``self.backbone`` is the torchvision ResNet (``fc`` dropped); RoIAlign 14x14 on
  C4 (output of ``layer3``, stride 16), ``layer4`` (res5) as the head, global average pooling:
  (N, C5 channels). Keys are the torchvision ResNet's (minus ``fc``), ready for a linear probe.
  Needs a bottleneck backbone (config.py refuses ResNet-18/34).

Every slot (B x K per view, padded ones too) is pooled and sent through the head, so shapes are
static and the step never waits on the host; the head's BatchNorms take their statistics from the
valid slots only (``masked.py``), so padded boxes never enter a BatchNorm.

Choices where the paper is silent (the released code hologerry/SoCo followed):
- ResNet init: conv weights ~ N(0, sqrt(2 / (k*k*out))) (Kaiming normal, fan-out), BN weight 1,
  bias 0, and the last BN of each residual block zero-initialised (``model.zero_init_residual``).
  torchvision's ResNet does exactly this.
- FPN convs: Kaiming normal (fan-out, ReLU), as mmcv's ConvModule in the released code
  (torchvision's own FPN uses Kaiming uniform a=1). No conv bias (a BN follows).
- Box-head convs and fc, projector and predictor: PyTorch's default Linear/Conv init, as the
  released code (torchvision's box head would re-init its convs with Kaiming normal).
- Every BatchNorm: momentum ``model.bn_momentum`` (0.1, PyTorch default = released), eps 1e-5.
- RoIAlign: ``aligned=True`` (half-pixel correct; the released code's default), sampling ratio
  ``model.roi_sampling_ratio`` (2, torchvision Mask R-CNN's), spatial scale 1/stride.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torchvision.models.detection.backbone_utils import (
    BackboneWithFPN,
    _resnet_fpn_extractor,
)
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead
from torchvision.ops import roi_align

from ..config import ModelConfig
from .backbones import build_resnet, stage_channels
from .masked import run_masked

FPN_STRIDES = (4, 8, 16, 32)  # P2..P5 (paper 3.3)
FPN_CHANNELS = 256
C4_STRIDE = 16
# Paper 4.1 gives no size for C4; 14x14 is Detectron2's R50-C4 pooler (res5 then halves it to 7x7)
# and the released SoCo_C4 code's. ``model.roi_size`` is the FPN size only.
C4_ROI_SIZE = 14


# ---------------------------------------------------------------- building blocks


def build_body(cfg: ModelConfig) -> nn.Module:
    """The run's torchvision ResNet (``model.backbone``), random init, trainable BatchNorm2d."""
    return build_resnet(cfg.backbone, cfg.zero_init_residual)


def build_fpn_backbone(cfg: ModelConfig) -> BackboneWithFPN:
    """The ``backbone`` of torchvision's maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None),
    around the run's ResNet.

    Same call as torchvision (5 trainable stages, FPN with BatchNorm2d, LastLevelMaxPool; the FPN's
    in-channels come from the ResNet), so for ResNet-50 the state-dict keys equal that model's
    ``backbone.*`` keys. FPN convs are then re-initialised as the released code (mmcv ConvModule:
    Kaiming normal, fan-out).
    """
    backbone = _resnet_fpn_extractor(build_body(cfg), 5, norm_layer=nn.BatchNorm2d)
    for m in backbone.fpn.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return backbone


def build_box_head(cfg: ModelConfig) -> FastRCNNConvFCHead:
    """Mask R-CNN v2 box head: 4 x (conv3x3-BN-ReLU) + fc(1024)-ReLU, torchvision's module.

    torchvision re-initialises the convs with Kaiming normal; the released code's head uses
    PyTorch's default init, which we restore (``reset_parameters``).
    """
    head = FastRCNNConvFCHead(
        (FPN_CHANNELS, cfg.roi_size, cfg.roi_size), [FPN_CHANNELS] * 4, [cfg.head_dim], norm_layer=nn.BatchNorm2d
    )
    for m in head.modules():
        if isinstance(m, nn.Conv2d):
            m.reset_parameters()
    return head


def set_bn_momentum(module: nn.Module, momentum: float) -> None:
    """Set the running-statistics momentum of every BatchNorm in ``module``."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = momentum


# ---------------------------------------------------------------- routing + pooling


def pool_boxes(
    maps: list[torch.Tensor],
    strides: tuple[int, ...],
    boxes: torch.Tensor,
    levels: torch.Tensor | None,
    valid: torch.Tensor,
    output_size: int,
    sampling_ratio: int,
) -> torch.Tensor:
    """RoIAlign every slot from its one assigned map: (B*K, C, S, S) in row-major (b, k) order.

    maps: feature maps, one per level (``maps[l]`` has stride ``strides[l]``); boxes (B, K, 4) in
    image pixels (x1, y1, x2, y2); levels (B, K) int in [0, len(maps)) (ignored with one map);
    valid (B, K) bool. Every slot is pooled on every level (one ``roi_align`` per level over all
    B*K boxes) and each slot then takes the level it is assigned to, with a gather: shapes are
    static and nothing waits on the host (no count of boxes per level). Pooling is the cheap part
    (the 4 levels together cost well under 1% of a step's FLOPs); what routing saves is the head,
    which sees each box once. Padded slots are pooled from a sanitised box (their rows are
    finite and unspecified; the head masks them out of BatchNorm and the loss ignores them).
    Under DDP every level's map is in the graph on every rank, so SyncBN's collectives line up
    and no parameter is ever "unused".
    """
    B, K = valid.shape
    # Padded slots may hold garbage (NaN, out-of-range levels): a NaN corner would reach
    # roi_align's integer indexing, so they get an empty box at the origin and level 0.
    flat = torch.where(valid.reshape(B * K, 1), boxes.reshape(B * K, 4), 0.0)
    # rois (B*K, 5): batch index, x1, y1, x2, y2; kept in float32 (bf16 would round box edges).
    image = torch.arange(B, device=boxes.device, dtype=flat.dtype).repeat_interleave(K)
    rois = torch.cat([image[:, None], flat], dim=1)
    pooled = [
        roi_align(m, rois, output_size=output_size, spatial_scale=1.0 / s, sampling_ratio=sampling_ratio, aligned=True)
        for m, s in zip(maps, strides)
    ]
    if len(maps) == 1 or levels is None:
        return pooled[0]
    level = torch.where(valid, levels.to(torch.long), 0).reshape(B * K, 1, 1, 1)
    out = pooled[0]
    for index in range(1, len(maps)):  # elementwise selects: the backward is elementwise too
        out = torch.where(level == index, pooled[index], out)
    return out


# ---------------------------------------------------------------- the encoder


class SoCoEncoder(nn.Module):
    """f^H(RoIAlign(f^I(V), b)) for every box slot of a view (paper eq. 1).

    ``forward(images (B,3,H,W), boxes (B,K,4), levels (B,K), valid (B,K)) -> (B*K, out_dim)``,
    rows in row-major (b, k) order; rows of padded slots are finite and meaningless (BatchNorm
    statistics come from the valid slots only). ``out_dim`` is ``model.head_dim`` (1024, FPN) or the
    ResNet's C5 channels (C4: 2048 for a bottleneck ResNet).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.arch not in ("fpn", "c4"):
            raise ValueError(f"model.arch must be 'fpn' or 'c4', got {cfg.arch!r}")
        self.arch = cfg.arch
        self.sampling_ratio = cfg.roi_sampling_ratio
        if cfg.arch == "fpn":
            self.backbone = build_fpn_backbone(cfg)
            self.box_head = build_box_head(cfg)
            self.roi_size = cfg.roi_size
            self.strides = FPN_STRIDES
            self.out_dim = cfg.head_dim
        else:
            self.backbone = build_body(cfg)
            self.backbone.fc = nn.Identity()  # no parameters: keys = the torchvision ResNet's without fc
            self.roi_size = C4_ROI_SIZE
            self.strides = (C4_STRIDE,)
            self.out_dim = stage_channels(self.backbone)[3]  # res5's output, globally pooled
        set_bn_momentum(self, cfg.bn_momentum)

    def features(self, images: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        """Image-level maps the boxes are pooled from: P2..P5 ("p2".."p5") for FPN, "c4" for C4."""
        if self.arch == "fpn":
            fpn = self.backbone(images)  # '0'..'3' = P2..P5, 'pool' = P6 (unused)
            return OrderedDict((f"p{i + 2}", fpn[str(i)]) for i in range(4))
        r = self.backbone
        x = r.maxpool(r.relu(r.bn1(r.conv1(images))))
        return OrderedDict(c4=r.layer3(r.layer2(r.layer1(x))))

    def pool(self, maps, boxes, levels, valid) -> torch.Tensor:
        """RoIAlign of every slot, each from its assigned level: (B*K, C, S, S)."""
        return pool_boxes(list(maps.values()), self.strides, boxes, levels, valid, self.roi_size, self.sampling_ratio)

    def head(self, rois: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """R-CNN head: 4conv1fc (FPN) or res5 + global average pooling (C4).

        ``mask`` (rows,) bool: BatchNorm statistics from those rows only (None: all rows)."""
        if self.arch == "fpn":
            return run_masked(self.box_head, rois, mask)
        return torch.flatten(self.backbone.avgpool(run_masked(self.backbone.layer4, rois, mask)), 1)

    def forward(self, images, boxes, levels, valid) -> torch.Tensor:
        return self.head(self.pool(self.features(images), boxes, levels, valid), valid.reshape(-1))
