"""``soco compare``: several initialisations under one budget, seeds paired, with an honest report.

A comparison (:class:`CompareSpec`) is a list of inits, label fractions and a number of seeds, one
metric (``finetune``: Mask R-CNN COCO AP; ``knn``: object-level kNN) and that metric's options.
Its arms are every (init, fraction, seed), seeds 0..S-1, in the order fraction, seed, init (a
(fraction, seed) pair is complete early, so a partial report already pairs). For one (fraction,
seed) every init trains on the same labelled subset: the metric draws it from ``seed`` alone
(``FinetuneOptions(fraction, seed)``, ``KnnOptions(train_fraction, seed)``), so the differences
against the first init (the baseline) are paired.

An init is ``none`` (random init, "random init"; seeded by the arm's seed), ``PATH`` (a run
folder, checkpoint or exported file, named by its basename) or ``NAME=PATH[,PATH,...]``: a group,
e.g. one recipe pretrained with several seeds; seed ``s`` uses member ``s % len(group)``.

Layout of OUT::

    compare.json                       the specification (refused if a rerun differs)
    arms/<init>/f<fraction>/s<seed>/   one arm: the metric's own folder (metrics.json or knn.json)
                                       and init_weights.json (the weights it started from)
    logs/                              --devices: one log per child process
    report.md, report.json, report.png (see :mod:`.report` and :func:`write_compare_report`)

An arm whose result file exists is skipped; an unfinished fine-tune resumes from its own
checkpoints, an unfinished kNN reruns. ``shard=(i, n)`` runs arms i, i+n, ... only.

The weights each arm saw (:class:`InitWeights`): a member is resolved as the metrics resolve it
(a run folder: its newest intact checkpoint) and identified by that file's sha256 and, for a soco
checkpoint, its step; each file is hashed once per version in a process. An arm records the
identity in its result file (key ``init_weights``). Before anything runs, a finished arm (or an
unfinished fine-tune, which would resume) whose recorded weights differ from what its init
resolves to now is refused (:func:`stale_arms`, :func:`refuse_stale`), unless its init is to be
re-evaluated (:func:`move_aside`); a file that changes while the comparison runs stops it before
the next arm of that init. The report shows the weights of every init and says when an init's
arms were computed from different ones.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import NonFiniteLossError, PathError, UserError, one_line
from ..files import atomic_write_bytes, atomic_write_json
from ..runfolder import file_digest

SPEC_FILE = "compare.json"
SPEC_VERSION = 1
RANDOM_INIT = "random init"
METRICS = ("finetune", "knn")
RESULT_FILES = {"finetune": "metrics.json", "knn": "knn.json"}
WEIGHTS_KEY = "init_weights"  # an arm's result file: the weights identity it was computed from
START_FILE = "init_weights.json"  # an arm's folder: the weights identity it started from


# ---------------------------------------------------------------- inits


@dataclass(frozen=True)
class Init:
    """One initialisation: ``paths`` has one entry per group member (None = random init)."""

    name: str
    paths: tuple[str | None, ...]

    def weights_for(self, seed: int) -> str | None:
        """The member seed ``seed`` uses: ``paths[seed % len(paths)]``."""
        return self.paths[seed % len(self.paths)]

    def to_json(self) -> dict:
        return {"name": self.name, "paths": list(self.paths)}

    @classmethod
    def from_json(cls, obj: dict) -> Init:
        return cls(str(obj["name"]), tuple(obj["paths"]))


def _is_none(text: str) -> bool:
    return text.strip().lower() == "none"


def parse_init(text: str, must_exist: bool = True) -> Init:
    """``none`` | ``PATH`` | ``NAME=PATH[,PATH,...]`` -> :class:`Init` (paths made absolute).

    A PATH that exists is taken whole even if it contains ``=``. Raises UserError.
    """
    text = text.strip()
    if not text:
        raise UserError("--init: empty value (expected none, PATH or NAME=PATH[,PATH,...])")
    if _is_none(text):
        return Init(RANDOM_INIT, (None,))
    if "=" in text and not Path(text).exists():
        name, _, rest = text.partition("=")
        name = name.strip()
        members = [m.strip() for m in rest.split(",")]
        if not name or not rest.strip() or any(not m for m in members):
            raise UserError(f"--init {text}: expected NAME=PATH[,PATH,...] with a name and no empty path")
    else:
        name, members = Path(text.rstrip("/\\")).name or text, [text]
    paths: list[str | None] = []
    for member in members:
        if _is_none(member):
            paths.append(None)
            continue
        if must_exist and not Path(member).exists():
            raise UserError(f"--init {text}: {member}: no such run folder, checkpoint or weights file (or give none)")
        paths.append(os.path.abspath(member))
    return Init(name, tuple(paths))


def safe_name(name: str) -> str:
    """A folder name for an init: anything but letters, digits, ``.``, ``-``, ``_`` becomes ``_``."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")
    return safe or "init"


