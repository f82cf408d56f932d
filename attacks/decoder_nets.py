"""The decoders of the reconstruction attack: Z → X̂ networks of three depths.

``upsample`` (a convolutional upsampling stack), ``alexnet`` (a fully connected stem and an
AlexNet-style transposed-convolution stack, the inversion networks of the Scrunch paper) and
``resnet`` (residual upsampling blocks). Each starts from the attacker-train mean image, so
an untrained decoder predicts the no-information floor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from leakaudit.errors import UnknownNameError

ARCHS = ("upsample", "alexnet", "resnet")


@dataclass(frozen=True)
class Geometry:
    """How a decoder goes from Z to X.

    Attributes:
        z_shape: one Z row.
        x_shape: one X row, (C, H, W).
        spatial: Z is a feature map with more than one position (used as is); otherwise it is
            flattened and projected onto a ``start``-sized map by a linear layer.
        start: (H, W) of the first feature map.
        ups: number of ×2 upsamplings; a final resize covers the rest of the way to X's size.
    """

    z_shape: tuple[int, ...]
    x_shape: tuple[int, int, int]
    spatial: bool
    start: tuple[int, int]
    ups: int

    @property
    def features(self) -> int:
        return math.prod(self.z_shape)

    def widths(self, base: int) -> list[int]:
        """Channels of the start map and after each upsampling: ``base``·2^k down to ``base``, at most 256."""
        return [max(base, min(256, base * 2 ** (self.ups - i))) for i in range(self.ups + 1)]

    def reached(self) -> tuple[int, int]:
        return self.start[0] * 2**self.ups, self.start[1] * 2**self.ups


def geometry(z_shape: tuple[int, ...], x_shape: tuple[int, ...], *, flat: bool = False) -> Geometry:
    """Plan the upsampling from ``z_shape`` to ``x_shape``.

    Spatial Z is doubled while it stays within X's size (5×5 → 20×20 for a 32×32 X) and then
    resized; flat Z (or ``flat=True``) starts from a map of about 4×4 that doubles exactly to
    X's size where X's side is 4·2^k.
    """
    channels, height, width = (int(s) for s in x_shape)
    x_shape = (channels, height, width)
    z_shape = tuple(int(s) for s in z_shape)
    if not flat and len(z_shape) == 3 and z_shape[1] * z_shape[2] > 1:
        h, w = z_shape[1:]
        ratio = min(height / h, width / w)
        ups = int(math.floor(math.log2(ratio))) if ratio >= 2 else 0
        return Geometry(z_shape, x_shape, True, (h, w), ups)
    ups = max(0, math.ceil(math.log2(max(min(height, width), 1) / 4)))
    start = (max(1, math.ceil(height / 2**ups)), max(1, math.ceil(width / 2**ups)))
    return Geometry(z_shape, x_shape, False, start, ups)


class _Stem(nn.Module):
    """Z → the first feature map: a 3×3 conv for spatial Z, a linear projection for flat Z."""

    def __init__(self, geo: Geometry, channels: int) -> None:
        super().__init__()
        if geo.spatial:
            self.body = nn.Sequential(
                nn.Conv2d(geo.z_shape[0], channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU()
            )
        else:
            h, w = geo.start
            self.body = nn.Sequential(
                nn.Flatten(),
                nn.Linear(geo.features, channels * h * w, bias=False),
                nn.BatchNorm1d(channels * h * w),
                nn.ReLU(),
                nn.Unflatten(1, (channels, h, w)),
            )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.body(z)


class _Resize(nn.Module):
    """Bilinear resize to X's exact size, where the doublings did not land on it."""

    def __init__(self, size: tuple[int, int]) -> None:
        super().__init__()
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) == self.size:
            return x
        return F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


class MeanImageOutput(nn.Module):
    """``sigmoid(residual + logit(mean image))``: the decoder learns what Z adds to the mean image.

    With the layer before it initialised to zero, an untrained decoder predicts the
    attacker-train mean image, the no-information baseline; early stopping can then keep
    that state (epoch 0) when training only fits noise, instead of reporting a decoder worse
    than the baseline. The per-pixel base is a parameter, trained with the rest.
    """

    def __init__(self, shape: tuple[int, int, int], mean_image: torch.Tensor | None = None) -> None:
        super().__init__()
        base = torch.full(shape, 0.5) if mean_image is None else mean_image.detach().float().reshape(shape)
        self.base = nn.Parameter(torch.logit(base.clamp(1e-3, 1 - 1e-3)))

    def forward(self, residual: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(residual + self.base)


def _zero(layer: nn.Conv2d | nn.ConvTranspose2d) -> nn.Module:
    nn.init.zeros_(layer.weight)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


class UpsampleDecoder(nn.Sequential):
    """×2 nearest upsampling + two 3×3 conv/BN/ReLU per stage, resize to X, 3×3 conv, sigmoid."""

    def __init__(self, geo: Geometry, width: int = 32, mean_image: torch.Tensor | None = None) -> None:
        widths = geo.widths(width)
        layers: list[nn.Module] = [_Stem(geo, widths[0])]
        for cin, cout in zip(widths, widths[1:]):
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), *_conv_bn_relu(cin, cout), *_conv_bn_relu(cout, cout)]
        channels, height, w = geo.x_shape
        layers += [
            _Resize((height, w)),
            _zero(nn.Conv2d(widths[-1], channels, 3, padding=1)),
            MeanImageOutput(geo.x_shape, mean_image),
        ]
        super().__init__(*layers)


