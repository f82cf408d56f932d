"""Successive halving: train every candidate briefly, keep the best on validation, continue it.

An attack that tries several architectures (the decoder attack's ``best``) used to train each
one to its own early stop and keep the best on attacker-validation. Most of those epochs go
to candidates that lose. Successive halving (Jamieson & Talwalkar, 2016; the rungs of
Hyperband) spends them where they matter: every candidate trains ``first_rung`` epochs, the
best ``1/eta`` of them on attacker-validation (at least one) go on to ``eta`` times as many,
and so on until one is left, which trains to the end of its budget (its own early stopping
still applies). A candidate that stopped early stays in the ranking with its best score.

Selection uses attacker-validation only, as before. The survivor takes the steps it would
take trained alone (each :class:`~leakaudit.attacks._training.Fitting` keeps its own
optimiser, order and generator state), so where it is the candidate the full-budget path
would choose, it ends with the same weights; what can change is the choice, when a candidate
that leads after ``first_rung`` epochs is overtaken later. ``budget: full`` keeps the old
path, to compare.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from leakaudit.attacks._training import Fitting

#: ``budget`` values of the attacks that choose among candidates.
BUDGETS = ("halving", "full")
#: Each rung keeps the best third of the candidates and trains them three times as long.
ETA = 3


def successive_halving(candidates: Sequence[Fitting], *, epochs: int, first_rung: int, eta: int = ETA) -> list[int | None]:
    """Advance ``candidates`` by successive halving; per candidate, the epochs after which it was dropped.

    The survivor's entry is ``None``; every candidate is left advanced, not finished (call
    :meth:`Fitting.finish` on each). Ties go to the lower validation loss, then to the
    earlier candidate.
    """
    if first_rung < 1 or eta < 2:
        raise ValueError(f"successive halving needs first_rung ≥ 1 and eta ≥ 2, got {first_rung} and {eta}")
    dropped: list[int | None] = [None] * len(candidates)
    alive = list(range(len(candidates)))
    rung = first_rung
    while len(alive) > 1 and rung < epochs:
        for i in alive:
            candidates[i].advance(rung)
        ranked = sorted(alive, key=lambda i: (-candidates[i].val_score, candidates[i].val_loss, i))
        keep = max(1, math.ceil(len(alive) / eta))
        for i in ranked[keep:]:
            dropped[i] = candidates[i].epoch
        alive = sorted(ranked[:keep])
        rung *= eta
    for i in alive:
        candidates[i].advance(epochs)
    return dropped
