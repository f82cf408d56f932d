"""Distance correlation against the `dcor` package's own test suite, case by case.

Ported from ``dcor/tests/test_dcor.py`` (dcor 0.7): each test names the case it comes from
and keeps its tolerance (``assertAlmostEqual`` is 7 decimal places unless ``places`` says
otherwise). Cases that do not transfer: ``double_centered`` and ``_dyad_update`` (internals
ours does not have), the method/compile-mode loops (ours has one exact method), Fraction and
Decimal vectors (ours computes in binary floating point), the Array API namespace, and the
distance *covariance* values, which ours does not return (the ones checked here through
the correlations built from them).

Edge cases follow, each against dcor's answer. Memory: dcor broadcasts pairwise differences
(n² · d · 8 bytes); every call here stays below 20 MB.
"""

from __future__ import annotations

import dcor
import numpy as np
import pytest
import torch

from leakaudit.metrics.dcor import (
    distance_correlation,
    distance_correlation_projection,
    distance_correlation_stats,
    distance_correlation_torch,
    distance_correlation_u2,
)

ARR1 = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])[:, None]
ARR2 = np.array([1.0, 7.0, 5.0, 5.0, 6.0, 2.0])[:, None]


# --------------------------------------------------------------------------- ported cases


def test_distance_correlation_multivariate() -> None:
    """TestDistanceCorrelation.test_distance_correlation_multivariate (energy package values)."""
    matrix1 = np.array(((1, 2, 3), (4, 5, 6), (7, 8, 9)))
    matrix2 = np.array(((7, 3, 6), (2, 1, 4), (3, 8, 1)))
    matrix3 = np.array(((1, 1, 1), (2, 1, 1), (1, 1, 1)))
    constant_matrix = np.ones((3, 3))
    assert distance_correlation(matrix1, matrix1) ** 2 == pytest.approx(1, abs=0.5e-7)
    assert distance_correlation(matrix1, constant_matrix) ** 2 == pytest.approx(0, abs=0.5e-7)
    assert distance_correlation(matrix1, matrix2) ** 2 == pytest.approx(0.93387, abs=0.5e-5)
    assert distance_correlation(matrix1, matrix3) ** 2 == pytest.approx(0.31623, abs=0.5e-5)


def test_distance_correlation_comparison() -> None:
    """TestDistanceCorrelation.test_distance_correlation_comparison (the correlations)."""
    assert distance_correlation_u2(ARR1, ARR2) == pytest.approx(-0.41613, abs=0.5e-5)
    assert distance_correlation_u2(ARR1, ARR1) == pytest.approx(1, abs=0.5e-5)
    assert distance_correlation_u2(ARR2, ARR2) == pytest.approx(1, abs=0.5e-5)
    assert distance_correlation(ARR1, ARR2) ** 2 == pytest.approx(0.30661, abs=0.5e-5)
    assert distance_correlation(ARR1, ARR1) ** 2 == pytest.approx(1, abs=0.5e-5)
    assert distance_correlation(ARR2, ARR2) ** 2 == pytest.approx(1, abs=0.5e-5)
    stats = distance_correlation_stats(ARR1, ARR2, pvalue="none")
    np.testing.assert_allclose((stats.dcor_u2, stats.dcor**2), (-0.41613, 0.30661), rtol=1e-4)
    # float32: the constants are rounded to 5 places and the exact u2 (−0.4161252) sits
    # 4.8e-6 from its constant, so float32 is held to dcor's own value instead.
    fast = distance_correlation_stats(ARR1, ARR2, pvalue="none", precision="float32")
    assert fast.dcor_u2 == pytest.approx(float(dcor.u_distance_correlation_sqr(ARR1, ARR2)), abs=1e-6)
    assert fast.dcor == pytest.approx(float(dcor.distance_correlation(ARR1, ARR2)), abs=1e-6)