def fraction_label(fraction: float) -> str:
    return f"f{fraction:g}"


# ---------------------------------------------------------------- the specification and its arms


@dataclass(frozen=True)
class Arm:
    """One (init, fraction, seed) run; ``index`` is its place in :meth:`CompareSpec.arms`."""

    index: int
    init: Init
    fraction: float
    seed: int

    @property
    def weights(self) -> str | None:
        return self.init.weights_for(self.seed)

    @property
    def label(self) -> str:
        return f"{self.init.name} {fraction_label(self.fraction)} s{self.seed}"

    def folder(self, out) -> Path:
        return Path(out) / "arms" / safe_name(self.init.name) / fraction_label(self.fraction) / f"s{self.seed}"


@dataclass
class CompareSpec:
    """What is compared (written to OUT/compare.json) plus ``runtime`` settings that do not change
    the results (device, workers, progress, ...; never written, never compared)."""

    inits: tuple[Init, ...]
    fractions: tuple[float, ...]
    seeds: int
    metric: str
    train_json: str
    train_images: str
    val_json: str
    val_images: str
    options: dict = field(default_factory=dict)
    runtime: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.inits = tuple(self.inits)
        self.fractions = tuple(float(f) for f in self.fractions)
        if self.metric not in METRICS:
            raise UserError(f"metric must be one of {', '.join(METRICS)}, got {self.metric!r}")
        if not self.inits:
            raise UserError("give at least one --init (the first is the baseline)")
        if self.seeds < 1:
            raise UserError(f"--seeds must be at least 1, got {self.seeds}")
        if not self.fractions:
            raise UserError("--fractions: no fraction given")
        for f in self.fractions:
            if not 0.0 < f <= 1.0:
                raise UserError(f"--fractions: each must be in (0, 1], got {f:g}")
        if len(set(self.fractions)) != len(self.fractions):
            listed = ",".join(f"{f:g}" for f in self.fractions)
            raise UserError(f"--fractions: a fraction is listed twice ({listed})")
        names: dict[str, str] = {}
        for init in self.inits:
            key = safe_name(init.name)
            if key in names:
                same = "the same name" if names[key] == init.name else f"the same folder name as {names[key]!r}"
                raise UserError(f"--init: two inits have {same} ({init.name!r}); name them, e.g. --init NAME=PATH")
            names[key] = init.name

    @property
    def baseline(self) -> Init:
        return self.inits[0]

    def arms(self) -> list[Arm]:
        """Every (init, fraction, seed), ordered fraction, seed, init; indices 0..len-1."""
        out, index = [], 0
        for fraction in self.fractions:
            for seed in range(self.seeds):
                for init in self.inits:
                    out.append(Arm(index, init, fraction, seed))
                    index += 1
        return out

    def to_json(self) -> dict:
        return {
            "version": SPEC_VERSION,
            "metric": self.metric,
            "inits": [init.to_json() for init in self.inits],
            "baseline": self.baseline.name,
            "fractions": list(self.fractions),
            "seeds": self.seeds,
            "data": {
                "train_json": self.train_json,
                "train_images": self.train_images,
                "val_json": self.val_json,
                "val_images": self.val_images,
            },
            "options": dict(self.options),
        }

    @classmethod
    def from_json(cls, obj: dict, runtime: dict | None = None) -> CompareSpec:
        data = obj["data"]
        return cls(
            tuple(Init.from_json(i) for i in obj["inits"]),
            tuple(obj["fractions"]),
            int(obj["seeds"]),
            obj["metric"],
            data["train_json"],
            data["train_images"],
            data["val_json"],
            data["val_images"],
            dict(obj.get("options", {})),
            dict(runtime or {}),
        )


def _normalised(obj):
    return json.loads(json.dumps(obj))


# Recorded option names a later version renamed, per metric: an older OUT/compare.json is read
# with the new names (one line says so when it is rewritten), so its arms keep running.
RENAMED_OPTIONS = {"finetune": {"batch": "batch_size"}}


