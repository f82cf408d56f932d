"""Where an attack's rows come from: tensors in memory, or a store streamed in contiguous slices.

The one training loop (:func:`leakaudit.attacks._training.fit`) and its scoring take a
:class:`TensorSource` or a :class:`StreamSource`; both give the same three things:

* ``epoch_order(generator, ctx)``: the epoch's positions (:func:`leakaudit.store.stream.epoch_order`);
* ``epoch(order, bounds)``: a context yielding ``take(positions) → (x, y)`` for each step in turn;
* ``chunks(rows, ctx)``: this rank's rows in order, ``rows`` at a time, for scoring and prediction.

Given the same :class:`~leakaudit.store.stream.Blocks` and seed, both draw the same order, so
a model trained from a stream sees exactly the batches it would see in memory.

Under ``torchrun`` a tensor source splits rows as the engine always has (every ``world``-th
row); a stream gives each rank one contiguous range of the role's rows, padded to equal length
with its own first rows, so that each rank reads only its own rows.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch

from leakaudit import distributed
from leakaudit.distributed import Context
from leakaudit.store.stream import Blocks, DataPath, StreamReader, epoch_order

#: ``transform(x)``: applied to each batch's inputs (a standardizer, a flattening).
Transform = Callable[[torch.Tensor], torch.Tensor]
Take = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class TensorSource:
    """Rows held in memory as tensors ``x`` and ``y``."""

    path = "memory"

    def __init__(self, x: torch.Tensor, y: torch.Tensor, *, blocks: Blocks | None = None) -> None:
        self.x, self.y, self.blocks = x, y, blocks
        self.rows = len(x)

    def mapped(self, transform: Transform) -> TensorSource:
        """The same rows with ``transform`` applied to ``x`` (at once: the rows are in memory)."""
        return TensorSource(transform(self.x), self.y, blocks=self.blocks)

    def subset(self, positions: np.ndarray) -> TensorSource:
        """The rows at sorted ``positions``."""
        index = torch.from_numpy(np.sort(np.asarray(positions, dtype=np.int64)))
        return TensorSource(self.x[index], self.y[index], blocks=self.blocks)

    def epoch_order(self, generator: torch.Generator, ctx: Context | None) -> torch.Tensor:
        order = epoch_order(self.rows, generator, self.blocks)
        return order if ctx is None else distributed.shard_strided(order, ctx)

    @contextlib.contextmanager
    def epoch(self, order: torch.Tensor, bounds: Sequence[tuple[int, int]]) -> Iterator[Take]:
        yield lambda index: (self.x[index], self.y[index])

    def chunks(self, rows: int, ctx: Context | None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        x, y = (self.x, self.y) if ctx is None else (self.x[ctx.rank :: ctx.world_size], self.y[ctx.rank :: ctx.world_size])
        for first in range(0, len(x), rows):
            yield x[first : first + rows], y[first : first + rows]

    def gather(self, local: torch.Tensor, ctx: Context) -> torch.Tensor:
        return distributed.gather_strided(local, self.rows, ctx)

    def local_rows(self, ctx: Context) -> int:
        return len(range(ctx.rank, self.rows, ctx.world_size))

    def row_elements(self) -> tuple[int, int]:
        """Values in one row of ``x`` and of ``y``."""
        return (self.x[0].numel() if self.rows else 1), (self.y[0].numel() if self.rows and self.y.dim() > 1 else 1)


class StreamSource:
    """A role's rows streamed from a store: ``x`` from dataset ``x_name``, ``y`` from ``y_name`` or ``targets``.

    Args:
        reader_of: builds the :class:`StreamReader` of some of the role's rows and datasets.
        rows: the role's row indices in the store (sorted).
        blocks: block and window sizes (the budget's).
        y_name: a dataset for the targets (a decoder's ``inputs``), or
        targets: one target per role row, in memory (a classifier's labels).
        transform: applied to each batch's ``x`` after conversion to float32.
        data_path: why this role streams (for results).
    """

    path = "stream"

    def __init__(self, store, rows: np.ndarray, role: str, blocks: Blocks, *, x_name: str = "activations",
                 y_name: str | None = None, targets: torch.Tensor | None = None, transform: Transform | None = None,
                 data_path: DataPath | None = None) -> None:
        if (y_name is None) == (targets is None):
            raise ValueError("give exactly one of y_name and targets")
        self.store, self.role_rows, self.role, self.blocks = store, np.asarray(rows, dtype=np.int64), role, blocks
        self.x_name, self.y_name, self.targets, self.transform, self.data_path = x_name, y_name, targets, transform, data_path
        self.rows = len(self.role_rows)

    def mapped(self, transform: Transform) -> StreamSource:
        """The same rows with ``transform`` applied to each batch's ``x`` (after any transform already set)."""
        inner = self.transform
        combined = transform if inner is None else (lambda x: transform(inner(x)))
        return StreamSource(self.store, self.role_rows, self.role, self.blocks, x_name=self.x_name, y_name=self.y_name,
                            targets=self.targets, transform=combined, data_path=self.data_path)

    def subset(self, positions: np.ndarray) -> StreamSource:
        """The rows at sorted ``positions`` of this role."""
        positions = np.sort(np.asarray(positions, dtype=np.int64))
        return StreamSource(self.store, self.role_rows[positions], self.role, self.blocks, x_name=self.x_name,
                            y_name=self.y_name, targets=None if self.targets is None else self.targets[positions],
                            transform=self.transform, data_path=self.data_path)

    def dataset_only(self, name: str) -> StreamSource:
        """The same rows reading dataset ``name`` alone, as ``x`` without transform (``y`` a placeholder)."""
        return StreamSource(self.store, self.role_rows, self.role, self.blocks, x_name=name,
                            targets=torch.zeros(self.rows, dtype=torch.uint8), data_path=self.data_path)

    def _range(self, ctx: Context | None) -> tuple[int, int]:
        if ctx is None:
            return 0, self.rows
        return self.rows * ctx.rank // ctx.world_size, self.rows * (ctx.rank + 1) // ctx.world_size

    def local_rows(self, ctx: Context) -> int:
        lo, hi = self._range(ctx)
        return hi - lo

    def row_elements(self) -> tuple[int, int]:
        """Values in one row of ``x`` and of ``y`` (as stored: a transform that reshapes keeps the count)."""
        x = math.prod(self.store.file[self.x_name].shape[1:])
        return x, (math.prod(self.store.file[self.y_name].shape[1:]) if self.y_name is not None else 1)

    def _reader(self, lo: int, hi: int) -> StreamReader:
        names = [self.x_name] if self.y_name is None else [self.x_name, self.y_name]
        return StreamReader(self.store, names, self.role_rows[lo:hi], self.role, self.blocks)

    def epoch_order(self, generator: torch.Generator, ctx: Context | None) -> torch.Tensor:
        lo, hi = self._range(ctx)
        order = epoch_order(hi - lo, generator, self.blocks) + lo
        if ctx is not None:
            size = -(-self.rows // ctx.world_size)  # every rank takes as many steps as the largest range needs
            if len(order) < size:
                order = torch.cat([order, order.repeat(-(-size // max(len(order), 1)))[: size - len(order)]])
        return order

    def _convert(self, positions: np.ndarray, arrays: tuple[np.ndarray, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.from_numpy(arrays[0])
        if self.transform is not None:
            x = self.transform(x)
        y = torch.from_numpy(arrays[1]) if self.y_name is not None else self.targets[torch.from_numpy(positions)]  # type: ignore[index]
        return x, y

    @contextlib.contextmanager
    def epoch(self, order: torch.Tensor, bounds: Sequence[tuple[int, int]]) -> Iterator[Take]:
        positions = order.numpy()
        lo = int(positions.min()) if len(positions) else 0
        hi = int(positions.max()) + 1 if len(positions) else 0
        batches = self._reader(lo, hi).batches(positions - lo, bounds)

        def take(index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            got, arrays = next(batches)
            if not np.array_equal(got + lo, index.numpy()):
                raise RuntimeError("the stream and the training loop disagree on the order of rows")
            return self._convert(got + lo, arrays)

        try:
            yield take
        finally:
            batches.close()  # stops the read-ahead thread when an epoch ends early

    def chunks(self, rows: int, ctx: Context | None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # A chunk, the read-ahead queue's chunks and the block being cut hold half a window each at
        # most: an evaluation pass stays within the budget's share, as an epoch's windows do.
        rows = max(1, min(rows, self.blocks.window_rows // 2))
        lo, hi = self._range(ctx)
        n = hi - lo
        bounds = [(a, min(a + rows, n)) for a in range(0, n, rows)]
        for got, arrays in self._reader(lo, hi).batches(np.arange(n), bounds):
            yield self._convert(got + lo, arrays)

    def gather(self, local: torch.Tensor, ctx: Context) -> torch.Tensor:
        return torch.cat(distributed.all_gather(local.cpu()))


Source = TensorSource | StreamSource


def as_source(data: Source | tuple[torch.Tensor, torch.Tensor]) -> Source:
    return data if isinstance(data, (TensorSource, StreamSource)) else TensorSource(*data)


#: Bytes of float64 values a streamed statistic converts at a time: with its few temporary copies,
#: well within any useful budget whatever the width of a row.
STATISTIC_CHUNK_BYTES = 64 << 20


def statistic_chunk_rows(elements: int, most: int = 1024) -> int:
    """Rows per chunk of a streamed float64 statistic over rows of ``elements`` values."""
    return max(1, min(most, STATISTIC_CHUNK_BYTES // (8 * max(1, elements))))


def mean_target(source: Source) -> torch.Tensor:
    """The mean of the targets ``y`` over the source's rows (float64 sums, returned as float32)."""
    if isinstance(source, TensorSource):
        return source.y.mean(dim=0)
    if source.y_name is None:
        assert source.targets is not None  # a StreamSource has y_name or targets
        return source.targets.double().mean(dim=0).float()
    total, rows = None, 0
    targets = source.dataset_only(source.y_name)  # the other dataset is not read
    for yb, _ in targets.chunks(statistic_chunk_rows(source.row_elements()[1]), None):
        part = yb.double().sum(dim=0)
        total = part if total is None else total + part
        rows += len(yb)
    if total is None:
        raise ValueError("mean_target needs at least one row")
    return (total / rows).float()
