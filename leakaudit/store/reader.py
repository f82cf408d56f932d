"""Reading a store: :func:`open_store` validates it and checks its checksums before any data is read."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Literal

import h5py
import numpy as np

from leakaudit import __version__
from leakaudit.errors import StoreError, UnknownNameError
from leakaudit.store.integrity import (
    LARGE_DATASETS,
    NOT_VERIFIED,
    StoreCorruptError,
    _canonical,
    _datasets,
    _digests,
    attributes_digest,
)
from leakaudit.store.schema import ROLE_CODES, ROLES, SCHEMA, SCHEMA_VERSION, partial_path
from leakaudit.store.virtual import SHARDED


class ActivationStore:
    """Read access to a complete, valid store; every reader goes through this class.

    Args:
        path: the store.
        verify: ``"all"`` checks every dataset against its checksum before any is read;
            ``"attributes"`` checks the attributes and every dataset but ``/inputs`` and
            ``/activations`` (what plain ``leakaudit info`` reads).

    Raises:
        StoreError: the file is missing, not HDF5, of another schema or newer version,
            incomplete, its datasets disagree in length, or something it holds does not
            match the checksum recorded when it was dumped.
    """

    def __init__(self, path: str | Path, *, verify: Literal["all", "attributes"] = "all") -> None:
        self.path = Path(path)
        where = str(self.path)
        if not self.path.exists():
            partial = partial_path(self.path)
            hint = f" An interrupted dump left {str(partial)!r}: resume it with `leakaudit dump … --resume`." if partial.exists() else ""
            raise StoreError(f"store {where!r} does not exist.{hint}")
        try:
            self.file = h5py.File(self.path, "r")
        except OSError:
            raise StoreError(f"{where!r} is not a readable HDF5 file (corrupt or truncated?).") from None
        try:
            self._validate()
            #: What was checked: ``status`` and, per dataset, ``verified``, ``not read`` or ``no checksum``.
            self.integrity = self._verify(verify)
        except BaseException:
            self.file.close()
            raise

    def _validate(self) -> None:
        where = str(self.path)
        attrs = self.file.attrs
        schema = attrs.get("schema")
        if schema != SCHEMA:
            raise StoreError(f"{where!r} is not a leakaudit activation store (schema attribute {schema!r}).")
        version = int(attrs.get("schema_version", -1))
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{where!r} has schema version {version}; this leakaudit ({__version__}) reads up to "
                f"{SCHEMA_VERSION}. Upgrade leakaudit."
            )
        if version < 1:
            raise StoreError(f"{where!r} has an invalid schema version {version}.")
        if not bool(attrs.get("complete", False)):
            raise StoreError(
                f"{where!r} is incomplete: its dump did not finish. Resume it with `leakaudit dump … --resume`."
            )
        if "activations" not in self.file:
            raise StoreError(f"{where!r} has no /activations dataset.")
        lengths = {"activations": len(self.file["activations"])}
        for name in ("inputs", "index", "split", "outputs"):
            if name in self.file:
                lengths[name] = len(self.file[name])
        for name in self.tasks:
            lengths[f"labels/{name}"] = len(self.file["labels"][name])
        if len(set(lengths.values())) > 1:
            detail = ", ".join(f"{k} {v}" for k, v in lengths.items())
            raise StoreError(f"{where!r} is inconsistent: its datasets differ in length ({detail}).")
        if "split" not in self.file:
            raise StoreError(f"{where!r} has no /split dataset.")
        for name in SHARDED:
            dataset = self.file.get(name)
            if dataset is not None and dataset.is_virtual:
                # HDF5 reads a missing source as fill values; a store must never do that silently.
                for source in dataset.virtual_sources():
                    shard = self.path.parent / source.file_name
                    if not shard.exists():
                        raise StoreError(f"{where!r} is missing its shard {str(shard)!r} (/{name} reads from it).")

    def _verify(self, level: str) -> dict[str, Any]:
        where = str(self.path)
        datasets = _datasets(self.file)
        recorded = self.file.attrs.get("store_sha256")
        if recorded is None:
            if any("sha256" in d.attrs for d in datasets.values()):
                raise StoreCorruptError(
                    self.path, "its attributes", "lack the checksum (store_sha256) its datasets' checksums need. Dump it again."
                )
            # Written before checksums: no evidence either way, so it opens, reported as such.
            return {"status": NOT_VERIFIED, "store_sha256": None, "datasets": {n: "no checksum" for n in datasets}}
        recorded = _canonical(recorded)
        if attributes_digest(self.file) != recorded:
            raise StoreCorruptError(
                self.path, "its attributes", "do not match the checksum recorded when it was dumped. Dump it again."
            )
        found = {name: "not read" for name in datasets if level != "all" and name in LARGE_DATASETS}
        checked = {name: d for name, d in datasets.items() if name not in found}
        fd = os.open(self.path, os.O_RDONLY)
        try:
            actual = _digests(checked, fd, repr(where))
        finally:
            os.close(fd)
        for name, dataset in checked.items():
            expected = dataset.attrs.get("sha256")
            if expected is None or actual[name] != _canonical(expected):
                raise StoreCorruptError(
                    self.path, f"/{name}", "does not match the checksum recorded when it was dumped. "
                    "Dump it again (or restore the file from a copy you trust).",
                )
            found[name] = "verified"
        complete = all(v == "verified" for v in found.values())
        return {"status": "verified" if complete else "partly verified", "store_sha256": recorded, "datasets": found}

    # -- context manager

    def __enter__(self) -> ActivationStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.file.id.valid:
            self.file.close()

    # -- metadata

    def __len__(self) -> int:
        return len(self.file["activations"])

    @property
    def attrs(self) -> dict[str, Any]:
        """Provenance attributes, JSON-encoded ones decoded."""
        result: dict[str, Any] = {}
        for key, value in self.file.attrs.items():
            if isinstance(value, bytes):
                value = value.decode()
            if isinstance(value, str) and value[:1] in "[{":
                try:
                    value = json.loads(value)
                except ValueError:
                    pass
            elif isinstance(value, np.generic):
                value = value.item()
            result[key] = value
        return result

    @property
    def tasks(self) -> list[str]:
        return list(self.file["labels"].keys()) if "labels" in self.file else []

    @property
    def has_inputs(self) -> bool:
        return "inputs" in self.file

    @property
    def has_outputs(self) -> bool:
        return "outputs" in self.file

    @property
    def input_shape(self) -> tuple[int, ...] | None:
        return tuple(self.file["inputs"].shape[1:]) if self.has_inputs else None

    @property
    def layer_shape(self) -> tuple[int, ...]:
        return tuple(self.file["activations"].shape[1:])

    def class_names(self, task: str) -> list[str]:
        self._check_task(task)
        return list(json.loads(self.file["labels"][task].attrs["class_names"]))

    def _check_task(self, task: str) -> None:
        if task not in self.tasks:
            raise UnknownNameError(
                "task",
                task,
                self.tasks,
                hint=f"The store has: {', '.join(self.tasks) or 'no tasks'}. Add tasks at dump time with --task NAME=SOURCE.",
            )

    # -- data

    def labels(self, task: str) -> np.ndarray:
        self._check_task(task)
        return self.file["labels"][task][()]

    def split(self) -> np.ndarray:
        return self.file["split"][()]

    def rows(self, role: str) -> np.ndarray:
        """Indices of the rows with ``role`` (attacker-train, attacker-validation, test)."""
        if role not in ROLE_CODES:
            raise UnknownNameError("split role", role, ROLES)
        return np.flatnonzero(self.split() == ROLE_CODES[role])

    def split_sizes(self) -> dict[str, int]:
        counts = np.bincount(self.split(), minlength=len(ROLES))
        return {role: int(counts[code]) for code, role in enumerate(ROLES)}

    def read(self, name: str, rows: np.ndarray | None = None, *, dtype: Any = np.float32, block_rows: int | None = None) -> np.ndarray:
        """Read dataset ``name`` (all rows, or ``rows``) into memory as ``dtype``.

        h5py's fancy indexing reads row by row and is orders of magnitude slower, so rows are
        read in runs: from a contiguous dataset, each run of consecutive rows straight from the
        file (:class:`~leakaudit.store.stream.RawRows`); from a chunked or virtual one, slices of
        at most 256 MiB, indexed in memory. Either way memory holds ``out`` and one block, however
        sparse ``rows`` are (a slice from the first to the last of a sparse selection could span
        the whole store).
        """
        if name not in self.file:
            raise StoreError(f"{str(self.path)!r} has no /{name} dataset.")
        dataset = self.file[name]
        n = len(dataset)
        row_bytes = max(1, math.prod(dataset.shape[1:]) * np.dtype(dtype).itemsize)
        block_rows = block_rows or max(1, (256 << 20) // row_bytes)
        if rows is None:
            out = np.empty(dataset.shape, dtype=dtype)
            for start in range(0, n, block_rows):
                stop = min(n, start + block_rows)
                out[start:stop] = dataset[start:stop]
            return out
        from leakaudit.store.stream import RawRows

        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), *dataset.shape[1:]), dtype=dtype)
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        # A slice through HDF5 holds every row between its first and last: bound that span too.
        span_rows = max(1, (256 << 20) // max(1, math.prod(dataset.shape[1:]) * dataset.dtype.itemsize))
        with RawRows(self, [name]) as raw:
            first = 0
            while first < len(sorted_rows):
                lo = int(sorted_rows[first])
                stop = min(first + block_rows, int(np.searchsorted(sorted_rows, lo + span_rows, side="left")))
                stop = max(stop, first + 1)
                chunk = sorted_rows[first:stop]
                block = raw.read(name, chunk)  # only these rows, from a contiguous dataset
                if block is None:
                    block = dataset[lo : int(chunk[-1]) + 1][chunk - lo]
                out[order[first:stop]] = block
                first = stop
        return out

    def activations(self, rows: np.ndarray | None = None, *, dtype: Any = np.float32) -> np.ndarray:
        return self.read("activations", rows, dtype=dtype)

    def inputs(self, rows: np.ndarray | None = None) -> np.ndarray:
        if not self.has_inputs:
            raise StoreError(
                f"{str(self.path)!r} has no /inputs: it was dumped with --no-inputs. "
                "Dump it again without --no-inputs to attack or score reconstructions."
            )
        return self.read("inputs", rows)

    def summary(self) -> dict[str, Any]:
        """Everything `leakaudit info` shows, JSON-serialisable."""
        tasks = {}
        for task in self.tasks:
            labels = self.labels(task)
            names = self.class_names(task)
            tasks[task] = {
                "source": str(self.file["labels"][task].attrs.get("source", "")),
                "classes": len(names),
                "class_names": names,
                "counts": np.bincount(labels, minlength=len(names)).tolist(),
            }
        datasets = {
            name: {"shape": list(obj.shape), "dtype": str(obj.dtype)}
            for name, obj in self.file.items()
            if isinstance(obj, h5py.Dataset)
        }
        return {
            "path": str(self.path),
            "rows": len(self),
            "layer_shape": list(self.layer_shape),
            "input_shape": list(self.input_shape) if self.input_shape else None,
            "datasets": datasets,
            "tasks": tasks,
            "split": self.split_sizes(),
            "integrity": self.integrity,
            "provenance": self.attrs,
        }


def open_store(path: str | Path, *, verify: Literal["all", "attributes"] = "all") -> ActivationStore:
    """Open and validate a store, checking it against its checksums (see :class:`ActivationStore`)."""
    return ActivationStore(path, verify=verify)
