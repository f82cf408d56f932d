"""Intra-class distance against hand-computed values and a direct NumPy computation."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from leakaudit.errors import DataError, NonFiniteError
from leakaudit.metrics.distance import intra_class_distance, intra_class_distance_stats


def test_hand_computed_example() -> None:
    # Class 0: (0, 0) and (2, 0), centre (1, 0), distances 1 and 1.
    # Class 5: (0, 3), (0, -3), (4, 0): centre (4/3, 0); distances √(16/9 + 9) twice and 8/3.
    z = np.array([[0.0, 0.0], [2.0, 0.0], [0.0, 3.0], [0.0, -3.0], [4.0, 0.0]])
    labels = np.array([0, 0, 5, 5, 5])
    far = np.sqrt(16 / 9 + 9)
    stats = intra_class_distance_stats(z, labels)
    assert stats.per_class == {0: pytest.approx(1.0), 5: pytest.approx((2 * far + 8 / 3) / 3)}
    assert stats.counts == {0: 2, 5: 3}
    assert stats.value == pytest.approx((2 + 2 * far + 8 / 3) / 5)


def test_matches_direct_numpy_on_flattened_activations(tmp_path) -> None:
    rng = np.random.default_rng(0)
    z = rng.standard_normal((1_000, 4, 3, 3)).astype(np.float32)
    labels = rng.integers(0, 10, 1_000)
    flat = z.reshape(1_000, -1).astype(np.float64)
    expected = np.mean([np.linalg.norm(flat[i] - flat[labels == labels[i]].mean(axis=0)) for i in range(1_000)])
    assert intra_class_distance(z, labels, block_size=77) == pytest.approx(expected, rel=1e-12)
    assert intra_class_distance(torch.from_numpy(z), torch.from_numpy(labels)) == pytest.approx(expected, rel=1e-12)
    path = tmp_path / "acts.h5"
    with h5py.File(path, "w") as handle:
        handle["activations"] = z
    with h5py.File(path, "r") as handle:
        assert intra_class_distance(handle["activations"], labels, block_size=128) == pytest.approx(expected, rel=1e-12)


def test_scatter_ratio_is_within_over_total_and_scale_free() -> None:
    # Hand example above: within = 2·1 + 2·(16/9 + 9) + (8/3)² ; total about the mean (0.8, 0).
    z = np.array([[0.0, 0.0], [2.0, 0.0], [0.0, 3.0], [0.0, -3.0], [4.0, 0.0]])
    labels = np.array([0, 0, 5, 5, 5])
    within = 2.0 + 2 * (16 / 9 + 9) + (8 / 3) ** 2
    total = float(((z - z.mean(0)) ** 2).sum())
    assert intra_class_distance_stats(z, labels).scatter_ratio == pytest.approx(within / total, rel=1e-12)
    rng = np.random.default_rng(1)
    z = rng.standard_normal((500, 6)) + rng.integers(0, 4, 500)[:, None]
    labels = rng.integers(0, 4, 500)
    z[labels == 2] += 5.0
    ratio = intra_class_distance_stats(z, labels, block_size=64).scatter_ratio
    assert 0.0 < ratio < 1.0
    # Shrinking Z shrinks the distance, not the ratio.
    small = intra_class_distance_stats(z * 1e-3, labels)
    assert small.scatter_ratio == pytest.approx(ratio, rel=1e-9)
    assert small.value == pytest.approx(1e-3 * intra_class_distance(z, labels), rel=1e-9)
    assert np.isnan(intra_class_distance_stats(np.ones((3, 2)), [0, 1, 1]).scatter_ratio)


def test_collapsed_classes_have_zero_distance() -> None:
    z = np.repeat(np.eye(3), 4, axis=0) * 7.0
    labels = np.repeat([0, 1, 2], 4)
    assert intra_class_distance(z, labels) == 0.0
    assert intra_class_distance(z, np.zeros(12, dtype=int)) > 0.0


def test_bad_input() -> None:
    z = np.zeros((4, 2))
    with pytest.raises(DataError, match="one entry per row of Z; got 3 labels for 4 rows"):
        intra_class_distance(z, [0, 1, 0])
    with pytest.raises(DataError, match="integer class indices"):
        intra_class_distance(z, [0.5, 1, 0, 1])
    z[2, 1] = np.nan
    with pytest.raises(NonFiniteError, match="non-finite"):
        intra_class_distance(z, [0, 1, 0, 1])
    with pytest.raises(DataError, match="at least one row"):
        intra_class_distance(np.zeros((0, 3)), [])
