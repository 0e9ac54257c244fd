"""Read any weights file soco knows: which file, which format, which network, which backbone.

``read_weights(RUN or FILE) -> FileWeights`` is what every command that loads weights reads
through (``soco knn``, ``soco linear``, ``soco finetune``, ``soco pretrain --init``);
``read_soco_checkpoint`` is export's (a SoCo checkpoint only). The file's tensors come out under
torchvision Mask R-CNN v2 names ("detector keys": backbone.body.*, backbone.fpn.*,
roi_heads.box_head.*, ...) whatever the format:

- a run folder resolves to ``RUN/checkpoints/last.pt``, else its newest ``step_N.pt`` (the one
  run-folder lookup, ``CheckpointManager.latest``, that pretraining's resume uses too);
- torch files load with ``torch.load(weights_only=True)`` (a checkpoint cannot run code), plain
  pickles (Detectron2's .pkl) with only numpy arrays and dicts allowed, safetensors files by
  their extension;
- a SoCo checkpoint is a dict whose ``model`` entry is a ``SoCoModel`` state dict: the online
  network ``encoder.*`` (with ``projector.*``, ``predictor.*``) and the EMA target network
  ``target_encoder.*`` (with ``target_projector.*``), as BYOL, which SoCo follows, names them
  (the released code, hologerry/SoCo, calls them ``encoder`` / ``encoder_k``); its architecture
  is the saved config's ``model.arch``, else ``fpn`` when the encoder has the FPN body;
- any other file is a state dict (possibly under ``model`` or ``state_dict``, possibly with a
  DataParallel ``module.`` prefix) in one of four layouts: torchvision detection, a plain
  torchvision ResNet (put under ``backbone.body``), Detectron2 or MMDetection names as soco
  export writes them (model-zoo checkpoints use the same ones; read back with keymaps.inverse).

Every problem is a :class:`WeightsError` of one line naming the file; weights holding NaN or inf
(a diverged run) are one of them, whatever the format (``engine.checkpoint.refuse_non_finite``).
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..engine.checkpoint import (
    CheckpointError,
    CheckpointManager,
    load_checkpoint,
    numpy_pickle_allowed,
    refuse_non_finite,
)
from .errors import WeightsError
from .keymaps import ARCHS, NETWORKS, PREFIXES, encoder_to_detector, from_exported


@dataclass
class SocoWeights:
    """A SoCo checkpoint, read: the encoders of both networks with the ``encoder.`` /
    ``target_encoder.`` prefix removed (``SoCoEncoder`` state dict keys), and the rest."""

    path: Path  # the checkpoint file (a run folder resolved to it)
    arch: str  # "fpn" or "c4"
    online: dict[str, torch.Tensor]
    target: dict[str, torch.Tensor]
    step: int | None
    config: dict | None  # the run's resolved config as saved in the checkpoint, if any
    model: dict[str, torch.Tensor] = field(repr=False, default_factory=dict)  # the whole "model" entry
    total_steps: int | None = None  # the schedule's length (None: not recorded, nor derivable)

    @property
    def backbone(self) -> str:
        """The run's ``model.backbone``; without a config, the one the encoder's shapes name
        (``resnet50``, the paper's, when the file holds no ResNet tensors at all: loading then
        names what is missing). A ResNet of no known shape is a WeightsError naming the file."""
        # here, not at the top: model/ imports torchvision (~1 s); reading weights needs no model
        from ..model.backbones import backbone_of_state

        model = (self.config or {}).get("model")
        name = model.get("backbone") if isinstance(model, dict) else None
        if name:
            return str(name)
        try:
            found = backbone_of_state(
                self.online or self.target, "backbone.body." if self.arch == "fpn" else "backbone."
            )
        except ValueError as exc:
            raise WeightsError(f"{self.path}: {exc}") from exc
        return found or "resnet50"

    def network(self, which: str) -> dict[str, torch.Tensor]:
        """The ``online`` or ``target`` encoder."""
        if which not in NETWORKS:
            raise WeightsError(f"soco weights must be one of {', '.join(NETWORKS)}, got {which!r}")
        return self.online if which == "online" else self.target


def resolve_checkpoint(source) -> Path:
    """A run folder (its ``checkpoints/last.pt``, else the newest ``step_N.pt``) or a file."""
    path = Path(source)
    if path.is_dir():
        found = CheckpointManager(path).latest()  # the one run-folder lookup (pretraining's resume too)
        if found is None:
            raise WeightsError(
                f"{path}: no checkpoint in {path / 'checkpoints'} (expected last.pt or step_N.pt; "
                "is it a soco pretrain run folder?)"
            )
        return found
    if path.is_file():
        return path
    raise WeightsError(f"{path}: no such run folder or checkpoint file")


def _load(path: Path, what: str):
    """A torch file's content; WeightsError if unreadable or if its weights hold NaN or inf."""
    return _finite(path, _read(path, what))


