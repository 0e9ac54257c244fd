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

How the FPN slots are pooled (``model.roi_pool``; both static-shaped, neither reads the device
on the host):
- ``"per_level"`` (default): one RoIAlign per level over all B*K slots, then each slot keeps its
  level's rows (``torch.where``): 4x the RoIAlign work, and on a GPU the backward's atomics touch
  every level.
- ``"packed"``: ONE RoIAlign over a canvas holding every level (``pack_levels``): P2 as it is,
  then P3..P5, each replicate-padded by one pixel, side by side in a second frame of P2's size,
  the frames concatenated along the batch; each slot's box is shifted to its level's place. The
  pad reproduces RoIAlign's clamping at a map's edge (P2's edges are the frame's own), so for boxes
  inside the image the result and the gradients equal ``"per_level"``'s (to ~1e-13 in float64; in
  float32 the shifted P3..P5 coordinates round differently, ~1e-5). Boxes are first clamped to
  their level's map (its extent in image pixels, >= the image), so no sample reaches another
  level: a box outside the image pools as its clamped part, where ``"per_level"`` would sample
  zeros. The data pipeline clips every box to its view, so training never meets the difference.
  Costs: the canvas (2x P2) is written in the forward and its gradient zeroed in the backward.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Literal, NamedTuple, get_args

import torch
import torch.nn.functional as F
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
RoiPool = Literal["per_level", "packed"]  # model.roi_pool
ROI_POOLS: tuple[RoiPool, ...] = get_args(RoiPool)


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
    method: RoiPool = "per_level",
) -> torch.Tensor:
    """RoIAlign every slot from its one assigned map: (B*K, C, S, S) in row-major (b, k) order.

    maps: feature maps, one per level (``maps[l]`` has stride ``strides[l]``); boxes (B, K, 4) in
    image pixels (x1, y1, x2, y2); levels (B, K) int in [0, len(maps)) (ignored with one map);
    valid (B, K) bool. ``method`` (``model.roi_pool``, module docstring): ``"per_level"`` pools
    every slot on every level (one ``roi_align`` per level over all B*K boxes) and each slot then
    takes the level it is assigned to, with elementwise selects; ``"packed"`` pools every slot once
    from a canvas holding all levels (``pack_levels``). Either way shapes are static and nothing
    waits on the host (no count of boxes per level). What routing saves is the head, which sees
    each box once. Padded slots are pooled from a sanitised box (their rows are finite and
    unspecified; the head masks them out of BatchNorm and the loss ignores them). Under DDP every
    level's map is in the graph on every rank, so SyncBN's collectives line up and no parameter is
    ever "unused". One map (C4): a single ``roi_align``, whatever ``method``.
    """
    if method not in ROI_POOLS:
        raise ValueError(f"method must be one of {ROI_POOLS}, got {method!r}")
    B, K = valid.shape
    # Padded slots may hold garbage (NaN, out-of-range levels): a NaN corner would reach
    # roi_align's integer indexing, so they get an empty box at the origin and level 0.
    flat = torch.where(valid.reshape(B * K, 1), boxes.reshape(B * K, 4), 0.0)
    # rois (B*K, 5): batch index, x1, y1, x2, y2; kept in float32 (bf16 would round box edges).
    image = torch.arange(B, device=boxes.device, dtype=flat.dtype).repeat_interleave(K)
    if len(maps) == 1 or levels is None:
        rois = torch.cat([image[:, None], flat], dim=1)
        return roi_align(
            maps[0], rois, output_size, spatial_scale=1.0 / strides[0], sampling_ratio=sampling_ratio, aligned=True
        )
    level = torch.where(valid, levels.to(torch.long), 0).reshape(B * K)
    if method == "packed":
        return _pool_packed(maps, strides, flat, image, level, output_size, sampling_ratio)
    rois = torch.cat([image[:, None], flat], dim=1)
    pooled = [
        roi_align(m, rois, output_size=output_size, spatial_scale=1.0 / s, sampling_ratio=sampling_ratio, aligned=True)
        for m, s in zip(maps, strides)
    ]
    level = level.reshape(B * K, 1, 1, 1)
    out = pooled[0]
    for index in range(1, len(maps)):  # elementwise selects: the backward is elementwise too
        out = torch.where(level == index, pooled[index], out)
    return out


class Place(NamedTuple):
    """Where a level's pixel (0, 0) lies in ``pack_levels``' canvas: frame, row, column."""

    frame: int
    row: int
    col: int


