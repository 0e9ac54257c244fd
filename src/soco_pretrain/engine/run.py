"""``engine.run(stage, out, ...)``: one run of a training stage, from the lock to the summary.

A stage (pretraining, fine-tuning, the linear probe) supplies what is its own -- its job
(data, model, optimiser), its step, its hooks (evaluation, validation, the kNN monitor), what
its checkpoints hold and how they load, what it prints and returns -- through the
:class:`Stage` protocol. :func:`run` does the rest, once for every stage:

1. ``stage.check(info, fresh)`` on every process, before anything is written (input checks, the
   leak guard, a bad ``--init``);
2. the run-folder lock (``runfolder.locked``; rank 0) and, for ``resume="none"``, the fresh
   start (``--overwrite`` moves an earlier run aside);
3. ``stage.build(info)``;
4. **one resume policy** (:func:`resume_stage`): the checkpoint ``resume`` names is read, the
   stage refuses a checkpoint that is not its own or cannot fit, and a checkpoint made with
   another *recipe* -- any setting outside ``stage.run_keys``, the settings that change how a
   run runs, not what it trains -- is refused in one line naming the keys unless
   ``accept_changes``; the run settings that differ are said in one line;
5. ``stage.begin`` (the start-up line, a warm start), the :class:`~.trainer.Trainer` with the
   stage's hooks and the two periodic hooks every stage has -- the metrics writer and the
   checkpointer (:class:`~.checkpoint.Checkpointer`) -- and ``stage.finish`` (the summary).

The distributed set-up (torchrun / srun) and its clean-up wrap all of it for a stage with
``distributed = True``; a lost rank becomes one line (``stop_on_lost_ranks``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from ..errors import UserError
from ..runfolder import holds_checkpoints, locked, start_fresh
from .checkpoint import Checkpointer, CheckpointManager, load_checkpoint, rng_state, set_rng_state
from .distributed import DistInfo, all_reduce_mean, barrier, cleanup, init_distributed, stop_on_lost_ranks
from .metrics import METRICS_FILE, Metrics
from .trainer import Hook, StepOutput, Trainer


class Stage(Protocol):
    """What a training stage supplies to :func:`run` (see the module docstring for the order)."""

    command: str  # "pretrain" | "finetune" | "linear probe": the lock's and the messages' name
    distributed: bool  # under torchrun / srun: one process per device, a process group
    trains: bool  # False: a run that only evaluates (its checkpoint is read whatever the recipe; nothing moved aside)
    keep_checkpoints: int  # numbered checkpoints kept besides last.pt (0: only last.pt)
    run_keys: tuple[str, ...]  # dotted prefixes of settings a resume may change (how it runs)
    device: torch.device  # set by build: where a checkpoint is loaded to
    is_main: bool  # set by build: this process writes the run folder
    total_steps: int  # set by build: the schedule's length

    def check(self, info: DistInfo, fresh: bool) -> None:
        """Every process, before the lock: refuse bad input before anything is written.
        ``fresh``: the run will start at step 0 (no checkpoint to resume)."""

    def build(self, info: DistInfo) -> None:
        """Data, model and optimiser of this process."""

    def recipe(self) -> dict:
        """This run's settings (nested dicts), compared with a checkpoint's on resume."""

    def recipe_of(self, checkpoint: dict, path: Path, accept_changes: bool) -> dict:
        """A checkpoint's settings, as :meth:`recipe` gives them; refuses (one line naming
        ``path``) a checkpoint that is not this stage's or cannot fit this run whatever the
        settings (other classes, another backbone)."""

    def state_dict(self, step: int) -> dict:
        """What a checkpoint of the state after ``step`` steps holds besides ``step`` and ``rng``
        (the engine adds those)."""

    def load_state_dict(self, checkpoint: dict, path: Path) -> None:
        """Load a checkpoint that passed the checks."""

    def resumed_line(self, checkpoint: dict, path: Path) -> str:
        """The one line saying where the run resumed."""

    def begin(self, start: int, stop: int, resumed_from: Path | None) -> None:
        """After the resume, before the first step: a warm start, the start-up line."""

    def finished_result(self, start: int) -> Any:
        """A result to return at once instead of training (e.g. an evaluation-only run, or a
        finished run whose result is on disk), else None."""

    def make_step(self, start: int) -> Callable[[int], StepOutput]:
        """The step function (may have ``close()``: the trainer calls it at the end)."""

    def metrics(self) -> dict:
        """:class:`~.metrics.Metrics` keyword arguments: ``desc``, ``log_due``, ``record`` ..."""

    def checkpoint_due(self, trainer: Trainer) -> bool:
        """Whether the step just taken saves a checkpoint."""

    def hooks(self, writer: Hook, checkpointer: Hook) -> list[Hook]:
        """The stage's hooks in order, with the metrics writer and the checkpointer placed
        (usually last: ``[*own, writer, checkpointer]``: the record of a step is written before
        its checkpoint, so a crash between the two repeats a record rather than losing one)."""

    def finish(self, trainer: Trainer, start: int, seconds: float) -> Any:
        """The summary: printed by rank 0, returned by :func:`run`."""


def differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two nested dicts (a key in one only differs)."""
    keys = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key}")
    return keys