def _upgraded(obj: dict) -> tuple[dict, list[str]]:
    """``obj`` (a recorded spec) with renamed option keys under their new names, and the renames."""
    renames = RENAMED_OPTIONS.get(obj.get("metric", ""), {})
    options = obj.get("options", {})
    done = [f"{old} -> {new}" for old, new in renames.items() if old in options and new not in options]
    if not done:
        return obj, []
    upgraded = {k: v for k, v in options.items() if k not in renames}
    for old, new in renames.items():
        if old in options:
            upgraded[new] = options[old]
    return {**obj, "options": upgraded}, done


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = list(dict.fromkeys([*old, *new]))
    diffs = []
    for key in keys:
        a, b = old.get(key, "(absent)"), new.get(key, "(absent)")
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            diffs.append(f"{prefix}{key} {json.dumps(a)} -> {json.dumps(b)}")
    return diffs


def read_spec(out, runtime: dict | None = None) -> CompareSpec:
    """The comparison recorded in OUT/compare.json; UserError if there is none."""
    path = Path(out) / SPEC_FILE
    if not path.is_file():
        raise PathError(path, "no such file (not a soco compare folder; give --init and the data options)")
    try:
        obj, _ = _upgraded(json.loads(path.read_text(encoding="utf-8")))
        return CompareSpec.from_json(obj, runtime)
    except (ValueError, KeyError, TypeError) as exc:
        raise PathError(path, f"not a soco compare specification ({type(exc).__name__}: {exc})") from exc


def check_out(spec: CompareSpec, out) -> bool:
    """Whether OUT/compare.json exists; UserError when it records another comparison. Writes
    nothing, so a comparison refused before it runs (a leak, changed weights) leaves OUT as it was."""
    path = Path(out) / SPEC_FILE
    if not path.is_file():
        return False
    try:
        old, _ = _upgraded(json.loads(path.read_text(encoding="utf-8")))
    except ValueError as exc:
        raise PathError(path, "unreadable (not JSON); remove it or use another --out") from exc
    new = _normalised(spec.to_json())
    if old != new:
        diffs = _differences(old, new)
        shown = "; ".join(diffs[:3]) + (f"; and {len(diffs) - 3} more" if len(diffs) > 3 else "")
        raise UserError(
            f"{out} holds another comparison ({shown}); use another --out, or rerun "
            "with the recorded options (or without --init to reuse them)"
        )
    return True


def prepare_out(spec: CompareSpec, out) -> Path:
    """Write OUT/compare.json, or check that the one there is this ``spec``; UserError if not."""
    path = Path(out) / SPEC_FILE
    if not check_out(spec, out):
        atomic_write_json(path, _normalised(spec.to_json()))
        return path
    renamed = _upgraded(json.loads(path.read_text(encoding="utf-8")))[1]
    if renamed:  # the same comparison under older option names: recorded anew
        atomic_write_json(path, _normalised(spec.to_json()))
        print(f"note: {path} recorded options under their old names; rewritten ({', '.join(renamed)})", flush=True)
    return path


# ---------------------------------------------------------------- results


def result_path(arm: Arm, spec: CompareSpec, out) -> Path:
    return arm.folder(out) / RESULT_FILES[spec.metric]


def load_result(arm: Arm, spec: CompareSpec, out) -> dict | None:
    """The finished arm's result (metrics.json with its final AP, or knn.json), else None (not
    run yet, or a fine-tune still under way).

    A result file that cannot be read is refused (PathError naming it), not taken as "not run":
    the arm's folder may hold hours of work, so the user decides, by deleting the file, whether
    the arm runs again; nothing is moved or deleted here.
    """
    path = result_path(arm, spec, out)
    if not path.is_file():
        return None
    hint = "delete it to run this arm again"
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise PathError(path, f"unreadable result file ({one_line(exc)}); {hint}") from exc
    if not isinstance(result, dict):
        raise PathError(path, f"unreadable result file (a JSON {type(result).__name__}, not an object); {hint}")
    if spec.metric == "finetune":
        if "bbox" not in result:
            return None
        if "max_iters" in result and result.get("iterations", 0) < result["max_iters"]:
            return None
    elif "top1" not in result:
        return None
    return result


def shard_arms(arms: list[Arm], shard: tuple[int, int] | None) -> list[Arm]:
    """Arms i, i+n, i+2n, ... of ``arms`` for ``shard=(i, n)`` (all for None)."""
    if shard is None:
        return list(arms)
    i, n = shard
    if n < 1 or not 0 <= i < n:
        raise UserError(f"bad --arm {i}/{n}: need 0 <= i < N")
    return [arm for arm in arms if arm.index % n == i]


