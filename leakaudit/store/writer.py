"""Writing a store row block by row block, resumably, into a ``.partial`` file renamed when complete.

Writing. Objects of 4 KiB or more start on a 4 KiB boundary, and the file's blocks are
reserved when it is created. The rows of the contiguous datasets are written in whole pages
with ``O_DIRECT`` where the file system allows it (:class:`_DirectWriter`), bypassing the
page cache, whose copying would take CPU time from the forward pass. Readers see ordinary HDF5.

Atomicity. A dump writes ``STORE.h5.partial`` and renames it to ``STORE.h5`` once every
row is written and ``complete`` is set. After each flush it records the rows written in
``STORE.h5.partial.json`` (atomically replaced), together with a fingerprint of the
settings; ``--resume`` continues from there only if the fingerprint matches.

Before the rename the writer checks that the ``.partial`` file is still the one it created
(:mod:`leakaudit.store.locks` keeps a second dump out while it runs), and that no other
dump completed the store meanwhile, so nothing is marked complete that is not one dump's data.
"""

from __future__ import annotations

import errno
import json
import math
import os
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import h5py
import numpy as np

from leakaudit import __version__
from leakaudit._io import atomic_write_text
from leakaudit.errors import StoreError
from leakaudit.store.integrity import _record_checksums
from leakaudit.store.locks import DumpInProgressError, DumpLock
from leakaudit.store.schema import ROLES, SCHEMA, SCHEMA_VERSION, _json_attr, journal_path, partial_path


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

    file: h5py.File  # opened in __init__ (created, or reopened on resume)

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
        self._direct: _DirectWriter | Literal[False] | None = None  # None: not tried yet; False: unavailable
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

    @staticmethod
    def resume_state(path: Path) -> dict[str, Any]:
        """The ``state`` that the interrupted dump of store ``path`` recorded (``{}`` if there is none).

        What a resumed dump must repeat to compute the same bits (e.g. its memory format),
        read before the writer is opened, because the dump decides those choices first.
        """
        try:
            return dict(_read_journal(journal_path(Path(path))).get("state", {}))
        except (OSError, ValueError):
            return {}

    def _reopen(self) -> int:
        try:
            journal = _read_journal(self.journal)
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
        forward pass needs on a small machine (benchmarks/RESULTS.md has the measurement).
        Where the platform cannot, nothing is lost but speed.
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
        assert self._datasets is not None  # looked up by write(), the only caller
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


def _read_journal(journal: Path) -> dict[str, Any]:
    """The progress journal: ``rows_done``, ``fingerprint`` and ``state`` (OSError, ValueError if unreadable)."""
    return json.loads(journal.read_text())


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

    Writing through the page cache costs CPU time (page allocation, copying) that, with
    ``O_DIRECT``, the device spends instead; during a dump the forward pass has every core,
    so that CPU time would come straight out of it (benchmarks/RESULTS.md has the
    measurements). The whole pages of a range go direct from a page-aligned buffer; the partial pages
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
    def open(cls, path: Path) -> _DirectWriter | None:
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
    view = data.data  # memoryview(data); numpy's stubs do not declare ndarray's buffer protocol
    while view.nbytes:
        written = os.pwrite(fd, view, offset)
        if written <= 0:
            raise OSError(errno.EIO, "short write")
        view, offset = view[written:], offset + written

