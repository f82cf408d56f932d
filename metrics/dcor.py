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
  random data (timings in benchmarks/RESULTS.md).
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
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from leakaudit.distributed import Context
from leakaudit.errors import ConfigError, DataError, UsageError
from leakaudit.metrics._dcor.autograd import _double_centred, _SafeSqrt
from leakaudit.metrics._dcor.exact import _dcor_from_sums, _dcor_u2_from_sums, _pass, _u_stat, _v_stat
from leakaudit.metrics._dcor.projection import _abs_row_sums, _project, _sphere, _sum_abs_products
from leakaudit.metrics._dcor.pvalue import _permutation_test, _t_test
from leakaudit.metrics._dcor.rows import (
    Progress,
    RowData,
    _any_constant,
    _check_constant_mode,
    _check_pair,
    _resolve,
    _scan,
)

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

#: ``pvalue="auto"`` uses a permutation test up to this many rows and the t-test above it.
PERMUTATION_AUTO_MAX_N = 1_000
#: A permutation test keeps two n × n float64 matrices in memory; refuse beyond this.
PERMUTATION_MAX_N = 10_000


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