def collect(spec: CompareSpec, out) -> tuple[list[tuple[Arm, dict]], list[Arm]]:
    """(finished arms with their results, unfinished arms), in arm order."""
    done, missing = [], []
    for arm in spec.arms():
        result = load_result(arm, spec, out)
        if result is None:
            missing.append(arm)
        else:
            done.append((arm, result))
    return done, missing


# ---------------------------------------------------------------- the weights each arm saw


def random_identity(seed: int) -> dict:
    """The identity of random-init weights: no file, the arm's seed."""
    return {"weights": None, "file": None, "sha256": None, "step": None, "random_seed": int(seed)}


def describe_weights(identity: dict | None) -> str:
    """``step 200, sha256 0123456789ab`` (12 hex digits), ``sha256 ...`` for a file that is not a
    soco checkpoint, ``random init seed 3``, or ``not recorded``."""
    if not isinstance(identity, dict):
        return "not recorded"
    if identity.get("file") is None:
        seed = identity.get("random_seed")
        return "random init, seed not recorded" if seed is None else f"random init seed {seed}"
    step, digest = identity.get("step"), identity.get("sha256")
    # a record written by hand or by an older version may lack the digest: say so, not "sha256 None"
    sha = f"sha256 {digest[:12]}" if isinstance(digest, str) and digest else "sha256 not recorded"
    return (f"step {step}, " if step is not None else "") + sha


def _weights_key(identity: dict | None) -> tuple | None:
    if not isinstance(identity, dict):
        return None
    if identity.get("file") is None:
        return ("random", identity.get("random_seed"))
    return ("file", identity.get("sha256"), identity.get("step"))


def same_weights(a: dict | None, b: dict | None) -> bool:
    """The same weights: the same sha256 and step (wherever the file lies), or the same random seed."""
    return _weights_key(a) == _weights_key(b)


def _soco_step(path: Path) -> int | None:
    """The step of a soco pretrain checkpoint, None for any other weights file. Only the pickle is
    read (``torch.load`` with ``mmap``: the tensors stay on disk)."""
    import zipfile

    if not zipfile.is_zipfile(path):  # safetensors, Detectron2 .pkl, ...: no step
        return None
    import torch

    from ..engine.checkpoint import _numpy_safe_globals  # the checkpoint reader's own allowlist
    from ..weights import soco_weights_of

    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            content = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        found = soco_weights_of(content, path)
    except Exception:  # not a checkpoint soco reads this way: its sha256 alone identifies it
        return None
    return None if found is None else found.step


def _stat_key(path: Path) -> tuple[int, int, int, int]:
    try:
        st = os.stat(path)
    except OSError as exc:
        raise PathError(path, f"cannot read the weights ({exc.strerror or exc})") from exc
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class InitWeights:
    """What the members of a comparison's inits resolve to, as identities (:func:`describe_weights`).

    :meth:`now` resolves a member as the metrics do (``weights.resolve_checkpoint``: a
    run folder's newest intact checkpoint) and hashes that file (``runfolder.file_digest``) once
    per version (device, inode, size, mtime) in this process; an unchanged file costs a stat.
    ``pinned``: the identity each member had when the comparison started (:meth:`pin`); every arm
    run in this process must see it (:meth:`for_arm`).
    """

    def __init__(self) -> None:
        self._seen: dict[str, tuple[tuple[int, int, int, int], dict]] = {}
        self.pinned: dict[str, dict] = {}

    def now(self, weights: str | None, seed: int = 0) -> dict:
        if weights is None:
            return random_identity(seed)
        from ..weights import resolve_checkpoint

        path = Path(resolve_checkpoint(weights))
        for _ in range(3):
            before = _stat_key(path)
            seen = self._seen.get(str(path))
            if seen is not None and seen[0] == before:
                return dict(seen[1], weights=str(weights))
            try:
                digest = file_digest(path)
            except OSError as exc:
                raise PathError(path, f"cannot read the weights ({exc.strerror or exc})") from exc
            identity = {"weights": str(weights), "file": str(path), "sha256": digest, "step": _soco_step(path)}
            if _stat_key(path) == before:  # not replaced while it was read
                self._seen[str(path)] = (before, identity)
                return identity
        raise PathError(path, "replaced three times while it was read; try again")

    def pin(self, spec: CompareSpec) -> None:
        """Resolve and hash every member of every init now (one line on a missing checkpoint)."""
        for init in spec.inits:
            for member in init.paths:
                if member is not None and member not in self.pinned:
                    self.pinned[member] = self.now(member)

    def for_arm(self, arm: Arm, total: int | None = None) -> dict:
        """The identity ``arm`` runs with: the pinned one; UserError when its file changed since."""
        now = self.now(arm.weights, arm.seed)
        if arm.weights is None:
            return now
        pinned = self.pinned.setdefault(arm.weights, now)
        if not same_weights(pinned, now):
            name = arm.init.name
            raise UserError(
                f"{name}: its weights changed while this comparison ran ({describe_weights(pinned)} -> "
                f"{describe_weights(now)}, {now['file']}); arm {arm.index + 1}{f'/{total}' if total else ''} "
                f"({arm.label}) was not started and the arms of {name} finished so far used the old weights: "
                f"rerun with --reevaluate {shlex.quote(name)} to evaluate them again with the new ones, or "
                "compare a copy of the checkpoint that training does not overwrite (in another --out)"
            )
        return dict(pinned, weights=arm.weights)


