"""Checksums of a store: what a complete store records and what a reader checks.

When a store is complete, every dataset gets a ``sha256`` attribute: the SHA-256 of its
elements' stored bytes in C order (the raw bytes on disk for contiguous datasets, the
decompressed ones for chunked datasets, the stitched rows for virtual ones). The root
attribute ``store_sha256`` hashes the other root attributes and every object's name, shape,
dtype and attributes (the datasets' checksums included), so it changes whenever anything in
the store does: reports use it to tell stores apart.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from leakaudit.errors import StoreError


class StoreCorruptError(StoreError):
    """Something in a store does not match the checksum recorded when it was dumped.

    Args:
        path: the store.
        part: what failed, e.g. ``/activations`` or ``its attributes``.
        detail: the rest of the sentence after "is corrupt: PART".
    """

    def __init__(self, path: Path, part: str, detail: str) -> None:
        self.path = path
        self.part = part
        super().__init__(f"{str(path)!r} is corrupt: {part} {detail}")


#: Datasets plain ``leakaudit info`` does not read; it checks every other one.
LARGE_DATASETS = ("inputs", "activations")
_HASH_BLOCK = 8 << 20
NOT_VERIFIED = "not verified (written before checksums)"


def _canonical(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray):
        return [_canonical(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    return value


def attributes_digest(file: h5py.File) -> str:
    """SHA-256 of the root attributes (but ``store_sha256``) and every object's name, shape, dtype, attributes."""
    objects: dict[str, Any] = {}

    def visit(name: str, obj: Any) -> None:
        entry: dict[str, Any] = {"attrs": {k: _canonical(v) for k, v in obj.attrs.items()}}
        if isinstance(obj, h5py.Dataset):
            entry.update(shape=list(obj.shape), dtype=obj.dtype.str)
        objects[name] = entry

    file.visititems(visit)
    root = {k: _canonical(v) for k, v in file.attrs.items() if k != "store_sha256"}
    text = json.dumps({"attrs": root, "objects": objects}, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _datasets(file: h5py.File) -> dict[str, h5py.Dataset]:
    found: dict[str, h5py.Dataset] = {}
    file.visititems(lambda name, obj: found.__setitem__(name, obj) if isinstance(obj, h5py.Dataset) else None)
    return found


def _raw_extent(dataset: h5py.Dataset) -> tuple[int, int] | None:
    """(offset, size) of a dataset stored as one contiguous run of raw bytes in its file, else None."""
    if dataset.chunks is not None or dataset.is_virtual or dataset.shape is None:
        return None
    size = dataset.size * dataset.dtype.itemsize
    offset = dataset.id.get_offset()
    if offset is None or dataset.id.get_storage_size() != size:
        return None
    return offset, size


def _blocks(dataset: h5py.Dataset, fd: int | None, *, what: str) -> Iterator[Any]:
    """The dataset's stored bytes in order, in blocks of about :data:`_HASH_BLOCK` bytes."""
    extent = _raw_extent(dataset) if fd is not None else None
    if fd is not None and extent is not None:
        offset, size = extent
        if hasattr(os, "posix_fadvise") and size:
            os.posix_fadvise(fd, offset, size, os.POSIX_FADV_SEQUENTIAL)
        # Two buffers: one is filled while the caller hashes the other.
        buffers = [bytearray(min(size, _HASH_BLOCK)) for _ in range(2)] if size else []
        done = turn = 0
        while done < size:
            view = memoryview(buffers[turn % 2])[: min(_HASH_BLOCK, size - done)]
            got = os.preadv(fd, [view], offset + done)
            if got <= 0:
                raise StoreError(f"{what} is truncated: /{dataset.name.lstrip('/')} ends early. Dump it again.")
            yield view[:got]
            done, turn = done + got, turn + 1
        return
    if dataset.shape == ():
        yield np.ascontiguousarray(dataset[()])
        return
    row_bytes = max(1, math.prod(dataset.shape[1:]) * dataset.dtype.itemsize)
    step = max(1, _HASH_BLOCK // row_bytes)
    for start in range(0, len(dataset), step):
        yield np.ascontiguousarray(dataset[start : start + step])


def _digest(blocks: Iterator[Any]) -> str:
    """SHA-256 of the blocks, the next one read while this one is hashed (both release the GIL)."""
    digest = hashlib.sha256()
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(next, blocks, None)
        while (block := pending.result()) is not None:
            pending = pool.submit(next, blocks, None)
            digest.update(block)
    return digest.hexdigest()


def dataset_digest(dataset: h5py.Dataset, fd: int | None = None, *, what: str = "the store") -> str:
    """SHA-256 of a dataset's elements' stored bytes in C order (raw file bytes read from ``fd`` when contiguous)."""
    return _digest(_blocks(dataset, fd, what=what))


def _digests(datasets: Mapping[str, h5py.Dataset], fd: int | None, what: str) -> dict[str, str]:
    """Checksums of ``datasets``, two at a time: hashing, not reading, is what bounds them on a warm cache."""
    with ThreadPoolExecutor(max_workers=max(1, min(2, os.cpu_count() or 1))) as pool:
        futures = {name: pool.submit(dataset_digest, dataset, fd, what=what) for name, dataset in datasets.items()}
        return {name: future.result() for name, future in futures.items()}


def _record_checksums(file: h5py.File, fd: int | None, precomputed: Mapping[str, str] | None = None) -> None:
    datasets = _datasets(file)
    known = dict(precomputed or {})
    known.update(_digests({n: d for n, d in datasets.items() if n not in known}, fd, repr(file.filename)))
    for name, dataset in datasets.items():
        dataset.attrs["sha256"] = known[name]
    file.attrs["store_sha256"] = attributes_digest(file)


def record_checksums(path: str | Path) -> str:
    """Compute and record the checksums of the store at ``path``, as a dump does when it completes.

    For a store edited on purpose (tests build defective stores this way); it vouches for
    whatever the file holds now. Returns ``store_sha256``.
    """
    path = Path(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        with h5py.File(path, "r+") as file:
            _record_checksums(file, fd)
            return str(file.attrs["store_sha256"])
    finally:
        os.close(fd)


def seal_attributes(file: h5py.File) -> None:
    """Record ``store_sha256`` again after a deliberate change of attributes (never of data)."""
    file.attrs["store_sha256"] = attributes_digest(file)

