"""How raw rows become the model's input: size, channels and optional normalisation.

Images are stored and scored in [0, 1] exactly as the model sees them (after resizing and
channel conversion); normalisation is applied only to the model's input, only when asked.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from leakaudit.data.sources import DataSource
from leakaudit.errors import ConfigError, DataError


@dataclass(frozen=True)
class Preprocess:
    """How raw rows become the model's input: size, channels, optional normalisation."""

    input_size: tuple[int, int]
    in_chans: int
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def images(self, block: np.ndarray) -> torch.Tensor:
        """Raw rows → float32 [B, C, H, W] in [0, 1], as stored in ``/inputs``."""
        block = np.ascontiguousarray(block)
        if not block.flags.writeable:  # idx files are read-only buffers; torch wants writable memory
            block = block.copy()
        x = torch.from_numpy(block)
        scale = 1.0
        if x.dtype == torch.uint8:
            x, scale = x.float(), 1.0 / 255.0  # the scale folds into a small resize's weights
        elif x.dtype == torch.bool:
            x = x.float()
        else:
            x = x.float()
            if not torch.isfinite(x).all():
                raise DataError("input images contain NaN or infinite values.")
            low, high = float(x.min()), float(x.max())
            if low < -1e-6 or high > 1 + 1e-6:
                raise DataError(
                    f"float images must lie in [0, 1]; found values in [{low:.3g}, {high:.3g}]. "
                    "Scale them (or store uint8) before dumping."
                )
        channels = x.shape[1]
        if channels == 4:
            x, channels = x[:, :3], 3
        if channels != self.in_chans and not (channels == 1 or (channels == 3 and self.in_chans == 1)):
            raise DataError(f"cannot convert {channels}-channel images to the model's {self.in_chans} channels.")
        if channels == 3 and self.in_chans == 1:
            weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
            x = (x * weights).sum(1, keepdim=True)
        if tuple(x.shape[-2:]) != self.input_size:
            x = resize(x, self.input_size, scale).clamp_(0.0, 1.0)
        elif scale != 1.0:
            x = x.mul_(scale)
        if x.shape[1] == 1 and self.in_chans > 1:
            # Gray to the model's channels after resizing: the same image, a third of the work.
            x = x.expand(-1, self.in_chans, -1, -1)
        return x.contiguous()

    def model_input(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the optional normalisation to stored inputs."""
        if self.mean is None or self.std is None:
            return x
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std


SMALL_IMAGE = 64  # largest side resized by matrix products (faster than interpolate up to here)


def resize(x: torch.Tensor, size: tuple[int, int], scale: float = 1.0) -> torch.Tensor:
    """``scale · x`` resized bilinearly with antialiasing: ``F.interpolate``'s result.

    Bilinear resizing is separable, ``A_h · x · A_wᵀ``. For small images (every side up to
    ``SMALL_IMAGE``) two matrix products with those operators cost about half of
    ``interpolate``'s kernel on one thread, which is CPU the dump's forward pass keeps
    (benchmarks/RESULTS.md); the operators are ``interpolate``'s own (``_resize_operator``),
    so the images agree with it to float rounding (1.2e-7). Where every output row mixes at
    most two input rows (any enlargement), the second product is two row gathers instead
    (``_two_taps``), cheaper still. Larger images go to ``interpolate``.
    """
    batch, channels, height, width = x.shape
    out_h, out_w = size
    if max(height, width, out_h, out_w) > SMALL_IMAGE:
        if scale != 1.0:
            x = x * scale
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    a_h = _resize_operator(height, out_h)
    a_w = _resize_operator(width, out_w)
    if scale != 1.0:
        a_w = a_w * scale
    planes = batch * channels
    rows = (x.reshape(planes * height, width) @ a_w.T).view(planes, height, out_w)  # every row at once: one GEMM
    taps = _two_taps(height, out_h)
    if taps is None:
        out = torch.bmm(a_h.expand(planes, -1, -1), rows)
    else:
        first, second, w_first, w_second = taps
        out = rows.index_select(1, first).mul_(w_first).addcmul_(rows.index_select(1, second), w_second)
    return out.view(batch, channels, out_h, out_w)


@functools.lru_cache(maxsize=32)
def _two_taps(n_in: int, n_out: int) -> tuple[torch.Tensor, ...] | None:
    """``_resize_operator(n_in, n_out)`` as two (index, weight) columns, if no row has more
    than two nonzero weights: output row i = w₁[i]·x[j₁[i]] + w₂[i]·x[j₂[i]].
    """
    operator = _resize_operator(n_in, n_out)
    nonzero = [row.nonzero().flatten().tolist() for row in operator]
    if any(len(columns) > 2 for columns in nonzero):
        return None
    first = torch.tensor([columns[0] for columns in nonzero])
    second = torch.tensor([columns[-1] for columns in nonzero])
    rows = torch.arange(n_out)
    w_second = torch.where(first == second, 0.0, operator[rows, second])  # a one-tap row counts once
    return first, second, operator[rows, first].view(1, n_out, 1), w_second.view(1, n_out, 1)


@functools.lru_cache(maxsize=32)
def _resize_operator(n_in: int, n_out: int) -> torch.Tensor:
    """The [n_out, n_in] matrix of 1-D bilinear antialiased resizing, taken from ``interpolate``.

    Column i is the resized i-th basis vector. The basis is resized as one n_in × n_in image
    along its height only: ``interpolate`` returns wrong values for width-1 inputs.
    """
    basis = torch.eye(n_in).view(1, 1, n_in, n_in)
    out = F.interpolate(basis, size=(n_out, n_in), mode="bilinear", align_corners=False, antialias=True)
    return out[0, 0].contiguous()


def preprocess_for(
    source: DataSource,
    *,
    model_input_size: tuple[int, int] | None,
    model_in_chans: int | None,
    input_size: tuple[int, int] | None = None,
    normalize: str | None = None,
) -> Preprocess:
    """How ``source`` is fed to a model: ``--input-size`` > the model's declared size > the data's."""
    in_chans = model_in_chans or source.shape[0]
    size = input_size or model_input_size or source.shape[1:]
    mean, std = parse_normalize(normalize, in_chans)
    return Preprocess((int(size[0]), int(size[1])), int(in_chans), mean, std)


def parse_normalize(text: str | None, in_chans: int) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
    """``MEAN,STD`` (one value each, or one per channel separated by '/') → per-channel tuples."""
    if text is None:
        return None, None
    try:
        mean_text, std_text = text.split(",")
        mean = tuple(float(v) for v in mean_text.split("/"))
        std = tuple(float(v) for v in std_text.split("/"))
    except ValueError:
        raise ConfigError(
            f"--normalize expects MEAN,STD (per channel: M1/M2/M3,S1/S2/S3), got {text!r}."
        ) from None
    if len(mean) == 1:
        mean = mean * in_chans
    if len(std) == 1:
        std = std * in_chans
    if len(mean) != in_chans or len(std) != in_chans or any(s <= 0 for s in std):
        raise ConfigError(f"--normalize needs {in_chans} means and {in_chans} positive stds, got {text!r}.")
    return mean, std
