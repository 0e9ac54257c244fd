"""The object-kNN monitor as a trainer hook: the learning curve of a pretraining run.

``soco pretrain`` passes :func:`monitor_hook` to ``pretrain(hooks=...)`` when ``monitor.json``
is set (the training loop knows only hooks). On rank 0 the hook probes the online encoder
(evaluate/knn.py ``ObjectMonitor``) at step 0 (the curve's starting point), every
``monitor.every`` steps and at the last; the results join the step's metrics record.
"""

from __future__ import annotations

from ..engine.hooks import Hook
from .knn import ObjectMonitor, describe


class MonitorHook(Hook):
    """Runs ``monitor(core)`` between steps (not training time) and records the result."""

    def __init__(self, monitor: ObjectMonitor, core):
        self.monitor, self.core = monitor, core

    def _measure(self, trainer) -> dict:
        with trainer.side_work():  # not training time
            result = self.monitor(self.core)
        trainer.metrics.bar.write(f"step {trainer.step}: {describe(result)}")
        return result

    def before_train(self, trainer) -> None:
        if trainer.step == 0 and trainer.stop_step > 0:
            trainer.metrics.logger.log(0, **self._measure(trainer))

    def after_step(self, trainer) -> None:
        if self.monitor.due(trainer.step) or trainer.is_last:
            trainer.record.update(self._measure(trainer))


def monitor_hook(job) -> MonitorHook | None:
    """The monitor of a pretraining job (``train.loop.Job``): rank 0 when ``monitor.json`` is set,
    else None. Built before the run's metrics file and bar, so a bad monitor setting fails first."""
    cfg = job.cfg
    if not (job.is_main and cfg.monitor.json):
        return None
    monitor = ObjectMonitor(cfg, job.device)
    print(
        f"monitor: object kNN every {monitor.every} steps on {cfg.monitor.json} "
        f"({monitor.train.num_objects} neighbour / {monitor.val.num_objects} query objects)",
        flush=True,
    )
    return MonitorHook(monitor, job.core)