def pack_levels(maps: list[torch.Tensor]) -> tuple[torch.Tensor, list[Place]]:
    """All maps (N, C, h_l, w_l) in one canvas (F*N, C, H, W): F frames of ``maps[0]``'s size
    (H, W) = (h_0, w_0), concatenated along the batch (frame f of image b is canvas image f*N + b).

    Frame 0 is ``maps[0]`` (P2) itself: its borders are the frame's edges, where RoIAlign clamps
    exactly as on the map alone, so the largest map is copied once (by the final cat) and its
    gradient is a contiguous slice of the canvas's. The other maps are replicate-padded by 1 pixel
    (a bilinear sample in [-1, 0] or [h - 1, h] then reads the border value, as RoIAlign's own
    clamping at a map's edge; F.pad's backward folds the pad's gradient back onto the border) and
    shelf-packed, left to right and top to bottom, into frame 1 (P3 | P4 | P5 for views of 192 px
    and up; P5 on a second shelf below 192 px), zeros where nothing lies, more frames if needed.
    If a padded map is larger than P2 (maps of 1 or 2 pixels), the frames grow and P2 gets a
    replicate pad on its right and bottom. Only F.pad and torch.cat: functional, differentiable,
    torch.compile-friendly; every shape and place is a Python int, known when tracing.
    """
    first, rest = maps[0], [F.pad(m, (1, 1, 1, 1), mode="replicate") for m in maps[1:]]
    height, width = first.shape[-2:]
    if any(p.shape[-2] > height or p.shape[-1] > width for p in rest):
        first = F.pad(first, (0, 1, 0, 1), mode="replicate")  # its right and bottom edges are inside
        height = max([first.shape[-2], *(p.shape[-2] for p in rest)])
        width = max([first.shape[-1], *(p.shape[-1] for p in rest)])
    frames: list[list[list[int]]] = []  # frame -> shelves -> indices into rest
    places = [Place(0, 0, 0)]
    shelf_y = shelf_h = x = 0
    for index, p in enumerate(rest):
        h, w = p.shape[-2:]
        if frames and x + w <= width and shelf_y + h <= height:  # on the current shelf
            shelf_h = max(shelf_h, h)
        elif frames and shelf_y + shelf_h + h <= height:  # a new shelf below it
            shelf_y, shelf_h, x = shelf_y + shelf_h, h, 0
            frames[-1].append([])
        else:  # a new frame
            shelf_y, shelf_h, x = 0, h, 0
            frames.append([[]])
        frames[-1][-1].append(index)
        places.append(Place(len(frames), shelf_y + 1, x + 1))  # + 1: inside the pad
        x += w
    built = [_zero_pad(first, right=width - first.shape[-1], bottom=height - first.shape[-2])]
    for shelves in frames:
        rows = []
        for shelf in shelves:
            tall = max(rest[i].shape[-2] for i in shelf)
            row = _cat([_zero_pad(rest[i], bottom=tall - rest[i].shape[-2]) for i in shelf], dim=3)
            rows.append(_zero_pad(row, right=width - row.shape[-1]))
        frame = _cat(rows, dim=2)
        built.append(_zero_pad(frame, bottom=height - frame.shape[-2]))
    return _cat(built, dim=0), places


def _zero_pad(x: torch.Tensor, right: int = 0, bottom: int = 0) -> torch.Tensor:
    """Zeros on the right / bottom; ``x`` itself when there is nothing to add (F.pad would copy)."""
    return F.pad(x, (0, right, 0, bottom)) if right or bottom else x


def _cat(parts: list[torch.Tensor], dim: int) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def _per_slot(level: torch.Tensor, values: list[float]) -> torch.Tensor:
    """(n, 1) float32: ``values[level[i]]`` for every slot, by selects on the device (a table
    made with torch.tensor would be a host-to-device copy, which synchronises on a GPU)."""
    out = torch.full((level.shape[0], 1), float(values[0]), dtype=torch.float32, device=level.device)
    for index in range(1, len(values)):
        out = torch.where(level[:, None] == index, float(values[index]), out)
    return out


def _pool_packed(maps, strides, flat, image, level, output_size: int, sampling_ratio: int) -> torch.Tensor:
    """``pool_boxes(method="packed")``: ONE roi_align on ``pack_levels``' canvas."""
    canvas, places = pack_levels(maps)
    n = maps[0].shape[0]
    scale = _per_slot(level, [1.0 / s for s in strides])
    # Clamped to the level's map (not the image: its size is unknown here; the map covers it), so
    # aligned samples stay within [-0.5, h - 0.5] map pixels: inside the pad, never a neighbour.
    w = _per_slot(level, [m.shape[-1] for m in maps])
    h = _per_slot(level, [m.shape[-2] for m in maps])
    xs = torch.minimum((flat[:, 0::2] * scale).clamp(min=0.0), w) + _per_slot(level, [p.col for p in places])
    ys = torch.minimum((flat[:, 1::2] * scale).clamp(min=0.0), h) + _per_slot(level, [p.row for p in places])
    index = image[:, None] + _per_slot(level, [p.frame * n for p in places])  # canvas image: frame*N + b
    rois = torch.cat([index, xs[:, :1], ys[:, :1], xs[:, 1:], ys[:, 1:]], dim=1)
    return roi_align(canvas, rois, output_size, spatial_scale=1.0, sampling_ratio=sampling_ratio, aligned=True)


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
        self.roi_pool: RoiPool = cfg.roi_pool  # FPN only; C4 pools one map either way
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
        return pool_boxes(
            list(maps.values()), self.strides, boxes, levels, valid, self.roi_size, self.sampling_ratio, self.roi_pool
        )

    def head(self, rois: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """R-CNN head: 4conv1fc (FPN) or res5 + global average pooling (C4).

        ``mask`` (rows,) bool: BatchNorm statistics from those rows only (None: all rows)."""
        if self.arch == "fpn":
            return run_masked(self.box_head, rois, mask)
        return torch.flatten(self.backbone.avgpool(run_masked(self.backbone.layer4, rois, mask)), 1)

    def forward(self, images, boxes, levels, valid) -> torch.Tensor:
        return self.head(self.pool(self.features(images), boxes, levels, valid), valid.reshape(-1))
