"""Distance correlation between inputs X and split-layer activations Z.

What is computed (exponent 1, Euclidean distances on flattened rows):

* ``dcor`` — the V-statistic distance correlation of Székely, Rizzo & Bakirov (2007),
  the number NoPeek reports and :func:`dcor.distance_correlation` returns.
  Writing ``a_ij = |x_i - x_j|``, ``b_ij = |z_i - z_j|``, row sums ``a_i.`` and the total
  ``a..``, the squared distance covariance is

      dCov²_n(X, Z) = Σ a_ij b_ij / n² − 2 Σ_i a_i. b_i. / n³ + a.. b.. / n⁴

  and ``dCor² = dCov²(X, Z) / sqrt(dCov²(X, X) dCov²(Z, Z))``. It is biased upwards:
  for *independent* high-dimensional X and Z at n = 1,000 it reads 0.7 to 0.97 (DESIGN.md),
  so it is a number to compare with the papers, not evidence of independence.
* ``dcor_u2`` — the bias-corrected squared distance correlation (U-centring, Székely &
  Rizzo 2014), with the closed form of Huo & Székely (2016)

      Ω(a, b) = [Σ_{i≠j} a_ij b_ij − 2/(n−2) Σ_i a_i. b_i. + a.. b.. / ((n−1)(n−2))] / (n(n−3))

  and ``dcor_u2 = Ω(a, b) / sqrt(Ω(a, a) Ω(b, b))``. Its expectation is 0 under independence
  and it can be slightly negative; this is the number for "no leakage" claims and gates.

Both come out of one blockwise pass that accumulates ``Σ a_ij b_ij``, ``Σ a_ij²``,
``Σ b_ij²`` and the row sums. The pass walks the upper triangle of the n × n distance
matrices in ``block × block`` tiles (distances by the Gram trick, one matrix multiply per tile
and variable), so memory is O(n + block² + block · (d + k)) and never n × n, and the cost is
about ``n² (d + k)`` multiply-adds: half of the two full distance matrices, by symmetry.

Precision (``precision=``):

* ``"float64"`` (default): tiles in float64; agrees with the ``dcor`` package to ~1e-12 on
  random data. On 2 cores this ran n = 60,000 with d = 784, k = 400 in about a minute.
* ``"float32"``: tiles in float32 (about twice the matrix-multiply rate), every sum still
  accumulated in float64. Each variable is centred (dCor is translation invariant) and
  scaled by a power of two (it is scale invariant too) *before* the cast, in float64 where
  float32 does not hold the input exactly, so that offsets (data around 1e4 … 1e8) and
  extreme magnitudes cost nothing. Measured against ``dcor`` (tests/metrics/
  test_dcor_reference_suite.py): within 1e-8 on random data with offsets up to 1e8, and
  within 1e-7 on one-hot labels, repeated rows and dead-ReLU rows; about 1e-6 relative on
  large activation stores (benchmarks/RESULTS-metrics.md).

Either way the Gram trick, ``|x_i|² + |x_j|² − 2 x_i·x_j``, is inexact for (near-)duplicate
rows: it leaves a few ε of ``|x_i|² + |x_j|²`` where the true square is 0, and its square
root, ``sqrt(ε) · |x|``, would count duplicates as distinct (in float32 that moved dCor by
1e-5 on one-hot labels). Squared distances below 16 ε of ``|x_i| |x_j|`` are therefore set
to 0 (negative ones included, and the diagonal exactly); only pairs closer than about
``4 sqrt(ε)`` of their norms, whose distances rounding dominates anyway, are affected.

Constant data: a variable whose rows are all equal has distance variance 0, and dCor (and
``dcor_u2``) is then 0 by definition (Székely, Rizzo & Bakirov 2007), with p-value 1; the
``dcor`` package and :func:`distance_correlation_torch` agree. ``constant="error"`` refuses
such data instead (what an audit wants: there it means a wrong store or a collapsed layer).

Inputs are ``[n, ...]`` NumPy arrays, torch tensors, or any object with ``.shape`` and row
slicing (an ``h5py.Dataset``), read block by block so an activation store bigger than
memory still works (it is re-read about ``n / block`` times).

Under ``torchrun``, passing ``group`` (a :class:`leakaudit.distributed.Context`) to
:func:`distance_correlation_stats` splits the tiles across ranks: tile ``t`` of the
upper triangle (in the order the single-process pass walks them) goes to rank
``t mod world``; each rank accumulates its tiles' partial sums and row sums in float64, and
one all-reduce (float64) gives every rank the sums of the whole pass. Only the order of
the float64 additions differs from one process, so the result agrees with it to ~1e-12.
Every rank reads all of X and Z once for the column means, and the rows of its tiles.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol, Union

import numpy as np
import torch
from scipy import stats as _scipy_stats

from leakaudit.distributed import Context
from leakaudit.errors import ConfigError, DataError, NonFiniteError, UsageError

__all__ = [
    "DcorStats",
    "distance_correlation",
    "distance_correlation_u2",
    "distance_correlation_stats",
    "distance_correlation_projection",
    "distance_correlation_torch",
]

Precision = Literal["float64", "float32"]
Constant = Literal["zero", "error"]
PvalueMethod = Literal["auto", "t-test", "permutation", "none"]
Progress = Callable[[int, int], None]

#: ``pvalue="auto"`` uses a permutation test up to this many rows and the t-test above it.
PERMUTATION_AUTO_MAX_N = 1_000
#: A permutation test keeps two n × n float64 matrices in memory; refuse beyond this.
PERMUTATION_MAX_N = 10_000
#: Default tile side: 1,024² float64 tiles (8 MB each) stay in this machine's 32 MB L3
#: cache, which makes the elementwise work per tile cheap next to the matrix multiply.
DEFAULT_BLOCK_SIZE = 1_024


class RowDataset(Protocol):
    """Anything with a shape and row slicing that returns NumPy arrays (e.g. ``h5py.Dataset``)."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    def __getitem__(self, key: slice) -> np.ndarray: ...


