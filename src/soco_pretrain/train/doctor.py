"""``soco doctor``: price a pretraining run before starting it, without training.

Given what ``soco pretrain`` is given, it checks the software and devices, that this process can
read a sample of the images and that the proposal store has entries for them, that the run
folder can hold the planned checkpoints, and the per-device batch; then it states the plan
(steps, images seen) and an ETA from the measured throughputs of ``throughput.py``.

Under torchrun every rank checks its own share of the sample (``rank::world``, as the dataset is
split by rank) on its own file system, and the findings are gathered to rank 0, which reports
them: a node with a stale copy of the images shows up as "rank 3: ...".

A finding blocks (exit status 2) when the run would fail or train on something else than meant;
the rest are notes.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from .. import files
from ..config import PretrainConfig
from ..data.dataset import image_source, join_store
from ..engine.checkpoint import state_bytes
from ..engine.distributed import cleanup, init_distributed
from ..errors import SocoError, UserError
from ..images import ImageError, ImageList, load_rgb
from ..model import SoCoModel
from ..proposals.store import load as load_store
from ..runfolder import usable_cores
from ..transfer.detector_memory import cpu_available_gib
from .loop import full_batches_only, make_plan, resolve_per_device_batch
from .throughput import describe, lookup

SAMPLE = 32  # images decoded per run (spread over the list): seconds, even for large photos
# More unreadable files than this in the sample is a wrong folder or a broken copy, not the odd
# bad file the loader skips (our threshold).
MAX_BAD_FRACTION = 0.1
MAX_NAMED = 3  # files named per finding


@dataclass
class Check:
    """One line of the report. ``status``: ok | note | problem (a problem blocks the run)."""

    name: str
    status: str
    detail: str

    def line(self) -> str:
        return f"{self.name:<11}{self.status:<9}{self.detail}"


@dataclass
class Report:
    """What ``diagnose`` found: the checks, then the plan's lines (rank 0; other ranks' is empty)."""

    checks: list[Check] = field(default_factory=list)
    plan: list[str] = field(default_factory=list)

    @property
    def problems(self) -> list[Check]:
        return [c for c in self.checks if c.status == "problem"]

    @property
    def exit_code(self) -> int:
        return 2 if self.problems else 0

    def text(self) -> str:
        return "\n".join([c.line() for c in self.checks] + self.plan)


@dataclass
class RankSample:
    """One rank's share of the sample: what it could not read. Gathered to rank 0."""

    rank: int
    devices: list[str]
    sampled: int = 0
    missing: list[str] = field(default_factory=list)
    undecodable: list[str] = field(default_factory=list)  # "path (reason)"
    no_proposals: list[str] = field(default_factory=list)
    error: str = ""  # the image list or the store could not be read on this rank


# ---------------------------------------------------------------- the pieces


