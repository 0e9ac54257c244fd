"""Stage 4: pretraining.

``loop`` (``pretrain()``: the job, the step and the hooks on the engine), ``lars`` (LARS
optimiser and its parameter groups), ``memory`` (the automatic per-device batch). The loop
machinery every stage shares -- trainer, checkpoints, metrics, schedules, distributed set-up --
lives in :mod:`soco_pretrain.engine`. Names are
imported lazily so ``soco show curves`` does not pay for torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "lars": ["LARS", "lars_param_groups"],
    "loop": ["pretrain", "Summary"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)  # noqa: PLE0605 - computed from _EXPORTS


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