def _read_json(path: Path) -> dict | None:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def recorded_weights(arm: Arm, spec: CompareSpec, out, result: dict | None = None) -> dict | None:
    """The weights ``arm`` was computed from (finished: its result file's record, else the one it
    started with) or, for an unfinished fine-tune (it would resume), started from; None if none."""
    if result is None:
        result = load_result(arm, spec, out)
    if result is not None and isinstance(result.get(WEIGHTS_KEY), dict):
        return result[WEIGHTS_KEY]
    if result is not None or spec.metric == "finetune":
        return _read_json(arm.folder(out) / START_FILE)
    return None


@dataclass
class StaleArm:
    """An arm whose recorded weights (None: a finished arm without a record) differ from ``now``."""

    arm: Arm
    recorded: dict | None
    now: dict


def stale_arms(spec: CompareSpec, out, weights: InitWeights) -> list[StaleArm]:
    """Every arm in OUT (all shards) computed from, or resuming from, other weights than its init's
    pinned ones (:meth:`InitWeights.pin` first), and finished arms without a record. Random-init
    arms never are (their identity is their seed)."""
    found = []
    for arm in spec.arms():
        if arm.weights is None:
            continue
        result = load_result(arm, spec, out)
        recorded = recorded_weights(arm, spec, out, result)
        if recorded is None and result is None:
            continue
        now = weights.pinned[arm.weights]
        if recorded is None or not same_weights(recorded, now):
            found.append(StaleArm(arm, recorded, now))
    return found


def _grouped(stale: list[StaleArm]) -> dict[str, list[StaleArm]]:
    groups: dict[str, list[StaleArm]] = {}
    for item in stale:
        groups.setdefault(item.arm.init.name, []).append(item)
    return groups


def _texts(identities) -> str:
    return " / ".join(dict.fromkeys(describe_weights(i) for i in identities))


def refuse_stale(stale: list[StaleArm]) -> None:
    """UserError (one line) naming each init whose recorded arms have other weights than now,
    the old and new step / sha256, and the way out (``--reevaluate NAME``)."""
    groups = _grouped([s for s in stale if s.recorded is not None])
    if not groups:
        return
    parts = [
        f"{name} ({len(items)} arm(s) from {_texts(s.recorded for s in items)}, now {_texts(s.now for s in items)})"
        for name, items in groups.items()
    ]
    flags = " ".join(f"--reevaluate {shlex.quote(name)}" for name in groups)
    raise UserError(
        f"weights changed since arms of this comparison ran: {'; '.join(parts)}; a report would pool "
        f"two sets of weights. Add {flags} to move those arms aside and evaluate them again with the "
        "current weights"
    )


def move_aside(arm: Arm, out) -> Path:
    """Move ``arm``'s folder aside to ``sS.old-N`` (never deleted; the arm then runs afresh)."""
    folder = arm.folder(out)
    n = 1
    while (aside := folder.with_name(f"{folder.name}.old-{n}")).exists():
        n += 1
    folder.rename(aside)
    return aside


def reevaluate(
    spec: CompareSpec,
    out,
    names: list[str],
    stale: list[StaleArm],
    shard: tuple[int, int] | None = None,
    log: Callable[[str], None] = print,
) -> list[Path]:
    """``--reevaluate``: move aside the arms of the inits ``names`` (those of ``shard``) that were
    computed from other weights than their init's current ones (or have no record), one line per
    init; returns where they went."""
    mine = {arm.index for arm in shard_arms(spec.arms(), shard)}
    groups = _grouped([s for s in stale if s.arm.index in mine])
    moved = []
    for name in names:
        items = groups.get(name, [])
        if not items:
            which = f"of {name}" if shard is None else f"of {name} in arms {shard[0]}/{shard[1]}"
            log(f"--reevaluate {name}: every arm {which} already used its current weights; nothing to discard")
            continue
        asides = [move_aside(s.arm, Path(out)) for s in items]
        moved += asides
        shown = ", ".join(str(a.relative_to(out)) for a in asides[:3]) + (" ..." if len(asides) > 3 else "")
        log(
            f"--reevaluate {name}: moved {len(items)} arm(s) computed from {_texts(s.recorded for s in items)} "
            f"aside ({shown}); they run again with {_texts(s.now for s in items)}"
        )
    return moved


