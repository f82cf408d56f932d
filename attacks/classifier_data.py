"""Where each head of the classifier attack reads its rows: in memory, streamed, or a subsample.

When :data:`~leakaudit.attacks._data.WHOLE_ROW_COPIES` float32 copies of every row fit in
the memory budget, every head reads its rows into memory, as it always has. Otherwise a
subsample would report an attacker holding fewer pairs than the store gives it (a weaker
attacker, the wrong direction for an audit), so each head takes the path it can:

* the network heads (``mlp``, ``conv``, ``continuation`` on Z, ``raw-cnn`` on X) stream every
  row of each role from the store in contiguous slices
  (:class:`~leakaudit.attacks._sources.StreamSource`), standardised by a streamed pass over
  their training rows; their refit streams the sorted union of attacker-train and
  attacker-validation rows;
* the heads that need all their rows at once (the L-BFGS linear probes ``linear`` and
  ``raw-linear``, the ``svm``) are fitted on a seeded per-class subsample of attacker-train,
  and choose their settings on one of attacker-validation, within the budget
  (:func:`~leakaudit.attacks._data.rows_within_budget`); they are then compared with the other
  heads on every attacker-validation row and scored on every test row, read chunk by chunk,
  so that every head's numbers (and the drop's paired interval) are over the same rows.

``records`` says, per group of heads, which path ran and why; it is the result's ``data_path``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from leakaudit.attacks._data import WHOLE_ROW_COPIES, AttackRows, read_activations, read_inputs, rows_within_budget
from leakaudit.attacks._sources import StreamSource
from leakaudit.attacks._training import as_tensor
from leakaudit.attacks.classifier_train import HeadData, HeadResult, Labels, pooled
from leakaudit.store import ActivationStore
from leakaudit.store.stream import Blocks, format_bytes, less_networks

#: The heads fitted on all their rows at once: on the streamed path, a subsample within the budget.
WHOLE_ROW_HEADS = ("linear", "svm", "raw-linear")
#: The role of a streamed refit's training rows.
POOLED_ROLE = "attacker-train+attacker-validation"


@dataclass
class ClassifierData:
    """The rows of every head of one classifier attack, and the record of how they are read.

    Attributes:
        store: the open store.
        rows: every row of the three roles.
        labels: the task's label of every store row.
        path: ``memory`` (every head in memory) or ``stream`` (per head, see the module docstring).
        sub: the rows the whole-row heads are fitted and select on (``rows`` in memory).
        records: per group of heads, the path and why (the result's ``data_path``).
    """

    store: ActivationStore
    rows: AttackRows
    labels: np.ndarray
    path: str
    sub: AttackRows
    records: dict[str, dict[str, Any]]
    budget: int = 0
    _memory: dict[str, HeadData] = field(default_factory=dict, repr=False)

    def streams(self, head: str) -> bool:
        return self.path == "stream" and head not in WHOLE_ROW_HEADS

    def subsampled(self, head: str) -> bool:
        """Whether ``head`` is fitted on fewer attacker-train or attacker-validation rows than the store holds."""
        return self.path == "stream" and head in WHOLE_ROW_HEADS and (
            len(self.sub.train) < len(self.rows.train) or len(self.sub.val) < len(self.rows.val))

    def note_rows(self, head: HeadResult) -> None:
        """A head fitted on a subsample of attacker-train says on how many rows (the SVM's own subsample may be fewer)."""
        if self.subsampled(head.name) and head.train_rows is None:
            head.train_rows = len(self.sub.train)

    def sizes(self, head: str) -> dict[str, int]:
        """Rows ``head`` used per role."""
        if self.path == "stream" and head in WHOLE_ROW_HEADS:
            return {"attacker-train": len(self.sub.train), "attacker-validation": len(self.sub.val), "test": len(self.rows.test)}
        return self.rows.sizes()

    def load(self, name: str) -> None:
        """In memory, read dataset ``name`` of every role (Z or X, refusing non-finite values) for the heads."""
        if self.path == "memory":
            self._memory[name] = self._read(name, self.rows)
        elif name not in self._memory:
            self._memory[name] = self._read(name, AttackRows(self.sub.train, self.sub.val, self.sub.test[:0]))

    def release(self, name: str) -> None:
        self._memory.pop(name, None)

    def inputs(self, head: str, name: str) -> HeadData:
        """The input of ``head`` from dataset ``name`` (``activations`` or ``inputs``), before standardisation."""
        if self.path == "memory":
            return self._memory[name]
        train, val, test = (self._source(name, r, role) for r, role in self._roles())
        if head not in WHOLE_ROW_HEADS:
            return HeadData(train, val, test)
        kept = self._memory[name]
        return HeadData(kept.train, kept.val, test, val_all=val)

    def pooled_inputs(self, head: str, name: str) -> HeadData:
        """The input of ``head``'s refit: its attacker-train and attacker-validation rows as training rows."""
        if self.path == "memory" or head in WHOLE_ROW_HEADS:
            return pooled(self.inputs(head, name))
        union = self._union()
        return HeadData(self._source(name, union, POOLED_ROLE), self._source(name, self.rows.val, "attacker-validation"),
                        self._source(name, self.rows.test, "test"))  # fmt: skip

    def head_labels(self, head: str) -> Labels:
        rows = self.sub if self.path == "stream" and head in WHOLE_ROW_HEADS else self.rows
        return self._y(rows.train), self._y(rows.val), self.labels[self.rows.test]

    def pooled_labels(self, head: str) -> tuple[torch.Tensor, np.ndarray]:
        if self.path == "stream" and head not in WHOLE_ROW_HEADS:
            return self._y(self._union()), self.labels[self.rows.test]
        train_y, val_y, test_y = self.head_labels(head)
        return torch.cat([train_y, val_y]), test_y

    def _union(self) -> np.ndarray:
        return np.sort(np.concatenate([self.rows.train, self.rows.val]))

    def _y(self, rows: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(self.labels[rows]).long()

    def _roles(self) -> tuple[tuple[np.ndarray, str], ...]:
        return ((self.rows.train, "attacker-train"), (self.rows.val, "attacker-validation"), (self.rows.test, "test"))

    def _source(self, name: str, rows: np.ndarray, role: str) -> StreamSource:
        row_bytes = 4 * math.prod(self.store.file[name].shape[1:])
        return StreamSource(self.store, rows, role, Blocks.for_budget(row_bytes, self.budget), x_name=name,
                            targets=self._y(rows))  # fmt: skip

    def _read(self, name: str, rows: AttackRows) -> HeadData:
        read = read_activations if name == "activations" else read_inputs
        roles = ((rows.train, "attacker-train"), (rows.val, "attacker-validation"), (rows.test, "test"))
        return HeadData(*(as_tensor(read(self.store, r, role)) for r, role in roles))


def classifier_data(store: ActivationStore, rows: AttackRows, labels: np.ndarray, names: tuple[str, ...], seed: int,
                    heads: Sequence[str], networks: int = 0) -> ClassifierData:  # fmt: skip
    """How every head of ``heads`` reads datasets ``names`` of ``rows`` within the memory budget (the module docstring).

    Args:
        store: the open store.
        rows: the attacker split.
        labels: the task's label of every store row.
        names: the datasets the heads read (``activations``, and ``inputs`` for a raw-X reference).
        seed: the seed of the whole-row heads' subsample.
        heads: every head that will run (Z and raw-X), to name them in the records.
        networks: bytes the largest network head takes while it trains
            (:func:`~leakaudit.attacks.classifier_train.head_footprint`), counted before the rows.
    """
    kept, record = rows_within_budget(store, rows, labels, names, seed, networks=networks)
    if record["data_path"] == "memory":
        # One record for the three roles, keyed as the decoder's per role.
        return ClassifierData(store, rows, labels, "memory", rows, {"attacker roles": record})
    limit = int(record["memory_budget"])  # a budget that chose a path is recorded in bytes
    whole = [h for h in heads if h in WHOLE_ROW_HEADS]
    streamed = [h for h in heads if h not in WHOLE_ROW_HEADS]
    needed = format_bytes(record["role_bytes"])
    named = less_networks(f"the memory budget of {format_bytes(limit)}", networks, limit)
    records: dict[str, dict[str, Any]] = {}
    sub = AttackRows(rows.train[:0], rows.val[:0], rows.test)  # nothing held in memory unless a whole-row head runs
    if whole:
        # Their test rows are read chunk by chunk, so only attacker-train and attacker-validation need the budget.
        fitted = AttackRows(rows.train, rows.val, rows.test[:0])
        sub, part = rows_within_budget(store, fitted, labels, names, seed, budget_bytes=limit, networks=networks)
        sub = AttackRows(sub.train, sub.val, rows.test)
        share = part.get("share", 1.0)
        base = {"memory_budget": limit, "role_bytes": part["role_bytes"], "networks_bytes": networks,
                "role": "attacker-train and attacker-validation", "heads": whole}  # fmt: skip
        if part["data_path"] == "memory":
            reason = (f"{WHOLE_ROW_COPIES} float32 copies of every row would take {needed}, more than {named}; these heads need all their rows at once: their attacker-train and "
                      f"attacker-validation rows ({format_bytes(part['role_bytes'])} as {WHOLE_ROW_COPIES} copies) are "
                      "held in memory, their test rows read chunk by chunk")  # fmt: skip
            records[", ".join(whole)] = {"data_path": "memory", **base, "reason": reason}
        else:
            reason = (f"{WHOLE_ROW_COPIES} float32 copies of every row would take {needed}, more than {named}; these heads need all their rows at once, so they were fitted on a seeded "
                      f"per-class subsample ({len(sub.train):,} of {len(rows.train):,} attacker-train and {len(sub.val):,} "
                      f"of {len(rows.val):,} attacker-validation rows: an attacker holding fewer pairs), then compared and "
                      "scored on every attacker-validation and test row")  # fmt: skip
            kept_sizes = {"attacker-train": len(sub.train), "attacker-validation": len(sub.val), "test": len(rows.test)}
            records[", ".join(whole)] = {"data_path": "subsample", **base, "seed": seed, "share": share,
                                         "rows_kept": kept_sizes, "rows_all": rows.sizes(), "reason": reason}  # fmt: skip
    if streamed:
        reason = (f"{WHOLE_ROW_COPIES} float32 copies of every row would take {needed}, more than {named}; these heads read every row of each role from the store in contiguous slices")
        records[", ".join(streamed)] = {"data_path": "stream", "memory_budget": limit, "role_bytes": record["role_bytes"],
                                        "networks_bytes": networks, "role": "every role", "heads": streamed, "rows": rows.sizes(),
                                        "reason": reason}  # fmt: skip
    return ClassifierData(store, rows, labels, "stream", sub, records, budget=max(1, limit - networks))
