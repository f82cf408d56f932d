"""Structural similarity (SSIM), batched in torch, equal to scikit-image's.

The reference is ``skimage.metrics.structural_similarity(x, y, gaussian_weights=True,
sigma=1.5, use_sample_covariance=False, data_range=R)`` (Wang et al. 2004), with
``channel_axis`` for colour images, which averages the per-channel SSIM. That function

* filters with an 11-tap Gaussian (σ = 1.5, truncated at 3.5 σ, ``mode="reflect"``),
* crops ``(11 − 1) // 2 = 5`` pixels from every border before averaging the SSIM map,

so every pixel it averages is a *valid* convolution: the reflected border never enters.
Here the filter is a valid separable convolution applied to the five maps (x, y, x², y², xy)
of every channel at once: two products with banded matrices for images up to 64 px a side
(fastest there despite multiplying zeros), one depthwise ``conv2d`` per axis above (where
the banded products would be mostly zeros); the batch is processed in chunks that stay in
cache.

Numerics: each image's mean is subtracted (in float64 unless the working precision holds the
input exactly) and the result divided by ``data_range`` before any cast (SSIM is invariant
to scaling x, y and the range together), so second moments are taken about the image mean,
which keeps ``E[x²] − E[x]²`` well conditioned in float32 (exact on flat images) and an
offset in the data costs nothing. The result is clipped to [−1, 1], so SSIM(x, x) is 1.
Measured against scikit-image in float64 on the offline images of ``skimage.data`` with
noise σ = 0.02, 0.1, 0.3 (tests/metrics/test_ssim_reference_suite.py): float32 (the
default) within 7e-7 on photographs and within 6.5e-6 on images dominated by flat regions
(colorwheel, checkerboard), float64 within 2e-14. For images with an offset of 1e4 or more,
scikit-image's own float64 drifts (its moments are taken about 0); ours stays within 1e-6
of a centred float64 reference.

``data_range`` defaults to the span of an integer dtype (255 for uint8, as scikit-image
infers it) and to 1 for floating images.
``torchmetrics``' SSIM averages a differently padded map and was measured up to 0.11 away
from scikit-image on 32 × 32 images (issue 4); this one follows scikit-image by design.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from functools import lru_cache
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from leakaudit.errors import ConfigError, DataError, NonFiniteError
from leakaudit.metrics._dcor.exact import _holds_exactly

__all__ = ["structural_similarity", "ssim_percentiles", "WINDOW"]

#: Side of the Gaussian window: 2 · int(3.5 · 1.5 + 0.5) + 1, as scikit-image computes it.
WINDOW = 11
_SIGMA = 1.5
_K1, _K2 = 0.01, 0.03
#: Pixels per chunk (× 5 maps × 4 bytes ≈ 1.3 MB): a chunk's maps stay in cache.
_CHUNK_PIXELS = 1 << 16
#: Images up to this side are filtered by banded matrix products, larger ones by convolution.
_MATMUL_MAX_SIDE = 64


def _gaussian_taps() -> np.ndarray:
    # scipy.ndimage's _gaussian_kernel1d: exp(-x² / 2σ²) on -r..r, normalised to sum 1.
    radius = WINDOW // 2
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    taps = np.exp(-0.5 / _SIGMA**2 * x**2)
    return taps / taps.sum()


@lru_cache(maxsize=64)
def _kernels(channels: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise row and column kernels ``[channels, 1, 1, 11]`` and ``[channels, 1, 11, 1]``."""
    taps = torch.from_numpy(_gaussian_taps()).to(device=device, dtype=dtype)
    row = taps.view(1, 1, 1, WINDOW).expand(channels, 1, 1, WINDOW).contiguous()
    column = taps.view(1, 1, WINDOW, 1).expand(channels, 1, WINDOW, 1).contiguous()
    return row, column


