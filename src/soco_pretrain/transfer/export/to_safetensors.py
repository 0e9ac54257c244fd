"""safetensors: the torchvision export's tensors in one safetensors file, with the run in its
metadata, and a model card beside it.

The names are exactly the torchvision export's (this exporter takes its mappers): FPN runs
``backbone.body.*``, ``backbone.fpn.*``, ``roi_heads.box_head.*`` (torchvision Mask R-CNN v2),
C4 runs the plain torchvision ResNet keys; ``safetensors.torch.load_file`` gives a dict that
loads into the torchvision model as the torchvision export does. safetensors holds tensors only
(no pickle: loading runs no code) and a ``str -> str`` header, filled by :func:`file_metadata`.
The model card (:func:`card_path`, Markdown) says what the weights are, how they were trained,
how to load them and whose they are.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ... import __version__
from ...data.manifest import sidecar_path
from ...errors import UserError
from ...files import atomic_write_bytes, atomic_write_text
from ...model.backbones import BACKBONES
from .common import Written
from .to_torchvision import TorchvisionExporter, missing_keys

FORMAT = "soco-pretrain"  # metadata "format": what wrote the file
PAPER = (
    'Fangyun Wei, Yue Gao, Zhirong Wu, Han Hu, Stephen Lin, "Aligning Pretraining for Detection '
    'via Object-Level Contrastive Learning", NeurIPS 2021 (arXiv:2106.02637)'
)
LICENSE_NOTE = (
    "These weights were learnt from the run's training images: the rights to them are those of "
    "whoever owns that training data (check its terms before sharing or using them). "
    "soco-pretrain's MIT licence covers its code, not these weights."
)
# The config values the recipe shows: (config key, what it is).
RECIPE_KEYS = (
    ("model.arch", "network: fpn (FPN + 4conv1fc box head) or c4 (res5 head)"),
    ("model.backbone", "torchvision ResNet / ResNeXt"),
    ("train.epochs", "epochs over the training images"),
    ("train.batch_size", "total batch (images per optimiser step)"),
    ("train.optimizer", "optimiser: lars (the paper's) or sgd"),
    ("train.base_lr", "learning rate per 256 images (lr = base_lr x batch / 256)"),
    ("train.warmup_steps", "warm-up in steps (none: train.warmup_epochs)"),
    ("train.weight_decay", "weight decay"),
    ("train.ema_tau", "starting EMA rate of the target network"),
    ("train.ema_schedule", "EMA rate schedule: cosine to 1 (the paper's) or constant"),
    ("data.views.v1_size", "view V1 size (px)"),
    ("data.views.v2_size", "view V2 size (px)"),
    ("data.views.v3_size", "view V3 size (px)"),
    ("data.views.soco_star", "SoCo*: a fourth view V4"),
    ("data.views.num_proposals", "proposals per image per step (K)"),
    ("data.views.proposal_source", "where the boxes come from"),
    ("train.freeze", "parts kept as they started"),
    ("model.init", "warm start weights"),
)
# newer keys: shown only when the config has them
OPTIONAL_KEYS = ("train.freeze", "model.init", "train.optimizer", "train.warmup_steps", "train.ema_schedule")
MISSING = object()
_NETWORKS = {
    "online": "the online encoder, which BYOL and the released SoCo converters keep",
    "target": "the EMA target encoder",
}


def card_path(out: Path) -> Path:
    """The model card of ``out``: its name with the last suffix replaced by ``.MODEL_CARD.md``
    (``soco_r50.safetensors`` -> ``soco_r50.MODEL_CARD.md``)."""
    return out.with_name(f"{out.stem if out.suffix else out.name}.MODEL_CARD.md")


def _value(config: dict | None, dotted: str):
    node: object = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return MISSING
        node = node[part]
    return node


def _views(config: dict | None) -> str | None:
    sizes = [_value(config, f"data.views.v{i}_size") for i in (1, 2, 3)]
    if MISSING in sizes:
        return None
    if _value(config, "data.views.soco_star") is True:
        sizes.append(_value(config, "data.views.v4_size"))
    return "/".join(map(str, sizes))


def recipe_line(source) -> str:
    """One line for people: arch, backbone, epochs, batch, base_lr, views (+ freeze, init)."""
    config = source.config
    parts = [f"SoCo {source.arch}", f"backbone {source.backbone}"]
    if config is None:
        return ", ".join(parts + ["training settings not recorded (the checkpoint has no config)"])
    for key, label in (("train.epochs", "epochs"), ("train.batch_size", "batch"), ("train.base_lr", "base_lr")):
        value = _value(config, key)
        if value is not MISSING:
            parts.append(f"{label} {value}")
    views, k = _views(config), _value(config, "data.views.num_proposals")
    if views is not None:
        parts.append(f"views {views}" + ("" if k is MISSING else f", K={k} proposals"))
    freeze, init = _value(config, "train.freeze"), _value(config, "model.init")
    if freeze not in (MISSING, None, "none"):
        parts.append(f"freeze {freeze}")
    if init not in (MISSING, None):
        parts.append(f"init {Path(str(init)).name}")  # the file's name: a local path means nothing elsewhere
    return ", ".join(parts)


def shareable(value):
    """``value`` (a saved config) with every absolute path replaced by its file name: a shipped
    file should not carry the layout of the machine it was trained on (``model.init``,
    ``data.views.proposal_json``, ``monitor.json`` ...)."""
    if isinstance(value, dict):
        return {k: shareable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [shareable(v) for v in value]
    if isinstance(value, str) and Path(value).is_absolute():
        return Path(value).name
    return value


def file_metadata(source, stamp: dict) -> dict[str, str]:
    """The safetensors header metadata (every value a string); ``step``, ``total_steps``,
    ``config`` (absolute paths cut to file names) and the ``data_manifest_*`` keys only when the
    checkpoint / run records them."""
    meta = {"format": FORMAT, "arch": source.arch, "backbone": source.backbone, "weights": source.weights}
    if source.step is not None:
        meta["step"] = str(source.step)
    if source.total_steps is not None:
        meta["total_steps"] = str(source.total_steps)
    meta["soco_pretrain_version"] = __version__
    if source.config is not None:
        meta["config"] = json.dumps(shareable(source.config), sort_keys=True, default=str)
    meta["recipe"] = recipe_line(source)
    meta.update({key: str(value) for key, value in stamp.items() if value is not None})
    meta["license"] = LICENSE_NOTE
    return meta


def standalone(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with every tensor contiguous and owning its memory: safetensors refuses tensors
    that share storage and writes only contiguous ones."""
    seen: set[int] = set()
    out = {}
    for name, tensor in state.items():
        ptr = tensor.untyped_storage().data_ptr()
        whole = tensor.is_contiguous() and tensor.untyped_storage().nbytes() == tensor.nbytes
        out[name] = tensor if whole and ptr not in seen else tensor.contiguous().clone()
        seen.add(ptr)
    return out