def sample_indices(n: int, k: int) -> list[int]:
    """``k`` indices spread evenly over ``n`` images (all of them when ``n <= k``)."""
    return list(range(n)) if n <= k else [i * n // k for i in range(k)]


def micro_batches_per_epoch(n: int, per_device_batch: int, world: int) -> int:
    """Batches per process and epoch, as the loader makes them: the sampler pads every rank to
    ceil(n / world) samples, full batches only unless the images are fewer than one batch per
    process (loop.build_job)."""
    per_rank = math.ceil(n / world)
    if full_batches_only(n, per_device_batch, world):
        return per_rank // per_device_batch
    return math.ceil(per_rank / per_device_batch)


def versions() -> Check:
    import torchvision

    parts = [f"torch {torch.__version__}", f"torchvision {torchvision.__version__}"]
    if torch.cuda.is_available():
        parts.append(f"CUDA {torch.version.cuda}")
        try:
            parts.append("NCCL " + ".".join(str(v) for v in torch.cuda.nccl.version()))
        except (RuntimeError, AttributeError):  # a build without NCCL
            parts.append("no NCCL")
    else:
        parts.append("no CUDA device")
    return Check("software", "ok", ", ".join(parts))


def device_lines(device: torch.device, world: int) -> list[str]:
    """This process's device(s): every visible GPU when alone, its own under torchrun; the CPU's
    usable cores and available memory."""
    if device.type == "cuda":
        indices = range(torch.cuda.device_count()) if world == 1 else [device.index or 0]
        lines = []
        for i in indices:
            free, total = torch.cuda.mem_get_info(i)
            lines.append(f"cuda:{i} {torch.cuda.get_device_name(i)}, {total / 2**30:.1f} GiB ({free / 2**30:.1f} free)")
        return lines
    gib = cpu_available_gib()
    memory = f"{gib:.1f} GiB memory available" if gib is not None else "memory unknown"
    return [f"cpu, {usable_cores()} cores, {memory}"]


def read_sample(listed: ImageList, indices: list[int], join, sample: RankSample) -> None:
    """Decode the images at ``indices``; count the missing, undecodable and proposal-less ones."""
    for i in indices:
        path, name = listed.abspath(i), listed.paths[i]
        sample.sampled += 1
        if not path.exists():
            sample.missing.append(name)
        else:
            try:
                load_rgb(path)
            except ImageError as exc:
                sample.undecodable.append(f"{name} ({exc.reason})")
        if join is not None and join.missing[i]:
            sample.no_proposals.append(name)


def gather(sample: RankSample) -> list[RankSample]:
    """Every rank's sample, on every rank (one process: its own)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [sample]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, sample)
    return out


def _named(paths: list[str]) -> str:
    more = f" and {len(paths) - MAX_NAMED} more" if len(paths) > MAX_NAMED else ""
    return ", ".join(paths[:MAX_NAMED]) + more


def image_checks(samples: list[RankSample], n_images: int) -> list[Check]:
    """One line per rank with unreadable images (problem above MAX_BAD_FRACTION of the whole
    sample, else a note: the loader skips them), or one ok line."""
    who = (lambda s: f"rank {s.rank}: ") if len(samples) > 1 else (lambda s: "")
    sampled = sum(s.sampled for s in samples)
    bad = sum(len(s.missing) + len(s.undecodable) for s in samples)
    status = "problem" if bad > MAX_BAD_FRACTION * sampled else "note"
    checks = []
    for s in samples:
        if s.missing:
            checks.append(
                Check(
                    "images",
                    status,
                    f"{who(s)}{len(s.missing)} of {s.sampled} sampled images missing: {_named(s.missing)}",
                )
            )
        if s.undecodable:
            checks.append(
                Check("images", status, f"{who(s)}{len(s.undecodable)} of {s.sampled} sampled images do not decode: "
                      f"{_named(s.undecodable)}")
            )  # fmt: skip
    if not checks:
        ranks = f" over {len(samples)} ranks" if len(samples) > 1 else ""
        checks.append(Check("images", "ok", f"{sampled} sampled of {n_images} decode{ranks}"))
    return checks


def proposal_checks(cfg: PretrainConfig, proposals, listed: ImageList, join, samples: list[RankSample]) -> list[Check]:
    """The store against the whole list (rank 0; vectorised, cheap), then each rank's sample
    against its own copy of the store."""
    views = cfg.data.views
    if views.proposal_source != "selective_search":
        return [Check("proposals", "ok", f"not needed (data.views.proposal_source={views.proposal_source})")]
    if join is None:
        return []  # the rank's error says why
    n, without = len(listed), len(join.without_proposals)
    not_in = join.reasons.get("not in the store", 0)
    checks = []
    if 2 * not_in > n:
        checks.append(Check("proposals", "problem", f"{not_in} of {n} images are not in {proposals}: a store of other "
                            "images? (soco proposals IMAGES -o STORE)"))  # fmt: skip
    elif without and views.no_proposals == "error":
        checks.append(Check("proposals", "problem", f"{without} of {n} images have no proposals in {proposals} and "
                            "data.views.no_proposals=error"))  # fmt: skip
    elif without:
        checks.append(Check("proposals", "note", f"{without} of {n} images have no proposals in {proposals}: they use "
                            "the whole image"))  # fmt: skip
    else:
        checks.append(Check("proposals", "ok", f"all {n} images have proposals in {proposals}"))
    if len(samples) > 1:
        for s in samples:
            if s.no_proposals:
                checks.append(Check("proposals", "note", f"rank {s.rank}: {len(s.no_proposals)} of {s.sampled} "
                                    f"sampled images have no proposals: {_named(s.no_proposals)}"))  # fmt: skip
    return checks


def checkpoint_bytes(cfg: PretrainConfig) -> int:
    """About the bytes of one checkpoint: online and target weights (with BatchNorm buffers) and
    the optimiser's momentum for every trainable parameter, sized as ``state_bytes`` sizes a real
    state. The model is built on the meta device (no memory, no initialisation); the tensors
    handed to state_bytes are allocated but never touched, so they take no memory either."""
    with torch.device("meta"):
        model = SoCoModel(cfg)
    weights = {k: torch.empty(v.shape, dtype=v.dtype) for k, v in model.state_dict().items()}
    momentum = [torch.empty(p.shape, dtype=p.dtype) for p in model.parameters() if p.requires_grad]
    return state_bytes({"model": weights, "optimizer": momentum})


def _existing_bytes(folder: Path) -> int:
    """Bytes of the checkpoints already in ``folder`` (a resumed run replaces them; hard links
    counted once)."""
    seen: dict[tuple[int, int], int] = {}
    if folder.is_dir():
        for p in folder.glob("*.pt"):
            st = p.stat()
            seen[(st.st_dev, st.st_ino)] = st.st_size
    return sum(seen.values())


def disk_check(cfg: PretrainConfig, out: Path) -> Check:
    """Room at ``out`` for the checkpoints kept at once: train.keep_checkpoints numbered files
    plus the next one written before the oldest is pruned (last.pt is a hard link to the newest;
    with keep 0, last.pt is rewritten beside the old one), less those already there."""
    here = out
    while not here.exists() and here.parent != here:
        here = here.parent
    if not os.access(here, os.W_OK | os.X_OK):
        return Check("disk", "problem", f"{here}: not writable by this user")
    try:
        per = checkpoint_bytes(cfg)
    except ValueError as exc:  # e.g. an unknown model.arch: the batch check says it too
        return Check("disk", "problem", f"cannot build the model: {exc}")
    keep = cfg.train.keep_checkpoints
    copies = keep + 1 if keep > 0 else 2
    needed = max(per, copies * per - _existing_bytes(out / "checkpoints"))
    what = f"{copies} checkpoints of about {files.human_bytes(per)} (train.keep_checkpoints={keep})"
    try:
        files.check_free_space(out, needed, what)
    except files.WriteError as exc:
        return Check("disk", "problem", exc.one_line())
    free = files.free_bytes(out)
    room = f"{files.human_bytes(free)} free at {out}" if free is not None else f"free space at {out} unknown"
    return Check("disk", "ok", f"{room}, about {files.human_bytes(needed)} needed: {what}")


def _clock(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def plan_checks(cfg: PretrainConfig, n_images: int, world: int, device: torch.device) -> tuple[list[Check], list[str]]:
    """The per-device batch (auto from the memory model), the plan of make_plan and the ETA."""
    try:
        cfg, note = resolve_per_device_batch(cfg, world, device)
        t = cfg.train
        plan = make_plan(cfg, world, micro_batches_per_epoch(n_images, t.per_device_batch, world), device)
    except UserError as exc:
        return [Check("batch", "problem", exc.one_line())], []
    batch = Check(
        "batch",
        "ok",
        f"{t.batch_size} = {t.per_device_batch} per device x {world} process(es) x {plan.accum} accumulation"
        + (f"; {note.strip(' ()')}" if note else ""),
    )
    # a step's batch, short when the images are fewer than one batch per process (one batch of them)
    per_step = plan.accum * world * min(t.per_device_batch, math.ceil(n_images / world))
    images_seen = plan.total_steps * per_step
    steps = f"{plan.steps_per_epoch} step{'s' if plan.steps_per_epoch != 1 else ''}"
    lines = [
        f"plan: {n_images:,} images, {steps}/epoch x {t.epochs} epochs = "
        f"{plan.total_steps:,} steps, "
        f"{images_seen:,} images seen, {plan.precision} on {device.type}, a checkpoint every "
        f"{t.checkpoint_every} steps"
    ]
    m, views = cfg.model, cfg.data.views
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    row = lookup(name, m.arch, m.backbone, views.v1_size, views.soco_star, plan.precision, usable_cores())
    model = f"{m.backbone} {m.arch}{'*' if views.soco_star else ''} at {views.v1_size} px, {plan.precision}"
    if row is None:
        cores = f" with {usable_cores()} cores" if device.type == "cpu" else ""
        lines.append(f"eta: unknown card: no measured throughput for {model} on {name}{cores} (train/throughput.py)")
    else:
        scaling = f" x {world} processes (assuming linear scaling)" if world > 1 else ""
        eta = _clock(images_seen / (row.images_per_s * world))
        lines.append(f"eta: about {eta} at {describe(row)}{scaling}")
    return [batch], lines


# ---------------------------------------------------------------- the whole check


def check_rank(cfg: PretrainConfig, images, proposals, image_root, sample: int, info) -> tuple:
    """This rank's image list, store join and share of the sample (its errors in the sample)."""
    mine = RankSample(info.rank, device_lines(info.device, info.world_size))
    listed, join = None, None
    try:
        listed = image_source(images, image_root)
        if len(listed) == 0:
            raise UserError(f"{images}: no images found")
        if cfg.data.views.proposal_source == "selective_search":
            if proposals is None:
                raise UserError("data.views.proposal_source=selective_search needs --proposals STORE")
            join = join_store(listed, load_store(proposals))
    except SocoError as exc:
        mine.error = exc.one_line()
    if listed is not None and len(listed):
        read_sample(listed, sample_indices(len(listed), sample)[info.rank :: info.world_size], join, mine)
    return mine, listed, join


def diagnose(
    cfg: PretrainConfig,
    images,
    proposals,
    out,
    image_root=None,
    sample: int = SAMPLE,
    device: str | None = None,
) -> Report:
    """Check what a ``soco pretrain`` run with these arguments needs, without training. Under
    torchrun (RANK / WORLD_SIZE) every rank must call it; rank 0's Report holds everything."""
    info = init_distributed(device, timeout_s=cfg.train.dist_timeout_s)
    try:
        mine, listed, join = check_rank(cfg, images, proposals, image_root, sample, info)
        samples = gather(mine)  # every rank, whatever it found
        if not info.is_main:
            return Report()
        report = Report([versions()])
        for s in samples:
            who = f"rank {s.rank}: " if len(samples) > 1 else ""
            report.checks += [Check("device", "ok", who + line) for line in s.devices]
        errors = [Check("inputs", "problem", (f"rank {s.rank}: " if len(samples) > 1 else "") + s.error)
                  for s in samples if s.error]  # fmt: skip
        report.checks += errors
        if listed is None:
            return report
        report.checks += image_checks(samples, len(listed))
        report.checks += proposal_checks(cfg, proposals, listed, join, samples)
        report.checks.append(disk_check(cfg, Path(out)))
        checks, report.plan = plan_checks(cfg, len(listed), info.world_size, info.device)
        report.checks += checks
        return report
    finally:
        cleanup()