def _listed(keys: list[str], most: int = 6) -> str:
    return ", ".join(keys[:most]) + (" ..." if len(keys) > most else "")


def resume_stage(stage: Stage, manager: CheckpointManager, resume, accept_changes: bool) -> tuple[int, Path | None]:
    """The one resume policy: load the checkpoint ``resume`` names ("auto": the run's latest,
    "none": start at step 0, or a path) into ``stage``; returns (step, its path)."""
    path = manager.resume_from(resume)
    if path is None:
        return 0, None
    checkpoint = load_checkpoint(path, map_location=stage.device)
    saved = stage.recipe_of(checkpoint, path, accept_changes)
    differs = differences(saved, stage.recipe())
    changed = [key for key in differs if not key.startswith(stage.run_keys)]
    if changed and not accept_changes and stage.trains:  # an evaluation-only run trains nothing on
        raise UserError(
            f"{path}: made with other settings ({_listed(changed)}); resume with the run's own, give another "
            "--out, or add --accept-changes"
        )
    stage.load_state_dict(checkpoint, path)
    if "rng" in checkpoint:
        set_rng_state(checkpoint["rng"])
    if stage.is_main:
        print(stage.resumed_line(checkpoint, path), flush=True)
        if differs:
            print(f"note: the settings differ from the checkpoint's in {', '.join(differs)}", flush=True)
    return int(checkpoint["step"]), path


def run(
    stage: Stage,
    out,
    *,
    resume="auto",
    accept_changes: bool = False,
    overwrite: bool = False,
    max_steps: int | None = None,
    device: str | None = None,
    progress: bool = True,
    timeout_s: float | None = None,
) -> Any:
    """Run ``stage`` into the folder ``out``; returns ``stage.finish``'s summary (see the module
    docstring). ``resume``: "auto" | "none" | a checkpoint path; ``max_steps``: stop after this
    many steps in total (the schedules keep their length, so a rerun continues); ``device``:
    "cpu" / "cuda" to force one; ``timeout_s``: how long a collective waits for the others."""
    out = Path(out)
    if max_steps is not None and max_steps < 0:
        raise UserError(f"max_steps must be >= 0, got {max_steps}")
    # a one-process stage ignores the launcher's variables: an empty environment is one process
    info = init_distributed(device, timeout_s=timeout_s) if stage.distributed else init_distributed(device, env={})
    then = f"; rerun the same command to resume from the last checkpoint in {out / 'checkpoints'}"
    try:
        with stop_on_lost_ranks(info, timeout_s, then):
            fresh = resume in (None, "none") or (resume == "auto" and not holds_checkpoints(out))
            stage.check(info, fresh)
            # a with block (not ExitStack.close in a finally): the lock sees the exception, so a run
            # refused inside it removes the folder it made (runfolder.locked)
            with locked(out, stage.command, enabled=info.is_main):
                return _run_locked(stage, out, info, resume, accept_changes, overwrite, max_steps, progress)
    finally:
        if stage.distributed:
            cleanup()


def _run_locked(stage: Stage, out: Path, info: DistInfo, resume, accept_changes, overwrite, max_steps, progress):
    if resume in (None, "none") and info.is_main and stage.trains:
        start_fresh(out, overwrite, stage.command)
    stage.build(info)
    manager = CheckpointManager(out, keep=stage.keep_checkpoints)
    start, resumed_from = resume_stage(stage, manager, resume, accept_changes)
    early = stage.finished_result(start)
    if early is not None:
        return early
    if start == 0 and info.is_main:
        _drop_stale_records(out)
    stop = stage.total_steps if max_steps is None else min(stage.total_steps, max_steps)
    stage.begin(start, stop, resumed_from)
    trainer = make_trainer(stage, out, start, stop, manager, info, progress)
    trainer.last_checkpoint = resumed_from
    wall = time.perf_counter()
    trainer.run()
    return stage.finish(trainer, start, time.perf_counter() - wall)


def _drop_stale_records(out: Path) -> None:
    """A run starting at step 0 over the records of one that died before its first checkpoint
    would append a second curve to the first: those records go, said in one line."""
    stale = out / METRICS_FILE
    if stale.is_file() and stale.stat().st_size:
        stale.unlink()
        print(f"note: {stale} held records of an earlier start without a checkpoint; removed", flush=True)


def make_trainer(
    stage: Stage, out: Path, start: int, stop: int, manager: CheckpointManager, info: DistInfo, progress: bool
) -> Trainer:
    """The trainer of one stage: the metrics (first: the loss guard sees a step before any hook
    can save), the stage's hooks, the metrics writer and the checkpointer where the stage puts
    them."""
    options: dict[str, Any] = {"reduce": all_reduce_mean, **stage.metrics()}
    metrics = Metrics(out, total_steps=stop, initial=start, enabled=info.is_main, progress=progress, **options)

    def state() -> dict:
        return {**stage.state_dict(trainer.step), "step": trainer.step, "rng": rng_state()}

    checkpointer = Checkpointer(manager, state, due=stage.checkpoint_due, is_main=info.is_main, barrier=barrier)
    hooks: Sequence[Hook] = stage.hooks(metrics.writer, checkpointer)
    trainer = Trainer(stage.make_step(start), start, stop, [metrics, *hooks])  # state() reads trainer.step
    return trainer