RowData = Union[np.ndarray, torch.Tensor, RowDataset]


@dataclass(frozen=True)
class DcorStats:
    """Distance correlation statistics of one (X, Z) pair.

    Attributes:
        dcor: V-statistic distance correlation, exponent 1 (NoPeek, ``dcor.distance_correlation``).
        dcor_u2: Bias-corrected squared distance correlation (U-centred); ≈ 0 under independence.
        pvalue: p-value of the test of independence, or None when not computed.
        pvalue_method: ``"permutation"``, ``"t-test"`` or ``"none"``.
        n: Number of rows.
        method: ``"exact"`` (blockwise pass) or ``"projection"`` (Huang & Huo 2017 estimate).
        precision: Floating-point precision of the tiles (``"float64"`` or ``"float32"``).
        statistic: The test statistic: the t statistic for the t-test, the observed U-centred
            distance covariance for the permutation test, None otherwise.
        num_permutations: Permutations used by the permutation test, else None.
        num_projections: Random projections used by the projection estimator, else None.
    """

    dcor: float
    dcor_u2: float
    pvalue: float | None
    pvalue_method: str
    n: int
    method: str = "exact"
    precision: str = "float64"
    statistic: float | None = None
    num_permutations: int | None = None
    num_projections: int | None = None


# --------------------------------------------------------------------------- input access


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


# --------------------------------------------------------------------------- exact, blockwise


@dataclass(frozen=True)
class _Sums:
    """The sufficient statistics of one pass (all float64)."""

    n: int
    s_ab: float
    s_aa: float
    s_bb: float
    row_a: torch.Tensor
    row_b: torch.Tensor


#: A squared distance below this many ε of ``|g_i| |g_j|`` is set to 0. Where the true value
#: is 0 the Gram trick's rounding leaves about 1–5 ε of ``|g_i|² + |g_j|²`` (measured, float32
#: and float64 alike), whose square root, ~sqrt(ε) · |g|, would count duplicate rows (one-hot
#: labels, dead ReLU rows) as distinct; only pairs closer than ~4 sqrt(ε) of their norms, whose
#: distances are rounding-dominated anyway, lose them.
_TIE_EPS = 16.0


def _distances(gi: torch.Tensor, ni: torch.Tensor, gj: torch.Tensor, nj: torch.Tensor, same: bool) -> torch.Tensor:
    """Euclidean distances between the rows of two centred blocks, by the Gram trick."""
    d2 = torch.addmm(ni[:, None], gi, gj.T, alpha=-2.0)
    d2.add_(nj[None, :])
    # Compared relative to |g_i| |g_j| by scaling rows and columns in place: a scalar
    # threshold is one fast pass, where a per-pair bound matrix and a mask cost several.
    inv_i = ni.clamp_min(torch.finfo(ni.dtype).tiny).rsqrt()
    inv_j = nj.clamp_min(torch.finfo(nj.dtype).tiny).rsqrt()
    d2.mul_(inv_i[:, None]).mul_(inv_j[None, :])
    # Also zeroes what rounding pushed below 0.
    torch.threshold_(d2, _TIE_EPS * torch.finfo(d2.dtype).eps, 0.0)
    if same:
        d2.fill_diagonal_(0.0)
    return d2.sqrt_().mul_(inv_i.rsqrt()[:, None]).mul_(inv_j.rsqrt()[None, :])


