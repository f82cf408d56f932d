"""The core's training machinery: one loop for every model the tool trains.

* :mod:`leakaudit.training.engine` — the loop (:func:`~leakaudit.training.engine.fit`):
  seeded order and rank sharding, selection on validation, divergence, torchrun, autocast.
  Attacks drive it with tensors held in memory (:mod:`leakaudit.attacks._training`).
* :mod:`leakaudit.training.prepared` — the rows, tasks and roles that ``train`` and
  ``harden`` train on, and the models they load.
* :mod:`leakaudit.training.objective` — training a whole model with a recipe's objective
  through the loop, and evaluating it.
"""

from __future__ import annotations

from leakaudit.training.engine import PRECISIONS, Diverged, Outcome, Schedule, Task, autocast_dtype, fit, seed_for

__all__ = ["PRECISIONS", "Diverged", "Outcome", "Schedule", "Task", "autocast_dtype", "fit", "seed_for"]