@lru_cache(maxsize=64)
def _band(size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``[size, size − 10]`` matrix M with ``(v @ M)[j] = Σ_t g_t v[j + t]``: a valid convolution."""
    taps = _gaussian_taps()
    band = np.zeros((size, size - WINDOW + 1), dtype=np.float64)
    for j in range(size - WINDOW + 1):
        band[j : j + WINDOW, j] = taps
    return torch.from_numpy(band).to(device=device, dtype=dtype)


def _filter(maps: torch.Tensor) -> torch.Tensor:
    """Valid separable Gaussian filter of ``[n, m, h, w]`` maps."""
    h, w = maps.shape[-2:]
    if max(h, w) <= _MATMUL_MAX_SIDE:
        # Small images: two products with banded matrices. Most of their entries are zero,
        # but a matrix multiply still beats a depthwise convolution at this size
        # (benchmarks/RESULTS.md).
        return _band(h, maps.dtype, maps.device).T @ (maps @ _band(w, maps.dtype, maps.device))
    row, column = _kernels(maps.shape[1], maps.dtype, maps.device)
    return F.conv2d(F.conv2d(maps, row, groups=maps.shape[1]), column, groups=maps.shape[1])


def _centre(x: torch.Tensor, scale: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``((x − c) · scale)`` in ``dtype`` with c each image's mean, and ``c · scale`` in float64.

    The mean is taken in float64, and so is the difference unless ``dtype`` holds the input
    exactly: a cast first would round an offset's digits into the pixels (an offset of 1e6
    moved float32 SSIM by 4e-3). Where it does hold it, the rounded mean is still exactly
    the constant subtracted, which is all the formula needs.
    """
    centre = x.mean(dim=(-2, -1), keepdim=True, dtype=torch.float64)
    if _holds_exactly(dtype, x.dtype):
        shifted = x.to(dtype) - centre.to(dtype)
        centre = centre.to(dtype).to(torch.float64)
    else:
        shifted = x.to(torch.float64) - centre
    return (shifted * scale).to(dtype), centre * scale


def _ssim_chunk(xs: torch.Tensor, cx: torch.Tensor, ys: torch.Tensor, cy: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM of images given as ``(x − cx, cx)`` and ``(y − cy, cy)``, range 1."""
    # Second moments about each image's own mean: E[x²] − E[x]² cancels catastrophically in
    # float32 on flat regions (measured 1.5e-4 off scikit-image on a flat image), while
    # E[(x − c)²] − E[x − c]² is exact there and the formula holds for any constant c.
    n, c, h, w = xs.shape
    # All five maps of all channels as the channels of one depthwise convolution: two conv
    # calls per chunk (pytorch-msssim makes ten).
    maps = torch.stack([xs, ys, xs * xs, ys * ys, xs * ys], dim=1).view(n, 5 * c, h, w)
    filtered = _filter(maps).view(n, 5, c, h - WINDOW + 1, w - WINDOW + 1)
    dx, dy, xx, yy, xy = filtered.unbind(dim=1)
    var_x = xx - dx * dx
    var_y = yy - dy * dy
    cov = xy - dx * dy
    mu_x = dx + cx.to(dx.dtype)
    mu_y = dy + cy.to(dy.dtype)
    c1, c2 = _K1**2, _K2**2  # data_range is 1 after scaling
    # (2 μx μy + c1) / (μx² + μy² + c1) written as 1 − (μx − μy)² / (…): the same value, with
    # μx − μy taken from the centred maps and the float64 centres, not as a difference of
    # two rounded means.
    mu_diff = (dx - dy) + (cx - cy).to(dx.dtype)
    luminance = 1 - mu_diff * mu_diff / (mu_x * mu_x + mu_y * mu_y + c1)
    ssim_map = luminance * (2 * cov + c2) / (var_x + var_y + c2)
    # Mean over pixels and then channels, in float64 as scikit-image does.
    return ssim_map.flatten(1).mean(dim=1, dtype=torch.float64)


def _as_tensor(value: torch.Tensor | np.ndarray, name: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        tensor = value
    else:
        array = np.asarray(value)
        if array.dtype.kind in "ui" and array.dtype not in (np.uint8, np.int8, np.int16, np.int32, np.int64):
            # torch lacks arithmetic on uint16/32/64; float64 holds them (uint64 to 16 digits).
            array = array.astype(np.float64)
        if array.dtype.kind in "biufc" and (
            not array.dtype.isnative or any(stride < 0 for stride in array.strides)
        ):
            # torch can view neither reversed slices (x[::-1], BGR → RGB) nor foreign byte order.
            array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("="))
        if array.dtype.kind not in "biufc":
            raise DataError(f"{name} must hold real numbers; got dtype {array.dtype}.")
        tensor = torch.from_numpy(array)
    if tensor.ndim != 4:
        raise DataError(
            f"structural_similarity expects {name} as a batch [N, C, H, W]; got shape {tuple(tensor.shape)}. "
            "Add the batch or channel axis (e.g. x[None] or x[:, None])."
        )
    if tensor.is_complex() or tensor.dtype == torch.bool:
        raise DataError(f"{name} must hold real numbers; got dtype {tensor.dtype}.")
    return tensor


def _integer_range(value: torch.Tensor | np.ndarray) -> float | None:
    """scikit-image's ``dtype_range`` span of an integer image's dtype, None for floats."""
    info: torch.iinfo | np.iinfo
    if isinstance(value, torch.Tensor):
        dtype = value.dtype
        if dtype.is_floating_point or dtype.is_complex or dtype == torch.bool:
            return None
        info = torch.iinfo(dtype)
    else:
        np_dtype = np.asarray(value).dtype
        if np_dtype.kind not in "ui":
            return None
        info = np.iinfo(np_dtype)
    return float(int(info.max) - int(info.min))


def _resolve_range(
    data_range: float | None, x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray
) -> float:
    if data_range is not None:
        if isinstance(data_range, bool) or not isinstance(data_range, numbers.Real):
            raise ConfigError(f"data_range must be a positive number; got {data_range!r}.")
        if not (math.isfinite(float(data_range)) and float(data_range) > 0):
            raise ConfigError(f"data_range must be a positive number; got {data_range!r}.")
        return float(data_range)
    range_x, range_y = _integer_range(x), _integer_range(y)
    if range_x != range_y:
        # scikit-image warns and takes x's; a reconstruction in [0, 1] against 8-bit
        # originals would then be scored on the wrong scale, so ask instead.
        raise ConfigError(
            f"data_range cannot be inferred: x is {x.dtype} and y is {y.dtype}, whose ranges differ. "
            "Pass data_range= (e.g. 255 for 8-bit images, 1 for images in [0, 1])."
        )
    return 1.0 if range_x is None else range_x


def structural_similarity(
    x: torch.Tensor | np.ndarray,
    y: torch.Tensor | np.ndarray,
    *,
    data_range: float | None = None,
    reduction: Literal["none", "mean"] = "none",
    precision: Literal["float32", "float64"] = "float32",
) -> torch.Tensor:
    """SSIM of each image pair, equal to scikit-image's (Gaussian window, population covariance).

    Per image: ``structural_similarity(x_i, y_i, gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=data_range, channel_axis=0)`` of scikit-image,
    that is the mean SSIM map over the pixels at least 5 px from every border, averaged
    over channels. Differentiable.

    Args:
        x: Images ``[N, C, H, W]`` (gray: C = 1, RGB: C = 3), tensor or array.
        y: Images of the same shape, e.g. reconstructions of ``x``.
        data_range: Dynamic range of the pixel values. None (default) infers it from the dtype:
            the span of an integer dtype, as scikit-image's ``dtype_range`` gives it (255 for
            uint8 and int8, 65,535 for uint16, …), and 1 for floating images, which are taken
            to lie in [0, 1] (scikit-image refuses to guess for floats). x and y of
            different integer dtypes, or one integer and one floating, need it explicitly.
        reduction: ``"none"`` for one value per image, ``"mean"`` for their mean.
        precision: Arithmetic of the filters; float32 is within 7e-7 of scikit-image's float64
            on photographs, 6.5e-6 on images with large flat regions (module docstring).

    Returns:
        float64 tensor ``[N]`` (or a 0-d tensor for ``"mean"``) on the device of ``x``.

    Raises:
        DataError: Shapes differ, are not 4-D, or an image is smaller than 11 × 11.
        NonFiniteError: NaN or infinite pixels.
        ConfigError: ``data_range`` not a positive number or not inferable (x and y of
            different dtype kinds), or an unknown ``reduction``/``precision``.
    """
    if reduction not in ("none", "mean"):
        raise ConfigError(f"reduction must be 'none' or 'mean'; got {reduction!r}.")
    if precision not in ("float32", "float64"):
        raise ConfigError(f"precision must be 'float32' or 'float64'; got {precision!r}.")
    value_range = _resolve_range(data_range, x, y)
    xt, yt = _as_tensor(x, "x"), _as_tensor(y, "y")
    if xt.shape != yt.shape:
        raise DataError(f"x and y must have the same shape; got {tuple(xt.shape)} and {tuple(yt.shape)}.")
    n, c, h, w = xt.shape
    if h < WINDOW or w < WINDOW:
        raise DataError(
            f"SSIM uses an {WINDOW} × {WINDOW} Gaussian window and needs images of at least "
            f"{WINDOW} × {WINDOW} pixels; got {h} × {w}. Upsample the images first."
        )
    if n == 0:
        raise DataError("structural_similarity got an empty batch (N = 0).")
    dtype = torch.float32 if precision == "float32" else torch.float64
    yt = yt.to(device=xt.device)
    for name, tensor in (("x", xt), ("y", yt)):
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise NonFiniteError(f"{name} contains {bad:,} non-finite pixels (NaN or ±inf); SSIM needs finite images.")
    chunk = max(1, _CHUNK_PIXELS // (c * h * w))
    scale = 1.0 / value_range
    values = [
        _ssim_chunk(*_centre(xt[i : i + chunk], scale, dtype), *_centre(yt[i : i + chunk], scale, dtype))
        for i in range(0, n, chunk)
    ]
    # SSIM lies in [−1, 1]; rounding can step past 1 (x = y in float32).
    result = torch.cat(values).clamp(-1.0, 1.0)
    return result.mean() if reduction == "mean" else result


def ssim_percentiles(
    values: torch.Tensor | np.ndarray | Sequence[float],
    percentiles: Sequence[float] = (5, 50, 95),
) -> dict[float, float]:
    """Percentiles of per-image SSIM values (linear interpolation, NumPy's default).

    Scrunch's Table 1 reports the 95th percentile of the reconstructions' SSIM
    (``ssim_p95``): the best-reconstructed 5 % of images, i.e. the worst case for privacy.

    Args:
        values: Per-image SSIM values, e.g. from :func:`structural_similarity`.
        percentiles: Percentiles in [0, 100].

    Returns:
        ``{percentile: value}`` in the order given.

    Raises:
        DataError: No values.
        NonFiniteError: Non-finite values.
        ConfigError: A percentile outside [0, 100].
    """
    array = values.detach().cpu().double().numpy() if isinstance(values, torch.Tensor) else np.asarray(values, float)
    array = array.reshape(-1)
    if array.size == 0:
        raise DataError("ssim_percentiles got no values.")
    if not np.isfinite(array).all():
        raise NonFiniteError("ssim_percentiles got non-finite SSIM values.")
    for q in percentiles:
        if not 0 <= q <= 100:
            raise ConfigError(f"percentiles must lie in [0, 100]; got {q!r}.")
    return {float(q): float(np.percentile(array, q)) for q in percentiles}
