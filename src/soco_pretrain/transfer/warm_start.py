"""Warm start: ``soco pretrain --init FILE`` loads weights users already have before step 0.

The file is read by the one weights layer (``weights/read.py``: a torchvision ResNet or
detection state dict, a safetensors export, a Detectron2 or MMDetection checkpoint, a soco run or
checkpoint; its online encoder) as torchvision detector keys, and matched against the SoCo
encoder of the run (``weights/load.py``; the report names modules the detector's way:
``backbone.body``, ``backbone.fpn``, ``roi_heads.box_head``). What loads: the ResNet body always,
the FPN and the box head where the file has them with the same layout (torchvision's v1 detectors
have an FPN without BatchNorm and a two-fc box head: those parts start from scratch, and the
report says so). The projector and predictor always start from scratch (no other library has them).

The body must load completely (the layer's ``report`` policy): a file whose ResNet misses keys or
differs in shape (R18 weights into an R50 run) is refused in one line naming the modules and,
where it can tell, the backbone the file holds, unless ``model.init_partial`` (``--init-partial``,
the ``partial`` policy) asks to load what matches. Stricter than the layer: a file with ResNet
tensors the run has no place for (R34 into R18) is refused too, and the FPN and box head load
whole or not at all.
The online and target networks start equal (the target is a copy of the online encoder, as at a
random start). ``num_batches_tracked`` counters are not required (Detectron2 files have none).

A frozen part (``train.freeze``) must come from the file whole: freezing tensors the file did not
fill (a plain ResNet file has no FPN; ``--init-partial`` leaves stages random) would keep random
weights fixed for the whole run, so that is refused too, naming them.

The check runs before anything is written (``prepare_init``, on the meta device); the load
(``apply_init``) after the model is built. The report is printed and saved as
``RUN/init_report.json`` with the file's sha256.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError
from ..model.backbones import backbone_of_state
from ..model.encoder import SoCoEncoder
from ..model.freeze import FREEZE_MODES, frozen_parts
from ..runfolder import file_digest
from ..weights import LoadReport, WeightsError, encoder_target, match, read_weights, refusal, resolve_checkpoint
from ..weights.load import is_counter

REPORT_FILE = "init_report.json"
BODY = LoadReport.body
# The FPN and the box head load whole or not at all: a model zoo's FPN without BatchNorm or two-fc
# box head matches some shapes of soco's (a 1x1 lateral conv, an fc on 256x7x7 inputs) but
# computes something else there, so those parts start from scratch, with a note.
HEADS = ("backbone.fpn", "roi_heads.box_head")


class InitError(UserError):
    """An ``--init`` file that cannot start this run (unreadable, other architecture); one line."""


@dataclass
class InitReport(LoadReport):
    """The weights layer's load report of the warm start, with the run's arch and backbone and
    the file's sha256 (saved as ``RUN/init_report.json``)."""

    arch: str = "fpn"
    backbone: str = "resnet50"
    sha256: str = ""
    title: str = "init"

    def format(self) -> str:
        lines = super().format().split("\n")
        rows = 1 + len(self.modules)  # the title, then one line per module
        return "\n".join([*lines[:rows], "  projector, predictor: random init (trained by SoCo)", *lines[rows:]])

    def to_json(self) -> dict:
        return {
            **super().to_json(),
            "sha256": self.sha256,
            "arch": self.arch,
            "backbone": self.backbone,
        }


