"""Inputs of the dCor estimators: row access block by block, the scan before a pass, argument checks."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, Union

import numpy as np
import torch

from leakaudit.errors import ConfigError, DataError, NonFiniteError, UsageError

Progress = Callable[[int, int], None]

#: Default tile side: 1,024² float64 tiles (8 MB each) stay in this machine's 32 MB L3
#: cache, which makes the elementwise work per tile cheap next to the matrix multiply.
DEFAULT_BLOCK_SIZE = 1_024


class RowDataset(Protocol):
    """Anything with a shape and row slicing that returns NumPy arrays (e.g. ``h5py.Dataset``)."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    def __getitem__(self, key: slice) -> np.ndarray: ...


RowData = Union[np.ndarray, torch.Tensor, RowDataset]


class _Rows:
    """Rows of ``[n, ...]`` data, flattened to ``[n, dim]``, read block by block."""

    def __init__(self, data: RowData, name: str) -> None:
        self.name = name
        self._tensor: torch.Tensor | None = None
        self._lazy: Any = None
        if isinstance(data, torch.Tensor):
            tensor = data.detach()
            shape = tuple(tensor.shape)
            self._check_shape(shape)
            self._tensor = tensor.reshape(shape[0], -1)
        elif isinstance(data, np.ndarray) or not (hasattr(data, "shape") and hasattr(data, "__getitem__")):
            array = np.asarray(data)
            shape = array.shape
            self._check_shape(shape)
            self._tensor = _numpy_to_torch(array.reshape(shape[0], -1), name)
        else:
            # h5py.Dataset and the like: never read the whole thing at once.
            shape = tuple(data.shape)
            self._check_shape(shape)
            self._lazy = data
        self.n = int(shape[0])
        self.dim = int(math.prod(shape[1:]))
        if self.dim == 0:
            raise DataError(f"{name} has no features: got shape {shape}.")

    def _check_shape(self, shape: tuple[int, ...]) -> None:
        if len(shape) < 1:
            raise DataError(f"{self.name} must have a row dimension [n, ...]; got a scalar.")

    @property
    def device(self) -> torch.device:
        return self._tensor.device if self._tensor is not None else torch.device("cpu")

    def block(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` as a ``[m, dim]`` tensor in the stored dtype."""
        if self._tensor is not None:
            return self._tensor[start:stop]
        array = np.asarray(self._lazy[start:stop])
        return _numpy_to_torch(array.reshape(array.shape[0], -1), self.name)


def _numpy_to_torch(array: np.ndarray, name: str) -> torch.Tensor:
    if array.dtype.kind not in "biuf":
        raise DataError(f"{name} must hold numbers; got an array of dtype {array.dtype}.")
    if array.dtype == np.uint64:
        # Values from 2⁶³ up would wrap to negative int64; the pass works in float64 anyway.
        array = array.astype(np.float64)
    elif array.dtype.kind == "u" and array.dtype.itemsize > 1:
        array = array.astype(np.int64)  # torch lacks arithmetic on uint16/32
    if not array.dtype.isnative or any(stride < 0 for stride in array.strides):
        # torch can view neither reversed slices (x[::-1], BGR → RGB) nor foreign byte order.
        array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("="))
    with warnings.catch_warnings():
        # Read-only arrays (memory maps) are only ever read here.
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


@dataclass(frozen=True)
class _Scan:
    """What one read of a variable tells before the pass.

    Attributes:
        mean: Column means (float64).
        scale: A power of two that brings the largest deviation from the first row into
            [0.5, 1); exact in binary, so scaling changes no digit, and dCor does not
            depend on it. 1 for constant data.
        constant: Whether all rows are equal.
    """

    mean: torch.Tensor
    scale: float
    constant: bool


def _scan(rows: _Rows, block: int) -> _Scan:
    """One pass: refuse non-finite values, column means and the scale (float64), constancy."""
    colsum = torch.zeros(rows.dim, dtype=torch.float64)
    first = rows.block(0, 1).to(device="cpu", dtype=torch.float64)
    spread = 0.0
    bad_values = bad_rows = 0
    first_bad: int | None = None
    for start in range(0, rows.n, block):
        chunk = rows.block(start, min(start + block, rows.n)).to("cpu")
        if chunk.is_floating_point():
            finite = torch.isfinite(chunk)
            if not bool(finite.all()):
                bad = ~finite
                bad_values += int(bad.sum())
                row_bad = bad.any(dim=1)
                bad_rows += int(row_bad.sum())
                if first_bad is None:
                    first_bad = start + int(torch.nonzero(row_bad)[0, 0])
                continue
        if bad_values:
            continue
        colsum += chunk.sum(dim=0, dtype=torch.float64)
        # In the stored dtype where it is floating (a difference of floats is 0 only between
        # equal values); float64 where that overflows, and for integers, which could wrap.
        deviation = float((chunk - first.to(chunk.dtype)).abs().max()) if chunk.is_floating_point() else math.inf
        if not math.isfinite(deviation):
            deviation = float((chunk.to(torch.float64) - first).abs().max())
        spread = max(spread, deviation)
    if bad_values:
        raise NonFiniteError(
            f"{rows.name} contains {bad_values:,} non-finite values (NaN or ±inf) in {bad_rows:,} of "
            f"{rows.n:,} rows (first in row {first_bad:,}). Distance correlation needs finite numbers; "
            "check the data or the dump that produced it."
        )
    scale = math.ldexp(1.0, -math.frexp(spread)[1]) if spread > 0 else 1.0
    return _Scan(colsum / rows.n, scale, spread == 0.0)


def _check_pair(x: RowData, z: RowData, min_n: int, what: str) -> tuple[_Rows, _Rows]:
    xr, zr = _Rows(x, "X"), _Rows(z, "Z")
    if xr.n != zr.n:
        raise DataError(f"X and Z must have the same number of rows; got {xr.n:,} and {zr.n:,}.")
    if xr.n < min_n:
        raise UsageError(f"{what} needs at least {min_n} rows; got {xr.n:,}.")
    return xr, zr


def _check_constant_mode(constant: str) -> None:
    if constant not in ("zero", "error"):
        raise ConfigError(f"constant must be 'zero' or 'error'; got {constant!r}.")


def _any_constant(scan_x: _Scan, scan_z: _Scan, n: int, constant: str) -> bool:
    """Whether X or Z is constant; raises instead when ``constant="error"``."""
    for name, scan in (("X", scan_x), ("Z", scan_z)):
        if scan.constant and constant == "error":
            raise DataError(
                f"distance correlation is degenerate: {name} is constant (all {n:,} rows equal), so its "
                "distance variance is 0 and dCor is 0 by definition. Check that the right data was passed "
                "and that the layer's activations have not collapsed (e.g. a dead ReLU layer)."
            )
    return scan_x.constant or scan_z.constant


def _resolve(
    precision: str, block_size: int | None, device: str | torch.device | None, rows: _Rows
) -> tuple[torch.dtype, int, torch.device]:
    if precision not in ("float64", "float32"):
        raise ConfigError(f"precision must be 'float64' or 'float32'; got {precision!r}.")
    if block_size is not None and (not isinstance(block_size, int) or block_size < 1):
        raise ConfigError(f"block_size must be a positive integer; got {block_size!r}.")
    dtype = torch.float64 if precision == "float64" else torch.float32
    block = min(block_size or DEFAULT_BLOCK_SIZE, rows.n)
    dev = torch.device(device) if device is not None else rows.device
    return dtype, block, dev
