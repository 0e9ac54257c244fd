"""The fine-tune detector (torchvision Mask R-CNN v2 / Faster R-CNN v2) and loading weights into it.

``build_detector`` makes torchvision's ``maskrcnn_resnet50_fpn_v2`` layout (or, for box-only
data, ``fasterrcnn_resnet50_fpn_v2``'s) with no downloaded weights around any backbone of
``model/backbones.py`` (ResNet-50 by default): ResNet + FPN with BatchNorm, 5 trainable stages,
RPN with 2 convs, 4conv1fc box head with BatchNorm, 4-conv mask head with BatchNorm -- the
R50-FPN "4conv1fc BN head" Mask R-CNN of the released fine-tune configs
(hologerry/SoCo detectron2_configs/R_50_FPN_1x.yaml). For ResNet-50 it is exactly torchvision's
model (same keys, shapes and, under one seed, initial values). ``detector_backbone`` picks the
backbone for a fine-tune: the weights' own, refusing a contradicting request in one line. Input
normalisation is torchvision's ImageNet mean/std on RGB in [0, 1], i.e. the released configs'
PIXEL_MEAN/STD in RGB.

``load_weights`` reads every format of the one weights layer (``weights/read.py``: SoCo run or
checkpoint, its online or target encoder; torchvision detection or ResNet state dicts; safetensors,
Detectron2 and MMDetection exports), all as torchvision detector keys, and loads them under the
``partial`` policy (``weights/load.py``): every tensor that fits loads, the report lists per module
what did not (e.g. the FPN and box head of a C4 run start from scratch), and a file of which no
tensor fits the ResNet body is refused. Partial, not stricter: fine-tuning trains every tensor, so
a partly loaded body is a weaker start, not a wrong one; the report says so.
"""

from __future__ import annotations

from torch import nn
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.models.detection.faster_rcnn import FasterRCNN, FastRCNNConvFCHead, RPNHead, _default_anchorgen
from torchvision.models.detection.mask_rcnn import MaskRCNN, MaskRCNNHeads

from ..model.backbones import DEFAULT_BACKBONE, backbone_info, build_resnet
from ..weights import NETWORKS, LoadReport, WeightsError, detector_target, load, match
from ..weights import read_weights as read_file
from ..weights.load import DETECTOR_MODULES

MODULES = DETECTOR_MODULES  # the module groups load_weights reports, in this order
# Which SoCo encoder feeds the detector. "online": what the released converter exports by default
# (hologerry/SoCo converter_detectron2/convert_detectron2_Head.py, --ema off) and BYOL keeps.
SOCO_WEIGHTS = NETWORKS  # ("online", "target")
DEFAULT_SOCO_WEIGHTS = "online"
POLICY = "partial"  # the weights layer's load policy for fine-tuning (module docstring)
WeightReport = LoadReport  # the one load report of the weights layer, under its old name here


def build_detector(
    num_classes: int,
    masks: bool = True,
    train_sizes=(800,),
    test_size: int = 800,
    max_size: int = 1333,
    backbone: str = "resnet50",
    **kwargs,
) -> nn.Module:
    """torchvision Mask R-CNN v2 (``masks``) or Faster R-CNN v2 with ``backbone`` + FPN, random
    init, nothing downloaded.

    ``backbone``: a ``model.backbone`` name (``model/backbones.py``). ``train_sizes``: short sides
    drawn per training image (torchvision picks one at random per image, Detectron2's
    ResizeShortestEdge "choice"); ``test_size`` the evaluation short side; ``max_size`` the
    long-side cap. Set ``model.transform.min_size`` to ``(test_size,)`` for evaluation with
    :func:`eval_sizes`. ``kwargs`` go to torchvision's MaskRCNN/FasterRCNN (e.g.
    ``box_batch_size_per_image``, ``rpn_post_nms_top_n_test``, ``box_detections_per_img``).
    """
    # The modules and the order of maskrcnn_resnet50_fpn_v2 / fasterrcnn_resnet50_fpn_v2
    # (torchvision models/detection/mask_rcnn.py, faster_rcnn.py), so that R50 draws the same
    # initial values under one seed.
    body = fpn_backbone(backbone)
    anchors = _default_anchorgen()
    rpn_head = RPNHead(body.out_channels, anchors.num_anchors_per_location()[0], conv_depth=2)
    heads = {"rpn_anchor_generator": anchors, "rpn_head": rpn_head, "box_head": v2_box_head(body.out_channels)}
    if masks:
        heads["mask_head"] = MaskRCNNHeads(body.out_channels, [256, 256, 256, 256], 1, norm_layer=nn.BatchNorm2d)
    make = MaskRCNN if masks else FasterRCNN
    model = make(
        body,
        num_classes=num_classes,
        min_size=tuple(int(s) for s in train_sizes),
        max_size=int(max_size),
        **heads,
        **kwargs,
    )
    model.test_size = int(test_size)
    return model