def _first(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


def _encoder_shapes(model_cfg) -> dict[str, torch.Size]:

    with torch.device("meta"):  # names and shapes only
        return {k: v.shape for k, v in SoCoEncoder(model_cfg).state_dict().items()}


def prepare_init(path, model_cfg, freeze: str = "none") -> InitReport:
    """Read ``path`` and match it against the encoder of ``model_cfg`` (nothing is built for real,
    nothing written). Raises :class:`InitError` for a file that cannot start the run, or that
    does not fill every tensor ``freeze`` (``train.freeze``) keeps fixed."""
    try:
        found = read_weights(path, "online")
    except WeightsError as exc:
        raise InitError(f"--init {exc}") from None
    shapes = _encoder_shapes(model_cfg)
    report = InitReport(found.path, found.description, "", arch=model_cfg.arch, backbone=model_cfg.backbone)
    target = encoder_target(shapes, model_cfg.arch, model_cfg.backbone)
    report.into = target.name
    match(found.state, target, whole=HEADS, report=report)
    _refuse_unless_complete(report, found.state, model_cfg)
    _refuse_frozen_not_loaded(report, shapes, freeze)
    report.sha256 = file_digest(found.path) if found.path.is_file() else ""
    return report


def _refuse_unless_complete(report: InitReport, state: dict, model_cfg) -> None:
    """InitError unless the layer's ``report`` policy (``partial`` with ``init_partial``) loads
    the file and it has no ResNet tensors the run has no place for (``state``: the file in
    detector keys)."""
    policy = "partial" if model_cfg.init_partial else "report"
    # ResNet tensors the run has no place for: a deeper ResNet of the same block kind (R34 into
    # R18) fills every slot of the smaller one with the wrong blocks
    extra = [k for k in report.unused if k.startswith(BODY + ".")]
    if refusal(report, "report") is None and not extra:
        return
    body_n, body_total = report.modules[BODY]
    body = {k[len(BODY) + 1 :]: v for k, v in state.items() if k.startswith(BODY + ".")}
    try:  # the one reading of a ResNet's shape (model/backbones.py)
        guess = backbone_of_state(body) if body else None
    except ValueError:  # a ResNet of no known shape: the message says what did not load
        guess = None
    holds = (
        f"; the file holds {guess} weights (set model.backbone={guess})" if guess and guess != report.backbone else ""
    )
    what = f"{report.path}: {BODY} {body_n}/{body_total} tensors match this run's {report.backbone}{holds}"
    if extra:
        what += f", and {len(extra)} ResNet tensors of the file have no place in it"
    if report.loaded == 0:
        raise InitError(f"--init {what}; nothing in the file fits this encoder ({report.description})")
    if refusal(report, policy) is not None or (extra and policy != "partial"):
        parts = _unloaded_parts(report)
        parts = f"not loaded: {parts}" if parts else "every slot filled from another ResNet's blocks"
        raise InitError(f"--init {what}; {parts} (--init-partial loads what matches)")


def _frozen_not_loaded(report: InitReport, shapes: dict, mode: str) -> list[str]:
    """Encoder tensors ``mode`` freezes that the file does not fill (BN counters not counted)."""
    parts = tuple(f"{name}." for name in frozen_parts(report.arch, mode))
    return [k for k in shapes if k.startswith(parts) and not is_counter(k) and k not in report.state]


def _refuse_frozen_not_loaded(report: InitReport, shapes: dict, mode: str) -> None:
    """InitError when ``train.freeze=mode`` would keep tensors fixed that the file did not fill:
    they would stay at their random init for the whole run. Names how many and the first few,
    and the largest mode whose tensors all come from the file."""
    missing = _frozen_not_loaded(report, shapes, mode)
    if not missing:
        return
    usable = "none"
    for other in FREEZE_MODES:
        try:
            if not _frozen_not_loaded(report, shapes, other):
                usable = other
        except ValueError:  # backbone+fpn of a C4 run
            pass
    raise InitError(
        f"--init {report.path}: train.freeze={mode} would keep {len(missing)} tensors fixed that the file "
        f"does not hold, at their random init ({_first(missing)}); freeze only what loads "
        f"(train.freeze={usable}) or give a file that holds them"
    )


def _unloaded_parts(report: InitReport) -> str:
    """The body's stages (conv1, layer1 ...) with tensors that did not load, and how many."""
    missing = Counter(k[len(BODY) + 1 :].split(".")[0] for k in report.missing if k.startswith(BODY + "."))
    return ", ".join(f"{BODY}.{part} ({n} tensors)" for part, n in missing.items())


def recorded_init_sha256(run_dir) -> str | None:
    """The sha256 of the init file a run started from (``RUN/init_report.json``), or None."""
    try:
        sha = json.loads((Path(run_dir) / REPORT_FILE).read_text(encoding="utf-8")).get("sha256")
    except (OSError, ValueError, AttributeError):  # no report (a run from scratch), or not readable
        return None
    return sha if isinstance(sha, str) and sha else None


def init_sha256(source) -> str:
    """sha256 of the file an ``--init`` value names (a run folder: its newest checkpoint), as
    :func:`prepare_init` records it; InitError (one line) when there is none."""
    try:
        return file_digest(resolve_checkpoint(source))
    except WeightsError as exc:
        raise InitError(f"--init {exc}") from None
    except OSError as exc:
        raise InitError(f"--init {source}: cannot read ({exc.strerror or exc})") from None


def apply_init(core, report: InitReport) -> None:
    """Load the matched tensors into the online encoder of ``core`` (a SoCoModel) and make the
    target encoder its copy."""
    own = core.encoder.state_dict()
    with torch.no_grad():
        for key, value in report.state.items():
            own[key].copy_(value.to(own[key].dtype))
    core.target_encoder.load_state_dict(core.encoder.state_dict())
