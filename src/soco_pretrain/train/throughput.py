"""Measured pretraining throughput per device and model: what ``soco doctor`` prices a run with.

Only this project's own measurements, as README.md states them, each with its date, card and
how it was taken; a device or model not listed here gets no ETA ("unknown card") rather than a
guess scaled from another one. Add a row when a new card or model is measured.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Throughput:
    """One measured figure: images/s of one process at ``batch`` on ``device``."""

    device: str  # "cpu", or a substring of the CUDA device name ("H200")
    cores: int | None  # CPU figures: the cores they were measured on (they scale with them)
    arch: str
    backbone: str
    v1_size: int
    soco_star: bool
    precision: str  # resolved: fp32 | bf16 | fp16
    batch: int
    images_per_s: float
    measured: str  # date of the measurement
    how: str  # what was timed, as the README says


MEASURED = (
    # README "Does SoCo beat random init at a CPU budget? The cpu-small experiment": a cpu-small
    # step (R18-FPN, 64 px views, batch 32) took 4.3 s in the run's progress line at its least
    # contended, i.e. soco pretrain's own loop, data loading included.
    Throughput("cpu", 2, "fpn", "resnet18", 64, False, "fp32", 32, 7.4, "2026-12-07", "soco pretrain's progress line"),
    # README "Benchmarks / Training step on a CPU" (the later run on an idle machine) and "Cost per
    # freeze mode": benchmarks/train_step.py, synthetic batch of 2 at 224/224/112 px, unfrozen.
    Throughput("cpu", 2, "fpn", "resnet50", 224, False, "fp32", 2, 0.49, "2026-11-30", "synthetic step"),
    Throughput("cpu", 2, "c4", "resnet50", 224, False, "fp32", 2, 0.59, "2026-11-30", "synthetic step"),
    # README "Benchmarks / Training step on a GPU": benchmarks/gpu.py on one H200, synthetic batch
    # on the device (no data loading), bf16. FPN with compile (the default on a GPU); C4 and SoCo*
    # were measured with channels_last but not compiled (slower than a default run would be).
    Throughput(
        "H200", None, "fpn", "resnet50", 224, False, "bf16", 128, 1102.1, "2026-11-27", "synthetic step, compiled"
    ),
    Throughput("H200", None, "c4", "resnet50", 224, False, "bf16", 128, 600.1, "2026-11-27", "synthetic step, eager"),
    Throughput("H200", None, "fpn", "resnet50", 224, True, "bf16", 128, 554.9, "2026-11-27", "synthetic step, eager"),
)  # fmt: skip


def lookup(
    device_name: str,
    arch: str,
    backbone: str,
    v1_size: int,
    soco_star: bool,
    precision: str,
    cores: int | None = None,
) -> Throughput | None:
    """The measured figure for this device and model, or None. ``device_name``: "cpu" or the
    CUDA device's name; a CPU figure counts only on as many cores as it was measured on."""
    for row in MEASURED:
        on_device = device_name == "cpu" if row.device == "cpu" else row.device.lower() in device_name.lower()
        if (
            on_device
            and (row.cores is None or row.cores == cores)
            and (row.arch, row.backbone, row.v1_size, row.soco_star, row.precision)
            == (arch, backbone, v1_size, soco_star, precision)
        ):
            return row
    return None


def describe(row: Throughput) -> str:
    """'7.4 images/s (soco pretrain's progress line, batch 32, 2-core CPU, 2026-12-07)'."""
    where = f"{row.cores}-core CPU" if row.device == "cpu" else row.device
    return f"{row.images_per_s:g} images/s ({row.how}, batch {row.batch}, {where}, {row.measured})"
