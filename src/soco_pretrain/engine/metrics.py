"""Training metrics: the loss window and non-finite guard, RUN/metrics.jsonl, optional
TensorBoard scalars, and the progress bar.

:class:`Metrics` is the first hook of every stage's trainer: after each step (``observe``) it
adds the step's loss to the window and, when a record, a checkpoint or the guard's period is
due, reads it on the host (the only host-device sync of a GPU step) and stops on a non-finite
value before anything can be saved. Its ``writer`` is an ordinary hook placed after the stage's
own (which add their extras to the record): ``write`` appends the step's record and moves the
bar.

``metrics.jsonl`` holds one JSON object per logged step (``step``, ``epoch``, ``loss``, ``lr``,
``tau``, ``images_per_s``, ``data_wait`` and any extras), each line flushed as it is written so
``soco show curves`` and ``tail -f`` see it at once. It is appended to, so a resumed run
continues the same file; :func:`read_metrics` drops the lines a resume has redone.

TensorBoard scalars go to RUN/tensorboard when the ``tensorboard`` package is installed
(``torch.utils.tensorboard`` needs it; it is not a dependency of soco-pretrain).
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import torch
from tqdm import tqdm

from ..errors import NonFiniteLossError, PathError
from .hooks import Hook

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
_tensorboard_note_shown = False


def _plain(value):
    """JSON-friendly number: tensors/numpy scalars -> float/int; non-finite floats -> None."""
    if hasattr(value, "item"):  # torch tensor / numpy scalar: one host sync, only at log steps
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/inf: written as null (a guard upstream stops on non-finite losses)
    return value


def _summary_writer(log_dir: Path):
    """A TensorBoard SummaryWriter, or None (with a one-time note) when tensorboard is missing."""
    global _tensorboard_note_shown
    try:
        from torch.utils.tensorboard import SummaryWriter  # here, not at the top: tensorboard is optional
    except ImportError:
        if not _tensorboard_note_shown:
            _tensorboard_note_shown = True
            print(
                "soco: note: TensorBoard logging is off (pip install tensorboard to enable it); "
                f"metrics are in {METRICS_FILE}",
                file=sys.stderr,
            )
        return None
    return SummaryWriter(log_dir=str(log_dir))


class MetricsLogger:
    """Appends metrics to ``RUN/metrics.jsonl`` (and TensorBoard). Does nothing unless ``enabled``.

    Pass ``enabled=is_main`` so only rank 0 writes. Use as a context manager or call ``close()``.
    """

    def __init__(self, run_dir, enabled: bool = True, tensorboard: bool = True):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.path = self.run_dir / METRICS_FILE
        self._file = None
        self._writer = None
        if enabled:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open for the run
            if tensorboard:
                self._writer = _summary_writer(self.run_dir / TENSORBOARD_DIR)

    def log(self, step: int, epoch=None, loss=None, lr=None, tau=None, images_per_s=None, data_wait=None, **extras):
        """Write one line for optimiser step ``step``; returns the record (None when disabled)."""
        if not self.enabled:
            return None
        record = {
            "step": int(step),
            "epoch": epoch,
            "loss": loss,
            "lr": lr,
            "tau": tau,
            "images_per_s": images_per_s,
            "data_wait": data_wait,
            **extras,
        }
        # Arguments not given are left out; a non-finite value becomes null.
        record = {k: _plain(v) for k, v in record.items() if v is not None}
        record["time"] = round(time.time(), 3)  # wall clock, for throughput over resumes
        assert self._file is not None  # enabled and not closed
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._writer is not None:
            for key, value in record.items():
                if key not in ("step", "time") and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._writer.add_scalar(f"train/{key}", value, global_step=record["step"])
            self._writer.flush()
        return record

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_metrics(run_dir) -> list[dict]:
    """The records of ``RUN/metrics.jsonl`` (or of a .jsonl file given directly), in step order.

    A line cut off by a crash is skipped. After a resume the file repeats steps past the last
    checkpoint; a record whose step is not beyond the previous one replaces the earlier records
    from that step on, so the result is the history of the run that continued.
    """
    path = Path(run_dir)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        raise PathError(path, "no such metrics file")
    records: list[dict] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                continue
            while records and records[-1]["step"] >= record["step"]:
                records.pop()
            records.append(record)
    return records


class Progress:
    """A tqdm bar over optimiser steps: loss, lr, tau, images/s, data-wait fraction and ETA.

    ``total`` steps in all, ``initial`` already done (resume). ``enabled=False`` (other ranks)
    makes every call a no-op. ``update(step, ...)`` moves the bar to ``step`` steps done.
    """

    def __init__(self, total: int, initial: int = 0, enabled: bool = True, desc: str = "pretrain"):
        self.enabled = enabled
        self._bar = None
        if enabled:
            self._bar = tqdm(
                total=total,
                initial=initial,
                desc=desc,
                unit="step",
                dynamic_ncols=True,
                mininterval=1.0,
                smoothing=0.05,
            )

    def update(self, step: int, loss=None, lr=None, tau=None, images_per_s=None, data_wait=None) -> None:
        if self._bar is None:
            return
        parts = []
        if loss is not None:
            loss = _plain(loss)
            parts.append("loss nan" if loss is None else f"loss {loss:.4f}")
        if lr is not None:
            parts.append(f"lr {lr:.3g}")
        if tau is not None:
            parts.append(f"tau {tau:.5f}")
        if images_per_s is not None:
            parts.append(f"{images_per_s:.1f} img/s")
        if data_wait is not None:
            parts.append(f"data {100 * data_wait:.0f}%")
        if parts:
            self._bar.set_postfix_str(", ".join(parts), refresh=False)
        self._bar.update(step - self._bar.n)

    def write(self, message: str) -> None:
        """Print a line without breaking the bar (nothing when disabled)."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message)
        else:
            print(message)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@dataclass
