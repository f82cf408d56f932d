"""A k-nearest-neighbour attack on split-layer activations: an example third-party leakaudit plugin.

Whoever receives Z and holds a few labelled rows of their own can label new rows by a vote
of their nearest labelled neighbours in Z, without training anything. What that vote
reaches on a private task is leakage that needs no model at all, so it is a cheap lower
bound beside the trained ``classifier`` attack: a hardened layer that still clusters rows
by their private class lets this attack through.

The attack uses the store's attacker split: the attacker-train rows are the labelled
reference set, the test rows are scored (attacker-validation rows are not needed, since
nothing is selected). Z is flattened and, by default, standardised with the reference
rows' mean and spread, so that no single large feature decides the distances.

Installing this package registers the attack ``knn`` through the ``leakaudit.plugins``
entry-point group (see ``pyproject.toml``); leakaudit imports this module on its first
registry lookup. Everything leakaudit needs to run it is declared in the registration below:
its config, what it needs from a store, the report numbers it returns and the file it can write.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from leakaudit.errors import DataError, NonFiniteError
from leakaudit.registry import ATTACKS, Artifact, Needs

__all__ = ["KnnConfig", "KnnResult", "run_knn"]

Progress = Callable[[str, float, "float | None"], None]


@dataclass(frozen=True)
class KnnConfig:
    """Settings of the k-nearest-neighbour attack.

    Attributes:
        task: the store's task to attack.
        k: neighbours that vote on each test row.
        weights: ``uniform`` (one vote each) or ``distance`` (closer neighbours weigh more).
        standardize: scale every feature of Z to zero mean and unit variance on the reference rows.
        max_reference_rows: use at most this many attacker-train rows (a seeded, class-stratified
            sample); ``None`` uses them all. Distances to every reference row are computed for
            every test row, so this bounds the cost on large stores.
        seed: seeds that sample (the vote itself is deterministic).
    """

    task: str = "private"
    k: int = 5
    weights: Literal["uniform", "distance"] = "uniform"
    standardize: bool = True
    max_reference_rows: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        # leakaudit turns a ValueError raised here into a configuration error naming the
        # YAML path or the --set option, so the message names only the setting.
        if self.k < 1:
            raise ValueError(f"k: expected a positive integer, got {self.k!r}.")
        if self.max_reference_rows is not None and self.max_reference_rows < 1:
            raise ValueError(f"max_reference_rows: expected a positive integer, got {self.max_reference_rows!r}.")


@dataclass
class KnnResult:
    """What the k-nearest-neighbour attack found; :meth:`to_dict` is its JSON form.

    Attributes:
        task: the attacked task.
        class_names: its classes.
        rows: reference (attacker-train) and test rows used.
        k: neighbours that voted.
        accuracy: test accuracy of the vote (``knn_private_accuracy``).
        balanced_accuracy: its mean per-class recall over the classes present in the test rows.
        chance: test accuracy of always predicting the most frequent reference class.
        per_class: class name → test rows of that class and the vote's accuracy on them.
        config: the settings used.
        warnings: what the user should know (an attack that does not beat chance).
    """

    task: str
    class_names: list[str]
    rows: dict[str, int]
    k: int
    accuracy: float
    balanced_accuracy: float
    chance: float
    per_class: dict[str, dict[str, float | int | None]]
    config: dict[str, Any]
    warnings: list[str] = field(default_factory=list)

    attack = "knn"

    def to_dict(self) -> dict[str, Any]:
        return {"attack": self.attack, **dataclasses.asdict(self)}

    def report_metrics(self) -> dict[str, float]:
        """The numbers the report records, under the names declared at registration."""
        return {"knn_private_accuracy": self.accuracy, "knn_private_chance": self.chance}


def write_per_class(result: KnnResult, store: Any, path: Path) -> None:
    """The per-class accuracies as JSON (the artifact ``per-class``)."""
    data = {"store": str(store.path), "task": result.task, "k": result.k, "per_class": result.per_class}
    Path(path).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _reference_rows(train: np.ndarray, labels: np.ndarray, limit: int | None, seed: int) -> np.ndarray:
    """At most ``limit`` of the ``train`` rows, sampled per class so that every class keeps its share."""
    if limit is None or len(train) <= limit:
        return train
    from sklearn.model_selection import train_test_split

    try:
        kept, _ = train_test_split(train, train_size=limit, stratify=labels[train], random_state=seed)
    except ValueError:  # a class too rare to stratify at this size: sample without stratifying
        kept = np.random.default_rng(seed).choice(train, size=limit, replace=False)
    return np.sort(kept)


@ATTACKS.register(
    "knn",
    config=KnnConfig,
    needs=Needs(task="task"),
    metrics={
        "knn_private_accuracy": (
            "test accuracy of a k-nearest-neighbour vote in Z over attacker-train rows, for the attacked task"
        ),
        "knn_private_chance": (
            "test accuracy of always predicting the most frequent attacker-train class of the attacked task"
        ),
    },
    artifacts={
        "per-class": Artifact("JSON of the vote's test accuracy per class", "knn-per-class.json", write_per_class),
    },
    comparable=("task", "k", "weights", "standardize", "max_reference_rows", "seed"),
)
def run_knn(store: Any, config: KnnConfig, progress: Progress | None = None) -> KnnResult:
    """Label test rows by a vote of their k nearest attacker-train rows in Z (no training).

    Args:
        store: an open leakaudit activation store.
        config: the attack's settings.
        progress: optional ``progress(description, done, total)`` for a progress bar.

    Raises:
        UnknownNameError: the store has no such task (the message lists its tasks).
        DataError: too few attacker-train rows for ``k``, or no test rows.
        NonFiniteError: Z holds NaN or infinite values.
    """
    from sklearn.neighbors import KNeighborsClassifier

    labels = store.labels(config.task)
    class_names = list(store.class_names(config.task))
    train = _reference_rows(store.rows("attacker-train"), labels, config.max_reference_rows, config.seed)
    test = store.rows("test")
    if len(test) == 0:
        raise DataError(
            f"store {str(store.path)!r} has no test rows to score the knn attack on; dump more rows or change --split."
        )
    if len(train) < config.k:
        raise DataError(
            f"the knn attack needs at least k = {config.k} attacker-train rows, store {str(store.path)!r} has "
            f"{len(train)}; lower k or dump more rows."
        )
    if progress is not None:
        progress("knn vote", 0, 1)
    z_train = store.activations(train).reshape(len(train), -1).astype(np.float64)
    z_test = store.activations(test).reshape(len(test), -1).astype(np.float64)
    if not (np.isfinite(z_train).all() and np.isfinite(z_test).all()):
        raise NonFiniteError(
            f"the activations of {str(store.path)!r} hold NaN or infinite values; the knn attack needs finite Z."
        )
    if config.standardize:
        mean, std = z_train.mean(0), z_train.std(0)
        std[std == 0] = 1.0  # a constant feature carries no distance
        z_train, z_test = (z_train - mean) / std, (z_test - mean) / std

    vote = KNeighborsClassifier(n_neighbors=config.k, weights=config.weights, n_jobs=1)
    vote.fit(z_train, labels[train])
    predicted = vote.predict(z_test)
    truth = labels[test]
    if progress is not None:
        progress("knn vote", 1, 1)

    correct = predicted == truth
    accuracy = float(correct.mean())
    per_class: dict[str, dict[str, float | int | None]] = {}
    for c, name in enumerate(class_names):
        mine = truth == c
        count = int(mine.sum())
        per_class[name] = {"rows": count, "accuracy": float(correct[mine].mean()) if count else None}
    recalls = [v["accuracy"] for v in per_class.values() if v["accuracy"] is not None]
    balanced = float(np.mean(recalls)) if recalls else float("nan")
    majority = int(np.bincount(labels[train], minlength=len(class_names)).argmax())
    chance = float((truth == majority).mean())

    warnings: list[str] = []
    if accuracy <= chance:
        warnings.append(
            f"the knn vote ({accuracy:.3f}) does not beat always guessing the most frequent class ({chance:.3f}); "
            "it found no neighbourhood structure for this task, which alone does not show that Z is private."
        )
    return KnnResult(
        task=config.task,
        class_names=class_names,
        rows={"attacker-train": int(len(train)), "test": int(len(test))},
        k=config.k,
        accuracy=accuracy,
        balanced_accuracy=balanced,
        chance=chance,
        per_class=per_class,
        config=dataclasses.asdict(config),
        warnings=warnings,
    )
