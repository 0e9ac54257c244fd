"""Export SoCo weights to the detectors people use (torchvision, Detectron2, MMDetection) and as
safetensors or a bare ResNet (torchvision / timm).

``export(RUN or checkpoint, to=..., weights=..., out=FILE) -> KeyReport``. What is exported is
the pretrained encoder (paper 4.2: "all the pretrained weights except for projection and
prediction are loaded"): for ``model.arch=fpn`` the ResNet (``model.backbone``, ResNet-50 by
default; model/backbones.py), the FPN and the 4conv1fc box head; for ``c4`` the ResNet (res5
being the C4 detector's box head). Pairs a target library cannot build are refused in one line
(README "Backbones").

Which network (``--weights``): **online** by default. The paper does not say; BYOL, which SoCo
follows, keeps the online encoder at the end of training, and the released SoCo converters
(hologerry/SoCo ``converter_detectron2/*.py``, ``converter_mmdetection/*.py``) read
``module.encoder.*`` / ``module.neck.*`` / ``module.head.*`` -- the online network; the target
is ``encoder_k``/``neck_k``/``head_k`` there and is never exported (their ``--ema`` flag reads a
separate ``model_ema`` entry, not the target). ``--weights target`` exports the EMA network.

The checkpoint is read by the one SoCo checkpoint reader (``weights/read.py``). One exporter
object per target (``EXPORTERS``) holds its key mappers per arch (``weights/keymaps.py``, where the
weights reader inverts them) and writes its files; the key lists are written out independently in
tests/test_export.py:

- torchvision (``to_torchvision.py``), arch fpn: a plain state dict with ``torchvision.models.
  detection.maskrcnn_resnet50_fpn_v2`` names, whatever the backbone (``backbone.body.*``, ``backbone.fpn.*``,
  ``roi_heads.box_head.*``); ``load_state_dict(strict=False)`` leaves missing only what SoCo
  does not pretrain (``rpn.*``, ``roi_heads.box_predictor.*``, ``roi_heads.mask_head.*``,
  ``roi_heads.mask_predictor.*``). Arch c4: plain ``torchvision.models.<backbone>`` keys
  (``conv1``, ``bn1``, ``layer1``..``layer4``; only ``fc`` missing) -- torchvision has no C4 Mask
  R-CNN, so this is the backbone for a linear probe or a hand-built C4 detector.
- Detectron2 (``to_detectron2.py``, names of Detectron2 v0.6): a pickle ``{"model": {name:
  float32 ndarray}, "__author__": "soco-pretrain", "matching_heuristics": True}``. FPN:
  ``backbone.bottom_up.stem / res2..res5``, ``backbone.fpn_lateral2..5`` / ``fpn_output2..5``
  (torchvision's ``inner_blocks[i]`` / ``layer_blocks[i]`` act on C(i+2)),
  ``roi_heads.box_head.conv1..4`` and ``fc1``; every norm as
  ``<conv>.norm.{weight,bias,running_mean,running_var}`` (no ``num_batches_tracked``, as
  Detectron2's model-zoo pickles; momentum BatchNorm never reads it). C4: ``backbone.stem``,
  ``backbone.res2..res4`` and ``roi_heads.res5`` (Res5ROIHeads). A ready config is written beside
  it (``FILE.yaml``, from ``templates/detectron2_{fpn,c4}.yaml.tmpl``).
- MMDetection (``to_mmdet.py``, names of MMDetection v3.3.0): ``torch.save({"state_dict": ...,
  "meta": ...})``. FPN: ``backbone.*`` (mmdet's ResNet keys equal torchvision's),
  ``neck.lateral_convs.i.conv/bn``, ``neck.fpn_convs.i.conv/bn``,
  ``roi_head.bbox_head.shared_convs.i.conv/bn``, ``roi_head.bbox_head.shared_fcs.0``. C4:
  ``backbone.*`` (stages 1-3) and ``roi_head.shared_head.layer4.*`` (mmdet's ResLayer shared
  head). A config (``FILE.py``, from ``templates/mmdet_{fpn,c4}.py.tmpl``) is written beside it.
- safetensors (``to_safetensors.py``): the torchvision export's tensors under the same names (its
  mappers), in a safetensors file whose metadata (str -> str) holds ``format`` ("soco-pretrain"),
  ``arch``, ``backbone``, ``weights``, ``step``, ``total_steps``, ``soco_pretrain_version``,
  ``config`` (the run's config as JSON), ``recipe`` (one line), ``data_manifest_hash`` /
  ``data_manifest_count`` (runs with a manifest) and ``license`` (``step``, ``total_steps`` and
  ``config`` when the checkpoint records them); a model card ``NAME.MODEL_CARD.md`` is written
  beside it (it says "stopped at step N of M" for a run stopped before its schedule's end).
- torchvision-backbone, alias timm (``to_backbone.py``): the ResNet alone, ``torchvision.models.
  <backbone>`` keys (FPN: the body ``backbone.body.X`` -> ``X``; C4: ``backbone.X``, res5
  included), a plain state dict that leaves only ``fc`` missing; timm's ResNet/ResNeXt names are
  the same (checked in that module's docstring).

When the run has a data manifest (``RUN/data_manifest.json``), it is copied beside the export
as ``FILE.manifest.json`` (the leak guard of fine-tuning finds it there) and its ``set_hash`` and
count go into the detectron2 payload / mmdet ``meta`` / safetensors metadata as
``data_manifest_hash`` and ``data_manifest_count``; the torchvision files stay plain state dicts.

Every file is written atomically (``soco_pretrain.files``: temporary file + ``os.replace``).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ...data.manifest import manifest_for_weights, sidecar_path
from ...files import atomic_write_json
from ...runfolder import holds_checkpoints
from ...weights.keymaps import ARCHS
from .common import (
    DEFAULT_WEIGHTS,
    DETECTRON2_VERSION,
    FINETUNE_WEIGHT_DECAY,
    MMDET_VERSION,
    PIXEL_MEAN,
    PIXEL_STD,
    WEIGHTS,
    Exporter,
    UserError,
    Written,
    render_template,
)
from .encoder import EncoderWeights, read_encoder, resolve_checkpoint
from .report import KeyReport, ModuleCount, detector_rows, unused_rows
from .to_backbone import BackboneExporter
from .to_detectron2 import Detectron2Exporter
from .to_mmdet import MmdetExporter
from .to_safetensors import SafetensorsExporter, card_path
from .to_torchvision import TorchvisionExporter

EXPORTERS: dict[str, Exporter] = {
    e.name: e
    for e in (TorchvisionExporter(), Detectron2Exporter(), MmdetExporter(), SafetensorsExporter(), BackboneExporter())
}
EXPORTERS["timm"] = EXPORTERS["torchvision-backbone"]  # timm's ResNet names are torchvision's (to_backbone.py)
TARGETS = tuple(EXPORTERS)  # torchvision, detectron2, mmdet, safetensors, torchvision-backbone, timm

__all__ = [
    "ARCHS",
    "DEFAULT_WEIGHTS",
    "DETECTRON2_VERSION",
    "EXPORTERS",
    "FINETUNE_WEIGHT_DECAY",
    "MMDET_VERSION",
    "PIXEL_MEAN",
    "PIXEL_STD",
    "TARGETS",
    "WEIGHTS",
    "EncoderWeights",
    "UserError",
    "Exporter",
    "KeyReport",
    "ModuleCount",
    "Written",
    "card_path",
    "convert",
    "export",
    "read_encoder",
    "render_template",
    "resolve_checkpoint",
]


def _exporter(to: str) -> Exporter:
    if to not in EXPORTERS:
        raise UserError(f"unknown target {to!r} (choose {', '.join(TARGETS)})")
    return EXPORTERS[to]


def convert(encoder: dict[str, torch.Tensor], arch: str, to: str):
    """Rename an encoder state dict for ``to``.

    Returns ``(state, mapping, groups, dropped)``: the renamed tensors (same objects), exported
    name -> encoder key, exported name -> detector module, and the encoder keys left out.
    """
    return _exporter(to).convert(encoder, arch)


def _refuse_clobbering_the_run(path: Path, checkpoint: Path) -> None:
    """UserError when writing ``path`` would destroy training state: the checkpoint being
    exported (by any name: a symlink or hard link is the same file) or any file in a run's
    checkpoints folder (a resume could take an export for a checkpoint, retention could delete it)."""

    if path.exists() and os.path.samefile(path, checkpoint):
        raise UserError(f"{path}: is the checkpoint being exported ({checkpoint}); write the export elsewhere")
    folder = path.resolve().parent
    if folder.name == "checkpoints" and holds_checkpoints(folder.parent):
        raise UserError(f"{path}: is inside the run's checkpoints folder {folder}; write the export elsewhere")


SAFETENSORS_SUFFIX = ".safetensors"


def _refuse_a_misleading_suffix(out: Path, to: str) -> None:
    """UserError when ``out``'s extension says another format than ``to`` writes: readers (soco's
    own ``--weights``, the safetensors tools) tell a safetensors file from a torch / pickle file
    by its ``.safetensors`` extension, so such a file would later fail to load."""
    if (to == "safetensors") == (out.suffix == SAFETENSORS_SUFFIX):
        return
    if to == "safetensors":
        raise UserError(
            f"{out}: --to safetensors writes a safetensors file, which readers know by its "
            f"{SAFETENSORS_SUFFIX} extension; name it e.g. {out.with_suffix(SAFETENSORS_SUFFIX).name}"
        )
    kind, suffix = ("a pickle", ".pkl") if to == "detectron2" else ("a torch.save file", ".pth")
    raise UserError(
        f"{out}: --to {to} writes {kind}, which a {SAFETENSORS_SUFFIX} name would have read as safetensors; "
        f"name it e.g. {out.with_suffix(suffix).name}, or use --to safetensors"
    )


def export(
    source,
    to: str,
    weights: str = DEFAULT_WEIGHTS,
    out=None,
    config_out=None,
) -> KeyReport:
    """Export a SoCo run folder or checkpoint to ``out`` for ``to`` (one of :data:`TARGETS`).

    ``weights``: ``online`` (default; BYOL and the released converters) or ``target`` (EMA).
    ``config_out`` (detectron2: ``out`` with ``.yaml``; mmdet: ``.py``; the others: none) is a
    ready fine-tune config pointing at ``out``. Returns the :class:`KeyReport`.
    """
    exporter = _exporter(to)
    if out is None:
        raise UserError("no output file given")
    out = Path(out)
    if out.is_dir():
        raise UserError(f"{out}: is a directory (give a file name, e.g. {out / 'soco.pth'})")
    _refuse_a_misleading_suffix(out, to)
    if config_out is not None and exporter.config_suffix is None:
        with_config = [name for name, e in EXPORTERS.items() if e.config_suffix is not None]
        raise UserError(f"a config file is written for {' and '.join(with_config)} only")
    if config_out is not None and Path(config_out).resolve() == out.resolve():
        raise UserError(f"{out}: the config file cannot be the weights file")
    source_weights = read_encoder(source, weights)
    for path in (out, exporter.config_path(out, config_out)):
        if path is not None:
            _refuse_clobbering_the_run(path, source_weights.checkpoint)
    found = manifest_for_weights(source_weights.checkpoint)  # the run's data manifest, if any
    manifest = found[1] if found is not None else None
    stamp = (
        {}
        if manifest is None
        else {"data_manifest_hash": manifest.get("set_hash"), "data_manifest_count": manifest.get("count")}
    )
    state, mapping, groups, dropped = exporter.convert(source_weights.state, source_weights.arch)
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    written = exporter.write(state, source_weights, out, exporter.config_path(out, config_out), stamp)

    # The manifest beside every target (a torchvision state dict has no room for it): the leak
    # guard of finetune/knn finds it there; a stale one from an earlier export is removed.
    manifest_out = sidecar_path(out)
    if manifest is not None:
        atomic_write_json(manifest_out, manifest)
    else:
        manifest_out.unlink(missing_ok=True)

    return KeyReport(
        target=to,
        arch=source_weights.arch,
        weights=weights,
        checkpoint=source_weights.checkpoint,
        step=source_weights.step,
        out=out,
        layout=written.layout,
        config_out=written.config_out,
        detector=detector_rows(groups, written.missing),
        checkpoint_unused=unused_rows(weights, dropped, source_weights.unused),
        mapping=mapping,
        notes=list(written.notes),
        manifest_hash=None if manifest is None else manifest.get("set_hash"),
        manifest_count=None if manifest is None else manifest.get("count"),
        manifest_out=manifest_out if manifest is not None else None,
    )
