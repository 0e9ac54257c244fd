"""Load a read weights file into a module under one explicit policy, with one report.

``match(weights_state, target) -> LoadReport`` pairs the file's tensors (detector keys, as
``read.read_weights`` gives them) with a :class:`Target`'s slots; ``refusal(report, policy)``
says why a policy refuses it (None: it loads); ``load(module, weights, target, policy)`` does all
three. Reports name modules and keys the detector's way (``backbone.body``, ``backbone.fpn``,
``roi_heads.box_head``, ...) whatever the module, so the same file reads the same in every command.

Policies (the ResNet body is ``backbone.body``):

- ``strict``: every tensor of the target loads, else refused naming the first that does not;
- ``report``: the body loads whole (else refused naming what is missing); the rest loads what
  fits and the report lists what did not;
- ``partial``: whatever fits loads; refused only when no tensor of the body does.

Under every policy a key of another shape is never loaded (a mismatch), and file keys the target
has no place for are listed as unused, never refused: a detector file holds heads a ResNet has
no place for. BatchNorm ``num_batches_tracked`` counters load when the file has them but are
never required nor counted (Detectron2 files have none; momentum BatchNorm never reads them).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .errors import WeightsError
from .keymaps import encoder_key_to_detector

POLICIES = ("strict", "report", "partial")
BODY = "backbone.body"
# The detector's module groups (torchvision Mask R-CNN v2), the rows of every report in this order.
DETECTOR_MODULES = (
    BODY,
    "backbone.fpn",
    "rpn",
    "roi_heads.box_head",
    "roi_heads.box_predictor",
    "roi_heads.mask_head",
    "roi_heads.mask_predictor",
)


def is_counter(key: str) -> bool:
    """A BatchNorm step counter: loaded when present, never required nor counted."""
    return key.endswith("num_batches_tracked")


def module_of(key: str) -> str:
    """The report row of a detector key: its :data:`DETECTOR_MODULES` group, else its first part."""
    for name in DETECTOR_MODULES:
        if key.startswith(name + "."):
            return name
    return key.split(".")[0]


@dataclass(frozen=True)
class Target:
    """What weights load into: its name in messages, its keys and shapes (``state_dict``), and
    each key's detector name (None: no weights file holds it; it is not reported)."""

    name: str
    shapes: dict[str, torch.Size]
    to_detector: Callable[[str], str | None]

    @classmethod
    def of(cls, name: str, module: nn.Module, to_detector: Callable[[str], str | None]) -> Target:
        return cls(name, {k: v.shape for k, v in module.state_dict().items()}, to_detector)


@dataclass
class LoadReport:
    """What loads from a file into a target: per module (loaded, total) tensors (counters aside),
    the target's keys left out, the file's keys of another shape or with no place, and the tensors
    that load (target keys)."""

    path: Path | None
    source: str  # what was read, as the reader describes it ("SoCo checkpoint X, online encoder")
    into: str  # what it loads into ("the Mask R-CNN detector", "the SoCo fpn encoder (resnet18)")
    modules: dict[str, tuple[int, int]] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)  # target tensors not loaded, detector names
    mismatched: list[str] = field(default_factory=list)  # file keys of another shape (not loaded)
    unused: list[str] = field(default_factory=list)  # file keys the target has no place for
    notes: list[str] = field(default_factory=list)
    state: dict = field(default_factory=dict, repr=False)  # target key -> tensor: what loads
    title: str = "weights"  # the first word of format()

    body = BODY  # the ResNet body's row

    @property
    def description(self) -> str:
        return self.source

    @property
    def loaded(self) -> int:
        return sum(n for n, _ in self.modules.values())

    def missing_modules(self) -> list[str]:
        return [m for m, (n, total) in self.modules.items() if n < total]

    def row(self, name: str, width: int = 16) -> str:
        n, total = self.modules[name]
        note = "" if n == total else ("  (random init)" if n == 0 else "  (partly loaded)")
        return f"  {name:<{width}} {n:>4}/{total:<4} loaded{note}"

    def format(self) -> str:
        width = max([16, *map(len, self.modules)])
        lines = [f"{self.title}: {self.source}"]
        lines += [self.row(name, width) for name in self.modules]
        lines += [f"  note: {note}" for note in self.notes]
        if self.mismatched:
            lines.append(f"  shape mismatch, not loaded: {len(self.mismatched)} ({_first(self.mismatched)})")
        lines.append(
            f"  unused keys in the file: {len(self.unused)}" + (f" ({_first(self.unused)})" if self.unused else "")
        )
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {
            "path": None if self.path is None else str(self.path.resolve()),
            "format": self.source,
            "modules": {m: {"loaded": n, "total": t} for m, (n, t) in self.modules.items()},
            "shape_mismatch": self.mismatched,
            "unused": self.unused,
            "notes": self.notes,
        }


