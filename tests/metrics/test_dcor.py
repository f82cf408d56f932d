"""Distance correlation against the `dcor` package, closed forms and invariances.

Memory note: `dcor` 0.7 (with today's array_api_compat) computes multivariate distances by
broadcasting pairwise differences, n² · d · 8 bytes (about 8 GB at n = 1,000, d = 1,024).
Every reference call below keeps that product under 150 MB (n ≤ 300 with d ≤ 200, or
n = 800 with d ≤ 8); one-dimensional calls take its O(n log n) path.
"""

from __future__ import annotations

import math

import dcor
import h5py
import numpy as np
import pytest
import torch

from leakaudit.errors import ConfigError, DataError, NonFiniteError, UsageError
from leakaudit.metrics.dcor import (
    DcorStats,
    distance_correlation,
    distance_correlation_projection,
    distance_correlation_stats,
    distance_correlation_torch,
    distance_correlation_u2,
)


def _dependent(rng: np.random.Generator, n: int, x_shape: tuple[int, ...], k: int) -> tuple[np.ndarray, np.ndarray]:
    x = rng.standard_normal((n, *x_shape))
    flat = x.reshape(n, -1)
    z = np.tanh(flat[:, : min(3, flat.shape[1])] @ rng.standard_normal((min(3, flat.shape[1]), k)))
    return x, z + 0.5 * rng.standard_normal((n, k))


# n² · d · 8 bytes for the reference: 20 KB, 144 MB, 45 MB, 41 MB, 7 MB.
SHAPES = [(50, (3,), 2), (300, (200,), 20), (257, (17,), 5), (800, (8,), 3), (120, (1, 8, 8), 12)]


@pytest.mark.parametrize(("n", "x_shape", "k"), SHAPES)
@pytest.mark.parametrize("block_size", [None, 64, 7])
def test_matches_dcor_package(n: int, x_shape: tuple[int, ...], k: int, block_size: int | None) -> None:
    rng = np.random.default_rng(n + k)
    x, z = _dependent(rng, n, x_shape, k)
    flat = x.reshape(n, -1)
    stats = distance_correlation_stats(x, z, block_size=block_size, pvalue="none")
    assert stats.dcor == pytest.approx(dcor.distance_correlation(flat, z), abs=1e-9)
    assert stats.dcor_u2 == pytest.approx(dcor.u_distance_correlation_sqr(flat, z), abs=1e-9)


def test_single_value_functions_match_dcor_package() -> None:
    rng = np.random.default_rng(3)
    x, z = _dependent(rng, 200, (30,), 4)
    assert distance_correlation(x, z) == pytest.approx(dcor.distance_correlation(x, z), abs=1e-9)
    assert distance_correlation_u2(x, z) == pytest.approx(dcor.u_distance_correlation_sqr(x, z), abs=1e-9)


def test_torch_and_float32_inputs_match_dcor_package() -> None:
    rng = np.random.default_rng(4)
    x, z = _dependent(rng, 250, (40,), 6)
    reference = dcor.distance_correlation(x, z)
    assert distance_correlation(torch.from_numpy(x), torch.from_numpy(z)) == pytest.approx(reference, abs=1e-9)
    # float32 storage, float32 tiles: documented as ~1e-6 relative or better.
    x32, z32 = x.astype(np.float32), z.astype(np.float32)
    reference32 = dcor.distance_correlation(x32.astype(np.float64), z32.astype(np.float64))
    assert distance_correlation(x32, z32, precision="float32") == pytest.approx(reference32, rel=1e-6)


def test_t_test_matches_dcor_package() -> None:
    rng = np.random.default_rng(5)
    n = 200
    x = rng.standard_normal((n, 50))
    z = 0.05 * x[:, :10] + rng.standard_normal((n, 10))  # weak dependence: a p-value in (0, 1)
    stats = distance_correlation_stats(x, z, pvalue="t-test")
    reference = dcor.independence.distance_correlation_t_test(x, z)
    assert 1e-4 < reference.pvalue < 0.9
    assert stats.pvalue_method == "t-test"
    assert stats.statistic == pytest.approx(reference.statistic, rel=1e-8)
    assert stats.pvalue == pytest.approx(reference.pvalue, rel=1e-6)