@pytest.mark.parametrize("kind", [float, int])
def test_distance_correlation_vector_generic(kind: type) -> None:
    """test_(u_)distance_correlation_vector and _ints: 1-D vectors of floats and ints."""
    arr1 = np.array([kind(i) for i in range(1, 7)])
    arr2 = np.array([kind(i) for i in (1, 7, 5, 5, 6, 2)])
    assert isinstance(distance_correlation(arr1, arr2), float)
    assert distance_correlation(arr1[:, None], arr2[:, None]) ** 2 == pytest.approx(0.3066099, abs=0.5e-6)
    assert distance_correlation_u2(arr1[:, None], arr2[:, None]) == pytest.approx(-0.41613, abs=0.5e-5)
    assert distance_correlation_u2(arr1[:, None], arr1[:, None]) == pytest.approx(1, abs=0.5e-5)


@pytest.mark.parametrize("seed", range(5))
def test_fast_naive_statistic_and_u_statistic(seed: int) -> None:
    """test_fast_naive_statistic / test_u_statistic: random (i, 1) pairs, i = 4 … 10, vs naive."""
    random_state = np.random.RandomState(seed)
    for i in range(4, 11):
        arr1, arr2 = random_state.rand(i, 1), random_state.rand(i, 1)
        naive_v = dcor.distance_correlation_sqr(arr1, arr2, method="naive")
        naive_u = dcor.u_distance_correlation_sqr(arr1, arr2, method="naive")
        assert distance_correlation(arr1, arr2) ** 2 == pytest.approx(float(naive_v), abs=0.5e-7)
        assert distance_correlation_u2(arr1, arr2) == pytest.approx(float(naive_u), abs=0.5e-7)


def test_dcor_constant() -> None:
    """test_dcor_constant: a constant variable has dCor 0 (with itself too)."""
    a = np.ones(100)[:, None]
    assert distance_correlation(a, a) == pytest.approx(0, abs=0.5e-7)
    assert float(distance_correlation_torch(torch.from_numpy(a), torch.from_numpy(a))) == 0.0


def test_integer_overflow() -> None:
    """test_integer_overflow (dcor issue #59): int64 inputs agree with floats.

    The reference uses 30,000 rows; the exact pass is O(n²), so it runs at 3,000 here, and
    the full size goes through the projection estimator, which is exact in one dimension.
    """
    for n_samples in (1_000, 10_000):
        arr1 = np.array([1, 2, 3] * n_samples, dtype=np.int64)[:, None]
        arr2 = np.array([10, 20, 5] * n_samples, dtype=np.int64)[:, None]
        if n_samples == 1_000:
            kernel = distance_correlation
        else:
            kernel = lambda a, b: distance_correlation_projection(a, b, num_projections=1).dcor  # noqa: E731
        float_float = kernel(arr1.astype(float), arr2.astype(float))
        for a, b in ((arr1, arr2), (arr1.astype(float), arr2), (arr1, arr2.astype(float))):
            assert kernel(a, b) == pytest.approx(float_float, abs=0.5e-7)
        assert float_float == pytest.approx(float(dcor.distance_correlation(arr1[:, 0], arr2[:, 0])), abs=0.5e-7)


def test_array_api_values() -> None:
    """TestDcorArrayAPI: the 4 × 4 matrix and the 0/1 column, correlations and their squares."""
    a = np.arange(1.0, 17.0).reshape(4, 4)
    b = np.array([[1.0], [0.0], [0.0], [1.0]])
    assert distance_correlation(a, a) ** 2 == pytest.approx(1.0, abs=0.5e-7)
    assert distance_correlation(a, b) ** 2 == pytest.approx(0.277350098, abs=0.5e-7)
    assert distance_correlation(b, b) ** 2 == pytest.approx(1.0, abs=0.5e-7)
    assert distance_correlation(a, b) == pytest.approx(0.526640387, abs=0.5e-7)
    assert distance_correlation_u2(a, a) == pytest.approx(1.0, abs=0.5e-7)
    assert distance_correlation_u2(a, b) == pytest.approx(-0.5, abs=0.5e-7)
    assert distance_correlation_u2(b, b) == pytest.approx(1.0, abs=0.5e-7)


# --------------------------------------------------------------------------- edge cases


def _pair(seed: int = 0, n: int = 300, d: int = 20) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d))
    return x, np.tanh(x[:, :3] @ rng.standard_normal((3, 5))) + 0.5 * rng.standard_normal((n, 5))


