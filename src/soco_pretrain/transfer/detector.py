"""The fine-tune detector (torchvision Mask R-CNN v2 / Faster R-CNN v2) and loading weights into it.

``build_detector`` makes torchvision's ``maskrcnn_resnet50_fpn_v2`` (or, for box-only data,
``fasterrcnn_resnet50_fpn_v2``) with no downloaded weights: ResNet-50 + FPN with BatchNorm, 5
trainable stages, RPN with 2 convs, 4conv1fc box head with BatchNorm, 4-conv mask head with
BatchNorm -- the R50-FPN "4conv1fc BN head" Mask R-CNN of the released fine-tune configs
(hologerry/SoCo detectron2_configs/R_50_FPN_1x.yaml). Input normalisation is torchvision's
ImageNet mean/std on RGB in [0, 1], i.e. the released configs' PIXEL_MEAN/STD in RGB.

``load_weights`` accepts
- a torchvision-format state dict file (``soco export --to torchvision``: ``backbone.*`` and
  ``roi_heads.box_head.*``; a whole detector's state dict works too; a plain torchvision
  ``resnet50`` state dict, as exported from a C4 run, goes into ``backbone.body``),
- a SoCo run folder or checkpoint ``.pt``: the encoder (online ``encoder.*`` or EMA
  ``target_encoder.*``) is mapped ``backbone.*`` -> ``backbone.*`` and ``box_head.*`` ->
  ``roi_heads.box_head.*`` (arch "fpn"), or for arch "c4" the ResNet-50 ``backbone.*`` ->
  ``backbone.body.*`` (the FPN and box head then start from scratch),
and prints a key report per module. Weights of which nothing loads are refused.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .weights import NETWORKS, WeightsError, load_weights_file, soco_weights_of

# Module groups of the detector reported by load_weights (in this order).
MODULES = (
    "backbone.body",
    "backbone.fpn",
    "rpn",
    "roi_heads.box_head",
    "roi_heads.box_predictor",
    "roi_heads.mask_head",
    "roi_heads.mask_predictor",
)
# Which SoCo encoder feeds the detector. "online": what the released converter exports by default
# (hologerry/SoCo converter_detectron2/convert_detectron2_Head.py, --ema off) and BYOL keeps.
SOCO_WEIGHTS = NETWORKS  # ("online", "target")
DEFAULT_SOCO_WEIGHTS = "online"
# WeightsError (unreadable weights, nothing matching the detector; one line) lives with the one
# checkpoint reader, transfer/weights.py, and is importable from here as before.


def build_detector(
    num_classes: int, masks: bool = True, train_sizes=(800,), test_size: int = 800, max_size: int = 1333, **kwargs
) -> nn.Module:
    """torchvision Mask R-CNN v2 (``masks``) or Faster R-CNN v2 R50-FPN, random init, nothing downloaded.

    ``train_sizes``: short sides drawn per training image (torchvision picks one at random per
    image, Detectron2's ResizeShortestEdge "choice"); ``test_size`` the evaluation short side;
    ``max_size`` the long-side cap. Set ``model.transform.min_size`` to ``(test_size,)`` for
    evaluation with :func:`eval_sizes`. ``kwargs`` go to torchvision's MaskRCNN/FasterRCNN
    (e.g. ``box_batch_size_per_image``, ``rpn_post_nms_top_n_test``, ``box_detections_per_img``).
    """
    from torchvision.models.detection import fasterrcnn_resnet50_fpn_v2, maskrcnn_resnet50_fpn_v2

    make = maskrcnn_resnet50_fpn_v2 if masks else fasterrcnn_resnet50_fpn_v2
    # weights=None, weights_backbone=None: torchvision then keeps all 5 stages trainable and
    # uses plain BatchNorm2d everywhere (never FrozenBatchNorm): BN is fine-tuned (paper 4.2).
    model = make(
        weights=None,
        weights_backbone=None,
        num_classes=num_classes,
        min_size=tuple(int(s) for s in train_sizes),
        max_size=int(max_size),
        **kwargs,
    )
    model.test_size = int(test_size)
    return model


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


@dataclass
class WeightReport:
    """What ``load_weights`` did: per module (loaded, total) tensors, and the file's leftovers."""

    source: str
    kind: str  # "none" | "torchvision" | "soco-fpn (online)" ...
    modules: dict[str, tuple[int, int]] = field(default_factory=dict)
    unused: list[str] = field(default_factory=list)  # keys in the file the detector has not
    mismatched: list[str] = field(default_factory=list)  # same key, different shape (not loaded)

    @property
    def loaded(self) -> int:
        return sum(n for n, _ in self.modules.values())

    def format(self) -> str:
        lines = [f"weights: {self.source} ({self.kind})"]
        for name, (n, total) in self.modules.items():
            note = "" if n == total else ("  (new: trained from scratch)" if n == 0 else "  (partly loaded)")
            lines.append(f"  {name:<26} {n:>4}/{total:<4} loaded{note}")
        if self.mismatched:
            lines.append(
                f"  shape mismatch, not loaded: {len(self.mismatched)} ({', '.join(self.mismatched[:3])}"
                f"{', ...' if len(self.mismatched) > 3 else ''})"
            )
        lines.append(
            f"  unused keys in the file: {len(self.unused)}"
            + (f" ({', '.join(self.unused[:3])}{', ...' if len(self.unused) > 3 else ''})" if self.unused else "")
        )
        return "\n".join(lines)


def _module_of(key: str) -> str:
    for name in MODULES:
        if key.startswith(name + "."):
            return name
    return key.split(".")[0]


def _tensor_dict(obj) -> dict | None:
    if isinstance(obj, dict) and obj and all(isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items()):
        return obj
    return None


def _strip_prefix(state: dict, prefix: str) -> dict:
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix) :]: v for k, v in state.items()}
    return state


