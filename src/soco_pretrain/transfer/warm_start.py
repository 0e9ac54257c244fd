"""Warm start: ``soco pretrain --init FILE`` loads weights users already have before step 0.

The file is read by the one weights reader (``transfer/weights.py``: a torchvision ResNet or
detection state dict, a safetensors export, a Detectron2 or MMDetection checkpoint, a soco run or
checkpoint; its online encoder) as torchvision detector keys, then mapped onto the SoCo encoder
of the run (``detector_to_encoder``). What loads: the ResNet body always, the FPN and the box
head where the file has them with the same layout (torchvision's v1 detectors have an FPN without
BatchNorm and a two-fc box head: those parts start from scratch, and the report says so). The
projector and predictor always start from scratch (no other library has them).

The body must load completely: a file whose ResNet misses keys or differs in shape (R18 weights
into an R50 run) is refused in one line naming the modules and, where it can tell, the backbone
the file holds, unless ``model.init_partial`` (``--init-partial``) asks to load what matches.
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

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import UserError

REPORT_FILE = "init_report.json"


class InitError(UserError):
    """An ``--init`` file that cannot start this run (unreadable, other architecture); one line."""


def _modules(arch: str) -> tuple[str, ...]:
    """Encoder module groups of the report, the body first."""
    return ("backbone.body", "backbone.fpn", "box_head") if arch == "fpn" else ("backbone",)


def _group(key: str, arch: str) -> str:
    for name in _modules(arch):
        if key.startswith(name + "."):
            return name
    return key.split(".")[0]


def _required(key: str) -> bool:
    return not key.endswith("num_batches_tracked")


@dataclass
class InitReport:
    """What the warm start loads: per encoder module (loaded, total) tensors, the rest."""

    path: Path
    description: str  # the format, as the reader describes it
    arch: str
    backbone: str
    modules: dict[str, tuple[int, int]] = field(default_factory=dict)
    mismatched: list[str] = field(default_factory=list)  # same key, another shape
    unused: list[str] = field(default_factory=list)  # keys of the file the encoder has no place for
    sha256: str = ""
    notes: list[str] = field(default_factory=list)
    state: dict = field(default_factory=dict, repr=False)  # encoder key -> tensor, what loads

    @property
    def body(self) -> str:
        return _modules(self.arch)[0]

    def missing_modules(self) -> list[str]:
        return [m for m, (n, total) in self.modules.items() if n < total]

    def format(self) -> str:
        lines = [f"init: {self.description}"]
        for name, (n, total) in self.modules.items():
            note = "" if n == total else ("  (random init)" if n == 0 else "  (partly loaded)")
            lines.append(f"  {name:<16} {n:>4}/{total:<4} loaded{note}")
        lines.append("  projector, predictor: random init (trained by SoCo)")
        lines += [f"  note: {note}" for note in self.notes]
        if self.mismatched:
            lines.append(f"  shape mismatch, not loaded: {len(self.mismatched)} ({_first(self.mismatched)})")
        lines.append(
            f"  unused keys in the file: {len(self.unused)}" + (f" ({_first(self.unused)})" if self.unused else "")
        )
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {
            "path": str(self.path.resolve()),
            "sha256": self.sha256,
            "format": self.description,
            "arch": self.arch,
            "backbone": self.backbone,
            "modules": {m: {"loaded": n, "total": t} for m, (n, t) in self.modules.items()},
            "shape_mismatch": self.mismatched,
            "unused": self.unused,
            "notes": self.notes,
        }


def _first(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


def _encoder_shapes(model_cfg) -> dict[str, torch.Size]:
    from ..model.encoder import SoCoEncoder

    with torch.device("meta"):  # names and shapes only
        return {k: v.shape for k, v in SoCoEncoder(model_cfg).state_dict().items()}


def prepare_init(path, model_cfg, freeze: str = "none") -> InitReport:
    """Read ``path`` and match it against the encoder of ``model_cfg`` (nothing is built for real,
    nothing written). Raises :class:`InitError` for a file that cannot start the run, or that
    does not fill every tensor ``freeze`` (``train.freeze``) keeps fixed."""
    from ..runfolder import file_digest
    from .weights import WeightsError, detector_state, detector_to_encoder, load_weights_file

    arch = model_cfg.arch
    try:
        found, content = load_weights_file(path)
        state, description = detector_state(content, found, "online")
    except WeightsError as exc:
        raise InitError(f"--init {exc}") from None
    mapped = detector_to_encoder(state, arch)
    shapes = _encoder_shapes(model_cfg)
    placed = set(mapped) & set(shapes)  # file tensors the encoder has a slot for
    report = InitReport(Path(found), description, arch, model_cfg.backbone)
    report.unused = [k for k in state if not _maps_into(k, arch, placed)]
    counts: dict[str, list[int]] = {m: [0, 0] for m in _modules(arch)}
    for key, shape in shapes.items():
        if not _required(key):
            continue
        group = _group(key, arch)
        counts.setdefault(group, [0, 0])[1] += 1
        if key not in mapped:
            continue
        if tuple(mapped[key].shape) != tuple(shape):
            report.mismatched.append(key)
            continue
        counts[group][0] += 1
        report.state[key] = mapped[key]
    for key in mapped:  # num_batches_tracked loads when the file has it
        if not _required(key) and key in shapes and tuple(mapped[key].shape) == tuple(shapes[key]):
            report.state[key] = mapped[key]
    report.modules = {m: (n, t) for m, (n, t) in counts.items()}
    _drop_incomplete_heads(report, arch)
    _refuse_unless_complete(report, state, model_cfg, shapes)
    _refuse_frozen_not_loaded(report, shapes, freeze)
    report.sha256 = file_digest(found) if found.is_file() else ""
    return report


def _drop_incomplete_heads(report: InitReport, arch: str) -> None:
    """The FPN and the box head load whole or not at all: a model zoo's FPN without BatchNorm or
    two-fc box head matches some shapes of soco's (a 1x1 lateral conv, an fc on 256x7x7 inputs)
    but computes something else there, so those parts start from scratch, with a note."""
    for name in _modules(arch)[1:]:
        n, total = report.modules.get(name, (0, 0))
        if 0 < n < total:
            report.state = {k: v for k, v in report.state.items() if _group(k, arch) != name}
            report.modules[name] = (0, total)
            report.notes.append(f"{name}: only {n} of {total} tensors match (another layout): random init")


def _maps_into(key: str, arch: str, placed: set) -> bool:
    from .weights import detector_to_encoder

    return bool(set(detector_to_encoder({key: None}, arch)) & placed)


def _refuse_unless_complete(report: InitReport, state: dict, model_cfg, shapes: dict) -> None:
    """InitError unless the ResNet body loads completely and the file has no other ResNet
    tensors (``state``: the file in detector keys), or ``init_partial`` allows it."""
    from ..model.backbones import backbone_of_state

    loaded = sum(n for n, _ in report.modules.values())
    body_n, body_total = report.modules[report.body]
    # ResNet tensors the run has no place for: a deeper ResNet of the same block kind (R34 into
    # R18) fills every slot of the smaller one with the wrong blocks
    extra = [k for k in report.unused if k.startswith("backbone.body.")]
    if body_n == body_total and not extra:
        return
    prefix = "backbone.body." if report.arch == "fpn" else "backbone."
    body = {k[len("backbone.body.") :]: v for k, v in state.items() if k.startswith("backbone.body.")}
    try:  # the one reading of a ResNet's shape (model/backbones.py)
        guess = backbone_of_state(body) if body else None
    except ValueError:  # a ResNet of no known shape: the message says what did not load
        guess = None
    holds = (
        f"; the file holds {guess} weights (set model.backbone={guess})" if guess and guess != report.backbone else ""
    )
    what = f"{report.path}: {report.body} {body_n}/{body_total} tensors match this run's {report.backbone}{holds}"
    if extra:
        what += f", and {len(extra)} ResNet tensors of the file have no place in it"
    if loaded == 0:
        raise InitError(f"--init {what}; nothing in the file fits this encoder ({report.description})")
    if not model_cfg.init_partial:
        parts = _unloaded_parts(report, prefix, shapes)
        parts = f"not loaded: {parts}" if parts else "every slot filled from another ResNet's blocks"
        raise InitError(f"--init {what}; {parts} (--init-partial loads what matches)")


def _frozen_not_loaded(report: InitReport, shapes: dict, mode: str) -> list[str]:
    """Encoder tensors ``mode`` freezes that the file does not fill (BN counters not counted)."""
    from ..model.freeze import frozen_parts

    parts = tuple(f"{name}." for name in frozen_parts(report.arch, mode))
    return [k for k in shapes if k.startswith(parts) and _required(k) and k not in report.state]


def _refuse_frozen_not_loaded(report: InitReport, shapes: dict, mode: str) -> None:
    """InitError when ``train.freeze=mode`` would keep tensors fixed that the file did not fill:
    they would stay at their random init for the whole run. Names how many and the first few,
    and the largest mode whose tensors all come from the file."""
    from ..model.freeze import FREEZE_MODES

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


def _unloaded_parts(report: InitReport, prefix: str, shapes: dict) -> str:
    """The body's stages (conv1, layer1 ...) with tensors that did not load, and how many."""
    from collections import Counter

    missing = Counter(
        k[len(prefix) :].split(".")[0]
        for k in shapes
        if k.startswith(prefix) and _required(k) and k not in report.state
    )
    return ", ".join(f"{report.body}.{part} ({n} tensors)" for part, n in missing.items())


def recorded_init_sha256(run_dir) -> str | None:
    """The sha256 of the init file a run started from (``RUN/init_report.json``), or None."""
    import json

    try:
        sha = json.loads((Path(run_dir) / REPORT_FILE).read_text(encoding="utf-8")).get("sha256")
    except (OSError, ValueError, AttributeError):  # no report (a run from scratch), or not readable
        return None
    return sha if isinstance(sha, str) and sha else None


def init_sha256(source) -> str:
    """sha256 of the file an ``--init`` value names (a run folder: its newest checkpoint), as
    :func:`prepare_init` records it; InitError (one line) when there is none."""
    from ..runfolder import file_digest
    from .weights import WeightsError, resolve_checkpoint

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