def test_invariant_to_translation_scaling_rotation_of_x() -> None:
    rng = np.random.default_rng(6)
    x, z = _dependent(rng, 300, (12,), 5)
    rotation, _ = np.linalg.qr(rng.standard_normal((12, 12)))
    moved = 3.7 * x @ rotation + rng.standard_normal(12) * 100.0
    base = distance_correlation_stats(x, z, pvalue="none")
    assert abs(base.dcor - 0.5) < 0.45  # not a degenerate value that any transform keeps
    other = distance_correlation_stats(moved, z, pvalue="none")
    assert other.dcor == pytest.approx(base.dcor, abs=1e-9)
    assert other.dcor_u2 == pytest.approx(base.dcor_u2, abs=1e-9)


@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_exactly_one_for_affine_z(precision: str) -> None:
    rng = np.random.default_rng(7)
    x = rng.standard_normal((500, 20))
    z = -2.5 * x + rng.standard_normal(20)
    stats = distance_correlation_stats(x, z, pvalue="none", precision=precision, block_size=128)
    tolerance = 1e-12 if precision == "float64" else 1e-6
    assert stats.dcor == pytest.approx(1.0, abs=tolerance)
    assert stats.dcor_u2 == pytest.approx(1.0, abs=tolerance)


def test_bias_corrected_separates_independent_from_dependent_in_high_dimension() -> None:
    # The DESIGN.md claim: raw V-statistic dCor of *independent* X (d = 1,024) and Z (k = 120)
    # at n = 1,000 reads about 0.7, while the bias-corrected value stays ≈ 0.
    rng = np.random.default_rng(8)
    n = 1_000
    x = rng.random((n, 1_024))
    z = rng.standard_normal((n, 120))
    independent = distance_correlation_stats(x, z, pvalue="t-test")
    assert independent.dcor > 0.6
    assert abs(independent.dcor_u2) < 0.005
    assert independent.pvalue > 0.01
    weakly = z + (x[:, :120] - 0.5)  # small but real dependence
    dependent = distance_correlation_stats(x, weakly, pvalue="t-test")
    assert dependent.dcor_u2 > 0.015
    assert dependent.pvalue < 1e-6
    # Raw dCor hardly tells the two apart (measured 0.714 against 0.720).
    assert dependent.dcor - independent.dcor < 0.05


def test_bias_corrected_near_zero_at_large_n_low_dimension() -> None:
    rng = np.random.default_rng(9)
    n = 4_000
    stats = distance_correlation_stats(rng.standard_normal((n, 3)), rng.standard_normal((n, 2)), pvalue="none")
    # Under independence the U-statistic has mean 0 and sd O(1/n).
    assert abs(stats.dcor_u2) < 2e-3


def test_permutation_pvalue() -> None:
    rng = np.random.default_rng(10)
    x, z = _dependent(rng, 80, (5,), 3)
    dependent = distance_correlation_stats(x, z, pvalue="auto", num_permutations=199, seed=1)
    assert dependent.pvalue_method == "permutation"
    assert dependent.pvalue == pytest.approx(1 / 200)
    independent = distance_correlation_stats(x, rng.standard_normal((80, 3)), num_permutations=199, seed=1)
    assert independent.pvalue > 0.05
    # The permutation statistic is the U-centred distance covariance of dcor.
    assert dependent.statistic == pytest.approx(dcor.u_distance_covariance_sqr(x, z), rel=1e-9)


def test_projection_estimator_is_exact_in_one_dimension() -> None:
    rng = np.random.default_rng(11)
    n = 2_000
    x = rng.standard_normal(n)
    z = x**2 + 0.5 * rng.standard_normal(n)
    z[::5] = z[0]  # ties
    stats = distance_correlation_projection(x[:, None], z[:, None], num_projections=1)
    assert stats.method == "projection"
    assert stats.dcor == pytest.approx(dcor.distance_correlation(x, z), abs=1e-9)
    assert stats.dcor_u2 == pytest.approx(dcor.u_distance_correlation_sqr(x, z), abs=1e-9)