# ---------------------------------------------------------------- the leak guard


def _val_image_paths(spec: CompareSpec) -> list[Path]:
    from ..coco_json import read_coco_json

    data = read_coco_json(
        spec.val_json, annotations="ignored", categories=False, sizes="ignored", what="validation JSON"
    )
    return [Path(spec.val_images) / im["file_name"] for im in data.images]


def check_leaks(spec: CompareSpec, log: Callable[[str], None] = print, progress: bool = False) -> None:
    """Refuse (LeakError, one line) when a validation image is in an init's pretraining set:
    every member of every init, in one pass over the validation images."""
    from ..data.manifest import check_weights_no_leak

    named = [(init.name, path) for init in spec.inits for path in init.paths]
    check_weights_no_leak(named, _val_image_paths(spec), "validation", log, progress)


# ---------------------------------------------------------------- running


def run_arm(arm: Arm, spec: CompareSpec, out_dir) -> dict:
    """Run one arm of ``spec`` into ``out_dir`` with its metric; returns the metric's result dict.

    finetune: :func:`soco_pretrain.transfer.finetune.finetune` with ``fraction``/``seed`` of the
    arm and ``resume="auto"``; knn: :func:`soco_pretrain.evaluate.knn.knn_eval` with
    ``train_fraction``/``seed`` (both with their leak check off: :func:`check_leaks` ran once for
    all arms).
    """
    from .. import config

    runtime = spec.runtime
    if spec.metric == "finetune":
        from ..transfer.finetune import FinetuneOptions, finetune

        options = dict(spec.options)
        if "train_sizes" in options:
            options["train_sizes"] = tuple(options["train_sizes"])
        # the run options of the metric (config.py's field metadata) that the runtime holds
        extra = {k: runtime[k] for k in config.option_names(config.FinetuneOptions, "run") if k in runtime}
        opts = FinetuneOptions(**options, **extra, fraction=arm.fraction, seed=arm.seed, resume="auto")
        return finetune(
            arm.weights,
            spec.train_json,
            spec.train_images,
            spec.val_json,
            spec.val_images,
            Path(out_dir),
            opts,
            allow_leak=True,
        )
    from .knn import KnnOptions, knn_eval

    extra = {k: runtime[k] for k in config.option_names(config.KnnOptions, "run") if k in runtime}
    knn_opts = KnnOptions(**spec.options, **extra, seed=arm.seed, train_fraction=arm.fraction, allow_leak=True)
    return knn_eval(
        arm.weights, spec.train_json, spec.train_images, spec.val_json, spec.val_images, Path(out_dir), knn_opts
    )


@dataclass
class RunSummary:
    ran: list[Arm] = field(default_factory=list)
    skipped: list[Arm] = field(default_factory=list)
    failed: list[tuple[Arm, str]] = field(default_factory=list)


def run_compare(
    spec: CompareSpec,
    out,
    shard: tuple[int, int] | None = None,
    runner: Callable[[Arm, CompareSpec, Path], dict] | None = None,
    log: Callable[[str], None] = print,
    weights: InitWeights | None = None,
) -> RunSummary:
    """Run the arms of ``spec`` (those of ``shard``) that are not finished; one line per arm.

    ``runner`` defaults to :func:`run_arm` (looked up at call time, so tests can replace it).
    OUT/compare.json must already be written (:func:`prepare_out`). ``weights``: the identities
    the comparison started with (:meth:`InitWeights.pin`; pinned at first use when not given):
    each arm writes its identity to START_FILE before it runs and to its result file after; an
    init whose file changed since stops the run (UserError) before its next arm.
    """
    out = Path(out)
    arms = spec.arms()
    total = len(arms)
    summary = RunSummary()
    weights = weights if weights is not None else InitWeights()
    for arm in shard_arms(arms, shard):
        head = f"arm {arm.index + 1}/{total}: {arm.label}"
        if load_result(arm, spec, out) is not None:
            log(f"{head}: done, skipped ({result_path(arm, spec, out)})")
            summary.skipped.append(arm)
            continue
        identity = weights.for_arm(arm, total)
        folder = arm.folder(out)
        seen = f"{arm.weights}: {describe_weights(identity)}" if arm.weights else f"none, {describe_weights(identity)}"
        log(f"{head} -> {folder} (weights: {seen})")
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(folder / START_FILE, identity)
        run = runner if runner is not None else run_arm
        try:
            run(arm, spec, folder)
        except NonFiniteLossError as exc:  # a diverged arm: note it, go on with the others
            message = " ".join(str(exc).split()) or type(exc).__name__
            log(f"{head}: failed: {message}")
            summary.failed.append((arm, message))
            continue
        record_weights(arm, spec, out, identity)
        summary.ran.append(arm)
    return summary


