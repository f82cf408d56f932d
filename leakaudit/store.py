"""The activation store: one HDF5 file per dump (schema ``leakaudit.activations`` v1).

=====================  ==========================================================
path                   content
=====================  ==========================================================
``/`` attrs            schema, schema_version, tool version, created, model spec,
                       checkpoint SHA-256, layer, data spec, input shape, seed, complete, …
``/inputs``            float32 [N, C, H, W] in [0, 1]: exactly what the model saw
``/activations``       float32 or float16 [N, *layer_shape]
``/labels/<task>``     int64 [N]; attrs ``class_names`` (JSON) and ``source``
``/index``             int64 [N]: the row's position in the data source
``/split``             uint8 [N]: 0 attacker-train, 1 attacker-validation, 2 test
``/outputs``           optional float32 [N, K]: the full model's logits
=====================  ==========================================================

Layout. Uncompressed datasets are contiguous and allocated when the file is created:
DESIGN.md measured contiguous storage an order of magnitude faster than 256-row chunks
for shuffled minibatches, and a write into pre-allocated contiguous storage changes no
HDF5 metadata, which is what makes a killed dump resumable. With ``compression`` the
datasets are chunked along N (about 1 MiB per chunk, also allocated early).

Writing. Objects of 4 KiB or more start on a 4 KiB boundary, and the file's blocks are
reserved when it is created. The rows of the contiguous datasets are written in whole pages
with ``O_DIRECT`` where the file system allows it (:class:`_DirectWriter`), bypassing the
page cache: on this project's 2-core VM that cut the writer's CPU time for a 1.2 GB dump
from about 2 s to 0.4 s, time the forward pass had been losing. Readers see ordinary HDF5.

Atomicity. A dump writes ``STORE.h5.partial`` and renames it to ``STORE.h5`` once every
row is written and ``complete`` is set. After each flush it records the rows written in
``STORE.h5.partial.json`` (atomically replaced), together with a fingerprint of the
settings; ``--resume`` continues from there only if the fingerprint matches.

One dump at a time. A writer holds an exclusive ``flock`` on ``STORE.h5.partial.lock``
from before it touches the ``.partial`` file until the rename (resumed dumps too); a
second dump to the same path is refused with :class:`DumpInProgressError`. The kernel
drops the lock when its process dies, even by SIGKILL, so a lock is never stale and a
killed dump can always be resumed. Before the rename the writer checks that the
``.partial`` file is still the one it created, and that no other dump completed the store
meanwhile, so nothing is marked complete that is not one dump's data.

Integrity. When a store is complete, every dataset gets a ``sha256`` attribute: the
SHA-256 of its elements' stored bytes in C order (the raw bytes on disk for contiguous
datasets, the decompressed ones for chunked datasets, the stitched rows for virtual
ones). The root attribute ``store_sha256`` hashes the other root attributes and every
object's name, shape, dtype and attributes (the datasets' checksums included), so it
changes whenever anything in the store does: reports use it to tell stores apart.
:func:`open_store` checks all of them before a reader sees any data (a streaming hash,
a small cost beside any attack or metric); ``leakaudit info`` checks the attributes and
the small datasets, ``info --verify`` everything. Stores written before checksums carry
none of these attributes: they open, reported as not verified.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import h5py
import numpy as np

from leakaudit import __version__
from leakaudit._io import atomic_write_text
from leakaudit.errors import FileSystemError, StoreError, UnknownNameError

try:
    import fcntl
except ImportError:  # not POSIX: no lock; the checks before the rename still hold
    fcntl = None  # type: ignore[assignment]

SCHEMA = "leakaudit.activations"
SCHEMA_VERSION = 1
ROLES = ("attacker-train", "attacker-validation", "test")
ROLE_CODES = {name: code for code, name in enumerate(ROLES)}


def partial_path(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def journal_path(path: Path) -> Path:
    return path.with_name(path.name + ".partial.json")


def lock_path(path: Path) -> Path:
    return path.with_name(path.name + ".partial.lock")


def _json_attr(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


class StoreWriter:
    """Writes a store row block by row block into a ``.partial`` file, renamed on :meth:`finish`.

    Args:
        path: the final store path.
        n: number of rows.
        input_shape: (C, H, W) of ``/inputs``.
        layer_shape: shape of one activation row.
        dtype: ``float32`` or ``float16`` for ``/activations``.
        labels: task name → (labels, class names, source).
        index: position of each row in the data source.
        split: role code of each row.
        attrs: provenance attributes for ``/``.
        fingerprint: settings a resumed dump must share with the interrupted one.
        output_shape: shape of one ``/outputs`` row, if the full model's logits are stored.
        compression: ``None``, ``gzip`` or ``lzf``.
        store_inputs: write ``/inputs`` (decoders need them; leave them out to keep raw data out of the store).
        resume: continue an existing ``.partial`` file instead of starting a new one.
        state: choices a resumed dump must repeat (e.g. the memory format), kept in the journal.
        replace: whether :meth:`finish` may replace a store at ``path`` (the caller's
            ``--force``); ``None``: only one that existed when this writer started. A store
            that another dump completed meanwhile is never replaced without it.
    """

    def __init__(
        self,
        path: Path,
        *,
        n: int,
        input_shape: Sequence[int],
        layer_shape: Sequence[int],
        dtype: str,
        labels: Mapping[str, tuple[np.ndarray, Sequence[str], str]],
        index: np.ndarray,
        split: np.ndarray,
        attrs: Mapping[str, Any],
        fingerprint: Mapping[str, Any],
        output_shape: Sequence[int] | None = None,
        compression: str | None = None,
        store_inputs: bool = True,
        resume: bool = False,
        state: Mapping[str, Any] | None = None,
        replace: bool | None = None,
    ) -> None:
        self.path = Path(path)
        self.partial = partial_path(self.path)
        self.journal = journal_path(self.path)
        self.n = n
        self.fingerprint = dict(fingerprint)
        self.state = dict(state or {})
        self.rows_done = 0
        self._datasets: dict[str, h5py.Dataset] | None = None
        self._layout: dict[str, tuple[int | None, np.dtype, tuple[int, ...]]] = {}
        self._direct: _DirectWriter | None | bool = None  # None: not tried yet; False: unavailable
        self._identity: int | None = None  # an open descriptor of the .partial file this writer made
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = DumpLock(self.path)  # before anything is touched: the loser changes nothing
        # A store that appears while this dump runs was completed by another dump: see finish.
        self._replaces = self.path.exists() if replace is None else replace
        if resume and self.partial.exists():
            try:
                self.rows_done = self._reopen()
                self._identity = os.open(self.partial, os.O_RDONLY)
            except BaseException:
                if getattr(self, "file", None) is not None and self.file.id.valid:
                    self.file.close()
                self._lock.release()
                raise
            return
        try:
            self.partial.unlink(missing_ok=True)
            self.journal.unlink(missing_ok=True)
            self.file = h5py.File(h5py.h5f.create(os.fsencode(self.partial), h5py.h5f.ACC_TRUNC, fapl=_writer_fapl()))
            self._identity = os.open(self.partial, os.O_RDONLY)
        except BaseException:
            if getattr(self, "file", None) is not None:
                self.file.close()
                self.partial.unlink(missing_ok=True)
            self._lock.release()
            raise
        try:
            self._create(
                input_shape, layer_shape, dtype, labels, index, split, attrs, output_shape, compression, store_inputs
            )
            self.file.flush()
            if not compression:
                self._preallocate()
        except BaseException:
            self.abort()
            raise
        self._write_journal()

    # -- creation / reopening

    def _dataset(self, name: str, shape: Sequence[int], dtype: Any, compression: str | None) -> h5py.Dataset:
        shape = tuple(int(s) for s in shape)
        space = h5py.h5s.create_simple(shape)
        plist = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        plist.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
        plist.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
        if compression:
            row_bytes = max(1, int(np.prod(shape[1:])) * np.dtype(dtype).itemsize)
            rows = max(1, min(shape[0], (1 << 20) // row_bytes))
            plist.set_chunk((rows, *shape[1:]))
            if compression == "gzip":
                plist.set_deflate(4)
            elif compression == "lzf":
                plist.set_filter(h5py.h5z.FILTER_LZF, h5py.h5z.FLAG_OPTIONAL)
            else:
                raise StoreError(f"unknown compression {compression!r}; use gzip or lzf.")
        type_id = h5py.h5t.py_create(np.dtype(dtype), logical=True)
        dataset_id = h5py.h5d.create(self.file.id, name.encode(), type_id, space, dcpl=plist)
        return h5py.Dataset(dataset_id)

    def _create(
        self, input_shape, layer_shape, dtype, labels, index, split, attrs, output_shape, compression, store_inputs
    ) -> None:
        f = self.file
        f.attrs["schema"] = SCHEMA
        f.attrs["schema_version"] = SCHEMA_VERSION
        f.attrs["tool_version"] = __version__
        f.attrs["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        f.attrs["complete"] = False
        f.attrs["rows"] = self.n
        for key, value in attrs.items():
            f.attrs[key] = value if isinstance(value, (str, int, float, bool, np.integer, np.floating)) else _json_attr(value)
        if store_inputs:
            self._dataset("inputs", (self.n, *input_shape), np.float32, compression)
        self._dataset("activations", (self.n, *layer_shape), np.dtype(dtype), compression)
        if output_shape is not None:
            self._dataset("outputs", (self.n, *output_shape), np.float32, compression)
        f.create_dataset("index", data=np.asarray(index, dtype=np.int64))
        split_ds = f.create_dataset("split", data=np.asarray(split, dtype=np.uint8))
        split_ds.attrs["roles"] = _json_attr(list(ROLES))
        group = f.create_group("labels")
        for name, (values, class_names, source) in labels.items():
            ds = group.create_dataset(name, data=np.asarray(values, dtype=np.int64))
            ds.attrs["class_names"] = _json_attr(list(class_names))
            ds.attrs["source"] = source

    def _reopen(self) -> int:
        try:
            journal = json.loads(self.journal.read_text())
        except (OSError, ValueError):
            raise StoreError(
                f"cannot resume {str(self.partial)!r}: its progress journal is missing or unreadable. "
                "Run the dump again with --force to start over."
            ) from None
        if journal.get("fingerprint") != json.loads(_json_attr(self.fingerprint)):
            old, new = journal.get("fingerprint", {}), json.loads(_json_attr(self.fingerprint))
            differing = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise StoreError(
                f"cannot resume {str(self.partial)!r}: it was started with different settings "
                f"({', '.join(differing)} differ). Use the same settings, or --force to start over."
            )
        try:
            self.file = h5py.File(h5py.h5f.open(os.fsencode(self.partial), h5py.h5f.ACC_RDWR, fapl=_writer_fapl()))
        except OSError:
            raise StoreError(
                f"cannot resume {str(self.partial)!r}: the partial file is damaged. Run the dump again with --force."
            ) from None
        self.state = dict(journal.get("state", {}))
        return int(journal["rows_done"])

    def _write_journal(self) -> None:
        atomic_write_text(
            self.journal, _json_attr({"rows_done": self.rows_done, "fingerprint": self.fingerprint, "state": self.state}) + "\n"
        )

    def _preallocate(self) -> None:
        """Reserve the file's blocks now rather than during the writes.

        HDF5 reserves the datasets' address space early, but the file system allocates
        blocks on first write; done then, it costs the writer thread CPU time that the
        forward pass needs on a small machine (measured: 60,000 rows of resnet18 inputs and
        activations, 1.2 GB, written in 0.13–0.18 s of CPU into a preallocated file against
        0.21–0.49 s into a sparse one). Where the platform cannot, nothing is lost but speed.
        """
        if not hasattr(os, "posix_fallocate"):
            return
        size = self.file.id.get_filesize()
        try:
            fd = os.open(self.partial, os.O_RDWR)
        except OSError:
            return
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise StoreError(
                    f"not enough free disk space for {str(self.path)!r}: the store needs {size / 2**30:.2f} GiB."
                ) from None
            # Any other refusal (a file system without fallocate) costs only speed.
        finally:
            os.close(fd)

    # -- writing

    def write(self, start: int, inputs: np.ndarray, activations: np.ndarray, outputs: np.ndarray | None = None) -> None:
        """Write rows ``start : start + len(inputs)``."""
        if self._datasets is None:
            # Looked up once: a name lookup per write costs more than a small write itself.
            self._datasets = {name: self.file[name] for name in ("inputs", "activations", "outputs") if name in self.file}
        if "inputs" in self._datasets:
            self._write_rows("inputs", start, inputs)
        self._write_rows("activations", start, activations)
        if outputs is not None:
            self._write_rows("outputs", start, outputs)

    def _write_rows(self, name: str, start: int, values: np.ndarray) -> None:
        dataset = self._datasets[name]
        if name not in self._layout:  # asking HDF5 costs more than a write: once per dataset
            contiguous = dataset.chunks is None and not dataset.is_virtual
            self._layout[name] = (dataset.id.get_offset() if contiguous else None, dataset.dtype, dataset.shape[1:])
        offset, dtype, row_shape = self._layout[name]
        if values.dtype != dtype or values.shape[1:] != row_shape:
            offset = None  # HDF5 converts
        elif offset is not None:
            values = np.ascontiguousarray(values)  # e.g. channels_last activations: rows in order
        if offset is not None and self._direct is None:
            self._direct = _DirectWriter.open(self.partial) or False
        if offset is not None and self._direct:
            row_bytes = values.dtype.itemsize * math.prod(values.shape[1:])
            if self._direct.write(offset + start * row_bytes, values):
                return
            self._direct.close()
            self._direct = False
        dataset[start : start + len(values)] = values

    def _close_direct(self) -> None:
        if self._direct:
            self._direct.close()
        self._direct = None

    def checkpoint(self, rows_done: int) -> None:
        """Make rows ``[0, rows_done)`` durable and record them in the journal."""
        self.file.flush()
        self.rows_done = rows_done
        self._write_journal()

    def finish(self, extra_attrs: Mapping[str, Any] | None = None) -> Path:
        """Record the checksums, mark the store complete and move it into place.

        An existing store is replaced only as ``replace`` allows; one that another dump
        completed meanwhile is kept.

        Raises:
            StoreError: the ``.partial`` file is no longer the one this writer created.
            DumpInProgressError: another dump completed the store while this one ran.
        """
        self._close_direct()
        for key, value in (extra_attrs or {}).items():
            self.file.attrs[key] = value
        self.file.attrs["complete"] = True
        self.file.flush()
        # Read back from the file, not hashed on the way in: the checksums vouch for what
        # reached the disk, however it was written (direct pages, HDF5 conversion, resume).
        _record_checksums(self.file, self._identity)
        self.file.flush()
        self.file.close()
        if not self._owns_partial():
            raise StoreError(
                f"{str(self.partial)!r} was replaced by another process while this dump wrote it; "
                f"nothing was marked complete. Dump again when no other dump writes {str(self.path)!r}."
            )
        if not self._replaces and self.path.exists():
            raise DumpInProgressError(
                f"another dump completed {str(self.path)!r} while this one was running; it was kept and "
                "this dump discarded. Pass --force to replace it."
            )
        os.replace(self.partial, self.path)
        self.journal.unlink(missing_ok=True)
        self._release()
        return self.path

    def close(self) -> None:
        """Close, keeping the ``.partial`` file and journal for ``--resume``."""
        self._close_direct()
        if self.file.id.valid:
            self.file.flush()
            self.file.close()
        self._release()

    def abort(self) -> None:
        """Close and delete the ``.partial`` file: nothing is left that looks like a result."""
        try:
            self._close_direct()
            if self.file.id.valid:
                self.file.close()
        finally:
            if self._owns_partial():  # never another process's files
                self.partial.unlink(missing_ok=True)
                self.journal.unlink(missing_ok=True)
            self._release()

    def _owns_partial(self) -> bool:
        """Whether ``.partial`` is still the file this writer created (same device and inode)."""
        if self._identity is None:
            return False
        try:
            found = os.stat(self.partial)
        except FileNotFoundError:
            return False
        mine = os.fstat(self._identity)
        return (found.st_dev, found.st_ino) == (mine.st_dev, mine.st_ino)

    def _release(self) -> None:
        if self._identity is not None:
            os.close(self._identity)
            self._identity = None
        self._lock.release()


#: Page size for direct writes: raw data of the big datasets starts on such a boundary.
PAGE = 4096


def _writer_fapl() -> h5py.h5p.PropFAID:
    """File access of a store being written: aligned raw data, no HDF5 copy of raw data.

    Objects of a page or more start on a page boundary, so the rows of ``/inputs`` and
    ``/activations`` go to disk in whole pages (:class:`_DirectWriter`). The sieve buffer
    is off: HDF5 must hold no copy of raw data that those writes bypass.
    """
    fapl = h5py.h5p.create(h5py.h5p.FILE_ACCESS)
    fapl.set_libver_bounds(h5py.h5f.LIBVER_EARLIEST, h5py.h5f.LIBVER_LATEST)
    fapl.set_alignment(PAGE, PAGE)
    fapl.set_sieve_buf_size(0)
    return fapl


class _DirectWriter:
    """Write byte ranges of a file with ``O_DIRECT``, bypassing the page cache.

    Measured on this project's 2-core VM: writing 1 GiB through the page cache costs 2.3 s of
    CPU (page allocation, copying), with ``O_DIRECT`` 0.1 s at 2 GB/s, the device doing the
    copy. During a dump the forward pass has every core, so that CPU time came straight out
    of it. The whole pages of a range go direct from a page-aligned buffer; the partial pages
    at either end (shared with the neighbouring batches) go through the page cache, so no
    page is ever written both ways. Where ``O_DIRECT`` is unavailable (not Linux, tmpfs, some
    network file systems) :meth:`open` returns None and the store writes through HDF5.
    """

    def __init__(self, direct_fd: int, buffered_fd: int) -> None:
        self.direct_fd = direct_fd
        self.buffered_fd = buffered_fd
        self._raw = np.empty(0, dtype=np.uint8)
        self.buffer = self._raw

    @classmethod
    def open(cls, path: Path) -> "_DirectWriter | None":
        flag = getattr(os, "O_DIRECT", None)
        if flag is None:
            return None
        try:
            direct_fd = os.open(path, os.O_WRONLY | flag)
        except OSError:
            return None
        try:
            buffered_fd = os.open(path, os.O_WRONLY)
        except OSError:
            os.close(direct_fd)
            return None
        return cls(direct_fd, buffered_fd)

    def _aligned(self, size: int) -> np.ndarray:
        if self.buffer.size < size:
            self._raw = np.empty(size + PAGE, dtype=np.uint8)
            skip = (-self._raw.ctypes.data) % PAGE
            self.buffer = self._raw[skip : skip + size]
        return self.buffer[:size]

    def write(self, offset: int, values: np.ndarray) -> bool:
        """Write ``values``' bytes at ``offset``; False if the file system refused ``O_DIRECT``."""
        data = values.reshape(-1).view(np.uint8)
        end = offset + data.size
        first, last = -(-offset // PAGE) * PAGE, end // PAGE * PAGE  # whole pages: [first, last)
        if last <= first:
            _pwrite_all(self.buffered_fd, data, offset)
            return True
        middle = self._aligned(last - first)
        middle[:] = data[first - offset : last - offset]
        try:
            _pwrite_all(self.direct_fd, middle, first)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            return False  # the caller writes the whole range again, another way
        if first > offset:
            _pwrite_all(self.buffered_fd, data[: first - offset], offset)
        if end > last:
            _pwrite_all(self.buffered_fd, data[last - offset :], last)
        return True

    def close(self) -> None:
        for fd in (self.direct_fd, self.buffered_fd):
            try:
                os.close(fd)
            except OSError:
                pass
        self.direct_fd = self.buffered_fd = -1


def _pwrite_all(fd: int, data: np.ndarray, offset: int) -> None:
    view = memoryview(data)
    while view.nbytes:
        written = os.pwrite(fd, view, offset)
        if written <= 0:
            raise OSError(errno.EIO, "short write")
        view, offset = view[written:], offset + written


class DumpInProgressError(StoreError):
    """Another dump is writing (or has just completed) the same store."""


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


class DumpLock:
    """An exclusive ``flock`` on ``STORE.h5.partial.lock``, held while a dump writes ``STORE.h5``.

    ``flock`` rather than an ``O_EXCL`` marker file: the kernel releases it when the holder
    dies, however it dies, so there is never a stale lock to clear by hand before a resume.
    The file is removed on release; whoever opened it just before then finds, after locking,
    that the path names another file (or none) and starts over.

    Args:
        store: the store path the dump writes.
        wait: block until the lock is free instead of refusing at once.

    Raises:
        DumpInProgressError: another process holds the lock (and ``wait`` is off).
    """

    def __init__(self, store: Path, *, wait: bool = False) -> None:
        self.store = Path(store)
        self.path = lock_path(self.store)
        self.fd: int | None = None
        if fcntl is None:
            return
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as exc:
                # The lock file is ours; the user named the store, so the message names that.
                raise FileSystemError(self.store, exc, action="write") from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                os.close(fd)
                raise DumpInProgressError(
                    f"another dump is writing {str(self.store)!r} right now (it holds {str(self.path)!r}). "
                    "Wait for it to finish, or write to another path; the lock ends with that process, "
                    "so there is nothing to remove by hand."
                ) from None
            except OSError:
                os.close(fd)  # a file system without locks: the checks before the rename remain
                return
            try:
                current = os.stat(self.path)
            except FileNotFoundError:
                os.close(fd)
                continue
            locked = os.fstat(fd)
            if (current.st_dev, current.st_ino) != (locked.st_dev, locked.st_ino):
                os.close(fd)
                continue
            self.fd = fd
            return

    def release(self) -> None:
        """Remove the lock file and release the lock (idempotent)."""
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self.fd)
            self.fd = None


def check_no_dump_running(store: Path) -> None:
    """Raise :class:`DumpInProgressError` if a dump is writing ``store`` now."""
    DumpLock(Path(store)).release()


def wait_for_dump(store: Path) -> None:
    """Return once no dump is writing ``store``."""
    DumpLock(Path(store), wait=True).release()


# --------------------------------------------------------------------------- checksums

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
    if extent is not None:
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

        Whole contiguous slices are read and then indexed in memory: h5py's fancy indexing
        reads row by row and is orders of magnitude slower.
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
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), *dataset.shape[1:]), dtype=dtype)
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        for first in range(0, len(sorted_rows), block_rows):
            chunk = sorted_rows[first : first + block_rows]
            lo, hi = int(chunk[0]), int(chunk[-1]) + 1
            block = dataset[lo:hi]
            out[order[first : first + len(chunk)]] = block[chunk - lo]
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
