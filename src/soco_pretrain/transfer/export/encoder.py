"""The encoder an export writes: one network of a SoCo checkpoint, checked against the detector."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from ...config import ModelConfig
from ...errors import UserError
from ...model.encoder import SoCoEncoder
from ...weights import (
    PREFIXES,
    read_soco_checkpoint,
    resolve_checkpoint,  # noqa: F401 - the export package's name for it
)
from .common import DEFAULT_WEIGHTS, WEIGHTS


@dataclass
class EncoderWeights:
    """One network's encoder from a SoCo checkpoint: keys without the ``encoder.`` prefix."""

    state: dict[str, torch.Tensor]
    arch: str
    weights: str
    checkpoint: Path
    step: int | None
    unused: dict[str, int]  # checkpoint "model" keys not in this encoder, per top-level module
    backbone: str = "resnet50"  # the run's model.backbone (model/backbones.py)
    config: dict | None = None  # the run's resolved config as saved in the checkpoint, if any
    total_steps: int | None = None  # the run's schedule length, when the checkpoint tells it


def read_encoder(source, weights: str = DEFAULT_WEIGHTS) -> EncoderWeights:
    """Load a checkpoint and take the online (``encoder.*``) or target (``target_encoder.*``) encoder.

    Raises :class:`UserError` (one line) for a missing or unreadable file, a file that is not a
    SoCo checkpoint, an unknown ``model.arch`` or encoder keys/shapes that differ from the
    detector's (e.g. a changed ``model.head_dim``).
    """
    if weights not in WEIGHTS:
        raise UserError(f"unknown weights {weights!r} (choose online or target)")
    found = read_soco_checkpoint(source)  # a WeightsError is already one line naming the file
    prefix = PREFIXES[weights]
    encoder = found.network(weights)
    if not encoder:
        raise UserError(f"{found.path}: has no {weights} network ({prefix}* keys)")
    _check_encoder(encoder, found.arch, found.path, prefix, found.backbone)
    unused = Counter(k.split(".", 1)[0] for k in found.model if not k.startswith(prefix))
    return EncoderWeights(
        encoder,
        found.arch,
        weights,
        found.path,
        found.step,
        dict(unused),
        found.backbone,
        found.config,
        found.total_steps,
    )


def _reference_shapes(arch: str, backbone: str = "resnet50") -> dict[str, torch.Size]:
    """Key -> shape of the encoder the detectors expect (ModelConfig defaults but ``arch`` and
    ``backbone``), built on 'meta'."""
    with torch.device("meta"):
        encoder = SoCoEncoder(ModelConfig(arch=arch, backbone=backbone))
    return {k: v.shape for k, v in encoder.state_dict().items()}


def _check_encoder(encoder: dict, arch: str, path: Path, prefix: str, backbone: str = "resnet50") -> None:
    reference = _reference_shapes(arch, backbone)
    absent = [k for k in reference if k not in encoder]
    extra = [k for k in encoder if k not in reference]
    if absent or extra:
        what = f"lacks {prefix}{absent[0]}" if absent else f"has unexpected {prefix}{extra[0]}"
        raise UserError(
            f"{path}: not a SoCo {arch} checkpoint this version can export ({what}; "
            f"{len(absent)} missing, {len(extra)} unexpected keys)"
        )
    for key, shape in reference.items():
        if encoder[key].shape != shape:
            raise UserError(
                f"{path}: {prefix}{key} has shape {tuple(encoder[key].shape)}, the detector's is {tuple(shape)} "
                "(only the Mask R-CNN sizes export: model.head_dim=1024, model.roi_size=7)"
            )
