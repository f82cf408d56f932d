"""Reading stores that do not fit in memory: the memory budget, the choice of path, the streaming reader.

A role's rows are read into memory (as float32) when they fit in the **memory budget**
(``--memory-budget``; default :data:`DEFAULT_FRACTION` of ``MemAvailable``); otherwise they
are **streamed**: the role's rows (sorted store indices) are cut into blocks of consecutive
role positions, each block read in as few reads as its rows allow (DESIGN.md: contiguous
reads run one to two orders of magnitude faster than row-by-row ones): from a contiguous
dataset, one read per run of consecutive store rows, straight from the file, so that the other
roles' rows between them are not read (a role of 40 % of the rows would read 2.5 times its
bytes as one slice); from a chunked or virtual one, one slice through HDF5. Blocks are shuffled per
epoch with a seeded generator and the rows of a window of blocks shuffled among themselves.
A background thread reads ahead into a bounded queue; each batch is converted from the
stored dtype to float32 and checked for NaN and infinity on its own, so a bad value in a
late slice is caught when it is read.

The order is a function of the seed and of the block and window sizes alone
(:func:`epoch_order`); when one window holds every row it is ``torch.randperm(n)``, the
in-memory order. An in-memory source given the same block and window sizes draws the same
order, so both paths train on the same batches.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
import queue
import re
import threading
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from leakaudit.errors import ConfigError, NonFiniteError, StoreError

#: The default budget, as a fraction of ``MemAvailable``: room for the model, the
#: optimiser and the other role's reads beside the data.
DEFAULT_FRACTION = 0.5
#: Bytes one streamed block aims at: large enough for contiguous reads to run at disk speed.
BLOCK_BYTES = 4 << 20
#: A window (the rows shuffled among themselves) is this share of the budget: two windows
#: are held at once (the one being consumed and the one read ahead) beside the queued batches.
WINDOW_SHARE = 0.25

#: The fewest blocks a window holds when the budget allows (see :meth:`Blocks.for_budget`).
WINDOW_BLOCKS = 8

_SUFFIXES = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_BUDGET = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)


def available_memory(meminfo: str | Path = "/proc/meminfo") -> int:
    """``MemAvailable`` in bytes (the physical memory when /proc/meminfo cannot be read)."""
    try:
        for line in Path(meminfo).read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def parse_budget(text: str | int | float | None, option: str = "--memory-budget") -> int:
    """Bytes of a budget: ``2G``, ``500M``, ``1K``, ``123456`` (bytes) or a fraction ``0.5`` of available memory.

    Suffixes are binary (``1K`` = 1,024 bytes); ``None`` is the default fraction.

    Raises:
        ConfigError: anything else, echoing what was given.
    """
    if text is None:
        return max(1, int(DEFAULT_FRACTION * available_memory()))
    given = str(text)
    match = _BUDGET.match(given)
    if match is None or isinstance(text, bool):
        raise ConfigError(
            f"{option}: expected bytes with an optional suffix (e.g. 2G, 500M) or a fraction of available memory "
            f"in (0, 1] (e.g. 0.5), got {given!r}."
        )
    number, suffix = float(match.group(1)), match.group(2).upper()
    if not suffix and "." in match.group(1):
        if not 0 < number <= 1:
            raise ConfigError(f"{option}: a fraction of available memory must be in (0, 1], got {given!r}.")
        return max(1, int(number * available_memory()))
    value = int(number * _SUFFIXES[suffix])
    if value < 1:
        raise ConfigError(f"{option}: the budget must be at least one byte, got {given!r}.")
    return value


_current: contextvars.ContextVar[int | None] = contextvars.ContextVar("memory_budget", default=None)


def memory_budget() -> int:
    """The budget in force: the one set by :func:`budget`, else the default fraction."""
    value = _current.get()
    return value if value is not None else parse_budget(None)


@contextlib.contextmanager
def budget(value: int | str | None) -> Iterator[int]:
    """Set the memory budget (bytes, or text for :func:`parse_budget`) for what runs inside.

    ``None`` leaves the default in force (and known as the default, see :func:`budget_record`).
    """
    if value is None:
        yield memory_budget()
        return
    resolved = value if isinstance(value, int) and not isinstance(value, bool) else parse_budget(value)
    token = _current.set(resolved)
    try:
        yield resolved
    finally:
        _current.reset(token)


def budget_is_default() -> bool:
    """Whether no budget was set: the default, a share of the memory available at the time."""
    return _current.get() is None


def budget_record(limit: int, path: str, default: bool | None = None) -> tuple[int | str, str]:
    """What a result records of the budget, and how its reason names it.

    The default budget is a share of the memory free at the time, so its bytes differ from one
    run to the next; recording them would make two runs of the same settings write different
    reports. Where the default budget made no difference (everything was read into memory) the
    result says ``default``; where it chose a path or a subsample, its bytes are part of the
    result and are recorded. ``default``: whether ``limit`` is the default (``None``: whether no
    budget is set now).
    """
    if (budget_is_default() if default is None else default) and path == "memory":
        return "default", f"the default memory budget ({DEFAULT_FRACTION:.0%} of available memory)"
    return limit, f"the memory budget of {format_bytes(limit)}"


def format_bytes(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


@dataclass(frozen=True)
class DataPath:
    """Which path reads a role's data, and why (what results and the terminal show)."""

    path: str  # "memory" or "stream"
    budget: int
    role_bytes: int
    role: str

    default: bool = False  # the budget is the default one (see :func:`budget_record`)
    #: Bytes of the budget taken by the networks trained beside the rows
    #: (:func:`leakaudit.training.footprint.network_footprint`); the rows get the rest.
    networks: int = 0

    @property
    def rows_budget(self) -> int:
        """What the budget leaves for rows once the networks are counted (at least one byte)."""
        return max(1, self.budget - self.networks)

    @property
    def over_budget(self) -> bool:
        """The networks alone take the whole budget: it cannot be held, whatever the path."""
        return self.networks >= self.budget

    def _recorded(self) -> tuple[int | str, str]:
        return budget_record(self.budget, self.path, self.default)

    @property
    def reason(self) -> str:
        relation = "fit in" if self.path == "memory" else "exceed"
        named = less_networks(self._recorded()[1], self.networks, self.budget)
        return f"{self.role} rows take {format_bytes(self.role_bytes)} as float32, which {relation} {named}"

    def to_dict(self) -> dict[str, Any]:
        return {"data_path": self.path, "memory_budget": self._recorded()[0], "role_bytes": self.role_bytes,
                "networks_bytes": self.networks, "role": self.role, "reason": self.reason}


