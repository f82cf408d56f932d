"""Shredder (Mireshghallah et al. 2020): learned additive noise at the split.

The pre-trained model stays frozen; only a noise distribution at the split is learned.
Every element of Z gets independent Laplace noise with a learned location μ and scale b,
drawn anew for every row (reparameterised, ε = −sign(u)·log(1 − 2|u|), u ~ U(−½, ½)),
and trained with

    CE(model(z + μ + b·ε), y) − β · mean(log b)

so the noise grows as large as the public task allows (``noise_weight`` = β). Model
selection keeps the epoch with the largest noise whose validation public accuracy stays
within ``tolerance`` of the unhardened model's — the baseline of Scrunch's Table 1.

The deployed encoder includes the sampling: ``encoder.pt2`` draws ε from torch's default
generator, so ``torch.manual_seed(s)`` before running it fixes the noise (``leakaudit
dump`` seeds each batch from ``--seed`` and its first row); the learned μ and b are also saved in
``noise.safetensors``. The noise module declares itself to the ``fisher-leakage`` metric with a
non-persistent buffer ``noise_laplace`` (it survives ``torch.export``, and is not in the saved
weights): its per-element scale b = exp(``log_scale``) defines the Fisher information of Z.

Under ``torchrun`` the frozen model is not wrapped in DistributedDataParallel (it has
nothing to train); the noise's μ and log b are broadcast from rank 0 before training and
their gradients averaged over ranks after every step, so every rank holds the same noise
parameters. Each rank draws ε from its own stream (seed + rank).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from leakaudit.recipes.base import Batch, EpochStats, Objective, RecipeContext
from leakaudit.registry import RECIPES


@dataclass(frozen=True)
class ShredderConfig:
    """Settings of Shredder.

    Attributes:
        noise_weight: β, how hard the noise is pushed up against the cross-entropy.
        init_scale: initial Laplace scale b, relative to the mean |Z| of the pre-trained model.
        tolerance: the largest drop of validation public accuracy (absolute, e.g. 0.01 =
            1 point) at which a larger noise is still preferred.
    """

    noise_weight: float = 0.1
    init_scale: float = 0.1
    tolerance: float = 0.01

    def __post_init__(self) -> None:
        if not self.noise_weight > 0.0:
            raise ValueError(f"noise_weight must be positive, got {self.noise_weight:g}.")
        if not self.init_scale > 0.0:
            raise ValueError(f"init_scale must be positive, got {self.init_scale:g}.")
        if not 0.0 <= self.tolerance < 1.0:
            raise ValueError(f"tolerance must lie in [0, 1), got {self.tolerance:g}.")


#: The buffer that declares a Laplace noise whose scale is exp(``log_scale``) of the same module.
LAPLACE_BUFFER = "noise_laplace"
#: The float32 next to −½ towards 0 (−½ + 2⁻²⁵), as a Python float so that exporters see a constant.
_ABOVE_MINUS_HALF = -0.5 + 2.0**-25


class LaplaceNoise(nn.Module):
    """Adds Laplace noise with learned per-element location and log-scale to its input."""

    def __init__(self, shape: tuple[int, ...], scale: float) -> None:
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(shape))
        self.log_scale = nn.Parameter(torch.full(shape, math.log(scale)))
        self.register_buffer(LAPLACE_BUFFER, torch.tensor(1.0), persistent=False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        # torch.rand draws from [0, 1): u = −½ happens (one float32 draw in 2²⁴, a few times in an
        # epoch of 20,000 rows of 120 elements), and log1p(−2|u|) = log 0 is −∞, a NaN loss. The
        # clamp moves only that draw, to the nearest float32 above −½; every other draw is unchanged.
        u = (torch.rand_like(z) - 0.5).clamp(min=_ABOVE_MINUS_HALF)
        eps = -torch.sign(u) * torch.log1p(-2.0 * u.abs())
        return z + self.loc + self.log_scale.exp() * eps


class NoisyEncoder(nn.Module):
    """The client's encoder with Shredder's noise: ``noise(encoder(x))``."""

    def __init__(self, encoder: nn.Module, noise: LaplaceNoise) -> None:
        super().__init__()
        self.encoder = encoder
        self.noise = noise

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.noise(self.encoder(x))


class Shredder(Objective):
    """Frozen model, learned Laplace noise at the split (see the module docstring)."""

    name = "shredder"
    trains_model = False
    default_lr = 1e-2  # only the noise is trained: a location and a log-scale per element

    def __init__(self, config: ShredderConfig, context: RecipeContext) -> None:
        self.config = config
        self.layer = context.layer
        z, _ = context.train_activations()
        self.signal = float(z.abs().mean()) or 1.0
        shape = tuple(context.layer_shape)
        self.noise = LaplaceNoise(shape, config.init_scale * self.signal).to(context.device)
        self.baseline_accuracy = context.baseline.accuracy

    def parameters(self) -> list[nn.Parameter]:
        return list(self.noise.parameters())

    def transform(self, z: torch.Tensor) -> torch.Tensor:
        return self.noise(z)

    def noise_to_signal(self) -> float:
        """Mean noise scale b over mean |Z| of the pre-trained model (E|ε| = 1 for Laplace)."""
        return float(self.noise.log_scale.detach().exp().mean()) / self.signal

    def loss(self, batch: Batch, logits: torch.Tensor, z: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        ce = F.cross_entropy(logits, batch.target)
        growth = self.noise.log_scale.mean()
        return ce - self.config.noise_weight * growth, {"cross_entropy": ce}

    def epoch_metrics(self, z: torch.Tensor | None, labels: torch.Tensor) -> dict[str, float]:
        return {"noise_to_signal": self.noise_to_signal()}

    def is_better(self, candidate: EpochStats, best: EpochStats | None) -> bool:
        if best is None:
            return True
        floor = self.baseline_accuracy - self.config.tolerance
        ok, best_ok = candidate.val_public_accuracy >= floor, best.val_public_accuracy >= floor
        if ok != best_ok:
            return ok
        if not ok:  # neither keeps the accuracy: prefer the more accurate
            return candidate.val_public_accuracy > best.val_public_accuracy
        return candidate.metrics.get("noise_to_signal", 0.0) > best.metrics.get("noise_to_signal", 0.0)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.noise.state_dict())

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.noise.load_state_dict(state)

    def wrap_encoder(self, encoder: nn.Module) -> nn.Module:
        noise = LaplaceNoise(tuple(self.noise.loc.shape), 1.0)
        noise.load_state_dict({k: v.detach().cpu() for k, v in self.noise.state_dict().items()})
        return NoisyEncoder(encoder, noise.requires_grad_(False))

    def describe(self) -> dict[str, Any]:
        return {
            "noise_weight": self.config.noise_weight,
            "init_scale": self.config.init_scale,
            "tolerance": self.config.tolerance,
            "noise_to_signal": self.noise_to_signal(),
            "baseline_val_public_accuracy": self.baseline_accuracy,
        }


@RECIPES.register("shredder", config=ShredderConfig)
def shredder(config: ShredderConfig, context: RecipeContext) -> Shredder:
    """Shredder: learned Laplace noise at the split of a frozen model (Scrunch's Table 1 baseline)."""
    return Shredder(config, context)