def _read(path: Path, what: str):

    try:
        return load_checkpoint(path, refuse_nan=False)  # _finite checks them, as for the other formats
    except CheckpointError as exc:  # torch's own first line is long and often misleading here
        cause = type(exc.__cause__).__name__ if exc.__cause__ is not None else "unreadable"
        raise WeightsError(f"{path}: not a {what} (torch.load(weights_only=True) failed: {cause})") from exc


def load_weights_file(source) -> tuple[Path, object]:
    """``(path, content)`` of a run folder or weights file in any format soco reads: torch
    checkpoints and state dicts, safetensors files, plain pickles of arrays (Detectron2)."""
    path = resolve_checkpoint(source)
    return path, _load_any(path, "readable checkpoint")


def soco_weights_of(content, path) -> SocoWeights | None:
    """``content`` (a loaded file) read as a SoCo checkpoint, or None when it is not one.

    Raises :class:`WeightsError` for a SoCo checkpoint of an architecture this version does not
    know (``model.arch`` other than fpn / c4).
    """
    model = content.get("model") if isinstance(content, dict) else None
    if not isinstance(model, dict) or not any(str(k).startswith(tuple(PREFIXES.values())) for k in model):
        return None
    networks = {
        which: {k[len(prefix) :]: v for k, v in model.items() if str(k).startswith(prefix)}
        for which, prefix in PREFIXES.items()
    }
    config = content.get("config") if isinstance(content.get("config"), dict) else None
    arch = None
    if config is not None and isinstance(config.get("model"), dict):
        arch = config["model"].get("arch")
    if arch is None:  # no config saved: only the FPN encoder has a BackboneWithFPN body
        encoder = networks["online"] or networks["target"]
        arch = "fpn" if any(k.startswith("backbone.body.") for k in encoder) else "c4"
    if arch not in ARCHS:
        raise WeightsError(f"{path}: unknown model.arch {arch!r} (soco knows {', '.join(ARCHS)})")
    step = content.get("step")
    return SocoWeights(
        Path(path),
        arch,
        networks["online"],
        networks["target"],
        int(step) if isinstance(step, int) else None,
        config,
        model,
        _total_steps(content, config),
    )


def _total_steps(content: dict, config: dict | None) -> int | None:
    """The run's schedule length: recorded in the checkpoint (``total_steps``), or, for a checkpoint
    written before that key, train.epochs x the steps per epoch its position implies (step =
    epoch x steps_per_epoch + batch_in_epoch), known once an epoch is complete; else None."""
    total = content.get("total_steps")
    if isinstance(total, int):
        return total
    train = (config or {}).get("train")
    epochs = train.get("epochs") if isinstance(train, dict) else None
    step, epoch, in_epoch = content.get("step"), content.get("epoch"), content.get("batch_in_epoch")
    if not (isinstance(step, int) and isinstance(epoch, int) and isinstance(in_epoch, int) and isinstance(epochs, int)):
        return None
    if epoch < 1:  # still in its first epoch: the steps per epoch are not known yet
        return None
    per_epoch, rest = divmod(step - in_epoch, epoch)
    return epochs * per_epoch if rest == 0 and per_epoch >= max(1, in_epoch) else None


def read_soco_checkpoint(source) -> SocoWeights:
    """Read a SoCo run folder or checkpoint file (module docstring); :class:`WeightsError` (one
    line) when it is missing, unreadable or not a SoCo checkpoint."""
    path = resolve_checkpoint(source)
    found = soco_weights_of(_load(path, "SoCo checkpoint"), path)
    if found is None:
        raise WeightsError(f"{path}: not a SoCo checkpoint (no 'model' entry with encoder.* weights)")
    return found


# ---------------------------------------------------------------- loading files of every format


def _load_pickle(path: Path):
    """A plain pickle (Detectron2's .pkl) read with only numpy arrays and dicts allowed: a weights
    file cannot run code (torch.load(weights_only=True) does not read plain pickles)."""

    class Restricted(pickle.Unpickler):
        def find_class(self, module, name):
            # _codecs.encode: how protocol-2 pickles written by Python 3 store bytes (torch allows it too)
            if numpy_pickle_allowed(module, name) or (module, name) in (("collections", "OrderedDict"),
                                                                         ("_codecs", "encode")):  # fmt: skip
                return super().find_class(module, name)
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a weights file")

    with open(path, "rb") as f:
        return Restricted(f, encoding="latin1").load()


def _load_any(path: Path, what: str):
    """torch checkpoints (zip or legacy), safetensors files and plain pickles of arrays."""
    if path.suffix == ".safetensors":
        try:
            content = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]  # an empty message has no line 0
            raise WeightsError(f"{path}: not a readable safetensors file ({first})") from exc
        return _finite(path, content)
    if path.suffix == ".pkl":  # Detectron2's format: a plain pickle, never a torch checkpoint
        return _pickle_or_error(path, what)
    try:
        content = _read(path, what)
    except WeightsError:
        with open(path, "rb") as f:
            head = f.read(2)
        if head[:1] != b"\x80":  # not a pickle either (pickle protocol >= 2 starts with PROTO)
            raise
        return _pickle_or_error(path, what)
    return _finite(path, content)