def soco_to_torchvision(encoder: dict, arch: str) -> dict:
    """A SoCo encoder state dict (``SoCoWeights.network(...)``) -> torchvision detector keys
    (see module docstring)."""
    out = OrderedDict()
    for key, value in encoder.items():
        if arch == "fpn":
            if key.startswith("backbone."):
                out[key] = value
            elif key.startswith("box_head."):
                out["roi_heads." + key] = value
        elif key.startswith("backbone.") and not key.startswith("backbone.fc."):
            out["backbone.body." + key[len("backbone.") :]] = value
    return out


def plain_state_dict(content, path: Path) -> tuple[dict, str]:
    """(torchvision-keyed state dict, description) of a loaded file that is not a SoCo checkpoint:
    a state dict of tensors, or one under ``model`` / ``state_dict``."""
    state = _tensor_dict(content)
    for key in ("model", "state_dict"):
        if state is None and isinstance(content, dict):
            state = _tensor_dict(content.get(key))
    if state is None:
        raise WeightsError(f"{path}: neither a state dict of tensors nor a SoCo checkpoint")
    state = _strip_prefix(state, "module.")
    if "conv1.weight" in state and not any(k.startswith("backbone.") for k in state):
        # a torchvision resnet50 state dict (soco export of a C4 run): the detector's ResNet body
        body = {f"backbone.body.{k}": v for k, v in state.items() if not k.startswith("fc.")}
        return body, f"torchvision resnet50 state dict {path}, into backbone.body"
    return state, f"torchvision state dict {path}"


def read_weights(weights, soco_weights: str = DEFAULT_SOCO_WEIGHTS) -> tuple[dict, str]:
    """(torchvision-keyed state dict, description) from a file or SoCo run folder."""
    path, content = load_weights_file(weights)  # the one reader: run-folder lookup, safe load
    soco = soco_weights_of(content, path)
    if soco is not None:
        encoder = soco.network(soco_weights)
        return soco_to_torchvision(encoder, soco.arch), f"SoCo checkpoint {path}, {soco_weights} encoder"
    return plain_state_dict(content, path)


def load_weights(model: nn.Module, weights, soco_weights: str = DEFAULT_SOCO_WEIGHTS) -> WeightReport:
    """Copy matching tensors of ``weights`` (path, run folder, or None/"none") into ``model``.

    Returns the report; raises WeightsError when the file matches nothing in the detector.
    """
    own = model.state_dict()
    totals: dict[str, int] = {}
    for key in own:
        totals[_module_of(key)] = totals.get(_module_of(key), 0) + 1
    if weights is None or str(weights) == "none":
        return WeightReport("none", "random init", {m: (0, n) for m, n in totals.items()})
    state, kind = read_weights(weights, soco_weights)
    loaded, unused, mismatched = {}, [], []
    for key, value in state.items():
        if key not in own:
            unused.append(key)
        elif tuple(own[key].shape) != tuple(value.shape):
            mismatched.append(key)
        else:
            loaded[key] = value
    if not loaded:
        raise WeightsError(
            f"{weights}: no tensor matches the detector ({len(state)} keys, e.g. "
            f"{', '.join(list(state)[:2]) or 'none'}); expected torchvision Mask R-CNN v2 keys "
            "(soco export --to torchvision) or a soco pretrain run"
        )
    _, unexpected = model.load_state_dict(loaded, strict=False)  # missing: counted per module below
    assert not unexpected, unexpected  # we only pass keys the model has
    counts = {m: 0 for m in totals}
    for key in loaded:
        counts[_module_of(key)] += 1
    return WeightReport(str(weights), kind, {m: (counts[m], totals[m]) for m in totals}, unused, mismatched)
