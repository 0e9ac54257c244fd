"""Moved to :mod:`soco_pretrain.weights` (the one weights layer); these names stay importable
from here for code written against the old place."""

from __future__ import annotations

from ..weights import (
    ARCHS,
    NETWORKS,
    PREFIXES,
    SocoWeights,
    WeightsError,
    detector_state,
    detector_to_encoder,
    encoder_to_detector,
    load_weights_file,
    read_soco_checkpoint,
    resolve_checkpoint,
    soco_weights_of,
)

__all__ = [
    "ARCHS",
    "NETWORKS",
    "PREFIXES",
    "SocoWeights",
    "WeightsError",
    "detector_state",
    "detector_to_encoder",
    "encoder_to_detector",
    "load_weights_file",
    "read_soco_checkpoint",
    "resolve_checkpoint",
    "soco_weights_of",
]
