"""The one training loop under ``soco pretrain``, ``soco finetune`` and ``soco linear``.

A :class:`Trainer` runs ``run_step(step)`` until ``stop_step`` and calls its hooks around
each step, in the spirit of Detectron2's ``TrainerBase`` + ``hooks.py`` and torchvision's
references (a plain loop, the stage-specific work in one function, everything else a hook):

    before_train
    for each step:  before_step -> run_step -> after_step of every hook, in order
    after_train     (also after an exception)

``run_step`` returns a :class:`StepOutput`; ``trainer.step`` counts *finished* steps, so hooks
see the number of the step that has just been taken (1-based). The hooks of every stage are,
in order (``engine.run`` assembles them): the metrics (:class:`~.metrics.Metrics`: the loss
window and the non-finite guard, first, so a bad loss stops the run before any hook can save),
the stage's own (evaluation, validation, the object-kNN monitor), the metrics writer (one
``metrics.jsonl`` record, the progress bar) and the checkpointer
(:class:`~.checkpoint.Checkpointer`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from .checkpoint import Checkpointer
from .hooks import Hook, StepOutput
from .metrics import Metrics

__all__ = ["Hook", "StepOutput", "Trainer", "autocast", "set_lr"]


class Trainer:
    """Runs ``run_step`` from ``start_step`` to ``stop_step`` (exclusive of steps already done),
    calling ``hooks`` in order. ``metrics`` and ``checkpointer`` are the hooks of those kinds,
    if any (the guard's message names the last checkpoint; the metrics read the loss when a
    checkpoint is due)."""

    def __init__(self, run_step: Callable[[int], StepOutput], start_step: int, stop_step: int,
                 hooks: Sequence[Hook] = ()):  # fmt: skip
        self.run_step = run_step
        self.step = int(start_step)
        self.start_step = int(start_step)
        self.stop_step = int(stop_step)
        self.hooks = list(hooks)
        self.metrics: Metrics | None = next((h for h in self.hooks if isinstance(h, Metrics)), None)
        self.checkpointer: Checkpointer | None = next((h for h in self.hooks if isinstance(h, Checkpointer)), None)
        self.output: StepOutput | None = None
        self.record: dict = {}  # extras for this step's metrics record
        self.last_checkpoint: Path | None = None  # set by the checkpointer (or the resume)
        self.side_seconds = 0.0  # time in hooks that is not training (evaluation, checkpoints)
        self.started = time.perf_counter()

    @property
    def is_last(self) -> bool:
        return self.step >= self.stop_step

    def every(self, n: int) -> bool:
        """The step just taken is a multiple of ``n`` (``n`` <= 0: never)."""
        return n > 0 and self.step % n == 0

    @contextlib.contextmanager
    def side_work(self):
        """Time spent inside is left out of the images/s figure (evaluation, checkpoints)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.side_seconds += time.perf_counter() - start

    def run(self) -> Trainer:
        self.started = time.perf_counter()
        for hook in self.hooks:
            hook.before_train(self)
        try:
            while self.step < self.stop_step:
                self.record = {}
                for hook in self.hooks:
                    hook.before_step(self)
                self.output = self.run_step(self.step)
                self.step += 1
                for hook in self.hooks:
                    hook.after_step(self)
        finally:
            close = getattr(self.run_step, "close", None)  # e.g. stop the loader's workers
            if close is not None:
                close()
            for hook in self.hooks:
                hook.after_train(self)
        return self

    @property
    def seconds(self) -> float:
        """Training time of this invocation (side work excluded)."""
        return time.perf_counter() - self.started - self.side_seconds


def set_lr(optimizer, lr: float) -> None:
    """Set every parameter group's learning rate (the schedules are per step)."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def autocast(device: torch.device, precision: str):
    """The autocast context for a resolved precision: bf16 | fp16 | fp32 (= none)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
