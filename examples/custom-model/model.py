"""A custom model for leakaudit: any module built by a factory function.

Use it as the spec ``examples/custom-model/model.py:build``. The factory takes the
architecture options leakaudit passes (``num_classes``, ``in_chans``) and declares the
input it expects with ``input_size = (C, H, W)``, so dumps resize data to it.
"""

from __future__ import annotations

from torch import nn


class SmallCNN(nn.Module):
    """Two convolution blocks (the client's encoder) and a classifier head (the server's)."""

    def __init__(self, num_classes: int = 10, in_chans: int = 1) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(in_chans, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )  # fmt: skip
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, num_classes))

    def forward(self, x):
        return self.head(self.encoder(x))


def build(num_classes: int = 10, in_chans: int = 1) -> SmallCNN:
    return SmallCNN(num_classes, in_chans)


build.input_size = (1, 16, 16)