def _pickle_or_error(path: Path, what: str):
    try:
        content = _load_pickle(path)
    except Exception as exc:  # noqa: BLE001 - any unreadable pickle is one line
        raise WeightsError(f"{path}: not a {what} ({type(exc).__name__}: {exc})") from exc
    return _finite(path, content)


def _finite(path: Path, content):
    """``content`` if its weights are all finite, else a WeightsError naming the file and the first
    bad tensor (every format: torch files, safetensors, pickles)."""
    refuse_non_finite(path, content, WeightsError)
    return content


def _tensor_dict(obj) -> dict | None:
    """``obj`` as {str: tensor} (numpy arrays become tensors), or None if it is not one."""
    if not isinstance(obj, dict) or not obj or not all(isinstance(k, str) for k in obj):
        return None
    if not all(torch.is_tensor(v) or isinstance(v, np.ndarray) for v in obj.values()):
        return None
    return {k: v if torch.is_tensor(v) else torch.from_numpy(np.ascontiguousarray(v)) for k, v in obj.items()}


def _layout(state: dict) -> str:
    """Which library's names a state dict uses: soco/torchvision detector keys, a plain
    torchvision ResNet, Detectron2 or MMDetection."""
    keys = list(state)
    if any(k.startswith(("backbone.bottom_up.", "backbone.res2.", "backbone.stem.", "roi_heads.res5.")) for k in keys):
        return "detectron2"
    if any(k.startswith(("neck.", "roi_head.")) for k in keys) or "backbone.conv1.weight" in state:
        return "mmdet"
    if "conv1.weight" in state and not any(k.startswith("backbone.") for k in keys):
        return "resnet"
    return "torchvision"


LAYOUT_NAMES = {
    "torchvision": "torchvision detection state dict",
    "resnet": "torchvision ResNet state dict",
    "detectron2": "Detectron2 checkpoint",
    "mmdet": "MMDetection checkpoint",
}


def detector_state(content, path, soco_weights: str = "online") -> tuple[dict, str]:
    """(detector-keyed state dict, description) of a loaded weights file of any format (see the
    section comment); :class:`WeightsError` when it holds no tensors soco can place."""
    soco = soco_weights_of(content, path)
    if soco is not None:
        encoder = soco.network(soco_weights)
        return encoder_to_detector(encoder, soco.arch), f"SoCo checkpoint {path}, {soco_weights} encoder"
    state = _tensor_dict(content)
    for key in ("model", "state_dict"):
        if state is None and isinstance(content, dict):
            state = _tensor_dict(content.get(key))
    if state is None:
        raise WeightsError(f"{path}: neither a state dict of tensors nor a SoCo checkpoint")
    if all(k.startswith("module.") for k in state):  # saved from a DataParallel/DDP wrapper
        state = {k[len("module.") :]: v for k, v in state.items()}
    layout = _layout(state)
    if layout == "resnet":
        # the classifier has no place in a detector: kept under its own name, reported unused
        body = {(k if k.startswith("fc.") else f"backbone.body.{k}"): v for k, v in state.items()}
        return body, f"torchvision ResNet state dict {path}, into backbone.body"
    if layout in ("detectron2", "mmdet"):
        mapped, arch = from_exported(state, layout)
        return mapped, f"{LAYOUT_NAMES[layout]} {path} ({arch} names)"
    return state, f"torchvision state dict {path}"


@dataclass
class FileWeights:
    """A weights file read for loading into a module: its tensors under detector keys."""

    path: Path  # the file (a run folder resolved to its checkpoint)
    description: str  # "SoCo checkpoint X, online encoder", "Detectron2 checkpoint X (fpn names)" ...
    state: dict[str, torch.Tensor] = field(repr=False)
    soco: SocoWeights | None = field(default=None, repr=False)  # set for a SoCo checkpoint

    @property
    def arch(self) -> str:
        """A SoCo run's model.arch; for other files ``fpn`` when they hold an FPN or a box head
        (a detector's), else ``c4`` (a bare ResNet: its res5 is the C4 box head)."""
        if self.soco is not None:
            return self.soco.arch
        return "fpn" if any(k.startswith(("backbone.fpn.", "roi_heads.box_head.")) for k in self.state) else "c4"

    @property
    def backbone(self) -> str | None:
        """A SoCo run's model.backbone; else the one whose shapes the file's ResNet body has
        (model/backbones.py); None without a ResNet body. WeightsError for a ResNet of no known shape."""
        # here, not at the top: model/ imports torchvision (~1 s); reading weights needs no model
        from ..model.backbones import backbone_of_state

        if self.soco is not None:
            return self.soco.backbone
        try:
            return backbone_of_state(self.state, "backbone.body.")
        except ValueError as exc:
            raise WeightsError(f"{self.path}: {exc}") from exc


def read_weights(source, soco_weights: str = "online") -> FileWeights:
    """A run folder or weights file of any format (module docstring), its ``soco_weights``
    network for a SoCo checkpoint; :class:`WeightsError` (one line) for what cannot be read."""
    path, content = load_weights_file(source)
    soco = soco_weights_of(content, path)
    state, description = detector_state(content, path, soco_weights)
    return FileWeights(path, description, state, soco)
