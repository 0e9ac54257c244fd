"""Every schedule of the project, evaluated per optimiser step: the learning rates of
pretraining and the linear probe (warm-up + cosine, :func:`lr_at`), of the fine-tune and the
linear probe's "steps" option (warm-up + drops, :func:`warmup_multistep`), the linear scaling
rule (:func:`scaled_lr`) and the EMA momentum (:func:`tau_at`).

``step`` counts optimiser steps already taken (0 for the first update); the training loop sets
the learning rate from :func:`lr_at` before each update and the EMA momentum from
:func:`tau_at` for the target update after it (``train.ema_schedule``: the paper's cosine, or
constant). Both are pure functions of the step, so a resumed run continues exactly where it
stopped (the released code restarted the EMA schedule).
"""

from __future__ import annotations

import math

# Linear scaling rule's reference batch (paper 4.1: lr = base_lr x batch / 256, as BYOL).
REFERENCE_BATCH = 256


def scaled_lr(base_lr: float, batch: int, reference: int = REFERENCE_BATCH) -> float:
    """``base_lr * batch / reference`` (paper 4.1: base lr 1.0, total batch 2048 -> lr 8.0 with the
    reference 256; the fine-tune's reference is Detectron2's batch 16, paper 4.2)."""
    return base_lr * batch / reference


def lr_at(
    step: int,
    total_steps: int,
    warmup_steps: int,
    peak_lr: float,
    start_factor: float = 0.0,
    final_lr: float = 0.0,
) -> float:
    """Learning rate for optimiser step ``step`` (0-based).

    Linear warm-up from ``start_factor * peak_lr`` (step 0) to ``peak_lr`` (step
    ``warmup_steps``), then half a cosine from ``peak_lr`` down to ``final_lr`` at
    ``total_steps``; steps past the end stay at ``final_lr``.

    Paper 4.1: warm-up over 10 epochs then cosine decay (start 0, end 0: ``start_factor=0``,
    ``final_lr=0``). Released code: warm-up starts at lr/100 and the cosine ends at 1e-6
    (``start_factor=0.01``, ``final_lr=1e-6``; TrainConfig.warmup_start_factor / final_lr).
    """
    if total_steps <= 0 or warmup_steps < 0:
        raise ValueError(f"lr_at: need total_steps > 0 and warmup_steps >= 0, got {total_steps}, {warmup_steps}")
    step = max(0, step)
    if step < warmup_steps:
        start = start_factor * peak_lr
        return start + (peak_lr - start) * step / warmup_steps
    decay_steps = total_steps - warmup_steps
    if decay_steps <= 0:  # warm-up covers the whole run (tiny runs): hold the peak
        return peak_lr
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return final_lr + (peak_lr - final_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_multistep(
    step: int, milestones: tuple[int, ...], gamma: float, warmup_steps: int, warmup_factor: float, peak_lr: float
) -> float:
    """Detectron2's WarmupMultiStepLR at 0-based ``step``: ``peak_lr`` times ``gamma`` per
    milestone passed (``step >= milestone``), times a linear warm-up factor from ``warmup_factor``
    at step 0 to 1 at ``warmup_steps``."""
    factor = gamma ** sum(step >= m for m in milestones)
    if step < warmup_steps:
        alpha = step / warmup_steps
        factor *= warmup_factor * (1 - alpha) + alpha
    return peak_lr * factor


EMA_SCHEDULES = ("cosine", "constant")


def tau_at(step: int, total_steps: int, tau0: float = 0.99, schedule: str = "cosine") -> float:
    """EMA momentum of the target update after optimiser step ``step``.

    ``cosine``: ``1 - (1 - tau0) * (cos(pi * step / total_steps) + 1) / 2``, BYOL's schedule (SoCo
    paper 4.1: tau from 0.99 increased to 1): ``tau0`` at step 0, ``(1 + tau0) / 2`` half-way, 1 at
    ``total_steps`` (and after). ``constant``: ``tau0`` at every step (our small-budget option, not
    the paper's: a short run's cosine would freeze the target early; lightly's BYOL example keeps
    0.99).
    """
    if total_steps <= 0:
        raise ValueError(f"tau_at: need total_steps > 0, got {total_steps}")
    if schedule == "constant":
        return float(tau0)
    if schedule != "cosine":
        raise ValueError(f"tau_at: schedule must be one of {', '.join(EMA_SCHEDULES)}, got {schedule!r}")
    progress = min(1.0, max(0, step) / total_steps)
    return 1.0 - (1.0 - tau0) * (math.cos(math.pi * progress) + 1.0) / 2.0
