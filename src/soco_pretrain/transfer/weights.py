"""The one reader of SoCo checkpoints: which file, which architecture, which network.

``read_soco_checkpoint(RUN or FILE) -> SocoWeights`` is what ``soco export``, the fine-tune
detector (``detector.load_weights``), the linear probe and ``soco knn`` read a pretraining run
through:

- a run folder resolves to ``RUN/checkpoints/last.pt``, else its newest ``step_N.pt`` (the one
  run-folder lookup, ``CheckpointManager.latest``, that pretraining's resume uses too);
- the file is loaded with ``torch.load(weights_only=True)`` (``load_checkpoint``: a checkpoint
  cannot run code);
- a SoCo checkpoint is a dict whose ``model`` entry is a ``SoCoModel`` state dict: the online
  network ``encoder.*`` (with ``projector.*``, ``predictor.*``) and the EMA target network
  ``target_encoder.*`` (with ``target_projector.*``), as BYOL, which SoCo follows, names them
  (the released code, hologerry/SoCo, calls them ``encoder`` / ``encoder_k``);
- the architecture is the saved config's ``model.arch``; a checkpoint without a config is
  ``fpn`` when its encoder has the FPN body (``backbone.body.*``), else ``c4``.

Readers that also take plain state dicts (the detector, the linear probe, kNN) call
:func:`load_weights_file` and then :func:`soco_weights_of` on what it returned. Every problem is
a :class:`WeightsError` of one line that names the file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import UserError

ARCHS = ("fpn", "c4")  # SoCoEncoder's model.arch values (model/encoder.py)
NETWORKS = ("online", "target")
PREFIXES = {"online": "encoder.", "target": "target_encoder."}  # SoCoModel attribute names


class WeightsError(UserError):
    """Weights that cannot be used (missing, unreadable, not a SoCo checkpoint, nothing matching
    the model they are for); one line that names the file."""


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

    @property
    def backbone(self) -> str:
        """The run's ``model.backbone`` (``resnet50``, the paper's, when the config predates the key)."""
        model = (self.config or {}).get("model")
        name = model.get("backbone") if isinstance(model, dict) else None
        return str(name) if name else "resnet50"

    def network(self, which: str) -> dict[str, torch.Tensor]:
        """The ``online`` or ``target`` encoder."""
        if which not in NETWORKS:
            raise WeightsError(f"soco weights must be one of {', '.join(NETWORKS)}, got {which!r}")
        return self.online if which == "online" else self.target


def resolve_checkpoint(source) -> Path:
    """A run folder (its ``checkpoints/last.pt``, else the newest ``step_N.pt``) or a file."""
    from ..engine.checkpoint import CheckpointManager

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
    from ..engine.checkpoint import CheckpointError, load_checkpoint

    try:
        return load_checkpoint(path)
    except CheckpointError as exc:  # torch's own first line is long and often misleading here
        cause = type(exc.__cause__).__name__ if exc.__cause__ is not None else "unreadable"
        raise WeightsError(f"{path}: not a {what} (torch.load(weights_only=True) failed: {cause})") from None


def load_weights_file(source) -> tuple[Path, object]:
    """``(checkpoint path, what torch.load returned)`` for a run folder or a weights file."""
    path = resolve_checkpoint(source)
    return path, _load(path, "readable checkpoint")


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
    )


def read_soco_checkpoint(source) -> SocoWeights:
    """Read a SoCo run folder or checkpoint file (module docstring); :class:`WeightsError` (one
    line) when it is missing, unreadable or not a SoCo checkpoint."""
    path = resolve_checkpoint(source)
    found = soco_weights_of(_load(path, "SoCo checkpoint"), path)
    if found is None:
        raise WeightsError(f"{path}: not a SoCo checkpoint (no 'model' entry with encoder.* weights)")
    return found
