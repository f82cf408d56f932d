"""Mutual information against the closed form for correlated Gaussians.

X ~ N(0, I_d) and Z = ρX + √(1 − ρ²) E have I(X; Z) = −(d/2) ln(1 − ρ²) nats.
All at n = 5,000, the size the issue's numbers were measured at.

Seed sensitivity, measured: KSG's sampling sd at d = 1, ρ = 0.5 is about 10 % of the truth
(−3 %, −8 %, −13 %, +18 % for data seeds 0–3), and in d = 4 at ρ = 0.5 it sits 9–11 % below
the truth for every seed. The default tests use data seed 0; the slow test averages six seeds.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from leakaudit.errors import ConfigError, DataError, NonFiniteError, UsageError
from leakaudit.metrics.mi import (
    MutualInformation,
    mi_drop,
    mutual_information_gaussian,
    mutual_information_ksg,
)

N = 5_000


def _gaussians(d: int, rho: float, seed: int = 0, n: int = N) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d))
    return x, rho * x + math.sqrt(1 - rho**2) * rng.standard_normal((n, d))


def _truth(d: int, rho: float) -> float:
    return -d / 2 * math.log(1 - rho**2)


@pytest.mark.parametrize(("d", "rho"), [(1, 0.5), (1, 0.9), (4, 0.5)])
def test_ksg_within_ten_percent_in_low_dimension(d: int, rho: float) -> None:
    estimate = mutual_information_ksg(*_gaussians(d, rho), k=3, dims=d)
    assert estimate.value == pytest.approx(_truth(d, rho), rel=0.10)
    assert (estimate.estimator, estimate.k, estimate.dims_x, estimate.dims_z) == ("ksg", 3, d, d)


def test_ksg_below_truth_and_increasing_in_rho_at_eight_dimensions() -> None:
    values = [mutual_information_ksg(*_gaussians(8, rho), dims=8).value for rho in (0.3, 0.6, 0.9)]
    truths = [_truth(8, rho) for rho in (0.3, 0.6, 0.9)]
    assert all(v < t for v, t in zip(values, truths))
    assert values[0] < values[1] < values[2]


@pytest.mark.parametrize(("d", "rho"), [(1, 0.5), (1, 0.9), (4, 0.5), (8, 0.6), (16, 0.6), (32, 0.6)])
def test_gaussian_within_five_percent_up_to_32_dimensions(d: int, rho: float) -> None:
    estimate = mutual_information_gaussian(*_gaussians(d, rho), dims=d)
    assert estimate.value == pytest.approx(_truth(d, rho), rel=0.05)


def test_gaussian_after_pca_reduction_of_wider_data() -> None:
    # 8 informative directions with large variance hidden among 64 features; PCA to 8 keeps them.
    rng = np.random.default_rng(1)
    x, z = _gaussians(8, 0.6)
    mix_x, _ = np.linalg.qr(rng.standard_normal((64, 64)))
    mix_z, _ = np.linalg.qr(rng.standard_normal((64, 64)))
    wide_x = np.hstack([3 * x, 0.1 * rng.standard_normal((N, 56))]) @ mix_x
    wide_z = np.hstack([3 * z, 0.1 * rng.standard_normal((N, 56))]) @ mix_z
    estimate = mutual_information_gaussian(wide_x, wide_z, dims=8)
    assert estimate.dims_x == estimate.dims_z == 8
    assert estimate.explained_x > 0.95
    assert estimate.value == pytest.approx(_truth(8, 0.6), rel=0.05)


@pytest.mark.parametrize("d", [8, 32])
def test_both_near_zero_for_independent_data(d: int) -> None:
    x, _ = _gaussians(d, 0.0, seed=2)
    z = np.random.default_rng(3).standard_normal((N, d))
    corrected = mutual_information_gaussian(x, z, dims=d)
    plug_in = mutual_information_gaussian(x, z, dims=d, bias_correction=False)
    assert abs(corrected.value) < 0.01
    # The uncorrected plug-in sits near pq / 2n (0.1 nats at d = 32): the correction matters.
    assert plug_in.value == pytest.approx(corrected.value + corrected.bias)
    assert corrected.bias == pytest.approx(d * d / (2 * N), rel=0.1)
    assert abs(mutual_information_ksg(x, z, dims=d).value) < 0.02


def test_seeded_and_accepts_tensors() -> None:
    x, z = _gaussians(20, 0.5, n=600)
    first = mutual_information_ksg(torch.from_numpy(x), torch.from_numpy(z), dims=5, seed=7)
    second = mutual_information_ksg(x, z, dims=5, seed=7)
    assert first == second


def test_mi_drop() -> None:
    x, z = _gaussians(4, 0.9, n=2_000)
    _, noisy = _gaussians(4, 0.5, n=2_000)
    baseline = mutual_information_gaussian(x, z, dims=4)
    hardened = mutual_information_gaussian(x, 0.5 * z + 0.9 * noisy, dims=4)
    drop = mi_drop(baseline, hardened)
    assert drop == pytest.approx(1 - hardened.value / baseline.value)
    assert 0.3 < drop < 1.0
    assert mi_drop(2.0, 0.5) == pytest.approx(0.75)
    with pytest.raises(ConfigError, match=r"same settings .* got gaussian\(dims=4, seed=0\) and ksg\(k=3, dims=4, seed=0\)"):
        mi_drop(baseline, mutual_information_ksg(x, z, dims=4))
    with pytest.raises(DataError, match="baseline mutual information is -0.01 nats"):
        mi_drop(-0.01, 0.0)


def test_bad_input() -> None:
    rng = np.random.default_rng(4)
    x = rng.standard_normal((50, 3))
    with pytest.raises(UsageError, match="KSG estimate with k = 3 needs at least 4 rows; got 3"):
        mutual_information_ksg(x[:3], x[:3])
    with pytest.raises(UsageError, match="with 8 \\+ 8 dimensions needs at least 18 rows; got 12"):
        mutual_information_gaussian(rng.standard_normal((12, 30)), rng.standard_normal((12, 30)), dims=8)
    with pytest.raises(DataError, match=r"Z is constant \(all 50 rows equal\)"):
        mutual_information_gaussian(x, np.ones((50, 2)))
    bad = x.copy()
    bad[4, 0] = np.inf
    with pytest.raises(NonFiniteError, match="X contains 1 non-finite values"):
        mutual_information_ksg(bad, x)
    with pytest.raises(ConfigError, match="dims must be a positive integer or None; got 0"):
        mutual_information_gaussian(x, x, dims=0)
    with pytest.raises(DataError, match="infinite"):
        mutual_information_gaussian(x, 2 * x + 1, dims=3)
    with pytest.raises(DataError, match="same number of rows"):
        mutual_information_ksg(x, x[:40])


def test_result_is_frozen() -> None:
    x, z = _gaussians(2, 0.5, n=300)
    estimate = mutual_information_gaussian(x, z, dims=2)
    assert isinstance(estimate, MutualInformation)
    with pytest.raises(AttributeError):
        estimate.value = 0.0  # type: ignore[misc]


@pytest.mark.slow
@pytest.mark.parametrize(("d", "rho"), [(1, 0.5), (1, 0.9), (4, 0.5)])
def test_ksg_within_ten_percent_on_average_over_seeds(d: int, rho: float) -> None:
    values = [mutual_information_ksg(*_gaussians(d, rho, seed=s), dims=d).value for s in range(6)]
    assert float(np.mean(values)) == pytest.approx(_truth(d, rho), rel=0.10)


@pytest.mark.slow
def test_ksg_saturates_at_high_dimension() -> None:
    # The measurement: near 1.1 nats whatever the truth (1.79 / 3.57 / 7.14).
    values = [mutual_information_ksg(*_gaussians(d, 0.6), dims=d).value for d in (8, 16, 32)]
    assert all(0.8 < v < 1.3 for v in values)