def test_projection_estimator_close_to_exact_in_high_dimension() -> None:
    rng = np.random.default_rng(1)
    n = 600
    x = rng.standard_normal((n, 20))
    z = np.tanh(x[:, :5] @ rng.standard_normal((5, 10))) + 0.3 * rng.standard_normal((n, 10))
    stats = distance_correlation_projection(x, z, num_projections=300, seed=0)
    # Measured spread at 300 projections: about ±0.05 over seeds (see RESULTS-metrics.md).
    assert stats.dcor == pytest.approx(dcor.distance_correlation(x, z), abs=0.1)
    assert stats.dcor_u2 == pytest.approx(dcor.u_distance_correlation_sqr(x, z), abs=0.1)


def test_h5py_dataset_read_in_blocks(tmp_path) -> None:
    rng = np.random.default_rng(12)
    x, z = _dependent(rng, 230, (4, 5), 7)
    path = tmp_path / "acts.h5"
    with h5py.File(path, "w") as handle:
        handle["inputs"] = x.astype(np.float32)
        handle["activations"] = z.astype(np.float16)
    with h5py.File(path, "r") as handle:
        stats = distance_correlation_stats(handle["inputs"], handle["activations"], block_size=50, pvalue="none")
    reference_x = x.astype(np.float32).astype(np.float64).reshape(230, -1)
    reference_z = z.astype(np.float16).astype(np.float64)
    assert stats.dcor == pytest.approx(dcor.distance_correlation(reference_x, reference_z), abs=1e-9)


def test_progress_reports_every_tile() -> None:
    rng = np.random.default_rng(13)
    x, z = _dependent(rng, 100, (3,), 2)
    calls: list[tuple[int, int]] = []
    distance_correlation(x, z, block_size=30, progress=lambda done, total: calls.append((done, total)))
    assert calls[0] == (0, 10)  # 4 row blocks → 4 · 5 / 2 upper-triangle tiles
    assert calls[-1] == (10, 10)
    assert [done for done, _ in calls] == list(range(11))


