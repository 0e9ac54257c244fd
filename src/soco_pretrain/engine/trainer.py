"""The one training loop under ``soco pretrain``, ``soco finetune`` and ``soco linear``.

A :class:`Trainer` runs ``run_step(step)`` until ``stop_step`` and calls its hooks around
each step, in the spirit of Detectron2's ``TrainerBase`` and torchvision's references (a plain
loop, the stage-specific work in one function):

    before_train
    for each step:  before_step -> run_step -> metrics.observe (guard) -> after_step hooks
                    -> metrics.write -> checkpointer
    after_train     (also after an exception)

``run_step`` returns a :class:`StepOutput`; ``trainer.step`` counts *finished* steps, so hooks
see the number of the step that has just been taken (1-based). The stages supply the step and
the hooks (checkpointing, evaluation, the object-kNN monitor); the engine supplies the loop,
the loss window + non-finite guard + metrics file + progress bar (:mod:`.metrics`), the
checkpointer (:mod:`.checkpoint`), the skipped-image log (:mod:`.skips`), the loader factory
(:mod:`.loader`) and the lr setter.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch


@dataclass
class StepOutput:
    """What one optimiser step reports.

    ``loss``: the step's loss, as the device tensors to add up in order (read on the host only
    when the guard or the metrics writer needs it, so a GPU step never waits for the host) or as
    a host float; ``parts``: named loss parts (averaged over the log window like the loss);
    ``images``: images trained on in this step over all processes; ``data_wait``: seconds spent
    waiting for the loader; ``scalars``: host values of this step (lr, tau, ...).
    """

    loss: list[torch.Tensor] | float | None = None
    images: int = 0
    data_wait: float = 0.0
    parts: dict = field(default_factory=dict)
    scalars: dict = field(default_factory=dict)


class Hook:
    """Called around the steps; override what you need. ``trainer.record`` collects extras (an
    evaluation, the monitor) for this step's metrics record."""

    def before_train(self, trainer: Trainer) -> None:
        pass

    def before_step(self, trainer: Trainer) -> None:
        pass

    def after_step(self, trainer: Trainer) -> None:
        pass

    def after_train(self, trainer: Trainer) -> None:
        pass


class Trainer:
    """Runs ``run_step`` from ``start_step`` to ``stop_step`` (exclusive of steps already done).

    ``metrics`` (:class:`~.metrics.Metrics`, optional) sees every step's output first (the loss
    window and the non-finite guard, before any hook can save a checkpoint) and writes the
    step's record after the hooks added their extras; ``checkpointer``
    (:class:`~.checkpoint.Checkpointer`, optional) saves last, so a crash between the two only
    repeats a record on resume.
    """

    def __init__(
        self,
        run_step: Callable[[int], StepOutput],
        start_step: int,
        stop_step: int,
        hooks: Sequence[Hook] = (),
        metrics=None,
        checkpointer=None,
    ):
        self.run_step = run_step
        self.step = int(start_step)
        self.start_step = int(start_step)
        self.stop_step = int(stop_step)
        self.hooks = list(hooks)
        self.metrics = metrics
        self.checkpointer = checkpointer
        self.output: StepOutput | None = None
        self.record: dict = {}  # extras for this step's metrics record
        self.last_checkpoint = None  # set by the checkpoint hook (or the resume)
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
                if self.metrics is not None:
                    self.metrics.observe(self)
                for hook in self.hooks:
                    hook.after_step(self)
                if self.metrics is not None:
                    self.metrics.write(self)
                if self.checkpointer is not None:
                    self.checkpointer.after_step(self)
        finally:
            close = getattr(self.run_step, "close", None)  # e.g. stop the loader's workers
            if close is not None:
                close()
            for hook in self.hooks:
                hook.after_train(self)
            if self.metrics is not None:
                self.metrics.close()
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