def fpn_backbone(backbone: str) -> nn.Module:
    """``backbone`` + FPN as torchvision's v2 detectors build it for ResNet-50 with
    ``weights_backbone=None``: all 5 stages trainable, plain BatchNorm2d everywhere (never
    FrozenBatchNorm: BN is fine-tuned, paper 4.2), torchvision's init (zero_init_residual off),
    FPN in-channels from the ResNet."""

    return _resnet_fpn_extractor(build_resnet(backbone, zero_init_residual=False), 5, norm_layer=nn.BatchNorm2d)


def v2_box_head(channels: int) -> nn.Module:
    """The v2 box head: 4 x (conv3x3-BN-ReLU) + fc(1024), torchvision's FastRCNNConvFCHead."""
    return FastRCNNConvFCHead((channels, 7, 7), [256, 256, 256, 256], [1024], norm_layer=nn.BatchNorm2d)


def weights_backbone(weights, soco_weights: str = DEFAULT_SOCO_WEIGHTS) -> str | None:
    """The backbone ``weights`` were made with: a SoCo run's ``model.backbone``; for any other
    format the one whose shapes its ResNet body (``backbone.body.*``) has. None for ``none`` and
    for weights without a ResNet body; :class:`WeightsError` for a ResNet of no known shape."""
    if weights is None or str(weights) == "none":
        return None
    return read_file(weights, soco_weights).backbone


def detector_backbone(weights, requested: str | None = None, soco_weights: str = DEFAULT_SOCO_WEIGHTS) -> str:
    """The backbone to build the fine-tune detector with: the weights' own
    (:func:`weights_backbone`), else ``requested``, else ResNet-50. :class:`WeightsError` (one
    line) when ``requested`` contradicts the weights: a detector half loaded from weights of
    another backbone would train mostly from scratch without saying so."""
    found = weights_backbone(weights, soco_weights)
    if found is not None and requested is not None and found != requested:
        raise WeightsError(
            f"{weights}: weights of a {backbone_info(found).label} ({found}), not of the requested "
            f"{backbone_info(requested).label} ({requested}); drop --backbone or give {requested} weights"
        )
    return found or requested or DEFAULT_BACKBONE


class eval_sizes:
    """Context manager: the detector resizes to its test size inside (torchvision uses min_size[-1])."""

    def __init__(self, model: nn.Module):
        self.transform = model.transform
        self.test_size = getattr(model, "test_size", self.transform.min_size[-1])

    def __enter__(self):
        self.before = self.transform.min_size
        self.transform.min_size = (self.test_size,)

    def __exit__(self, *exc):
        self.transform.min_size = self.before


# ---------------------------------------------------------------- weights


def read_weights(weights, soco_weights: str = DEFAULT_SOCO_WEIGHTS) -> tuple[dict, str]:
    """(torchvision-keyed state dict, description) from a file or SoCo run folder, in any format
    the weights layer reads (weights/read.py: SoCo, torchvision, safetensors, Detectron2, MMDetection)."""
    found = read_file(weights, soco_weights)
    return found.state, found.description


def load_weights(model: nn.Module, weights, soco_weights: str = DEFAULT_SOCO_WEIGHTS) -> LoadReport:
    """Load ``weights`` (path, run folder, or None/"none") into ``model`` under :data:`POLICY`.

    Returns the report; raises WeightsError when no tensor of the file fits the ResNet body.
    """
    target = detector_target(model)
    if weights is None or str(weights) == "none":
        return match({}, target, source="none (random init)")
    return load(model, read_file(weights, soco_weights), target, POLICY)
