"""Stage 4: the training engine.

``lars`` (LARS optimiser and its parameter groups), ``schedule`` (learning rate and EMA
momentum per step), ``checkpoint`` (atomic checkpoints, RNG states, retention),
``distributed`` (torchrun/SLURM set-up, collectives), ``metrics`` (metrics.jsonl, TensorBoard,
progress bar). Names are imported lazily so ``soco show curves`` does not pay for torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "lars": ["LARS", "lars_param_groups"],
    "schedule": ["lr_at", "tau_at", "scaled_lr"],
    "checkpoint": ["CheckpointError", "CheckpointManager", "load_checkpoint", "save_checkpoint",
                   "rng_state", "set_rng_state"],
    "distributed": ["DistInfo", "DistributedError", "init_distributed", "cleanup", "all_reduce_mean",
                    "is_main", "get_rank", "get_world_size", "barrier"],
    "metrics": ["MetricsLogger", "Progress", "read_metrics"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)  # noqa: PLE0605 - computed from _EXPORTS


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