def test_negative_strides_are_copied() -> None:
    x, z = _pair()
    reference = dcor.distance_correlation(x, z)
    assert distance_correlation(x[::-1], z[::-1]) == pytest.approx(reference, abs=1e-12)
    assert distance_correlation(x[:, ::-1], z) == pytest.approx(reference, abs=1e-12)  # a column flip (BGR → RGB)
    assert distance_correlation(x.astype(">f8"), z) == pytest.approx(reference, abs=1e-12)


@pytest.mark.parametrize("offset", [1e4, 1e6, 1e8])
def test_offset_is_removed_before_the_float32_cast(offset: float) -> None:
    x, z = _pair()
    reference = float(dcor.distance_correlation(x, z))
    # float64 inputs carrying the offset lose offset · 1e-16 of each value, nothing more.
    assert distance_correlation(x + offset, z) == pytest.approx(reference, abs=1e-9)
    assert distance_correlation(x + offset, z, precision="float32") == pytest.approx(reference, abs=1e-8)
    assert distance_correlation_u2(x + offset, z, precision="float32") == pytest.approx(
        float(dcor.u_distance_correlation_sqr(x, z)), abs=1e-8
    )


def test_uint64_beyond_two_to_the_63() -> None:
    rng = np.random.default_rng(1)
    small = rng.integers(0, 2**40, (200, 2))
    x = small.astype(np.uint64) + np.uint64(2**63)
    z = np.sqrt(small[:, :1].astype(np.float64)) + rng.standard_normal((200, 1)) * 100
    reference = float(dcor.distance_correlation(small.astype(np.float64), z))
    assert reference > 0.5
    assert distance_correlation(x, z) == pytest.approx(reference, abs=1e-9)


def test_constant_is_zero_in_every_kernel() -> None:
    x, z = _pair()
    constant = np.full_like(z, 7.0)
    assert float(dcor.distance_correlation(x, constant)) == 0.0
    assert distance_correlation(x, constant) == 0.0
    assert distance_correlation_u2(x, constant) == 0.0
    assert float(distance_correlation_torch(torch.from_numpy(x), torch.from_numpy(constant))) == 0.0


def test_results_are_clamped_to_their_ranges() -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((400, 6)).astype(np.float32)
    for precision in ("float64", "float32"):
        stats = distance_correlation_stats(x, 3 * x + 1, pvalue="none", precision=precision)
        assert 1 - 1e-6 <= stats.dcor <= 1.0
        assert 1 - 1e-6 <= stats.dcor_u2 <= 1.0


# --------------------------------------------------------------------------- stated accuracy


def _duplicate_heavy(seed: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, 800)
    onehot = np.eye(10)[labels]
    activations = onehot @ rng.standard_normal((10, 8)) + 0.3 * rng.standard_normal((800, 8))
    rows = np.repeat(rng.standard_normal((40, 30)), 10, axis=0)  # every row 10 times
    dead = np.maximum(rows[:, :6] @ rng.standard_normal((6, 12)) - 1.0, 0)  # ReLU: many all-zero rows
    return [("one-hot X", onehot, activations), ("one-hot Z", activations, onehot),
            ("repeated rows", rows, np.tanh(rows[:, :4])), ("dead ReLU rows", rows, dead)]  # fmt: skip


@pytest.mark.parametrize("seed", [0, 1])
def test_stated_float32_accuracy_on_duplicate_heavy_data(seed: int) -> None:
    """The module docstring's figure: float32 within 1e-7 of dcor on one-hot and repeated rows."""
    for name, x, z in _duplicate_heavy(seed):
        v = float(dcor.distance_correlation(x, z))
        u = float(dcor.u_distance_correlation_sqr(x, z))
        stats = distance_correlation_stats(x, z, pvalue="none", precision="float32", block_size=256)
        assert abs(stats.dcor - v) < 1e-7, name
        assert abs(stats.dcor_u2 - u) < 1e-7, name
        exact = distance_correlation_stats(x, z, pvalue="none", block_size=256)
        assert abs(exact.dcor - v) < 1e-12 and abs(exact.dcor_u2 - u) < 1e-12, name
