"""Small models used by the tests, importable as ``tests.models_for_tests:FACTORY``.

The same file is loaded by path (``tests/models_for_tests.py:build``) to test file specs.
"""

from __future__ import annotations

import time

import torch
from torch import nn


class NestedNet(nn.Module):
    """Convolutions in a Sequential, 1×1 convolutions in a ModuleDict, a linear head."""

    input_size = (1, 12, 12)

    def __init__(self, num_classes: int = 4, in_chans: int = 1) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(in_chans, 4, 3), nn.ReLU(), nn.Conv2d(4, 8, 3), nn.ReLU())
        self.blocks = nn.ModuleDict({"a": nn.Conv2d(8, 8, 1), "b": nn.Conv2d(8, 8, 1)})
        self.head = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.blocks["b"](torch.relu(self.blocks["a"](x)))
        return self.head(x.mean((2, 3)))


def build(num_classes: int = 4, in_chans: int = 1) -> NestedNet:
    return NestedNet(num_classes, in_chans)


class Branchy(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it, so dumps must use the hook."""

    input_size = (1, 12, 12)

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.act = nn.ReLU()
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.conv(x)
        if z.abs().sum() > 0:  # depends on the data (always true for non-blank inputs)
            z = self.act(z)
        return self.head(z.mean((2, 3)))


def branchy() -> Branchy:
    return Branchy()


def _sleep(_module: nn.Module, _inputs: object) -> None:
    time.sleep(0.1)


def slow() -> NestedNet:
    """NestedNet that sleeps in every forward pass, so a test can kill a dump mid-run.

    The sleep sits in a pre-hook of a leaf convolution: torch.fx inlines ``forward`` methods
    but calls leaf modules, so the hook runs under FX truncation and hook capture alike.
    """
    model = NestedNet()
    model.features[0].register_forward_pre_hook(_sleep)
    return model


class Exploding(NestedNet):
    """Produces infinite activations in its first block for some rows."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)


def exploding() -> Exploding:
    model = Exploding()
    with torch.no_grad():
        model.features[0].weight.fill_(float("inf"))
    return model


class NoisyNet(nn.Module):
    """A split model whose client adds fresh Gaussian noise to every activation (Shredder's kind).

    It has BatchNorm and Dropout (eval mode matters). With ``branch`` its forward branches on the
    data, so FX cannot trace it and the dump cuts it with a hook.
    """

    def __init__(self, num_classes: int = 4, branch: bool = False) -> None:
        super().__init__()
        self.branch = branch
        self.features = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(4))
        self.noise = GaussianNoise(0.5)
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(96, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.features(x)
        if not self.branch or z.sum() > -1e9:  # the sum depends on the data: not traceable
            z = self.noise(z)
        return self.head(z)


class GaussianNoise(nn.Module):
    def __init__(self, sigma: float) -> None:
        super().__init__()
        self.sigma = sigma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.sigma * torch.randn_like(x)


def noisy() -> NoisyNet:
    torch.manual_seed(3)
    return NoisyNet()


def noisy_branchy() -> NoisyNet:
    torch.manual_seed(3)
    return NoisyNet(branch=True)
