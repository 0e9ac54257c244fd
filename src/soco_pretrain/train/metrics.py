"""Training metrics: RUN/metrics.jsonl, optional TensorBoard scalars, and the progress bar.

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
from pathlib import Path

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
        from torch.utils.tensorboard import SummaryWriter
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
        record = {"step": int(step), "epoch": epoch, "loss": loss, "lr": lr, "tau": tau,
                  "images_per_s": images_per_s, "data_wait": data_wait, **extras}
        # Arguments not given are left out; a non-finite value becomes null.
        record = {k: _plain(v) for k, v in record.items() if v is not None}
        record["time"] = round(time.time(), 3)  # wall clock, for throughput over resumes
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
        raise FileNotFoundError(f"{path}: no such metrics file")
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
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True,
                             mininterval=1.0, smoothing=0.05)

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