class AlexNetDecoder(nn.Sequential):
    """Dosovitskiy & Brox (2016): 3 fully connected layers, 5×5 stride-2 up-convolutions, leaky ReLU 0.2.

    The paper's decoder for 227×227 ImageNet images uses 4,096-wide FC layers and a 256×4×4
    start; here the FC width is X's pixel count clipped to [512, 4096] and the start map is
    ~4×4 with ``2·width·2^k`` channels (at most 256).
    """

    def __init__(self, geo: Geometry, width: int = 32, mean_image: torch.Tensor | None = None) -> None:
        fc = int(min(4096, max(512, math.prod(geo.x_shape))))
        widths = geo.widths(width)
        h, w = geo.start
        layers: list[nn.Module] = [
            nn.Flatten(),
            nn.Linear(geo.features, fc),
            nn.LeakyReLU(0.2),
            nn.Linear(fc, fc),
            nn.LeakyReLU(0.2),
            nn.Linear(fc, widths[0] * h * w),
            nn.LeakyReLU(0.2),
            nn.Unflatten(1, (widths[0], h, w)),
        ]
        channels, height, width_px = geo.x_shape
        for i, (cin, cout) in enumerate(zip(widths, widths[1:])):
            last = i == geo.ups - 1
            upconv = nn.ConvTranspose2d(cin, channels if last else cout, 5, stride=2, padding=2, output_padding=1)
            layers += [_zero(upconv)] if last else [upconv, nn.LeakyReLU(0.2)]
        if geo.ups == 0:
            layers.append(_zero(nn.Conv2d(widths[0], channels, 3, padding=1)))
        layers += [_Resize((height, width_px)), MeanImageOutput(geo.x_shape, mean_image)]
        super().__init__(*layers)


class _ResBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            *_conv_bn_relu(channels, channels),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.body(x))


class _ResUpBlock(nn.Module):
    """×2 up-block: transposed conv → BN → ReLU → conv → BN, plus a transposed-conv skip path."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
        )
        self.skip = nn.Sequential(nn.ConvTranspose2d(cin, cout, 2, stride=2, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.skip(x))


class ResNetDecoder(nn.Sequential):
    """NoPeek's testbed: a residual block, then residual ×2 up-blocks, resize, 3×3 conv, sigmoid."""

    def __init__(self, geo: Geometry, width: int = 32, mean_image: torch.Tensor | None = None) -> None:
        widths = geo.widths(width)
        layers: list[nn.Module] = [_Stem(geo, widths[0]), _ResBlock(widths[0])]
        layers += [_ResUpBlock(cin, cout) for cin, cout in zip(widths, widths[1:])]
        channels, height, w = geo.x_shape
        layers += [
            _Resize((height, w)),
            _zero(nn.Conv2d(widths[-1], channels, 3, padding=1)),
            MeanImageOutput(geo.x_shape, mean_image),
        ]
        super().__init__(*layers)


def build_decoder(
    arch: str,
    z_shape: tuple[int, ...],
    x_shape: tuple[int, ...],
    width: int = 32,
    mean_image: torch.Tensor | None = None,
) -> nn.Module:
    """The decoder ``arch`` for Z rows of ``z_shape`` and X rows of ``x_shape``.

    Untrained, it predicts ``mean_image`` (a flat 0.5 grey without one) for every Z.
    """
    if arch == "upsample":
        return UpsampleDecoder(geometry(z_shape, x_shape), width, mean_image)
    if arch == "alexnet":
        return AlexNetDecoder(geometry(z_shape, x_shape, flat=True), width, mean_image)
    if arch == "resnet":
        return ResNetDecoder(geometry(z_shape, x_shape), width, mean_image)
    raise UnknownNameError("decoder", arch, ARCHS)