class Window:
    """The steps since the last record: mean loss (and parts), images/s, data-wait fraction."""

    loss: float | None
    parts: dict
    steps: int
    images: int
    images_per_s: float
    data_wait: float


class Metrics(Hook):
    """Loss window, non-finite guard, metrics record and progress bar of one run (rank 0 writes).

    ``log_due(trainer)``: whether the step just taken writes a full record; ``record(trainer,
    window)``: its fields (besides the extras hooks put in ``trainer.record``); ``base(trainer)``:
    fields every record carries (e.g. the epoch), also a record holding only extras.
    ``check_every``: the guard reads the loss at least this often (1 on a CPU, where reading is
    free; the log period on a GPU). ``where(trainer)`` and ``hint`` complete the guard's message.
    ``reduce``: averages a device tensor over the processes (DDP) before it is read.
    """

    def __init__(
        self,
        run_dir,
        *,
        total_steps: int,
        initial: int,
        log_due: Callable,
        record: Callable,
        base: Callable = lambda trainer: {},
        check_every: int = 1,
        enabled: bool = True,
        progress: bool = True,
        desc: str = "train",
        where: Callable | None = None,
        hint: str = "",
        reduce: Callable | None = None,
        tensorboard: bool = True,
    ):
        self.logger = MetricsLogger(run_dir, enabled=enabled, tensorboard=tensorboard)
        self.bar = Progress(total_steps, initial=initial, enabled=enabled and progress, desc=desc)
        self.log_due, self.record, self.base = log_due, record, base
        self.check_every = max(1, int(check_every))
        self.where = where or (lambda trainer: f"at step {trainer.step}")
        self.hint, self.reduce = hint, reduce
        self.images_total = 0
        self.last_loss: float | None = None  # the last loss read on the host
        self.last_logged: float | None = None  # the mean loss of the last record's window
        self._read_this_step = False
        self._window_start = time.perf_counter()
        self._side_at_start = 0.0
        self._reset()
        self.writer = MetricsWriter(self)

    def after_step(self, trainer) -> None:
        self.observe(trainer)

    def _reset(self) -> None:
        self._device_sum = None  # device tensor: read only when due
        self._host_sum = 0.0
        self._parts: dict = {}  # name -> window sum (float or device tensor)
        self._steps = self._images = 0
        self._wait = 0.0

    # -- called by the trainer
    def observe(self, trainer) -> None:
        out = trainer.output
        if isinstance(out.loss, list):
            for term in out.loss:
                term = term.detach().float()
                self._device_sum = term.clone() if self._device_sum is None else self._device_sum.add_(term)
        elif out.loss is not None:
            self._host_sum += float(out.loss)
        for key, value in out.parts.items():  # host floats, or device tensors read when written
            if isinstance(value, torch.Tensor):
                value = value.detach().float()
            self._parts[key] = self._parts[key] + value if key in self._parts else value
        self._steps += 1
        self._images += out.images
        self._wait += out.data_wait
        self._read_this_step = False
        checkpoint = trainer.checkpointer
        if (
            trainer.step % self.check_every == 0
            or self.log_due(trainer)
            or (checkpoint is not None and checkpoint.due(trainer))
        ):
            self._read(trainer)

    def _read(self, trainer) -> None:
        if self._device_sum is not None:
            total = self.reduce(self._device_sum) if self.reduce is not None else self._device_sum
            value = (total / self._steps).item()  # the host sync, lagged to here
        elif isinstance(trainer.output.loss, (int, float)):
            value = float(trainer.output.loss)  # host values: the guard looks at this step's own
        else:
            return
        if not math.isfinite(value):
            stop_non_finite(trainer, f"non-finite loss ({value})")
        self.last_loss, self._read_this_step = value, True

    def write(self, trainer) -> None:
        scalars = trainer.output.scalars
        if self.log_due(trainer):
            now = time.perf_counter()
            elapsed = max(now - self._window_start - (trainer.side_seconds - self._side_at_start), 1e-9)
            loss = None
            if self._device_sum is not None:
                loss = self.last_loss
            elif self._steps and isinstance(trainer.output.loss, (int, float)):
                loss = self._host_sum / self._steps
            window = Window(
                loss=loss,
                parts={k: self._host(v) / self._steps for k, v in self._parts.items()},
                steps=self._steps,
                images=self._images,
                images_per_s=self._images / elapsed,
                data_wait=min(1.0, self._wait / elapsed),
            )
            self.last_logged = loss
            self.logger.log(trainer.step, **{**self.base(trainer), **self.record(trainer, window), **trainer.record})
            self.bar.update(
                trainer.step,
                loss=self.last_loss if self._read_this_step else None,
                lr=scalars.get("lr"),
                tau=scalars.get("tau"),
                images_per_s=window.images_per_s,
                data_wait=window.data_wait,
            )
            self.images_total += self._images
            self._reset()
            self._window_start, self._side_at_start = time.perf_counter(), trainer.side_seconds
            return
        if trainer.record:  # extras only (e.g. the monitor between log steps): one record per step
            self.logger.log(trainer.step, **{**self.base(trainer), **trainer.record})
        if self._read_this_step:
            self.bar.update(trainer.step, loss=self.last_loss, lr=scalars.get("lr"), tau=scalars.get("tau"))
        else:
            self.bar.update(trainer.step)

    def _host(self, value) -> float:
        """A window sum on the host: a device tensor is averaged over the processes first."""
        if isinstance(value, torch.Tensor):
            return float((self.reduce(value) if self.reduce is not None else value).item())
        return float(value)

    def images_seen(self) -> int:
        """Images trained on by this invocation, the open window included."""
        return self.images_total + self._images

    def close(self) -> None:
        self.bar.close()
        self.logger.close()


class MetricsWriter(Hook):
    """Writes the step's record (and moves the bar) when due; closes the file and bar at the end."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def after_step(self, trainer) -> None:
        self.metrics.write(trainer)

    def after_train(self, trainer) -> None:
        self.metrics.close()


def stop_non_finite(trainer, what: str) -> NoReturn:
    """Stop the run: ``what`` went non-finite (the loss: :class:`Metrics`; the weights: the
    checkpointer) and nothing was saved after it. One line naming the last good checkpoint, with
    the stage's ``where`` and ``hint`` when the trainer has metrics."""
    metrics = trainer.metrics
    where = metrics.where(trainer) if metrics is not None else f"at step {trainer.step}"
    hint = metrics.hint if metrics is not None else ""
    raise NonFiniteLossError(
        f"{what} {where}; stopped without saving. Last good checkpoint: "
        f"{trainer.last_checkpoint or 'none'}.{' ' + hint if hint else ''}"
    )
