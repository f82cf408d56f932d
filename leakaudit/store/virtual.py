"""A distributed dump's store: complete shard files stitched with HDF5 virtual datasets."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from leakaudit.errors import StoreError
from leakaudit.store.integrity import _blocks, _canonical, _record_checksums
from leakaudit.store.locks import DumpLock
from leakaudit.store.schema import _json_attr, partial_path

SHARDED = ("inputs", "activations", "outputs")


def write_virtual_store(path: Path, shards: Sequence[Path], fingerprint: Mapping[str, Any], attrs: Mapping[str, Any]) -> Path:
    """Stitch complete shard files into one store at ``path`` with HDF5 virtual datasets.

    ``/inputs``, ``/activations`` and ``/outputs`` map onto the shards (relative paths, so
    the store and its ``.shards`` folder move together); labels, index and split are copied.
    Shards from another run (a different fingerprint) are refused, naming what differs.
    """
    path = Path(path)
    expected = json.loads(_json_attr(dict(fingerprint)))
    handles = []
    lock: DumpLock | None = None
    try:
        for shard in shards:
            if not shard.exists():
                raise StoreError(f"cannot stitch {str(path)!r}: shard {str(shard)!r} is missing.")
            handle = h5py.File(shard, "r")
            handles.append(handle)
            if not bool(handle.attrs.get("complete", False)):
                raise StoreError(f"cannot stitch {str(path)!r}: shard {str(shard)!r} is incomplete.")
            found = json.loads(handle.attrs.get("shard_fingerprint", "{}"))
            if found != expected:
                differing = sorted(k for k in set(found) | set(expected) if found.get(k) != expected.get(k))
                raise StoreError(
                    f"cannot stitch {str(path)!r}: shard {shard.name!r} comes from a different run "
                    f"({', '.join(differing)} differ). Dump again with --force."
                )
        bounds = [tuple(json.loads(h.attrs["shard_rows"])) if isinstance(h.attrs["shard_rows"], str) else tuple(h.attrs["shard_rows"]) for h in handles]
        n = int(expected["rows"])
        if bounds[0][0] != 0 or bounds[-1][1] != n or any(a[1] != b[0] for a, b in zip(bounds, bounds[1:])):
            raise StoreError(f"cannot stitch {str(path)!r}: the shards do not cover rows 0–{n} in order ({bounds}).")
        lock = DumpLock(path)
        partial = partial_path(path)
        partial.unlink(missing_ok=True)
        with h5py.File(partial, "w") as out:
            first = handles[0]
            for key, value in first.attrs.items():
                if not key.startswith("shard_"):
                    out.attrs[key] = value
            for key, value in attrs.items():
                out.attrs[key] = value if isinstance(value, (str, int, float, bool)) else _json_attr(value)
            out.attrs["complete"] = False
            out.attrs["rows"] = n
            for name in SHARDED:
                if name not in first:
                    continue
                shape = (n, *first[name].shape[1:])
                layout = h5py.VirtualLayout(shape=shape, dtype=first[name].dtype)
                for shard, handle, (lo, hi) in zip(shards, handles, bounds):
                    relative = os.path.relpath(shard, path.parent)
                    layout[lo:hi] = h5py.VirtualSource(relative, name, shape=handle[name].shape)
                out.create_virtual_dataset(name, layout)
            for name in ("index", "split"):
                out.create_dataset(name, data=np.concatenate([h[name][()] for h in handles]))
            out["split"].attrs["roles"] = first["split"].attrs["roles"]
            group = out.create_group("labels")
            for task in first["labels"]:
                ds = group.create_dataset(task, data=np.concatenate([h["labels"][task][()] for h in handles]))
                for key, value in first["labels"][task].attrs.items():
                    ds.attrs[key] = value
            out.attrs["dump_seconds"] = max(float(h.attrs.get("dump_seconds", 0.0)) for h in handles)
            out.attrs["complete"] = True
            stitched = {name: _stitched_digest(path, name, shards, handles) for name in SHARDED if name in first}
            _record_checksums(out, None, stitched)
        os.replace(partial, path)
        return path
    except BaseException:
        if lock is not None:
            partial_path(path).unlink(missing_ok=True)  # ours: the lock was held since before it existed
        raise
    finally:
        for handle in handles:
            handle.close()
        if lock is not None:
            lock.release()


def _stitched_digest(path: Path, name: str, shards: Sequence[Path], handles: Sequence[h5py.File]) -> str:
    """The checksum of virtual dataset ``name`` (its shards' rows in order), checking each shard's own on the way."""
    whole = hashlib.sha256()
    for shard, handle in zip(shards, handles):
        part = hashlib.sha256()
        fd = os.open(shard, os.O_RDONLY)
        try:
            for block in _blocks(handle[name], fd, what=repr(str(shard))):
                part.update(block)
                whole.update(block)
        finally:
            os.close(fd)
        expected = handle[name].attrs.get("sha256")
        if expected is not None and _canonical(expected) != part.hexdigest():
            raise StoreError(
                f"cannot stitch {str(path)!r}: /{name} of shard {shard.name!r} does not match the checksum recorded "
                "when it was written. Dump again with --force."
            )
    return whole.hexdigest()