def _first(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


def match(state: dict, target: Target, *, path=None, source: str = "", whole=(), report=None) -> LoadReport:
    """Pair ``state`` (a file's tensors under detector keys) with ``target``'s slots.

    ``whole``: modules that load whole or not at all (a part of them that only partly matches
    starts from scratch, with a note). ``report``: a LoadReport (subclass) to fill; a new one by
    default. Nothing is refused here (:func:`refusal`)."""
    report = report if report is not None else LoadReport(None if path is None else Path(path), source, target.name)
    slots = {}  # detector name -> target key
    for key in target.shapes:
        name = target.to_detector(key)
        if name is not None:
            slots[name] = key
    for key, value in state.items():
        own = slots.get(key)
        if own is None:
            report.unused.append(key)
        elif tuple(value.shape) != tuple(target.shapes[own]):
            report.mismatched.append(key)
        else:
            report.state[own] = value
    counts: dict[str, list[int]] = {m: [0, 0] for m in DETECTOR_MODULES}
    for name, key in slots.items():
        if not is_counter(name):
            row = counts.setdefault(module_of(name), [0, 0])
            row[1] += 1
            row[0] += key in report.state
    for name in whole:
        n, total = counts.get(name, (0, 0))
        if 0 < n < total:
            report.state = {k: v for k, v in report.state.items() if module_of(target.to_detector(k) or "") != name}
            counts[name][0] = 0
            report.notes.append(f"{name}: only {n} of {total} tensors match (another layout): random init")
    report.modules = {m: (n, total) for m, (n, total) in counts.items() if total}
    loaded = set(report.state)
    report.missing = [name for name, key in slots.items() if not is_counter(name) and key not in loaded]
    return report


def refusal(report: LoadReport, policy: str) -> str | None:
    """Why ``policy`` refuses to load ``report`` (one line, without the file's name), or None."""
    if policy not in POLICIES:
        raise ValueError(f"unknown load policy {policy!r} (one of {', '.join(POLICIES)})")
    n, total = report.modules.get(report.body, (0, 0))
    if policy == "partial" or n == 0:
        return None if n else f"no tensor matches {report.into}'s {report.body} ({_holds(report)})"
    missing = report.missing if policy == "strict" else [k for k in report.missing if module_of(k) == report.body]
    if not missing:
        return None
    mismatched = [k for k in report.mismatched if k in missing]
    first = f"{mismatched[0]} has another shape" if mismatched else f"{missing[0]} is not in the file"
    where = "" if policy == "strict" else f" of {report.body}"
    return f"{len(missing)} tensors{where} of {report.into} do not load (first: {first})"


def _holds(report: LoadReport) -> str:
    keys = report.unused + report.mismatched
    return f"the file's {len(keys)} keys, e.g. {_first(keys, 2)}" if keys else "the file holds no tensors"


def check(report: LoadReport, policy: str, error: type[Exception] = WeightsError) -> LoadReport:
    """``report`` if ``policy`` loads it, else ``error`` (one line naming the file)."""
    why = refusal(report, policy)
    if why is not None:
        raise error(f"{report.path}: {why}")
    return report


def load_into(module: nn.Module, report: LoadReport) -> None:
    """Copy the tensors ``report`` matched into ``module`` (the others keep their init)."""
    _, unexpected = module.load_state_dict(report.state, strict=False)
    assert not unexpected, unexpected  # match only keeps keys the target has


def load(module: nn.Module, weights, target: Target, policy: str, *, whole=(), error=WeightsError) -> LoadReport:
    """Match ``weights`` (a ``read.FileWeights``) against ``target`` (``module``'s), refuse as
    ``policy`` says, else load it into ``module``; the report."""
    report = check(match(weights.state, target, path=weights.path, source=weights.description, whole=whole), policy,
                   error)  # fmt: skip
    load_into(module, report)
    return report


# ---------------------------------------------------------------- the targets soco loads into


def detector_target(model: nn.Module) -> Target:
    """The fine-tune detector (torchvision Mask R-CNN / Faster R-CNN v2): detector keys as they are."""
    return Target.of("the detector", model, lambda key: key)


def encoder_target(shapes: dict[str, torch.Size], arch: str, backbone: str) -> Target:
    """A SoCo encoder of ``arch`` (``SoCoEncoder.state_dict()`` names and shapes; the meta device will do)."""
    return Target(f"the {backbone} {arch.upper()} encoder", shapes, lambda key: encoder_key_to_detector(key, arch))


def resnet_target(model: nn.Module, backbone: str) -> Target:
    """A ``torchvision.models.<backbone>`` (without ``fc``: the linear probe's): the detector's body."""
    return Target.of(f"a {backbone}", model, lambda key: f"{BODY}.{key}")
