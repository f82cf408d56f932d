"""SSIM against scikit-image's own test suite, case by case.

Ported from ``skimage/metrics/tests/test_structural_similarity.py`` (scikit-image): each test
names the case it comes from and keeps its tolerance. Cases that do not transfer: a
``win_size`` other than the Gaussian's 11 px, the uniform window (``test_mssim_vs_legacy``),
``gradient=``/``full=`` outputs (ours is differentiable instead), 1-D/3-D/4-D images
(``test_structural_similarity_nD``) and ``K1``/``K2``/``sigma`` arguments, which ours fixes at
Wang et al.'s values.

Edge cases where ours and scikit-image used to disagree follow, each against the reference's
own answer, and the accuracy the module docstring states is measured on the images of
``skimage.data`` that ship with scikit-image (the ones that need a download are not used).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from skimage import data as skdata
from skimage.metrics import structural_similarity as skimage_ssim

from leakaudit.errors import ConfigError, DataError
from leakaudit.metrics.ssim import structural_similarity

GAUSSIAN = {"gaussian_weights": True, "sigma": 1.5, "use_sample_covariance": False}


def _reference(x: np.ndarray, y: np.ndarray, **kwargs) -> float:
    return float(skimage_ssim(x, y, **GAUSSIAN, **kwargs))


def _batch(image: np.ndarray) -> np.ndarray:
    """HW or HWC → [1, C, H, W] (a view: strides may be negative)."""
    return image[None, None] if image.ndim == 2 else np.moveaxis(image, -1, 0)[None]


@pytest.fixture(scope="module")
def cam_noisy() -> tuple[np.ndarray, np.ndarray]:
    # As the reference module builds it: seed 5, σ = 20, clipped and cast back to uint8.
    rng = np.random.RandomState(5)
    cam = skdata.camera()
    noisy = np.clip(cam + 20.0 * rng.randn(*cam.shape), 0, 255).astype(cam.dtype)
    return cam, noisy


# --------------------------------------------------------------------------- ported cases


def test_vs_ipol(cam_noisy) -> None:
    """test_gaussian_structural_similarity_vs_IPOL: uint8 camera + noise, range inferred (255)."""
    cam, noisy = cam_noisy
    mssim_ipol = 0.357959091663361
    for precision in ("float32", "float64"):
        ours = float(structural_similarity(_batch(cam), _batch(noisy), precision=precision))
        np.testing.assert_almost_equal(ours, mssim_ipol, decimal=3)  # the reference's tolerance
        assert abs(ours - mssim_ipol) < 6e-6  # measured: 5.1e-6 (float64), 5.2e-6 (float32)


def test_image_with_itself_is_one() -> None:
    """test_structural_similarity_image / _patch_range: SSIM(X, X) == 1, SSIM(X, Y) < 0.3."""
    rng = np.random.RandomState(1234)
    x = (rng.rand(100, 100) * 255).astype(np.uint8)
    y = (rng.rand(100, 100) * 255).astype(np.uint8)
    for precision in ("float32", "float64"):
        assert float(structural_similarity(_batch(x), _batch(x), precision=precision)) == 1.0
        s2 = float(structural_similarity(_batch(x), _batch(y), precision=precision))
        assert s2 < 0.3
        np.testing.assert_allclose(s2, _reference(x, y), atol=1e-7)


@pytest.mark.parametrize("seed", [1, 2, 3, 5, 8, 13])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_grad_case_values(seed: int, dtype: type) -> None:
    """test_structural_similarity_grad: random 30 × 30 in [0, 255], data_range=255, SSIM < 0.05."""
    rnd = np.random.RandomState(seed)
    x = rnd.rand(30, 30).astype(dtype, copy=False) * 255
    y = rnd.rand(30, 30).astype(dtype, copy=False) * 255
    ours = structural_similarity(torch.from_numpy(_batch(x).copy()), _batch(y), data_range=255)
    assert float(ours) < 0.05
    np.testing.assert_allclose(float(ours), _reference(x, y, data_range=255), atol=1e-6)
    xt = torch.from_numpy(_batch(x).astype(np.float64))
    yt = torch.from_numpy(_batch(y).astype(np.float64)).requires_grad_()
    structural_similarity(xt, yt, data_range=255).sum().backward()
    assert yt.grad is not None and bool((yt.grad < 0.05).all())  # the reference's gradient bound


@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.float16, np.float32, np.float64])
def test_dtype(dtype: type) -> None:
    """test_structural_similarity_dtype: float64 result below 0.1, integer range inferred."""
    rng = np.random.RandomState(1234)
    x, y = rng.rand(30, 30), rng.rand(30, 30)
    if np.dtype(dtype).kind in "iu":
        x = (x * 255).astype(np.uint8)
        y = (x * 255).astype(np.uint8)  # sic: the reference's Y is X · 255 wrapped to uint8
    else:
        x, y = x.astype(dtype), y.astype(dtype)
    ours = structural_similarity(_batch(x), _batch(y))
    assert ours.dtype == torch.float64
    assert float(ours) < 0.1
    if np.dtype(dtype).kind == "f":
        np.testing.assert_allclose(float(ours), _reference(x, y, data_range=1.0), atol=1e-6)
    else:
        np.testing.assert_allclose(float(ours), _reference(x, y), atol=1e-6)


@pytest.mark.parametrize("channel_axis", [0, 1, 2, -1])
def test_multichannel_replicated_equals_gray(channel_axis: int) -> None:
    """test_structural_similarity_multichannel: a gray image tiled to 3 channels, same SSIM."""
    rng = np.random.RandomState(1234)
    x = (rng.rand(100, 100) * 255).astype(np.uint8)
    y = (rng.rand(100, 100) * 255).astype(np.uint8)
    gray = float(structural_similarity(_batch(x), _batch(y)))
    xc, yc = (np.moveaxis(np.tile(a[..., None], (1, 1, 3)), -1, channel_axis) for a in (x, y))
    # Ours takes [N, C, H, W]: move the channel axis back wherever the case put it.
    xb, yb = (np.moveaxis(a, channel_axis, 0)[None] for a in (xc, yc))
    np.testing.assert_almost_equal(float(structural_similarity(xb, yb)), gray)  # decimal=7
    np.testing.assert_almost_equal(gray, _reference(x, y))


def test_multichannel_chelsea() -> None:
    """test_structural_similarity_multichannel_chelsea: colour SSIM is the channels' mean."""
    xc = skdata.chelsea()
    rng = np.random.RandomState(1234)
    yc = np.clip(xc + 15.0 * rng.randn(*xc.shape), 0, 255).astype(xc.dtype)
    ours = float(structural_similarity(_batch(xc), _batch(yc)))
    separate = [float(structural_similarity(_batch(yc[..., c]), _batch(xc[..., c]))) for c in range(3)]
    np.testing.assert_almost_equal(ours, np.mean(separate))
    np.testing.assert_almost_equal(ours, _reference(xc, yc, channel_axis=-1), decimal=6)
    assert float(structural_similarity(_batch(xc), _batch(xc))) == 1.0


