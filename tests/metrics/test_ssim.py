"""SSIM against scikit-image (the reference the papers' numbers come from)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage import data as skdata
from skimage.metrics import structural_similarity as skimage_ssim
from skimage.transform import resize
from sklearn.datasets import load_digits

from leakaudit.errors import ConfigError, DataError, NonFiniteError
from leakaudit.metrics.ssim import ssim_percentiles, structural_similarity


def _reference(x: np.ndarray, y: np.ndarray, data_range: float = 1.0) -> np.ndarray:
    """scikit-image, image by image, in float64, NCHW → HWC with channel_axis."""
    return np.array(
        [
            skimage_ssim(
                a.transpose(1, 2, 0).astype(np.float64),
                b.transpose(1, 2, 0).astype(np.float64),
                gaussian_weights=True,
                sigma=1.5,
                use_sample_covariance=False,
                data_range=data_range,
                channel_axis=2,
            )
            for a, b in zip(x, y)
        ]
    )


def _noisy(rng: np.random.Generator, x: np.ndarray, scale: float) -> np.ndarray:
    return np.clip(x + scale * rng.standard_normal(x.shape), 0.0, 1.0)


@pytest.mark.parametrize("precision", ["float32", "float64"])
@pytest.mark.parametrize(
    "shape", [(16, 1, 32, 32), (4, 3, 128, 128), (5, 3, 11, 11), (3, 1, 37, 150), (3, 3, 130, 77)]
)
def test_random_images_match_skimage(shape: tuple[int, ...], precision: str) -> None:
    rng = np.random.default_rng(sum(shape))
    x = rng.random(shape)
    y = _noisy(rng, x, 0.3)
    ours = structural_similarity(torch.from_numpy(x), torch.from_numpy(y), precision=precision)
    assert ours.shape == (shape[0],) and ours.dtype == torch.float64
    np.testing.assert_allclose(ours.numpy(), _reference(x, y), rtol=0, atol=1e-4)


def test_digits_upsampled_match_skimage() -> None:
    digits = load_digits().images[:64] / 16.0
    x = np.stack([resize(image, (32, 32), order=1) for image in digits])[:, None].astype(np.float32)
    rng = np.random.default_rng(1)
    # Reconstruction-like pairs: blends with another digit plus noise, and exact copies.
    y = _noisy(rng, 0.7 * x + 0.3 * np.roll(x, 1, axis=0), 0.02).astype(np.float32)
    ours = structural_similarity(x, y).numpy()
    reference = _reference(x, y)
    assert reference.min() < 0.9  # not a trivial all-ones comparison
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-4)
    np.testing.assert_allclose(structural_similarity(x, x).numpy(), 1.0, rtol=0, atol=1e-6)
    binary = (x > 0.5).astype(np.float32)  # flat regions far from the image mean: worst case for float32
    np.testing.assert_allclose(structural_similarity(binary, 0.9 * binary).numpy(), _reference(binary, 0.9 * binary), atol=1e-4)


def test_rgb_photographs_match_skimage() -> None:
    astronaut = skdata.astronaut().astype(np.float64) / 255.0
    coffee = skdata.coffee().astype(np.float64) / 255.0
    crops = np.stack([astronaut[:128, :128], astronaut[200:328, 250:378], coffee[100:228, 200:328]]).transpose(0, 3, 1, 2)
    rng = np.random.default_rng(2)
    y = _noisy(rng, crops, 0.05)
    np.testing.assert_allclose(structural_similarity(crops, y).numpy(), _reference(crops, y), atol=1e-4)


def test_gray_photograph_with_8bit_range_matches_skimage() -> None:
    camera = skdata.camera().astype(np.float64)
    x = np.stack([camera[:96, :96], camera[300:396, 200:296]])[:, None]
    y = np.clip(x + np.random.default_rng(3).normal(0, 12, x.shape), 0, 255)
    ours = structural_similarity(x, y, data_range=255.0).numpy()
    np.testing.assert_allclose(ours, _reference(x, y, data_range=255.0), atol=1e-4)


def test_flat_images_are_exact() -> None:
    flat = np.full((2, 1, 16, 16), 0.5)
    # Only the luminance term differs: (2·0.5·0.6 + C1) / (0.5² + 0.6² + C1).
    expected = (2 * 0.5 * 0.6 + 1e-4) / (0.25 + 0.36 + 1e-4)
    np.testing.assert_allclose(structural_similarity(flat, flat + 0.1).numpy(), expected, atol=1e-6)
    np.testing.assert_allclose(_reference(flat, flat + 0.1), expected, atol=1e-12)


def test_reduction_mean_and_gradient() -> None:
    rng = np.random.default_rng(4)
    x = torch.from_numpy(rng.random((3, 1, 20, 20)))
    y = torch.from_numpy(rng.random((3, 1, 20, 20))).requires_grad_()
    mean = structural_similarity(x, y, reduction="mean")
    assert mean.ndim == 0
    assert float(mean.detach()) == pytest.approx(_reference(x.numpy(), y.detach().numpy()).mean(), abs=1e-4)
    mean.backward()
    assert y.grad is not None and bool(torch.isfinite(y.grad).all()) and float(y.grad.abs().sum()) > 0


def test_percentiles_match_numpy() -> None:
    values = torch.linspace(0, 1, 101, dtype=torch.float64)
    assert ssim_percentiles(values) == {5.0: pytest.approx(0.05), 50.0: pytest.approx(0.5), 95.0: pytest.approx(0.95)}
    rng = np.random.default_rng(5)
    sample = rng.random(37)
    assert ssim_percentiles(sample, (10, 95))[95.0] == pytest.approx(np.percentile(sample, 95))


def test_small_images_are_refused() -> None:
    with pytest.raises(DataError, match=r"at least 11 × 11 pixels; got 10 × 32"):
        structural_similarity(torch.zeros(2, 1, 10, 32), torch.zeros(2, 1, 10, 32))


def test_bad_input() -> None:
    with pytest.raises(DataError, match=r"\[N, C, H, W\]; got shape \(32, 32\)"):
        structural_similarity(torch.zeros(32, 32), torch.zeros(32, 32))
    with pytest.raises(DataError, match="same shape"):
        structural_similarity(torch.zeros(2, 1, 16, 16), torch.zeros(2, 3, 16, 16))
    bad = torch.zeros(2, 1, 16, 16)
    bad[1, 0, 3, 3] = float("nan")
    with pytest.raises(NonFiniteError, match="y contains 1 non-finite pixels"):
        structural_similarity(torch.zeros(2, 1, 16, 16), bad)
    with pytest.raises(ConfigError, match="data_range must be a positive number; got 0"):
        structural_similarity(bad, bad, data_range=0)
    with pytest.raises(DataError, match="no values"):
        ssim_percentiles([])
    with pytest.raises(ConfigError, match="percentiles must lie in"):
        ssim_percentiles([0.5], (101,))
