"""The exact blockwise pass (see :mod:`leakaudit.metrics.dcor`) and the statistics of its sums."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from leakaudit.distributed import Context
from leakaudit.metrics._dcor.rows import Progress, _any_constant, _check_constant_mode, _resolve, _Rows, _scan


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


def _correlation_of(s: _Sums, stat: Callable[[float, torch.Tensor, torch.Tensor, int], float]) -> float:
    """The correlation of ``stat`` (:func:`_v_stat` or :func:`_u_stat`) from one pass's sums."""
    cov = stat(s.s_ab, s.row_a, s.row_b, s.n)
    var_x = stat(s.s_aa, s.row_a, s.row_a, s.n)
    var_z = stat(s.s_bb, s.row_b, s.row_b, s.n)
    return _correlation(cov, var_x, var_z)


def _dcor_from_sums(s: _Sums | None) -> float:
    if s is None:
        return 0.0
    # The V-statistic dCov² is ≥ 0; a tiny negative value is rounding.
    return math.sqrt(max(_correlation_of(s, _v_stat), 0.0))


def _dcor_u2_from_sums(s: _Sums | None) -> float:
    return 0.0 if s is None else _correlation_of(s, _u_stat)