def record_weights(arm: Arm, spec: CompareSpec, out, identity: dict) -> None:
    """Add the weights identity to a finished arm's result file (key WEIGHTS_KEY)."""
    result = load_result(arm, spec, out)
    if result is not None and result.get(WEIGHTS_KEY) != identity:
        atomic_write_json(result_path(arm, spec, out), {**result, WEIGHTS_KEY: identity})


# ---------------------------------------------------------------- the report


def _arm_record(arm: Arm, spec: CompareSpec, out, result: dict) -> dict | None:
    """A finished arm's weights: its result file's record, else (stopped before that was added,
    OUT given) the one it started with."""
    if isinstance(result.get(WEIGHTS_KEY), dict):
        return result[WEIGHTS_KEY]
    return recorded_weights(arm, spec, out, result) if out is not None else None


def weights_summary(spec: CompareSpec, done: list[tuple[Arm, dict]], out=None) -> tuple[list[dict], list[str]]:
    """Per init, the weights its finished arms were computed from (one entry per member and
    identity, with the indices of its arms; ``consistent`` False when one member's arms saw
    different ones), and one warning per such init."""
    summary, warnings = [], []
    for init in spec.inits:
        groups: dict[tuple, dict] = {}
        for arm, result in done:
            if arm.init.name != init.name:
                continue
            recorded = _arm_record(arm, spec, out, result)
            if arm.weights is None:
                key: tuple = (None,)
                entry: dict[str, Any] = {"path": None, "file": None, "step": None, "sha256": None}
                text = "random init, seeded by each arm's seed"
            else:
                key = (arm.weights, _weights_key(recorded))
                entry = {"path": arm.weights, **{k: (recorded or {}).get(k) for k in ("file", "step", "sha256")}}
                text = describe_weights(recorded)
            groups.setdefault(key, {**entry, "text": text, "arms": []})["arms"].append(arm.index)
        entries = list(groups.values())
        members = [e["path"] for e in entries if e["path"] is not None]
        mixed = [m for m in dict.fromkeys(members) if members.count(m) > 1]
        summary.append({"init": init.name, "consistent": not mixed, "weights": entries})
        if mixed:
            texts = "; ".join(f"{e['text']}: {len(e['arms'])} arm(s)" for e in entries if e["path"] in mixed)
            where = f"--out {shlex.quote(str(out))} " if out is not None else ""
            warnings.append(
                f"the arms of {init.name} were computed from different weights ({texts}) and the numbers "
                f"above pool them: soco compare {where}--reevaluate {shlex.quote(init.name)} evaluates the "
                "arms made from other weights than its current ones again"
            )
    return summary, warnings


def _weights_markdown(summary: list[dict]) -> list[str]:
    lines = ["## Weights each init was evaluated with", ""]
    lines += ["| init | weights file | step, sha256 | arms |", "|---|---|---|---:|"]
    for item in summary:
        for e in item["weights"]:
            file = e["file"] or e["path"] or "none"
            text = e["text"] if item["consistent"] else f"**{e['text']}** (differs from its other arms)"
            lines.append(f"| {item['init']} | {file} | {text} | {len(e['arms'])} |")
    return lines + [""]