def test_mixed_dtype_needs_a_range(cam_noisy) -> None:
    """test_mssim_mixed_dtype: the reference warns and uses x's range; ours asks for it."""
    cam, noisy = cam_noisy
    with pytest.raises(ConfigError, match=r"data_range cannot be inferred: x is uint8 and y is float32"):
        structural_similarity(_batch(cam), _batch(noisy.astype(np.float32)))
    given = float(structural_similarity(_batch(cam), _batch(noisy.astype(np.float32)), data_range=255))
    np.testing.assert_almost_equal(given, float(structural_similarity(_batch(cam), _batch(noisy))))


def test_invalid_input() -> None:
    """test_invalid_input: size mismatch, image smaller than the window."""
    with pytest.raises(DataError, match="same shape"):
        structural_similarity(np.zeros((1, 1, 12, 12)), np.zeros((1, 1, 11, 11)))
    with pytest.raises(DataError, match=r"at least 11 × 11 pixels; got 9 × 9"):
        structural_similarity(np.zeros((1, 1, 9, 9)), np.zeros((1, 1, 9, 9)))


# --------------------------------------------------------------------------- edge cases


def test_uint8_range_is_inferred_as_255(cam_noisy) -> None:
    cam, noisy = cam_noisy
    reference = _reference(cam, noisy)  # the reference infers 255 from uint8
    ours = float(structural_similarity(_batch(cam), _batch(noisy)))
    assert abs(ours - reference) < 1e-6
    with pytest.raises(AssertionError):  # a range of 1 is far off: not a check that passes anyway
        np.testing.assert_allclose(float(structural_similarity(_batch(cam), _batch(noisy), data_range=1.0)), reference, atol=0.05)


@pytest.mark.parametrize(("dtype", "span"), [(np.int8, 255), (np.uint16, 65_535), (np.int16, 65_535)])
def test_integer_ranges_follow_dtype_range(dtype: type, span: int) -> None:
    rng = np.random.default_rng(0)
    info = np.iinfo(dtype)
    x = rng.integers(info.min, info.max, (40, 40), endpoint=True).astype(dtype)
    y = np.clip(x.astype(np.int64) + rng.integers(-500, 500, x.shape), info.min, info.max).astype(dtype)
    ours = float(structural_similarity(_batch(x), _batch(y)))
    np.testing.assert_allclose(ours, _reference(x, y), atol=1e-6)
    np.testing.assert_allclose(ours, _reference(x, y, data_range=span), atol=1e-6)


def test_negative_strides_are_copied(cam_noisy) -> None:
    cam, noisy = cam_noisy
    flipped = float(structural_similarity(_batch(cam[::-1]), _batch(noisy[::-1])))
    np.testing.assert_allclose(flipped, _reference(cam[::-1], noisy[::-1]), atol=1e-6)
    rgb = skdata.astronaut()[:64, :64]
    bgr = rgb[:, :, ::-1]  # BGR → RGB as OpenCV users write it
    noisy_bgr = np.clip(bgr + np.random.default_rng(1).normal(0, 10, bgr.shape), 0, 255).astype(np.uint8)
    ours = float(structural_similarity(_batch(bgr), _batch(noisy_bgr)))
    np.testing.assert_allclose(ours, _reference(bgr, noisy_bgr, channel_axis=-1), atol=1e-6)
    big_endian = cam.astype(">f8") / 255
    assert float(structural_similarity(_batch(big_endian), _batch(big_endian))) == 1.0


