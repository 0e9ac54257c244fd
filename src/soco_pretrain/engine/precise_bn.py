"""Precise BatchNorm statistics (Detectron2's PreciseBN, fvcore ``update_bn_stats``): inside
:func:`averaged_statistics` every given BatchNorm forgets its running statistics and keeps the
plain average of the batch statistics of the forward passes made in the block; its momentum is
restored afterwards, also when a forward pass fails. Used before the fine-tune's evaluation and by
the object probe (knn.py, crops.py)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

from torch import nn


def batch_norms(modules: Iterable[nn.Module], training_only: bool = False) -> list[nn.modules.batchnorm._BatchNorm]:
    """Every BatchNorm inside ``modules`` (``training_only``: those in training mode, i.e. not
    frozen)."""
    return [
        m
        for module in modules
        for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or not training_only)
    ]


@contextlib.contextmanager
def averaged_statistics(bns: list[nn.modules.batchnorm._BatchNorm]) -> Iterator[None]:
    """Reset ``bns``' running statistics and make them a cumulative average (momentum None) for
    the block; the momenta come back in ``finally``."""
    momenta = [m.momentum for m in bns]
    try:
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average of the batches' statistics
        yield
    finally:
        for m, momentum in zip(bns, momenta):
            m.momentum = momentum
