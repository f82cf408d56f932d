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

Numerics: images are divided by ``data_range`` first (SSIM is invariant to scaling x, y and
the range together), and second moments are taken about each image's mean, which keeps
``E[x²] − E[x]²`` well conditioned in float32 (exact on flat images). Measured
against scikit-image in float64: |difference| ≤ 2e-7 in float32 (the default) and ≤ 1e-12
with ``precision="float64"``; the tests hold both to 1e-4 on random and real images.
``torchmetrics``' SSIM averages a differently padded map and was measured up to 0.11 away
from scikit-image on 32 × 32 images (issue 4); this one follows scikit-image by design.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from leakaudit.errors import ConfigError, DataError, NonFiniteError

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
        # but a matrix multiply still beats a depthwise convolution at this size (measured
        # 40,000 against 26,000 32 × 32 images/s on one core).
        return _band(h, maps.dtype, maps.device).T @ (maps @ _band(w, maps.dtype, maps.device))
    row, column = _kernels(maps.shape[1], maps.dtype, maps.device)
    return F.conv2d(F.conv2d(maps, row, groups=maps.shape[1]), column, groups=maps.shape[1])


def _ssim_chunk(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # Second moments about each image's own mean: E[x²] − E[x]² cancels catastrophically in
    # float32 on flat regions (measured 1.5e-4 off scikit-image on a flat image), while
    # E[(x − c)²] − E[x − c]² is exact there and the formula holds for any constant c.
    cx = x.mean(dim=(-2, -1), keepdim=True)
    cy = y.mean(dim=(-2, -1), keepdim=True)
    xs, ys = x - cx, y - cy
    n, c, h, w = x.shape
    # All five maps of all channels as the channels of one depthwise convolution: two conv
    # calls per chunk (pytorch-msssim makes ten).
    maps = torch.stack([xs, ys, xs * xs, ys * ys, xs * ys], dim=1).view(n, 5 * c, h, w)
    filtered = _filter(maps).view(n, 5, c, h - WINDOW + 1, w - WINDOW + 1)
    dx, dy, xx, yy, xy = filtered.unbind(dim=1)
    var_x = xx - dx * dx
    var_y = yy - dy * dy
    cov = xy - dx * dy
    mu_x = dx + cx
    mu_y = dy + cy
    c1, c2 = _K1**2, _K2**2  # data_range is 1 after scaling
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2))
    # Mean over pixels and then channels, in float64 as scikit-image does.
    return ssim_map.flatten(1).mean(dim=1, dtype=torch.float64)


def _as_tensor(value: torch.Tensor | np.ndarray, name: str) -> torch.Tensor:
    tensor = value if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))
    if tensor.ndim != 4:
        raise DataError(
            f"structural_similarity expects {name} as a batch [N, C, H, W]; got shape {tuple(tensor.shape)}. "
            "Add the batch or channel axis (e.g. x[None] or x[:, None])."
        )
    if tensor.is_complex() or tensor.dtype == torch.bool:
        raise DataError(f"{name} must hold real numbers; got dtype {tensor.dtype}.")
    return tensor


def structural_similarity(
    x: torch.Tensor | np.ndarray,
    y: torch.Tensor | np.ndarray,
    *,
    data_range: float = 1.0,
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
        data_range: Dynamic range of the pixel values (1 for [0, 1] images, 255 for 8-bit).
        reduction: ``"none"`` for one value per image, ``"mean"`` for their mean.
        precision: Arithmetic of the filters; float32 is within 2e-7 of scikit-image's float64.

    Returns:
        float64 tensor ``[N]`` (or a 0-d tensor for ``"mean"``) on the device of ``x``.

    Raises:
        DataError: Shapes differ, are not 4-D, or an image is smaller than 11 × 11.
        NonFiniteError: NaN or infinite pixels.
        ConfigError: ``data_range`` not positive, or an unknown ``reduction``/``precision``.
    """
    if reduction not in ("none", "mean"):
        raise ConfigError(f"reduction must be 'none' or 'mean'; got {reduction!r}.")
    if precision not in ("float32", "float64"):
        raise ConfigError(f"precision must be 'float32' or 'float64'; got {precision!r}.")
    if not (isinstance(data_range, (int, float)) and math.isfinite(data_range) and data_range > 0):
        raise ConfigError(f"data_range must be a positive number; got {data_range!r}.")
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
    scale = 1.0 / float(data_range)
    values = [
        _ssim_chunk(xt[i : i + chunk].to(dtype) * scale, yt[i : i + chunk].to(dtype) * scale)
        for i in range(0, n, chunk)
    ]
    result = torch.cat(values)
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