def test_torch_version_matches_dcor_package_and_gradcheck() -> None:
    rng = np.random.default_rng(14)
    x, z = _dependent(rng, 64, (2, 3, 3), 5)
    xt = torch.from_numpy(x).requires_grad_()
    zt = torch.from_numpy(z).requires_grad_()
    value = distance_correlation_torch(xt, zt)
    assert float(value.detach()) == pytest.approx(dcor.distance_correlation(x.reshape(64, -1), z), abs=1e-9)
    small_x = torch.randn(10, 4, dtype=torch.float64, requires_grad=True)
    small_z = torch.randn(10, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(distance_correlation_torch, (small_x, small_z))


def _plain_torch_dcor(x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """What a NoPeek implementation with plain torch.sqrt computes."""

    def centred(v: torch.Tensor) -> torch.Tensor:
        n2 = (v * v).sum(1)
        d = (n2[:, None] + n2[None, :] - 2 * v @ v.T).clamp_min(0).sqrt()
        return d - d.mean(0) - d.mean(1, keepdim=True) + d.mean()

    a, b = centred(x), centred(z)
    return ((a * b).mean() / ((a * a).mean() * (b * b).mean()).sqrt()).sqrt()


def test_torch_version_has_finite_gradients_where_plain_sqrt_gives_nan() -> None:
    torch.manual_seed(0)
    x = torch.rand(32, 20)
    layer = torch.nn.Linear(20, 8)
    with torch.no_grad():
        layer.bias.fill_(-100.0)  # a dead ReLU layer: Z constant, what a strong NoPeek weight drives to
    for fn, finite in ((_plain_torch_dcor, False), (distance_correlation_torch, True)):
        layer.zero_grad()
        z = torch.relu(layer(x))
        # Duplicated input rows make zero distances off the diagonal too.
        xd = torch.cat([x, x[:4]]).requires_grad_()
        zd = torch.relu(layer(xd))
        loss = fn(xd, zd) + fn(x, z)
        loss.backward()
        grads_finite = bool(torch.isfinite(xd.grad).all()) and bool(torch.isfinite(layer.weight.grad).all())
        assert (bool(torch.isfinite(loss)) and grads_finite) is finite, fn.__name__
    assert float(distance_correlation_torch(x, torch.zeros(32, 8))) == 0.0


def test_too_few_rows() -> None:
    with pytest.raises(UsageError, match="at least 4 rows; got 3"):
        distance_correlation_stats(np.eye(3), np.eye(3))
    with pytest.raises(UsageError, match="at least 2 rows; got 1"):
        distance_correlation(np.ones((1, 2)), np.ones((1, 2)))


@pytest.mark.parametrize("which", ["X", "Z"])
def test_constant_input_gives_zero_or_is_refused_on_request(which: str) -> None:
    # One behaviour for every kernel: dCor = 0 by definition, as dcor and the NoPeek loss give.
    rng = np.random.default_rng(15)
    varying = rng.standard_normal((50, 4))
    constant = np.full((50, 4), 0.3)
    x, z = (constant, varying) if which == "X" else (varying, constant)
    assert distance_correlation(x, z) == 0.0
    assert distance_correlation_u2(x, z) == 0.0
    assert float(distance_correlation_torch(torch.from_numpy(x), torch.from_numpy(z))) == 0.0
    stats = distance_correlation_stats(x, z, pvalue="t-test")
    assert (stats.dcor, stats.dcor_u2, stats.pvalue) == (0.0, 0.0, 1.0)
    assert distance_correlation_projection(x, z).dcor == 0.0
    with pytest.raises(DataError, match=rf"degenerate: {which} is constant \(all 50 rows equal\)"):
        distance_correlation(x, z, constant="error")
    with pytest.raises(DataError, match="constant"):
        distance_correlation_projection(x, z, constant="error")
    with pytest.raises(ConfigError, match="constant must be 'zero' or 'error'; got 'raise'"):
        distance_correlation(x, z, constant="raise")  # type: ignore[arg-type]


def test_non_finite_input_is_refused() -> None:
    x = np.random.default_rng(16).standard_normal((40, 3))
    x[7, 1] = np.nan
    x[9, 0] = np.inf
    with pytest.raises(NonFiniteError, match=r"X contains 2 non-finite values .* in 2 of 40 rows \(first in row 7\)"):
        distance_correlation(x, np.arange(40.0))


def test_bad_arguments() -> None:
    x = np.random.default_rng(17).standard_normal((20, 3))
    with pytest.raises(DataError, match="same number of rows; got 20 and 19"):
        distance_correlation(x, x[:19])
    with pytest.raises(ConfigError, match="precision must be"):
        distance_correlation(x, x, precision="float16")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="pvalue must be"):
        distance_correlation_stats(x, x, pvalue="exact")  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="limited to 10,000 rows"):
        distance_correlation_stats(np.zeros((10_001, 1)), np.zeros((10_001, 1)), pvalue="permutation")


def test_stats_is_a_frozen_record() -> None:
    stats = distance_correlation_stats(np.arange(10.0), np.arange(10.0) ** 2, pvalue="none")
    assert isinstance(stats, DcorStats)
    assert math.isfinite(stats.dcor) and stats.n == 10
    with pytest.raises(AttributeError):
        stats.dcor = 0.0  # type: ignore[misc]


@pytest.mark.slow
def test_float32_agrees_with_float64_at_scale() -> None:
    rng = np.random.default_rng(18)
    n = 6_000
    x = rng.random((n, 784), dtype=np.float32)
    z = np.maximum(x @ rng.standard_normal((784, 400), dtype=np.float32) * 0.05, 0) + rng.random((n, 400), dtype=np.float32)
    exact = distance_correlation_stats(x, z, pvalue="none")
    fast = distance_correlation_stats(x, z, pvalue="none", precision="float32")
    assert fast.dcor == pytest.approx(exact.dcor, rel=1e-6)
    assert fast.dcor_u2 == pytest.approx(exact.dcor_u2, rel=1e-5)