def test_numpy_scalar_range_is_accepted(cam_noisy) -> None:
    cam, noisy = cam_noisy
    x, y = cam / 255.0, noisy / 255.0
    for value in (np.float32(1.0), np.float64(1.0), np.int64(1)):
        np.testing.assert_allclose(float(structural_similarity(_batch(x), _batch(y), data_range=value)), _reference(x, y, data_range=1.0), atol=1e-6)
    for bad in (True, "255", np.nan, -1.0):
        with pytest.raises(ConfigError, match="data_range must be a positive number"):
            structural_similarity(_batch(x), _batch(y), data_range=bad)  # type: ignore[arg-type]


def _centred_reference(x: np.ndarray, y: np.ndarray) -> float:
    """SSIM with moments about the image means, in float64 with scipy (data range 1).

    scikit-image takes E[x²] − E[x]² about 0, which cancels in float64 too once the
    values carry a large offset; this is the same definition without that loss.
    """
    cx, cy = x.mean(), y.mean()
    xs, ys = x - cx, y - cy

    def blur(v: np.ndarray) -> np.ndarray:
        return gaussian_filter(v, sigma=1.5, truncate=3.5, mode="reflect")

    mx, my = blur(xs), blur(ys)
    vx, vy, cov = blur(xs * xs) - mx * mx, blur(ys * ys) - my * my, blur(xs * ys) - mx * my
    mux, muy = mx + cx, my + cy
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mux * muy + c1) * (2 * cov + c2)) / ((mux**2 + muy**2 + c1) * (vx + vy + c2))
    return float(s[5:-5, 5:-5].mean())


@pytest.mark.parametrize("offset", [1e4, 1e6])
def test_offset_is_removed_before_the_float32_cast(cam_noisy, offset: float) -> None:
    cam, noisy = cam_noisy
    x, y = cam[:128, :128] / 255.0, noisy[:128, :128] / 255.0
    np.testing.assert_allclose(_centred_reference(x, y), _reference(x, y, data_range=1.0), atol=1e-12)
    reference = _centred_reference(x + offset, y + offset)
    for precision in ("float32", "float64"):
        ours = float(structural_similarity(_batch(x + offset), _batch(y + offset), precision=precision))
        assert abs(ours - reference) < 1e-6, precision


# --------------------------------------------------------------------------- stated accuracy


#: The 8-bit images of ``skimage.data`` that ship with scikit-image (no download).
OFFLINE_IMAGES = ["astronaut", "brick", "camera", "cat", "cell", "checkerboard", "chelsea", "clock", "coffee",
                  "coins", "colorwheel", "grass", "gravel", "immunohistochemistry", "microaneurysms", "moon",
                  "page", "rocket", "text"]  # fmt: skip


def _worst_errors(names: list[str], crop: int) -> tuple[float, float]:
    """Largest |ours − scikit-image| in float32 and float64 over images × noise σ 0.02, 0.1, 0.3."""
    rng = np.random.default_rng(0)
    worst32 = worst64 = 0.0
    for name in names:
        image = getattr(skdata, name)()[:crop, :crop].astype(np.float64) / 255.0
        x = _batch(image)
        for sigma in (0.02, 0.1, 0.3):
            noisy = np.clip(image + sigma * rng.standard_normal(image.shape), 0.0, 1.0)
            reference = _reference(image, noisy, data_range=1.0, channel_axis=-1 if image.ndim == 3 else None)
            y = _batch(noisy)
            worst32 = max(worst32, abs(float(structural_similarity(x, y)) - reference))
            worst64 = max(worst64, abs(float(structural_similarity(x, y, precision="float64")) - reference))
        assert float(structural_similarity(x, x)) == 1.0, name
    return worst32, worst64


def test_stated_accuracy_on_skimage_data() -> None:
    """The module docstring's figures on four images, two of them with large flat regions."""
    worst32, worst64 = _worst_errors(["camera", "astronaut", "checkerboard", "colorwheel"], crop=96)
    assert worst32 < 1e-5  # measured: 6.5e-6 (96-px colorwheel corner), 3.3e-6 at 256 px
    assert worst64 < 1e-13  # measured: 1.7e-14


@pytest.mark.slow
def test_stated_accuracy_on_all_offline_skimage_data() -> None:
    """The same on every offline image of ``skimage.data``, 256 × 256 crops."""
    worst32, worst64 = _worst_errors(OFFLINE_IMAGES, crop=256)
    assert worst32 < 1e-5  # measured: 6.5e-6 (96-px colorwheel corner), 3.3e-6 at 256 px
    assert worst64 < 1e-13  # measured: 1.7e-14
