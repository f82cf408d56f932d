"""Tasks (``--task NAME=SOURCE``): the labels an attack or a training run predicts.

Sources: ``label``, ``parity``, ``threshold:K`` (label ≥ K), ``map:FILE.yaml`` (label or
class name → group), or an array name of an npz/HDF5 source.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from leakaudit.data.sources import DataSource, _encode_labels
from leakaudit.errors import ConfigError, DataError, UnknownNameError


@dataclass(frozen=True)
class Task:
    """Labels of one task for every row of a source."""

    name: str
    source: str
    labels: np.ndarray
    class_names: list[str]


def parse_task_option(text: str) -> tuple[str, str]:
    """``NAME=SOURCE`` → (name, source); a bare ``SOURCE`` names itself."""
    name, sep, source = text.partition("=")
    if not sep:
        name, source = text, text
    name, source = name.strip(), source.strip()
    if not name or not source:
        raise ConfigError(f"--task expects NAME=SOURCE, got {text!r}.")
    if not name.replace("_", "").replace("-", "").isalnum():
        raise ConfigError(f"task name {name!r} may use letters, digits, '-' and '_' only.")
    return name, source


def resolve_task(name: str, source: str, data: DataSource) -> Task:
    """Compute the labels of task ``name`` from ``source`` (see the module docstring).

    Raises:
        DataError: the source has no labels, or a label lies outside the task's classes.
        ConfigError: a malformed ``threshold:K`` or ``map:FILE.yaml``.
        UnknownNameError: ``source`` is none of the above nor an array of the data.
    """
    task = _resolve_task(name, source, data)
    labels = task.labels
    outside = labels[(labels < 0) | (labels >= len(task.class_names))] if len(labels) else labels
    if len(outside):
        raise DataError(
            f"task {name!r} ({source}): label value {int(outside[0])} is outside the valid range "
            f"0..{len(task.class_names) - 1} of its {len(task.class_names)} classes. "
            "Fix the labels of the data source or the task's definition."
        )
    return task


def _resolve_task(name: str, source: str, data: DataSource) -> Task:
    kind, sep, argument = source.partition(":")
    if source in ("label", "parity") or kind in ("threshold", "map"):
        if data.labels is None:
            raise DataError(f"task {name!r} needs labels, but data source {data.spec!r} has none.")
        labels = data.labels
        names = data.class_names or [str(i) for i in range(int(labels.max()) + 1)]
        if source == "label":
            return Task(name, source, labels, list(names))
        if source == "parity":
            return Task(name, source, labels % 2, ["even", "odd"])
        if kind == "threshold":
            try:
                k = int(argument)
            except ValueError:
                raise ConfigError(f"task {name!r}: threshold:K needs an integer K, got {argument!r}.") from None
            return Task(name, source, (labels >= k).astype(np.int64), [f"<{k}", f">={k}"])
        return _mapped_task(name, source, argument, labels, list(names))
    if source in data.arrays:
        labels, class_names = _encode_labels(data.arrays[source], f"{data.spec}:{source}")
        return Task(name, source, labels, class_names)
    known = ["label", "parity", "threshold:K", "map:FILE.yaml", *data.arrays]
    raise UnknownNameError(f"task source for {name!r}", source, known)


def _mapped_task(name: str, source: str, path: str, labels: np.ndarray, names: list[str]) -> Task:
    from leakaudit.config import load_yaml

    mapping = load_yaml(path, what="task map")
    if not isinstance(mapping, Mapping) or not mapping:
        raise ConfigError(f"task map {path!r} must map labels (or class names) to group names.")
    groups: dict[str, int] = {}
    lookup: dict[int, int] = {}
    for key, group in mapping.items():
        if isinstance(key, int) and not isinstance(key, bool):
            if not 0 <= key < len(names):
                raise DataError(
                    f"task {name!r}: map {path!r} maps label {key}, outside the valid range 0..{len(names) - 1} "
                    f"of the data's {len(names)} classes. Remove it or fix the label."
                )
            label = key
        elif str(key) in names:
            label = names.index(str(key))
        else:
            raise ConfigError(f"task map {path!r}: {key!r} is neither a label nor a class name.")
        if isinstance(group, bool) or not isinstance(group, (str, int)) or str(group).strip() == "":
            raise ConfigError(
                f"task {name!r}: map {path!r} maps {key!r} to {group!r}, which is not a group name. "
                "Give every label a group name (a string or an integer)."
            )
        if label in lookup:
            raise ConfigError(f"task {name!r}: map {path!r} maps label {label} ({names[label]!r}) twice; give it one group.")
        lookup[label] = groups.setdefault(str(group), len(groups))
    present = np.unique(labels)
    unmapped = [int(v) for v in present if int(v) not in lookup]
    if unmapped:
        raise ConfigError(f"task map {path!r} leaves labels unmapped: {', '.join(map(str, unmapped[:10]))}.")
    table = np.full(int(present.max()) + 1, -1, dtype=np.int64)
    for label, group in lookup.items():
        if label < len(table):
            table[label] = group
    return Task(name, source, table[labels], list(groups))
