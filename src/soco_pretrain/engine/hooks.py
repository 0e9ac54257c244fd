"""What a step reports (:class:`StepOutput`) and what is called around the steps (:class:`Hook`):
the base of the trainer, the metrics and the checkpointer (engine/trainer.py says the order)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # annotations only
    from .trainer import Trainer


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
