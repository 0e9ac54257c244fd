"""The one weights layer: read any weights file soco knows and load it into a module.

- ``read``: ``read_weights(RUN or FILE) -> FileWeights`` (a SoCo checkpoint or run folder, a
  torchvision detection or ResNet state dict, a safetensors export, a Detectron2 or MMDetection
  checkpoint; tensors under detector keys, with the file's arch and backbone) and
  ``read_soco_checkpoint`` (export's reader: a SoCo checkpoint only);
- ``keymaps``: the key maps between encoder, detector and export-target names (the exporters of
  ``transfer/export`` take their mappers from here);
- ``load``: ``load(module, weights, target, policy)`` under ``strict | report | partial`` with
  one :class:`LoadReport`.

This package sits below train/, transfer/, evaluate/ and cli/ and imports none of them (only
config, model, engine, errors): every command reads weights through it. Which policy each
command uses (see their modules): ``soco linear`` strict (a frozen backbone must be the file's
whole), ``soco knn`` report (features of a partly random encoder measure nothing), ``soco
finetune`` partial (every tensor is trained; what did not load is reported), ``soco pretrain
--init`` report, or partial with ``--init-partial``, plus warm start's own rules.
"""

from .errors import WeightsError
from .keymaps import ARCHS, NETWORKS, PREFIXES, detector_to_encoder, encoder_to_detector
from .load import (
    POLICIES,
    LoadReport,
    Target,
    check,
    detector_target,
    encoder_target,
    load,
    load_into,
    match,
    refusal,
    resnet_target,
)
from .read import (
    FileWeights,
    SocoWeights,
    detector_state,
    load_weights_file,
    read_soco_checkpoint,
    read_weights,
    resolve_checkpoint,
    soco_weights_of,
)

__all__ = [
    "ARCHS",
    "NETWORKS",
    "POLICIES",
    "PREFIXES",
    "FileWeights",
    "LoadReport",
    "SocoWeights",
    "Target",
    "WeightsError",
    "check",
    "detector_state",
    "detector_target",
    "detector_to_encoder",
    "encoder_target",
    "encoder_to_detector",
    "load",
    "load_into",
    "load_weights_file",
    "match",
    "read_soco_checkpoint",
    "read_weights",
    "refusal",
    "resnet_target",
    "resolve_checkpoint",
    "soco_weights_of",
]
