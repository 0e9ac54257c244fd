"""The key report of one export: which keys went where, printed by ``soco export``."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ...weights.keymaps import PREFIXES


@dataclass
class ModuleCount:
    """Keys of one module: ``loaded`` (exported into the detector module), ``missing`` (detector
    keys SoCo does not pretrain: the detector initialises them) or ``unused`` (checkpoint keys
    left out of the export)."""

    module: str
    loaded: int = 0
    missing: int = 0
    unused: int = 0
    note: str = ""


@dataclass
class KeyReport:
    """What one export wrote and which keys went where."""

    target: str
    arch: str
    weights: str
    checkpoint: Path
    step: int | None
    out: Path
    layout: str  # one line: what the file holds and whose names it uses
    config_out: Path | None = None
    detector: list[ModuleCount] = field(default_factory=list)  # loaded / missing per detector module
    checkpoint_unused: list[ModuleCount] = field(default_factory=list)  # per checkpoint module
    mapping: dict[str, str] = field(default_factory=dict)  # exported name -> checkpoint key
    notes: list[str] = field(default_factory=list)
    manifest_hash: str | None = None  # set_hash of the run's data manifest, if it has one
    manifest_count: int | None = None
    manifest_out: Path | None = None  # the sidecar OUT.manifest.json

    @property
    def loaded(self) -> int:
        return sum(row.loaded for row in self.detector)

    @property
    def missing(self) -> int:
        return sum(row.missing for row in self.detector)

    @property
    def unused(self) -> int:
        return sum(row.unused for row in self.checkpoint_unused)

    def format(self) -> str:
        """A small table for the console: one row per detector module, then per checkpoint module."""
        step = "" if self.step is None else f", step {self.step}"
        lines = [
            (
                f"exported the {self.weights} network ({PREFIXES[self.weights]}*) of {self.checkpoint} "
                f"(arch {self.arch}{step}) for {self.target}"
            ),
            f"wrote {self.out}: {self.layout}",
        ]
        if self.config_out is not None:
            lines.append(f"wrote {self.config_out}: config for a Mask R-CNN fine-tune from these weights")
        if self.manifest_hash is not None:
            lines.append(
                f"wrote {self.manifest_out}: data manifest of the run, {self.manifest_count} images, "
                f"set hash {self.manifest_hash[:12]}"
            )
        rows = [(f"detector: {r.module}", r.loaded, r.missing, None, r.note) for r in self.detector]
        rows += [(f"checkpoint: {r.module}", None, None, r.unused, r.note) for r in self.checkpoint_unused]
        total = ("total", self.loaded, self.missing, self.unused, "")
        width = max(len(r[0]) for r in rows + [total]) + 2

        def line(name, *counts_and_note):
            *counts, note = counts_and_note
            cells = "".join(f"{'-' if c is None else c:>9}" for c in counts)
            return f"{name:<{width}}{cells}  {note}".rstrip()

        rule = "-" * (width + 27)
        lines += ["", f"{'module':<{width}}{'loaded':>9}{'missing':>9}{'unused':>9}", rule]
        lines += [line(*r) for r in rows]
        lines += [rule, line(*total), ""]
        lines.append(
            "missing = detector keys SoCo does not pretrain (the detector initialises them); "
            "unused = checkpoint keys not exported"
        )
        lines += self.notes
        return "\n".join(lines)


def detector_rows(groups: dict[str, str], missing: dict[str, int]) -> list[ModuleCount]:
    """Per detector module: keys exported into it (``groups``: exported name -> module), then the
    keys it has that SoCo does not pretrain (``missing``), in first-seen order."""
    rows = [ModuleCount(module, loaded=n) for module, n in Counter(groups.values()).items()]
    known = {row.module: row for row in rows}
    for module, n in missing.items():
        if module in known:
            known[module].missing = n
        else:
            rows.append(ModuleCount(module, missing=n))
    return rows


def unused_rows(weights: str, dropped: list[str], unused: dict[str, int]) -> list[ModuleCount]:
    """Checkpoint keys not exported: the chosen encoder's dropped keys (noted by kind, e.g.
    num_batches_tracked), then every other top-level module of the checkpoint."""
    rows = []
    if dropped:
        kinds = sorted({k.rsplit(".", 1)[-1] for k in dropped})
        rows.append(ModuleCount(PREFIXES[weights].rstrip("."), unused=len(dropped), note=", ".join(kinds)))
    rows += [ModuleCount(module, unused=n) for module, n in sorted(unused.items())]
    return rows