def write_compare_report(spec: CompareSpec, out, done: list[tuple[Arm, dict]], missing: list[Arm]):
    """:func:`.report.write_report` plus the weights of every init: report.json gets
    ``init_weights`` (per init, :func:`weights_summary`; per arm, its record) and
    ``weights_warnings``; report.md a table of them and, at the top, a warning per init whose arms
    saw different weights. Returns (paths, warnings)."""
    from .report import format_markdown, plot_report, summarize

    out = Path(out)
    report = summarize(spec, done, missing, out)
    records = {arm.index: _arm_record(arm, spec, out, result) for arm, result in done}
    for entry in report["arms"]:
        entry[WEIGHTS_KEY] = records[entry["index"]]
    summary, warnings = weights_summary(spec, done, out)
    report[WEIGHTS_KEY], report["weights_warnings"] = summary, warnings
    title, _, body = format_markdown(report).partition("\n")
    markdown = title + "\n\n" + "".join(f"**Warning: {w}.**\n\n" for w in warnings) + body.lstrip("\n")
    table = "\n".join(_weights_markdown(summary))  # before the notes
    before, notes, after = markdown.rpartition("\nNotes:\n")
    markdown = f"{before}\n{table}{notes}{after}" if notes else f"{markdown}\n{table}"
    paths = [out / "report.json", out / "report.md", out / "report.png"]
    atomic_write_json(paths[0], report)
    atomic_write_bytes(paths[1], markdown.encode("utf-8"))
    atomic_write_bytes(paths[2], plot_report(report))
    return paths, warnings


# ---------------------------------------------------------------- several devices


def device_env(device: str, environ: dict | None = None) -> tuple[str, dict]:
    """(``--device`` value, environment) of the child process for ``cuda:N`` or ``cpu``.

    ``cuda:N`` becomes ``--device cuda`` with CUDA_VISIBLE_DEVICES set to the N-th visible GPU
    (the N-th entry of the caller's own CUDA_VISIBLE_DEVICES when that is set).
    """
    env = dict(os.environ if environ is None else environ)
    text = device.strip().lower()
    if text == "cpu":
        return "cpu", env
    match = re.fullmatch(r"cuda(?::(\d+))?", text)
    if not match:
        raise UserError(f"--devices: bad device {device!r} (expected cuda:N or cpu)")
    index = int(match.group(1) or 0)
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip():
        entries = [v.strip() for v in visible.split(",") if v.strip()]
        if index >= len(entries):
            raise UserError(f"--devices: {device} but CUDA_VISIBLE_DEVICES={visible} lists {len(entries)} GPU(s)")
        env["CUDA_VISIBLE_DEVICES"] = entries[index]
    else:
        env["CUDA_VISIBLE_DEVICES"] = str(index)
    return "cuda", env


def parse_devices(text: str) -> list[str]:
    devices = [d.strip() for d in text.split(",") if d.strip()]
    if not devices:
        raise UserError("--devices: no device given (expected e.g. cuda:0,cuda:1)")
    gpus = [device_env(d, {})[1].get("CUDA_VISIBLE_DEVICES") for d in devices]  # also validates each
    gpus = [g for g in gpus if g is not None]
    if len(set(gpus)) != len(gpus):
        raise UserError(f"--devices: a GPU is listed twice ({text})")
    return devices


def child_commands(
    out, devices: list[str], runtime_args: list[str], environ: dict | None = None
) -> list[tuple[list[str], dict, Path]]:
    """(argv, environment, log file) of one ``soco compare`` child per device: arms k/D of OUT's
    recorded comparison, no report (the parent writes it), leak check already done."""
    out = Path(out)
    commands = []
    for k, device in enumerate(devices):
        flag, env = device_env(device, environ)
        argv = [
            sys.executable,
            "-m",
            "soco_pretrain",
            "compare",
            "--out",
            str(out),
            "--arm",
            f"{k}/{len(devices)}",
            "--device",
            flag,
            "--allow-leak",
            "--no-report",
            *runtime_args,
        ]
        commands.append((argv, env, out / "logs" / f"arm{k}of{len(devices)}.log"))
    return commands


def run_devices(
    out, devices: list[str], runtime_args: list[str], log: Callable[[str], None] = print, popen=subprocess.Popen
) -> list[int]:
    """Start one child per device (output to OUT/logs/), wait for all; returns their exit statuses."""
    commands = child_commands(out, devices, runtime_args)
    children = []
    try:
        for (argv, env, log_path), device in zip(commands, devices):
            log_path.parent.mkdir(parents=True, exist_ok=True)
            handle = open(log_path, "ab")
            children.append((popen(argv, env=env, stdout=handle, stderr=subprocess.STDOUT), handle, device, log_path))
            log(f"{device}: arms {argv[argv.index('--arm') + 1]} -> log {log_path}")
        statuses = []
        for child, handle, device, log_path in children:
            status = child.wait()
            handle.close()
            statuses.append(status)
            log(f"{device}: {'finished' if status == 0 else f'exit status {status}, see {log_path}'}")
        return statuses
    except BaseException:
        for child, handle, _, _ in children:
            if child.poll() is None:
                child.terminate()
            handle.close()
        raise
