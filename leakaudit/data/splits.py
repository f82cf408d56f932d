"""The split every command shares: each row's role (see :mod:`leakaudit.roles`).

Every task has at least two classes in each role of the split (attacker-train,
attacker-validation, test): an attack on one class scores against nothing, and the drop it
reports would look like privacy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from leakaudit.data.sources import DataSource
from leakaudit.data.tasks import Task
from leakaudit.errors import DataError
from leakaudit.roles import ATTACKER_TRAIN, ATTACKER_VALIDATION, ROLES, TEST


def split_roles(
    source: DataSource, n: int, fractions: tuple[float, float, float], seed: int, tasks: Sequence[Task] = ()
) -> tuple[np.ndarray, str]:
    """The split every command shares: roles for the first ``n`` rows of ``source``.

    Stratified by the source's own labels when it has them (the finest grouping, so coarser
    tasks are balanced too), else by the finest task, else a seeded random assignment. Since
    ``train``, ``harden`` and ``dump`` call this with the same data, fractions and seed, a
    model trained on the attacker-train rows and selected on attacker-validation is scored on
    test rows it never saw, as in the Scrunch paper's 40/40/20 protocol.

    Returns:
        The role codes (0 attacker-train, 1 attacker-validation, 2 test) and what they were
        stratified by (``label``, a task name, or ``""``).

    Raises:
        DataError: a class is too rare to split, or a task has fewer than two classes in
            some role (:func:`check_task_roles`).
    """
    if source.labels is not None:
        roles, by = stratified_split(source.labels[:n], fractions, seed), "label"
    elif tasks:
        finest = max(tasks, key=lambda t: len(t.class_names))
        roles, by = stratified_split(finest.labels[:n], fractions, seed), finest.name
    else:
        rng = np.random.default_rng(seed)
        roles, by = rng.choice(len(ROLES), size=n, p=list(fractions)).astype(np.uint8), ""
    for task in tasks:
        labels = task.labels[:n]
        check_task_roles(task.name, {role: labels[roles == code] for code, role in enumerate(ROLES)}, task.source)
    return roles, by


def check_task_roles(task: str, labels_by_role: Mapping[str, np.ndarray], source: str | None = None) -> None:
    """Refuse a task with fewer than two classes among the rows of any role.

    With one class, every prediction is that class or wrong: the attack's accuracy and the
    drop derived from it would measure nothing, yet read like results.

    Args:
        task: the task's name, for the message.
        labels_by_role: each role's labels (``attacker-train``, ``attacker-validation``, ``test``).
        source: how the task was defined (``threshold:9``), for the message.

    Raises:
        DataError: naming the task, the role and its class count.
    """
    for role, labels in labels_by_role.items():
        classes = len(np.unique(labels))
        if classes < 2:
            what = f"task {task!r}" + (f" ({source})" if source else "")
            found = "no rows" if len(labels) == 0 else f"{classes} class"
            raise DataError(
                f"{what} has {found} in the {role} rows; every role needs at least 2 classes, or its "
                "accuracy means nothing. Choose a task source that divides the rows into classes "
                "(e.g. a smaller K in threshold:K), or dump more rows."
            )


def stratified_split(
    labels: np.ndarray, fractions: tuple[float, float, float], seed: int
) -> np.ndarray:
    """Assign each row a role code: 0 (attacker-train), 1 (attacker-validation) or 2 (test).

    Stratified by ``labels`` and deterministic for a given seed. Raises when a class has
    too few rows to appear in every role.
    """
    from sklearn.model_selection import train_test_split

    n = len(labels)
    train, val, test = fractions
    counts = np.bincount(labels) if len(labels) else np.zeros(0, dtype=int)
    present = counts[counts > 0]
    if len(present) and present.min() < 3:
        rare = int(np.flatnonzero(counts == present.min())[0])
        raise DataError(
            f"class {rare} has only {int(present.min())} rows; a stratified three-way split needs at least 3 per class."
        )
    index = np.arange(n)
    roles = np.empty(n, dtype=np.uint8)
    try:
        rest, test_idx = train_test_split(index, test_size=test, random_state=seed, stratify=labels)
        train_idx, val_idx = train_test_split(
            rest, test_size=val / (train + val), random_state=seed, stratify=labels[rest]
        )
    except ValueError as exc:
        raise DataError(f"cannot split {n} rows {fractions} by class: {exc}.") from None
    roles[train_idx], roles[val_idx], roles[test_idx] = ATTACKER_TRAIN, ATTACKER_VALIDATION, TEST
    return roles