def float32_bytes(store: Any, names: Sequence[str], rows: int) -> int:
    """Bytes of ``rows`` rows of datasets ``names`` once converted to float32."""
    return sum(rows * math.prod(store.file[name].shape[1:]) * 4 for name in names)


def choose_path(store: Any, names: Sequence[str], rows: np.ndarray, role: str, budget_bytes: int | None = None,
                networks: int = 0) -> DataPath:
    """``memory`` when the role's float32 bytes fit in what the budget leaves beside ``networks`` bytes, ``stream`` otherwise."""
    limit = memory_budget() if budget_bytes is None else budget_bytes
    size = float32_bytes(store, names, len(rows))
    path = "memory" if size <= limit - networks else "stream"
    return DataPath(path, limit, size, role, default=budget_bytes is None and budget_is_default(), networks=max(0, networks))


def less_networks(named: str, networks: int, limit: int) -> str:
    """``named`` (a budget, as :func:`budget_record` names it) with the share the networks take out of it."""
    if networks >= limit:
        return f"{named}, all of it taken by the networks trained beside them ({format_bytes(networks)})"
    if networks:
        return f"{named} less {format_bytes(networks)} for the networks trained beside them"
    return named


def networks_over_budget(what: str, networks: int, limit: int) -> str:
    """The warning of a result whose networks alone take the whole memory budget."""
    return (f"the {what} take about {format_bytes(networks)} while they train (weights, gradients, Adam's moments, the best "
            f"epoch's copy, one batch's activations), more than the memory budget of {format_bytes(limit)}: the budget "
            "was not held, and the rows were read in the smallest pieces the attack allows")