def _encode(state: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    try:
        from safetensors.torch import save  # here, not at the top: a missing package is a one-line UserError
    except ImportError:
        raise UserError("--to safetensors needs the safetensors package (pip install safetensors)") from None
    return save(standalone(state), metadata=metadata)


def _describe(source) -> str:
    label = BACKBONES[source.backbone].label if source.backbone in BACKBONES else source.backbone
    if source.arch == "fpn":
        return f"{label}-FPN: ResNet body, FPN (P2-P5, BatchNorm) and 4conv1fc box head of torchvision's Mask R-CNN v2"
    return f"{label}-C4: the ResNet (res2-res5; res5 is the C4 detector's box head), no fc"


class SafetensorsExporter(TorchvisionExporter):
    """The torchvision exporter's names and missing keys; a safetensors file and a card."""

    name = "safetensors"
    config_suffix = None

    def write(self, state: dict, source, out: Path, config_out: Path | None, stamp: dict) -> Written:
        missing = missing_keys(source.arch, set(state), source.backbone)
        atomic_write_bytes(out, _encode(state, file_metadata(source, stamp)))
        card = card_path(out)
        atomic_write_text(card, model_card(source, out, stamp, state))
        names = (
            "torchvision Mask R-CNN v2 names (backbone.body, backbone.fpn, roi_heads.box_head)"
            if source.arch == "fpn"
            else f"torchvision {source.backbone} names (no fc)"
        )
        layout = (
            f"safetensors of the {source.backbone} {source.arch} encoder, {names}; run in the metadata "
            "(load_file -> load_state_dict(..., strict=False))"
        )
        return Written(layout, missing, notes=(f"wrote {card}: model card (what, recipe, data, how to load, licence)",))


# ---------------------------------------------------------------- the model card


def _recipe_table(config: dict | None) -> list[str]:
    if config is None:
        return ["Not recorded: the checkpoint has no saved config."]
    lines = [
        "From the run's saved config (the checkpoint's `config` entry, also the run folder's",
        "`config.yaml`; all of it is in this file's metadata under `config`):",
        "",
        "| config key | value | what it is |",
        "|---|---|---|",
    ]
    for key, what in RECIPE_KEYS:
        value = _value(config, key)
        if value is MISSING and key in OPTIONAL_KEYS:
            continue
        lines.append(f"| `{key}` | {_shown(key, value)} | {what} |")
    return lines


def _shown(key: str, value) -> str:
    if value is MISSING:
        return "not recorded"
    if value is None:
        return "none"
    if key == "model.init":
        return Path(str(value)).name  # the file's name: a local path means nothing elsewhere
    return value if isinstance(value, str) else json.dumps(value)


def _data_section(stamp: dict, out: Path) -> list[str]:
    digest, count = stamp.get("data_manifest_hash"), stamp.get("data_manifest_count")
    if digest is None:
        return ["Not recorded: the run has no data manifest (`data_manifest.json`)."]
    return [
        f"{count} images, data manifest set hash (sha256 of the sorted per-file sha256) `{digest}`.",
        f"The manifest itself is beside the weights (`{sidecar_path(out).name}`): it lists every",
        "training file by content hash, so an evaluation set can be checked for overlap (`soco",
        "finetune` and `soco knn` do so with these weights).",
    ]


def _load_snippet(source, filename: str) -> list[str]:
    backbone = source.backbone
    if source.arch == "c4":
        return [
            "```python",
            "import torchvision",
            "from safetensors.torch import load_file  # pip install safetensors",
            f"model = torchvision.models.{backbone}(weights=None)",
            f'model.load_state_dict(load_file("{filename}"), strict=False)',
            "```",
            "",
            "Only `fc.weight` and `fc.bias` are missing (SoCo trains no classifier); nothing is unexpected.",
        ]
    if backbone == "resnet50":
        return [
            "```python",
            "from safetensors.torch import load_file  # pip install safetensors",
            "from torchvision.models.detection import maskrcnn_resnet50_fpn_v2",
            "model = maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, num_classes=91)",
            f'model.load_state_dict(load_file("{filename}"), strict=False)',
            "```",
            "",
            "Missing are only the parts SoCo does not pretrain (`rpn.*`, `roi_heads.box_predictor.*`,",
            "`roi_heads.mask_head.*`, `roi_heads.mask_predictor.*`: the detector initialises them);",
            "nothing is unexpected. Set `num_classes` to your classes.",
        ]
    return [
        f"The names are those of `maskrcnn_resnet50_fpn_v2` with `torchvision.models.{backbone}` as its",
        "body. torchvision has no builder for that model; soco-pretrain's `build_detector` makes it",
        "(torchvision's modules, in the order `maskrcnn_resnet50_fpn_v2` builds them):",
        "",
        "```python",
        "from safetensors.torch import load_file  # pip install safetensors",
        "from soco_pretrain.transfer.detector import build_detector",
        f'model = build_detector(91, backbone="{backbone}")  # Mask R-CNN v2 around {backbone}',
        f'model.load_state_dict(load_file("{filename}"), strict=False)',
        "```",
        "",
        "Missing are only the parts SoCo does not pretrain (RPN, box predictor, mask head). For the",
        "ResNet alone, take the `backbone.body.` keys without that prefix (or export with",
        f"`--to torchvision-backbone`): they load into `torchvision.models.{backbone}()`, only `fc` missing.",
    ]


def _step_line(source) -> str:
    """The card's step: where the run stopped against its schedule, when the checkpoint tells it."""
    step, total = source.step, source.total_steps
    if step is None:
        return "Step: not recorded."
    if total is None:
        return (
            f"Step: {step} (optimiser steps of the run when the checkpoint was written; its schedule's "
            "length is not recorded)."
        )
    if step < total:
        return (
            f"Step: {step}: stopped at step {step} of {total}, before the end of its schedule (an unfinished run: "
            "the learning rate and EMA rate had not reached their final values)."
        )
    return f"Step: {step} of {total} (the run finished its schedule)."


def model_card(source, out: Path, stamp: dict, state: dict) -> str:
    """MODEL_CARD.md for the safetensors file ``out`` (Markdown)."""
    params = sum(
        t.numel() for name, t in state.items() if not name.endswith(("running_mean", "running_var", "tracked"))
    )
    dtypes = ", ".join(sorted({str(t.dtype).removeprefix("torch.") for t in state.values() if t.is_floating_point()}))
    lines = [
        f"# SoCo-pretrained {source.backbone} ({source.arch}): `{out.name}`",
        "",
        "## Model",
        "",
        f"- Method: SoCo, object-level contrastive pretraining for detection: {PAPER}.",
        f"- Architecture: {_describe(source)}.",
        f"- Backbone: torchvision `{source.backbone}` (`model.backbone`).",
        f"- Network: {source.weights} ({_NETWORKS[source.weights]}).",
        "- Not included: the projector and predictor (pretraining only, never exported).",
        f"- {_step_line(source)}",
        f"- Tensors: {len(state)} ({params:,} parameters), {dtypes}, names of the torchvision export.",
        f"- Written by soco-pretrain {__version__} (`soco export --to safetensors`) from `{source.checkpoint.name}`.",
        "",
        "## Recipe",
        "",
        *_recipe_table(source.config),
        "",
        f"In one line (metadata `recipe`): {recipe_line(source)}.",
        "",
        "## Training data",
        "",
        *_data_section(stamp, out),
        "",
        "## How to load",
        "",
        *_load_snippet(source, out.name),
        "",
        "Inputs as in pretraining: RGB in [0, 1], normalised with the ImageNet mean (0.485, 0.456, 0.406)",
        "and std (0.229, 0.224, 0.225), which torchvision's detectors do themselves. The metadata",
        "(`safetensors.safe_open(path, 'pt').metadata()`) holds `format`, `arch`, `backbone`, `weights`,",
        "`step`, `total_steps`, `soco_pretrain_version`, `config`, `recipe`, `data_manifest_hash`/`_count`",
        "and `license`.",
        "",
        "## Intended use and limitations",
        "",
        "- An initialisation to fine-tune object detection and instance segmentation (Mask R-CNN",
        "  FPN / C4, paper section 4.2) or other dense tasks; the ResNet alone for a linear probe.",
        "- Not a classifier and not a detector by itself: no `fc`, RPN, box predictor or mask head.",
        "  Fine-tune with labels (e.g. `soco finetune`) and evaluate before relying on it.",
        "- Self-supervised on the run's images only: what it is worth depends on that data and on the",
        "  schedule above; the paper's results are for ImageNet at 100 / 400 epochs, batch 2048. This",
        "  file records no accuracy. Biases of the training images carry over.",
        "- BatchNorm statistics are those of the pretraining crops; the paper fine-tunes with",
        "  synchronised BatchNorm, nothing frozen.",
        "",
        "## Licence",
        "",
        LICENSE_NOTE,
        "",
    ]
    return "\n".join(lines)
