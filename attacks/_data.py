"""Reading what an attack needs from a store: the attacker split, Z and X, checked once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from leakaudit.errors import DataError
from leakaudit.store import ROLES, ActivationStore
from leakaudit.store.stream import budget_record, check_finite, float32_bytes, format_bytes, less_networks, memory_budget


@dataclass(frozen=True)
class AttackRows:
    """Row indices of the three roles: fit on ``train``, select on ``val``, report on ``test``."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray

    def sizes(self) -> dict[str, int]:
        return {"attacker-train": len(self.train), "attacker-validation": len(self.val), "test": len(self.test)}


def attack_rows(store: ActivationStore) -> AttackRows:
    """The store's attacker split; every role must hold rows."""
    rows = {role: store.rows(role) for role in ROLES}
    empty = [role for role, r in rows.items() if len(r) == 0]
    if empty:
        raise DataError(
            f"store {str(store.path)!r} has no {' and no '.join(empty)} rows; attacks need all three roles. "
            "Dump more rows, or change the fractions with --split TRAIN,VAL,TEST."
        )
    return AttackRows(rows["attacker-train"], rows["attacker-validation"], rows["test"])


def read_activations(store: ActivationStore, rows: np.ndarray, role: str) -> np.ndarray:
    """Z of ``rows`` as float32, refusing NaN and infinite values."""
    z = store.activations(rows)
    check_finite(z, f"activations (/activations, {role} rows) of {str(store.path)!r}")
    return z


def read_inputs(store: ActivationStore, rows: np.ndarray, role: str) -> np.ndarray:
    """X of ``rows`` (float32 in [0, 1]); a store dumped with ``--no-inputs`` is refused by the store."""
    x = store.inputs(rows)
    check_finite(x, f"inputs (/inputs, {role} rows) of {str(store.path)!r}")
    return x


def check_class_rows(labels: np.ndarray, rows: AttackRows, class_names: list[str], task: str, min_train: int = 2) -> None:
    """Refuse a task whose classes are too thin in some role.

    Every class that occurs in the store needs ``min_train`` attacker-train rows (to learn
    it) and one attacker-validation and one test row (to select and report on it).
    """
    needs = {"attacker-train": min_train, "attacker-validation": 1, "test": 1}
    k = len(class_names)
    present = np.bincount(labels, minlength=k) > 0
    for role, role_rows in (("attacker-train", rows.train), ("attacker-validation", rows.val), ("test", rows.test)):
        counts = np.bincount(labels[role_rows], minlength=k)
        thin = [c for c in range(k) if present[c] and counts[c] < needs[role]]
        if thin:
            c = thin[0]
            more = f" (and {len(thin) - 1} more classes)" if len(thin) > 1 else ""
            raise DataError(
                f"task {task!r} has too few rows of class {class_names[c]!r} in {role}: {int(counts[c])}{more}; "
                f"every class needs at least {min_train} attacker-train, 1 attacker-validation and 1 test row. "
                "Dump more rows (or without --limit), change --split, or merge classes with a map:FILE.yaml task."
            )


#: Copies of a role's float32 rows an attack that needs all rows at once holds at its peak
#: (the rows, a standardised copy for the head, the pooled attacker-train + validation copy).
WHOLE_ROW_COPIES = 3


def rows_within_budget(store: ActivationStore, rows: AttackRows, labels: np.ndarray, names: tuple[str, ...], seed: int,
                       budget_bytes: int | None = None, networks: int = 0) -> tuple[AttackRows, dict[str, Any]]:
    """``rows`` if :data:`WHOLE_ROW_COPIES` copies of them fit in the memory budget; else a seeded subsample that does.

    The subsample keeps the same share of each class in each role (at least two attacker-train
    rows and one attacker-validation and one test row of every class), so the attack stays
    defined; what it reports is then the accuracy of an attacker holding fewer pairs, scored on
    fewer test rows (its bootstrap interval is over those rows, so it widens accordingly).

    Returns:
        The rows to use, and a record for the result: ``data_path`` (``memory`` or
        ``subsample``), the budget, the bytes, the rows kept per role, the seed and why.
    """
    limit = memory_budget() if budget_bytes is None else budget_bytes
    total = len(rows.train) + len(rows.val) + len(rows.test)
    needed = WHOLE_ROW_COPIES * float32_bytes(store, names, total)
    left = max(0, limit - networks)  # the networks trained beside the rows are counted first
    path = "memory" if needed <= left else "subsample"
    recorded, named = budget_record(limit, path, default=None if budget_bytes is None else False)
    named = less_networks(named, networks, limit)
    record: dict[str, Any] = {"memory_budget": recorded, "role_bytes": needed, "networks_bytes": networks,
                              "role": "all attacker roles"}  # fmt: skip
    if path == "memory":
        reason = f"{WHOLE_ROW_COPIES} float32 copies of every row take {format_bytes(needed)}, within {named}"
        return rows, {"data_path": "memory", **record, "reason": reason}
    share = left / needed
    rng = np.random.default_rng(seed)
    minimum = {"attacker-train": 2, "attacker-validation": 1, "test": 1}
    kept = {}
    for role, role_rows in (("attacker-train", rows.train), ("attacker-validation", rows.val), ("test", rows.test)):
        chosen = []
        for c in np.unique(labels[role_rows]):
            of_class = role_rows[labels[role_rows] == c]
            take = min(len(of_class), max(minimum[role], int(share * len(of_class))))
            chosen.append(rng.choice(of_class, take, replace=False))
        kept[role] = np.sort(np.concatenate(chosen)) if chosen else role_rows[:0]
    sub = AttackRows(kept["attacker-train"], kept["attacker-validation"], kept["test"])
    reason = (f"{WHOLE_ROW_COPIES} float32 copies of every row would take {format_bytes(needed)}, more than {named}; the heads need all their rows at once, so a seeded per-class subsample of "
              f"{share:.1%} of each role ran (an attacker holding fewer pairs, scored on fewer test rows)")
    return sub, {"data_path": "subsample", **record, "seed": seed, "share": share, "rows_kept": sub.sizes(),
                 "rows_all": rows.sizes(), "reason": reason}