@dataclass(frozen=True)
class Blocks:
    """How a role's positions are cut: ``block_rows`` per contiguous read, ``window_blocks`` per shuffle window."""

    block_rows: int
    window_blocks: int

    @classmethod
    def for_budget(cls, row_bytes: int, budget_bytes: int) -> Blocks:
        window_rows = max(1, int(budget_bytes * WINDOW_SHARE) // max(1, row_bytes))
        # At least WINDOW_BLOCKS blocks per window, so that a batch mixes rows from several places in the store.
        block_rows = max(1, min(window_rows // WINDOW_BLOCKS, BLOCK_BYTES // max(1, row_bytes)))
        return cls(block_rows, max(1, window_rows // block_rows))

    @property
    def window_rows(self) -> int:
        return self.block_rows * self.window_blocks


def epoch_order(n: int, generator: torch.Generator, blocks: Blocks | None) -> torch.Tensor:
    """One epoch's positions ``0 … n-1``: blocks in seeded order, rows shuffled within each window.

    ``blocks`` ``None``, or one window holding all ``n``: ``torch.randperm(n)`` (what the
    in-memory path always drew).
    """
    if blocks is None or blocks.window_rows >= n:
        return torch.randperm(n, generator=generator)
    starts = torch.arange(0, n, blocks.block_rows)
    block_perm = torch.randperm(len(starts), generator=generator)
    parts = []
    for first in range(0, len(block_perm), blocks.window_blocks):
        window = [torch.arange(int(starts[b]), min(n, int(starts[b]) + blocks.block_rows))
                  for b in block_perm[first : first + blocks.window_blocks].tolist()]
        positions = torch.cat(window)
        parts.append(positions[torch.randperm(len(positions), generator=generator)])
    return torch.cat(parts)


def sequential_order(n: int) -> torch.Tensor:
    return torch.arange(n)


class StreamReader:
    """Batches of datasets of a store, for a role's rows, read as contiguous slices ahead of use.

    Args:
        store: an open :class:`~leakaudit.store.ActivationStore`.
        names: datasets to read (``activations``, ``inputs``); every batch holds one array of each.
        rows: the role's row indices (sorted).
        role: the role's name, for error messages.
        blocks: block and window sizes.
        queue_batches: batches read ahead (the queue's bound).
    """

    def __init__(self, store: Any, names: Sequence[str], rows: np.ndarray, role: str, blocks: Blocks,
                 queue_batches: int = 2) -> None:
        self.store, self.names, self.role, self.blocks = store, tuple(names), role, blocks
        self.rows = np.asarray(rows, dtype=np.int64)
        if len(self.rows) > 1 and np.any(np.diff(self.rows) <= 0):
            raise ValueError("a role's rows must be sorted and distinct")
        self.queue_batches = max(1, queue_batches)
        self.slices_read = 0  # blocks read (for tests and benchmarks)
        self.bytes_read = 0  # bytes read from contiguous datasets' files (for tests and benchmarks)

    def __len__(self) -> int:
        return len(self.rows)

    def batches(self, order: torch.Tensor | np.ndarray,
                bounds: Sequence[tuple[int, int]]) -> Generator[tuple[np.ndarray, tuple[np.ndarray, ...]], None, None]:
        """``(positions, arrays)`` for each ``[start, stop)`` of ``bounds`` over ``order``, in order.

        ``positions`` index the role's rows; each array is float32 and finite.

        Raises:
            NonFiniteError: a batch holds NaN or infinite values (counts only, never values).
        """
        order_np = np.asarray(order, dtype=np.int64)
        results: queue.Queue[Any] = queue.Queue(maxsize=self.queue_batches)
        stop = threading.Event()

        def produce() -> None:
            try:
                for item in self._read(order_np, bounds):
                    while not stop.is_set():
                        try:
                            results.put(item, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
                results.put(_DONE)
            except BaseException as exc:  # handed to the consumer, raised there
                results.put(_Failed(exc))

        thread = threading.Thread(target=produce, name="leakaudit-stream", daemon=True)
        thread.start()
        try:
            while True:
                item = results.get()
                if item is _DONE:
                    return
                if isinstance(item, _Failed):
                    raise item.error
                yield item
        finally:
            stop.set()
            while thread.is_alive():
                with contextlib.suppress(queue.Empty):
                    results.get_nowait()
                thread.join(timeout=0.05)

    def _read(self, order: np.ndarray, bounds: Sequence[tuple[int, int]]) -> Iterator[tuple[np.ndarray, tuple[np.ndarray, ...]]]:
        block_rows = self.blocks.block_rows
        # Each batch's blocks are read when first needed and dropped once no later batch needs them.
        last_use = np.full(-(-len(self.rows) // block_rows) if len(self.rows) else 0, -1, dtype=np.int64)
        for index, (a, b) in enumerate(bounds):
            last_use[np.unique(order[a:b] // block_rows)] = index
        cache: dict[int, tuple[np.ndarray, ...]] = {}
        with RawRows(self.store, self.names) as raw:
            yield from self._batches_from(order, bounds, last_use, cache, raw)

    def _batches_from(self, order, bounds, last_use, cache, raw) -> Iterator[tuple[np.ndarray, tuple[np.ndarray, ...]]]:
        block_rows = self.blocks.block_rows
        for index, (a, b) in enumerate(bounds):
            positions = order[a:b]
            block_of = positions // block_rows
            for blk in np.unique(block_of):
                if int(blk) not in cache:
                    cache[int(blk)] = self._read_block(int(blk), raw)
            arrays = []
            for k, name in enumerate(self.names):
                shape = cache[int(block_of[0])][k].shape[1:] if len(positions) else self.store.file[name].shape[1:]
                out = np.empty((len(positions), *shape), dtype=np.float32)
                for blk in np.unique(block_of):
                    mask = block_of == blk
                    out[mask] = cache[int(blk)][k][positions[mask] - int(blk) * block_rows]
                check_finite(out, f"{_WHAT.get(name, name)} (/{name}, {self.role} rows) of {str(self.store.path)!r}")
                arrays.append(out)
            for blk in [blk for blk in cache if last_use[blk] <= index]:
                del cache[blk]
            yield positions, tuple(arrays)

    def _read_block(self, block: int, raw: RawRows) -> tuple[np.ndarray, ...]:
        """The role's rows of ``block`` in their stored dtype: per dataset, one read per run of consecutive rows."""
        rows = self.rows[block * self.blocks.block_rows : (block + 1) * self.blocks.block_rows]
        lo, hi = int(rows[0]), int(rows[-1]) + 1
        self.slices_read += 1
        out = []
        for name in self.names:
            got = raw.read(name, rows)
            if got is None:
                got = self.store.file[name][lo:hi][rows - lo]
            else:
                self.bytes_read += got.nbytes
            out.append(got)
        return tuple(out)


#: Rows at least this large are read without the kernel's readahead (see :class:`RawRows`).
RANDOM_READ_ROW_BYTES = 64 << 10


class RawRows:
    """Rows of a store's contiguous, uncompressed datasets read straight from the file, run by run.

    HDF5 places such a dataset's elements at one offset in C order, so row ``r`` is
    ``row_bytes`` at ``offset + r * row_bytes``. With rows of :data:`RANDOM_READ_ROW_BYTES` or
    more, readahead is turned off (``POSIX_FADV_RANDOM``): the gaps between runs belong to other
    roles and would be read for nothing; smaller rows share pages with their neighbours anyway.
    """

    def __init__(self, store: Any, names: Sequence[str]) -> None:
        self.layout: dict[str, tuple[int, int, np.dtype, tuple[int, ...]]] = {}
        for name in names:
            dataset = store.file[name]
            offset = dataset.id.get_offset() if dataset.chunks is None and not dataset.is_virtual else None
            if offset is not None and dataset.dtype.isnative:
                shape = tuple(int(s) for s in dataset.shape[1:])
                self.layout[name] = (int(offset), math.prod(shape) * dataset.dtype.itemsize, dataset.dtype, shape)
        self.path = str(store.path)
        self.fd: int | None = None

    def __enter__(self) -> RawRows:
        if self.layout:
            self.fd = os.open(self.path, os.O_RDONLY)
            if min(row_bytes for _, row_bytes, _, _ in self.layout.values()) >= RANDOM_READ_ROW_BYTES:
                with contextlib.suppress(AttributeError, OSError):
                    os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_RANDOM)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def read(self, name: str, rows: np.ndarray) -> np.ndarray | None:
        """``rows`` (sorted) of dataset ``name`` in its stored dtype, or ``None`` when it is not read this way."""
        if self.fd is None or name not in self.layout:
            return None
        offset, row_bytes, dtype, shape = self.layout[name]
        out = np.empty((len(rows), *shape), dtype=dtype)
        if not len(rows):
            return out
        buffer = out.reshape(len(rows), -1).view(np.uint8)
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        for first, stop in zip(np.concatenate([[0], breaks]), np.concatenate([breaks, [len(rows)]])):
            view = buffer[first:stop].reshape(-1).data
            at, done = offset + int(rows[first]) * row_bytes, 0
            while done < len(view):
                got = os.preadv(self.fd, [view[done:]], at + done)
                if got <= 0:
                    raise StoreError(f"{self.path!r} ended inside /{name}: the file is shorter than its layout says.")
                done += got
        return out


_WHAT = {"activations": "activations", "inputs": "inputs"}


class _Failed:
    def __init__(self, error: BaseException) -> None:
        self.error = error


_DONE = object()


def check_finite(values: np.ndarray, what: str) -> None:
    """Raise :class:`NonFiniteError` with counts (never values) if ``values`` has NaN or inf."""
    finite = np.isfinite(values)
    if finite.all():
        return
    nan = int(np.isnan(values).sum())
    inf = int(values.size - finite.sum()) - nan
    bad_rows = int((~finite.reshape(len(values), -1)).any(axis=1).sum()) if len(values) else 0
    raise NonFiniteError(
        f"the {what} contain {nan:,} NaN and {inf:,} infinite values in {bad_rows:,} rows; attacks need finite "
        "numbers. Check the model's weights and input scaling, then dump the store again."
    )