def _centred(
    rows: _Rows,
    start: int,
    stop: int,
    mean: torch.Tensor,
    scale: float,
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``start:stop`` minus the column means (``mean``: float64) times ``scale``, and their squared norms.

    Data that ``dtype`` does not hold exactly (float64 or wide integers in float32 tiles) is
    centred in float64 before the cast: a cast first would round an offset's digits into the
    differences (data around 1e8 would come out constant). Data it holds exactly is centred
    in ``dtype``, which loses nothing more: the rounded mean only shifts every row alike.
    """
    block = rows.block(start, stop).to(device=device, non_blocking=True)
    if _holds_exactly(dtype, block.dtype):
        block = block.to(dtype) - mean.to(dtype)
    else:
        block = (block.to(torch.float64) - mean).to(dtype)
    block.mul_(scale)  # a power of two: exact
    # Squared norms summed in float64: a float32 BLAS dot (einsum) was measured 1.5e-6 off,
    # which biased float32 dCor by 1e-5; an accurate norm leaves only the Gram rounding.
    return block, (block * block).sum(dim=1, dtype=torch.float64).to(dtype)


#: Significand bits of the floating dtypes, for :func:`_holds_exactly`.
_SIGNIFICAND = {torch.float64: 53, torch.float32: 24, torch.bfloat16: 8, torch.float16: 11}


def _holds_exactly(wide: torch.dtype, narrow: torch.dtype) -> bool:
    """Whether every value of ``narrow`` is a value of the floating dtype ``wide``."""
    if narrow == torch.bool:
        return True
    if narrow.is_floating_point:
        nested = {torch.float16, torch.bfloat16} != {wide, narrow}
        return nested and _SIGNIFICAND.get(narrow, 64) <= _SIGNIFICAND[wide]
    return torch.iinfo(narrow).bits <= _SIGNIFICAND[wide]


def _pass(
    xr: _Rows,
    zr: _Rows,
    *,
    precision: str,
    block_size: int | None,
    device: str | torch.device | None,
    progress: Progress | None,
    group: Context | None = None,
    constant: str = "zero",
) -> _Sums | None:
    """The sums of one blockwise pass, or None when X or Z is constant (dCor = 0)."""
    dtype, block, dev = _resolve(precision, block_size, device, xr)
    _check_constant_mode(constant)
    scan_x, scan_z = _scan(xr, block), _scan(zr, block)
    if _any_constant(scan_x, scan_z, xr.n, constant):
        return None
    mean_x, scale_x = scan_x.mean.to(dev), scan_x.scale
    mean_z, scale_z = scan_z.mean.to(dev), scan_z.scale

    n = xr.n
    starts = list(range(0, n, block))
    total = len(starts) * (len(starts) + 1) // 2
    rank, world = (0, 1) if group is None else (group.rank, group.world_size)
    if group is not None:
        total = len(range(rank, total, world))  # this rank's tiles
    tile = -1  # position of the tile in the single-process order
    done = 0
    if progress is not None:
        progress(0, total)
    acc = torch.zeros(3, dtype=torch.float64, device=dev)  # Σab, Σaa, Σbb
    row_a = torch.zeros(n, dtype=torch.float64, device=dev)
    row_b = torch.zeros(n, dtype=torch.float64, device=dev)
    with torch.no_grad():
        for bi, i0 in enumerate(starts):
            i1 = min(i0 + block, n)
            if world > 1 and not any((tile + 1 + t) % world == rank for t in range(min(world, len(starts) - bi))):
                tile += len(starts) - bi  # none of this row's tiles is ours: skip reading it
                continue
            xi, nxi = _centred(xr, i0, i1, mean_x, scale_x, dtype, dev)
            zi, nzi = _centred(zr, i0, i1, mean_z, scale_z, dtype, dev)
            for j0 in starts[bi:]:
                tile += 1
                if world > 1 and tile % world != rank:
                    continue
                j1 = min(j0 + block, n)
                same = j0 == i0
                if same:
                    xj, nxj, zj, nzj = xi, nxi, zi, nzi
                else:
                    xj, nxj = _centred(xr, j0, j1, mean_x, scale_x, dtype, dev)
                    zj, nzj = _centred(zr, j0, j1, mean_z, scale_z, dtype, dev)
                # float32 tiles are widened before any sum: dCov² is a small difference of
                # large sums (of relative size ~1/d for concentrated distances), so float32
                # accumulation measured 1e-5 relative error in dCor even with short sums.
                a = _distances(xi, nxi, xj, nxj, same).to(torch.float64)
                b = _distances(zi, nzi, zj, nzj, same).to(torch.float64)
                # Off-diagonal tiles stand for themselves and their transposes.
                weight = 1.0 if same else 2.0
                acc += weight * torch.stack(
                    [_dot64(a, b), _dot64(a, a), _dot64(b, b)]
                )
                row_a[i0:i1] += a.sum(dim=1)
                row_b[i0:i1] += b.sum(dim=1)
                if not same:
                    row_a[j0:j1] += a.sum(dim=0)
                    row_b[j0:j1] += b.sum(dim=0)
                del a, b
                done += 1
                if progress is not None:
                    progress(done, total)
    if group is not None:
        import torch.distributed as dist

        # One float64 all-reduce of everything the pass accumulated.
        packed = torch.cat([acc, row_a, row_b])
        dist.all_reduce(packed, op=dist.ReduceOp.SUM)
        acc, row_a, row_b = packed[:3], packed[3 : 3 + n], packed[3 + n :]
    s_ab, s_aa, s_bb = (float(v) for v in acc.cpu())
    return _Sums(n, s_ab, s_aa, s_bb, row_a.cpu(), row_b.cpu())


def _dot64(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ a_ij b_ij of two float64 tiles."""
    return torch.dot(a.view(-1), b.view(-1))


def _v_stat(s_ab: float, row_a: torch.Tensor, row_b: torch.Tensor, n: int) -> float:
    return s_ab / n**2 - 2.0 * float(row_a @ row_b) / n**3 + float(row_a.sum()) * float(row_b.sum()) / n**4


def _u_stat(s_ab: float, row_a: torch.Tensor, row_b: torch.Tensor, n: int) -> float:
    return (
        s_ab - 2.0 / (n - 2) * float(row_a @ row_b) + float(row_a.sum()) * float(row_b.sum()) / ((n - 1) * (n - 2))
    ) / (n * (n - 3))


def _correlation(cov: float, var_x: float, var_z: float) -> float:
    """``cov / sqrt(var_x var_z)`` clipped to [−1, 1]; 0 where a variance is not positive.

    0 is the definition of Székely, Rizzo & Bakirov (2007) when a distance variance
    vanishes, and what ``dcor`` returns. The clip removes rounding beyond a bound that holds
    exactly (Cauchy–Schwarz), e.g. 1 + 1e-7 for an affine Z in float32.
    """
    if not (var_x > 0 and var_z > 0):
        return 0.0
    return min(max(cov / math.sqrt(var_x * var_z), -1.0), 1.0)


def _dcor_from_sums(s: _Sums | None) -> float:
    if s is None:
        return 0.0
    cov = _v_stat(s.s_ab, s.row_a, s.row_b, s.n)
    var_x = _v_stat(s.s_aa, s.row_a, s.row_a, s.n)
    var_z = _v_stat(s.s_bb, s.row_b, s.row_b, s.n)
    # The V-statistic dCov² is ≥ 0; a tiny negative value is rounding.
    return math.sqrt(max(_correlation(cov, var_x, var_z), 0.0))


def _dcor_u2_from_sums(s: _Sums | None) -> float:
    if s is None:
        return 0.0
    cov = _u_stat(s.s_ab, s.row_a, s.row_b, s.n)
    var_x = _u_stat(s.s_aa, s.row_a, s.row_a, s.n)
    var_z = _u_stat(s.s_bb, s.row_b, s.row_b, s.n)
    return _correlation(cov, var_x, var_z)


def distance_correlation(
    x: RowData,
    z: RowData,
    *,
    block_size: int | None = None,
    device: str | torch.device | None = None,
    precision: Precision = "float64",
    progress: Progress | None = None,
    constant: Constant = "zero",
) -> float:
    """Distance correlation dCor(X, Z), the V-statistic with exponent 1.

    The value NoPeek reports and ``dcor.distance_correlation(x, z)`` returns, computed exactly
    in one blockwise pass that never holds an n × n matrix (see the module docstring). It is
    biased upwards, strongly so in high dimension; use :func:`distance_correlation_u2` to
    claim independence.

    Args:
        x: Inputs, ``[n, ...]`` (NumPy array, torch tensor or h5py dataset); rows are flattened.
        z: Activations, ``[n, ...]``, same n.
        block_size: Tile side in rows; memory grows with its square. Default 1,024.
        device: Torch device for the tiles (e.g. ``"cuda"``); default: where ``x`` lives.
        precision: ``"float64"`` (exact to ~1e-12) or ``"float32"`` (about 2× faster on CPU,
            within 1e-7 on the inputs the module docstring lists).
        progress: Called as ``progress(done, total)`` with tile counts.
        constant: ``"zero"``: a constant X or Z gives 0 (the definition); ``"error"``: raise.

    Returns:
        dCor in [0, 1].

    Raises:
        UsageError: Fewer than 2 rows.
        DataError: Different numbers of rows, non-numeric data, or (``constant="error"``)
            X or Z constant.
        NonFiniteError: NaN or infinite values.
        ConfigError: Invalid ``precision``, ``block_size`` or ``constant``.
    """
    xr, zr = _check_pair(x, z, 2, "distance correlation")
    sums = _pass(
        xr, zr, precision=precision, block_size=block_size, device=device, progress=progress, constant=constant
    )
    return _dcor_from_sums(sums)


def distance_correlation_u2(
    x: RowData,
    z: RowData,
    *,
    block_size: int | None = None,
    device: str | torch.device | None = None,
    precision: Precision = "float64",
    progress: Progress | None = None,
    constant: Constant = "zero",
) -> float:
    """Bias-corrected squared distance correlation (U-centred, Székely & Rizzo 2014).

    Equal to ``dcor.u_distance_correlation_sqr(x, z)``. Unbiased for the population dCov²
    in the numerator, so it is ≈ 0 (and may be slightly negative) for independent X and Z
    at any dimension, unlike the V-statistic. Same pass and arguments as
    :func:`distance_correlation`.

    Args:
        x: Inputs, ``[n, ...]``.
        z: Activations, ``[n, ...]``.
        block_size: Tile side in rows.
        device: Torch device for the tiles.
        precision: ``"float64"`` or ``"float32"``.
        progress: Called as ``progress(done, total)``.
        constant: ``"zero"``: a constant X or Z gives 0; ``"error"``: raise.

    Returns:
        The bias-corrected dCor², in [-1, 1].

    Raises:
        UsageError: Fewer than 4 rows (the U-statistic divides by n − 3).
        DataError: Different numbers of rows, or (``constant="error"``) X or Z constant.
        NonFiniteError: NaN or infinite values.
    """
    xr, zr = _check_pair(x, z, 4, "bias-corrected distance correlation")
    sums = _pass(
        xr, zr, precision=precision, block_size=block_size, device=device, progress=progress, constant=constant
    )
    return _dcor_u2_from_sums(sums)


def distance_correlation_stats(
    x: RowData,
    z: RowData,
    *,
    pvalue: PvalueMethod = "auto",
    num_permutations: int = 999,
    seed: int = 0,
    block_size: int | None = None,
    device: str | torch.device | None = None,
    precision: Precision = "float64",
    progress: Progress | None = None,
    group: Context | None = None,
    constant: Constant = "zero",
) -> DcorStats:
    """dCor, bias-corrected dCor² and a p-value of independence from one pass.

    P-values (``pvalue=``):

    * ``"t-test"``: the distance-correlation t-test of Székely & Rizzo (2013),
      ``T = sqrt(v − 1) R / sqrt(1 − R²)`` with ``R = dcor_u2`` and ``v = n(n − 3)/2``,
      one-sided against a Student t with ``v − 1`` degrees of freedom; as
      ``dcor.independence.distance_correlation_t_test``. Free once the pass is done. Its
      null distribution is exact only as the dimensions of X and Z grow (fine for images
      and activations); in low dimension it is an approximation.
    * ``"permutation"``: ``num_permutations`` random row permutations of Z (seeded) of the
      U-centred distance covariance; p = (1 + #{permuted ≥ observed}) / (1 + permutations).
      Valid at any dimension, but keeps two n × n float64 matrices in memory, so it is
      refused above 10,000 rows.
    * ``"auto"`` (default): permutation up to 1,000 rows, t-test above.
    * ``"none"``: no p-value.

    Args:
        x: Inputs, ``[n, ...]``.
        z: Activations, ``[n, ...]``.
        pvalue: Which test, see above.
        num_permutations: Permutations for the permutation test.
        seed: Seed of the permutations.
        block_size: Tile side in rows.
        device: Torch device for the tiles.
        precision: ``"float64"`` or ``"float32"``.
        progress: Called as ``progress(done, total)`` with tile counts (this rank's, under ``torchrun``).
        group: Under ``torchrun``, this process's place in the group: the tiles are split
            across ranks and every rank returns the same statistics (see the module
            docstring); every rank must call with the same arguments. The permutation test,
            if any, runs whole on every rank. ``None``: one process does everything.
        constant: ``"zero"``: a constant X or Z gives dcor = dcor_u2 = 0 and p = 1 without a
            pass; ``"error"``: raise.

    Returns:
        The statistics; ``method="exact"``.

    Raises:
        UsageError: Fewer than 4 rows, or a permutation test asked for above 10,000 rows.
        DataError: Different numbers of rows, or (``constant="error"``) X or Z constant.
        NonFiniteError: NaN or infinite values.
        ConfigError: Invalid ``pvalue``, ``num_permutations``, ``precision`` or ``block_size``.
    """
    if pvalue not in ("auto", "t-test", "permutation", "none"):
        raise ConfigError(f"pvalue must be 'auto', 't-test', 'permutation' or 'none'; got {pvalue!r}.")
    if not isinstance(num_permutations, int) or num_permutations < 1:
        raise ConfigError(f"num_permutations must be a positive integer; got {num_permutations!r}.")
    xr, zr = _check_pair(x, z, 4, "distance correlation with a p-value")
    n = xr.n
    if pvalue == "auto":
        pvalue = "permutation" if n <= PERMUTATION_AUTO_MAX_N else "t-test"
    if pvalue == "permutation" and n > PERMUTATION_MAX_N:
        raise UsageError(
            f"a permutation test keeps two n × n matrices in memory and is limited to "
            f"{PERMUTATION_MAX_N:,} rows; got {n:,}. Use pvalue='t-test'."
        )
    sums = _pass(
        xr,
        zr,
        precision=precision,
        block_size=block_size,
        device=device,
        progress=progress,
        group=group,
        constant=constant,
    )
    dcor_v = _dcor_from_sums(sums)
    dcor_u2 = _dcor_u2_from_sums(sums)
    if sums is None:
        # A constant variable is independent of everything: every permutation ties with the
        # observed statistic, so p = 1 by either test.
        method = "none" if pvalue == "none" else pvalue
        p = None if pvalue == "none" else 1.0
        stat = None if pvalue == "none" else 0.0
        perms = num_permutations if pvalue == "permutation" else None
        return DcorStats(0.0, 0.0, p, method, n, "exact", precision, stat, perms)
    if pvalue == "t-test":
        t, p = _t_test(dcor_u2, n)
        return DcorStats(dcor_v, dcor_u2, p, "t-test", n, "exact", precision, t)
    if pvalue == "permutation":
        stat, p = _permutation_test(xr, zr, num_permutations, seed, device)
        return DcorStats(dcor_v, dcor_u2, p, "permutation", n, "exact", precision, stat, num_permutations)
    return DcorStats(dcor_v, dcor_u2, None, "none", n, "exact", precision)


def _t_test(r: float, n: int) -> tuple[float, float]:
    v = n * (n - 3) / 2
    if r >= 1.0:
        return math.inf, 0.0
    t = math.sqrt(v - 1) * r / math.sqrt(1 - r * r)
    return t, float(_scipy_stats.t.sf(t, df=v - 1))


def _u_centred(rows: _Rows, device: torch.device) -> torch.Tensor:
    # Unscaled: the permutation statistic is a distance covariance, in the data's units.
    g, norms = _centred(rows, 0, rows.n, _scan(rows, rows.n).mean.to(device), 1.0, torch.float64, device)
    a = _distances(g, norms, g, norms, True)
    n = rows.n
    row = a.sum(dim=1)
    total = row.sum()
    a -= row[:, None] / (n - 2)
    a -= row[None, :] / (n - 2)
    a += total / ((n - 1) * (n - 2))
    a.fill_diagonal_(0.0)
    return a


def _permutation_test(
    xr: _Rows, zr: _Rows, num_permutations: int, seed: int, device: str | torch.device | None
) -> tuple[float, float]:
    dev = torch.device(device) if device is not None else xr.device
    with torch.no_grad():
        a = _u_centred(xr, dev)
        b = _u_centred(zr, dev)
        observed = float(torch.dot(a.view(-1), b.view(-1)))
        generator = torch.Generator().manual_seed(seed)
        exceed = 0
        for _ in range(num_permutations):
            perm = torch.randperm(xr.n, generator=generator).to(dev)
            permuted = float(torch.dot(a.view(-1), b[perm][:, perm].reshape(-1)))
            exceed += permuted >= observed
    n = xr.n
    return observed / (n * (n - 3)), (1 + exceed) / (1 + num_permutations)


# --------------------------------------------------------------------------- random projections


def _abs_row_sums(v: np.ndarray) -> np.ndarray:
    """Σ_j |v_i − v_j| for every i, in O(n log n)."""
    order = np.argsort(v, kind="stable")
    s = v[order]
    n = s.size
    csum = np.cumsum(s)
    before = csum - s
    rank = np.arange(n, dtype=np.float64)
    sums = s * (2.0 * rank - n + 1.0) - before + (csum[-1] - csum)
    out = np.empty(n, dtype=np.float64)
    out[order] = sums
    return out


def _sum_abs_products(x: np.ndarray, y: np.ndarray) -> float:
    """Σ_{i,j} |x_i − x_j| |y_i − y_j| in O(n log² n) (Huo & Székely 2016 in spirit).

    In x order, Σ_{i<j} (x_j − x_i)|y_j − y_i| = −Σ_{i<j}(x_j − x_i)(y_j − y_i) + 2 D with
    D = Σ over pairs i<j with y_i < y_j of (x_j − x_i)(y_j − y_i). The first term is
    n Σxy − Σx Σy; D needs, for every j, the count and the sums of x, y and xy over the
    "dominated" i (earlier in x order, smaller in y). Those come from a bottom-up merge sort
    on y, vectorised level by level with searchsorted.
    """
    n = x.size
    ox = np.argsort(x, kind="stable")
    xs, ys = x[ox], y[ox]
    rank = np.empty(n, dtype=np.int64)
    rank[np.argsort(ys, kind="stable")] = np.arange(n)  # unique ranks: ties in y add 0 anyway
    weights = np.stack([np.ones(n), xs, ys, xs * ys], axis=1)
    dominated = np.zeros((n, 4), dtype=np.float64)
    # Slot arrays: within each block of size s, sorted by y rank.
    slot_rank, slot_w, slot_id = rank.copy(), weights.copy(), np.arange(n)
    position = np.arange(n)
    s = 1
    while s < n:
        block = position // (2 * s)
        left = (position // s) % 2 == 0
        li, ri = np.nonzero(left)[0], np.nonzero(~left)[0]
        bl, br = block[li], block[ri]
        key_l = bl * n + slot_rank[li]
        key_r = br * n + slot_rank[ri]
        cum_l = np.zeros((li.size + 1, 4))
        np.cumsum(slot_w[li], axis=0, out=cum_l[1:])
        below_l = np.searchsorted(key_l, key_r)  # left keys below each right key
        # Every block before the last is full, so block b's left half starts at b·s.
        dominated[slot_id[ri]] += cum_l[below_l] - cum_l[br * s]
        below_r = np.searchsorted(key_r, key_l) - bl * s
        new_l = bl * 2 * s + (np.arange(li.size) - bl * s) + below_r
        new_r = br * 2 * s + (np.arange(ri.size) - br * s) + (below_l - br * s)
        order = np.empty(n, dtype=np.int64)
        order[new_l] = li
        order[new_r] = ri
        slot_rank, slot_w, slot_id = slot_rank[order], slot_w[order], slot_id[order]
        s *= 2
    c, sx, sy, sxy = dominated.T
    d = float(np.sum(c * xs * ys - xs * sy - ys * sx + sxy))
    pairs = n * float(np.dot(x, y)) - float(x.sum()) * float(y.sum())
    return 2.0 * (2.0 * d - pairs)


def _project(
    rows: _Rows, mean: torch.Tensor, directions: torch.Tensor, block: int, step: Callable[[], None]
) -> np.ndarray:
    """``(rows − mean) @ directions`` in float64, read block by block."""
    out = torch.empty(rows.n, directions.shape[1], dtype=torch.float64)
    for start in range(0, rows.n, block):
        stop = min(start + block, rows.n)
        chunk = rows.block(start, stop).to(torch.float64) - mean
        out[start:stop] = chunk @ directions
        step()
    return out.numpy()


def _sphere(generator: np.random.Generator, dim: int, count: int) -> torch.Tensor:
    u = generator.standard_normal((dim, count))
    u /= np.linalg.norm(u, axis=0, keepdims=True)
    return torch.from_numpy(u)


def distance_correlation_projection(
    x: RowData,
    z: RowData,
    *,
    num_projections: int = 100,
    seed: int = 0,
    block_size: int | None = None,
    progress: Progress | None = None,
    constant: Constant = "zero",
) -> DcorStats:
    """Random-projection estimate of dCor and bias-corrected dCor² (Huang & Huo 2017).

    For u uniform on the sphere, ``E_u |u·w| = |w| / C_p``, so the distance matrices are
    averages of one-dimensional ones, and the (bilinear) V- and U-statistics are averages
    of one-dimensional statistics, each computable in O(n log² n) without any n × n matrix.
    X is projected on ``num_projections`` pairs of independent directions (u, u') and Z on
    (v, v'); dCov²(X, Z) is estimated from (Xu, Zv), dCov²(X, X) from (Xu, Xu') and
    dCov²(Z, Z) from (Zv, Zv'); the constants C_p, C_q cancel in the correlation.

    Cost: one pass over the data (``n (d + k) · 4 · num_projections`` multiply-adds) plus
    ``3 · num_projections`` one-dimensional statistics. It is unbiased for each distance
    covariance, but the correlation is a ratio of noisy means: its error shrinks like
    ``1 / sqrt(num_projections)``; benchmarks/RESULTS-metrics.md reports it against the exact
    value. For one-dimensional X and Z it is exact. No p-value is computed.

    Args:
        x: Inputs, ``[n, ...]``.
        z: Activations, ``[n, ...]``.
        num_projections: Number of random projection pairs.
        seed: Seed of the projection directions.
        block_size: Rows read per block while projecting.
        progress: Called as ``progress(done, total)``.
        constant: ``"zero"``: a constant X or Z gives 0; ``"error"``: raise.

    Returns:
        The statistics with ``method="projection"``, ``pvalue=None``.

    Raises:
        UsageError: Fewer than 4 rows.
        DataError: Different numbers of rows, (``constant="error"``) X or Z constant, or a
            projected distance variance that is not positive.
        NonFiniteError: NaN or infinite values.
        ConfigError: Invalid ``num_projections`` or ``block_size``.
    """
    if not isinstance(num_projections, int) or num_projections < 1:
        raise ConfigError(f"num_projections must be a positive integer; got {num_projections!r}.")
    xr, zr = _check_pair(x, z, 4, "distance correlation by random projections")
    _, block, _ = _resolve("float64", block_size, None, xr)
    block = max(block, 4_096)  # only rows × directions are held, so read bigger blocks
    block = min(block, xr.n)
    _check_constant_mode(constant)
    scan_x, scan_z = _scan(xr, block), _scan(zr, block)
    if _any_constant(scan_x, scan_z, xr.n, constant):
        return DcorStats(0.0, 0.0, None, "none", xr.n, "projection", "float64", num_projections=num_projections)
    mean_x, mean_z = scan_x.mean, scan_z.mean
    n, k = xr.n, num_projections
    generator = np.random.default_rng(seed)
    dirs_x = _sphere(generator, xr.dim, 2 * k)
    dirs_z = _sphere(generator, zr.dim, 2 * k)
    reads = 2 * math.ceil(n / block)
    total = reads + k
    done = 0

    def step() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    if progress is not None:
        progress(0, total)
    px = _project(xr, mean_x, dirs_x, block, step)
    pz = _project(zr, mean_z, dirs_z, block, step)
    v = np.zeros(3)
    u = np.zeros(3)
    for i in range(k):
        xu, xu2, zv, zv2 = px[:, i], px[:, k + i], pz[:, i], pz[:, k + i]
        ra, ra2, rb, rb2 = (torch.from_numpy(_abs_row_sums(p)) for p in (xu, xu2, zv, zv2))
        for j, (p, q, rp, rq) in enumerate(((xu, zv, ra, rb), (xu, xu2, ra, ra2), (zv, zv2, rb, rb2))):
            s = _sum_abs_products(p, q)
            v[j] += _v_stat(s, rp, rq, n)
            u[j] += _u_stat(s, rp, rq, n)
        step()
    if v[1] <= 0 or v[2] <= 0 or u[1] <= 0 or u[2] <= 0:
        raise DataError(
            "the random-projection estimate of a distance variance is not positive; "
            "the data is (nearly) constant along the projections. Use the exact distance_correlation."
        )
    r2 = v[0] / math.sqrt(v[1] * v[2])
    return DcorStats(
        dcor=math.sqrt(max(r2, 0.0)),
        dcor_u2=float(u[0] / math.sqrt(u[1] * u[2])),
        pvalue=None,
        pvalue_method="none",
        n=n,
        method="projection",
        precision="float64",
        num_projections=k,
    )


# --------------------------------------------------------------------------- differentiable


class _SafeSqrt(torch.autograd.Function):
    """sqrt whose gradient is 0 (a subgradient) where the argument is 0, not infinite.

    At a zero distance (the diagonal, duplicate rows) the squared distance has zero
    gradient too, and autograd's inf · 0 would give NaN. dCor = 0 is a minimum of a
    non-negative function, where 0 is the right subgradient as well.
    """

    @staticmethod
    def forward(ctx: Any, value: torch.Tensor) -> torch.Tensor:
        root = value.clamp_min(0).sqrt()
        ctx.save_for_backward(root)
        return root

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (root,) = ctx.saved_tensors
        positive = root > 0
        return torch.where(positive, grad / (2 * torch.where(positive, root, torch.ones_like(root))), 0.0)


def _double_centred(x: torch.Tensor) -> torch.Tensor:
    x = x - x.mean(dim=0, keepdim=True)  # translation invariance; keeps the Gram trick accurate
    norms = (x * x).sum(dim=1)
    d2 = norms[:, None] + norms[None, :] - 2.0 * (x @ x.T)
    eye = torch.eye(x.shape[0], dtype=torch.bool, device=x.device)
    d = _SafeSqrt.apply(d2.masked_fill(eye, 0.0))
    return d - d.mean(dim=0, keepdim=True) - d.mean(dim=1, keepdim=True) + d.mean()


def distance_correlation_torch(x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Differentiable dCor(X, Z) of a batch (V-statistic, exponent 1), for training losses.

    The same quantity as :func:`distance_correlation`, as a torch scalar with gradients
    (the NoPeek loss). Memory is O(batch²): meant for minibatches. Square roots are taken
    with a zero subgradient at 0 (pairwise distances on the diagonal and between duplicate
    rows, and dCor itself), and a constant X or Z in the batch gives dCor = 0 with zero
    gradient (the definition, as :func:`distance_correlation` returns), instead of the NaN that plain ``torch.sqrt`` produces there and that a strong
    NoPeek weight otherwise runs into.

    Args:
        x: ``[b, ...]`` floating tensor; rows are flattened.
        z: ``[b, ...]`` floating tensor on the same device.

    Returns:
        A 0-d tensor in the dtype of ``x`` and ``z`` (promoted).

    Raises:
        DataError: Different batch sizes, fewer than 2 rows, or non-floating tensors.
    """
    if not (isinstance(x, torch.Tensor) and isinstance(z, torch.Tensor)):
        raise DataError("distance_correlation_torch expects torch tensors; use distance_correlation for arrays.")
    if x.ndim < 1 or z.ndim < 1 or x.shape[0] != z.shape[0]:
        raise DataError(
            f"X and Z must have the same number of rows; got shapes {tuple(x.shape)} and {tuple(z.shape)}."
        )
    if x.shape[0] < 2:
        raise UsageError(f"distance correlation needs at least 2 rows; got {x.shape[0]}.")
    if not (x.is_floating_point() and z.is_floating_point()):
        raise DataError(f"distance_correlation_torch needs floating tensors; got {x.dtype} and {z.dtype}.")
    dtype = torch.promote_types(x.dtype, z.dtype)
    a = _double_centred(x.reshape(x.shape[0], -1).to(dtype))
    b = _double_centred(z.reshape(z.shape[0], -1).to(dtype))
    dcov2 = (a * b).mean()
    dvar2 = (a * a).mean() * (b * b).mean()
    defined = dvar2 > 0
    r2 = torch.where(defined, dcov2 / _SafeSqrt.apply(torch.where(defined, dvar2, torch.ones_like(dvar2))), 0.0)
    return _SafeSqrt.apply(r2)
