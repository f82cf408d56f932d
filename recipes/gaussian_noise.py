"""Gaussian noise of a stated scale at the split, the model fine-tuned through it.

Every row's split activations are (optionally) clipped to L2 norm at most C and then get
independent Gaussian noise, drawn anew for every row:

    Z = clip_C(f(x)) + σ·ε,   ε ~ N(0, I),   clip_C(z) = z · min(1, C / ‖z‖₂)

and the whole model is fine-tuned with the public task's cross-entropy through that noise,
so that what follows the split learns to read noisy activations. σ (and C) are fixed, not
learned: the noise is the stated randomisation that Fisher-information leakage (dFIL,
:mod:`leakaudit.metrics.bounds`) measures, so σ must be the scale the deployed encoder
really draws.

σ is in the units of Z. Without clipping, fine-tuning is free to grow Z until the noise no
longer matters, which the measured dFIL then shows; clipping to C caps the signal, so σ / C
is the noise-to-signal ratio that stays true after training.

The deployed encoder includes the sampling (as Shredder's does): ``encoder.pt2`` draws ε
from torch's default generator, so ``torch.manual_seed(s)`` before running it fixes the
noise (``leakaudit dump`` seeds each batch from ``--seed`` and its first row); the noise stays on in eval mode,
because an encoder whose noise switched off outside training would leak exactly what an
unhardened one does. σ and C are buffers of the noise module (``noise_sigma``,
``noise_clip``; 0 = no clipping), so they survive ``torch.export`` and a metric finds them
in the exported encoder; they are also saved in ``noise.safetensors``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from leakaudit.recipes.base import Objective, RecipeContext
from leakaudit.registry import RECIPES

#: The buffer names a noise module declares its scale and clipping norm under.
SIGMA_BUFFER = "noise_sigma"
CLIP_BUFFER = "noise_clip"


@dataclass(frozen=True)
class GaussianNoiseConfig:
    """Settings of the Gaussian-noise recipe.

    Attributes:
        sigma: σ, the standard deviation of the noise added to every element of Z (units of Z).
        clip: C, the L2 norm each row of Z is clipped to before the noise (``None``: no clipping).
    """

    sigma: float = 1.0
    clip: float | None = None

    def __post_init__(self) -> None:
        if not (self.sigma > 0.0 and math.isfinite(self.sigma)):
            raise ValueError(f"--sigma must be a positive number, got {self.sigma:g}.")
        if self.clip is not None and not (self.clip > 0.0 and math.isfinite(self.clip)):
            raise ValueError(f"--clip must be a positive number, got {self.clip:g}.")


class GaussianNoise(nn.Module):
    """Clips each row to L2 norm ``clip`` (if given), then adds N(0, σ²) noise to every element.

    The noise is drawn in eval mode too: it is part of the deployed encoder.
    """

    noise_sigma: torch.Tensor
    noise_clip: torch.Tensor

    def __init__(self, sigma: float, clip: float | None = None) -> None:
        super().__init__()
        self.clips = clip is not None
        self.register_buffer(SIGMA_BUFFER, torch.tensor(float(sigma)))
        self.register_buffer(CLIP_BUFFER, torch.tensor(float(clip) if clip is not None else 0.0))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.clips:
            norm = torch.linalg.vector_norm(z.flatten(1), dim=1).view(-1, *([1] * (z.dim() - 1)))
            # C / max(‖z‖, C): 1 inside the ball, so rows already within it are left as they are.
            z = z * (self.noise_clip / torch.maximum(norm, self.noise_clip))
        return z + self.noise_sigma * torch.randn_like(z)

    def extra_repr(self) -> str:
        clip = f", clip={float(self.noise_clip):g}" if self.clips else ""
        return f"sigma={float(self.noise_sigma):g}{clip}"


class NoisyEncoder(nn.Module):
    """The client's encoder followed by the noise: ``noise(encoder(x))``."""

    def __init__(self, encoder: nn.Module, noise: GaussianNoise) -> None:
        super().__init__()
        self.encoder = encoder
        self.noise = noise

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.noise(self.encoder(x))


class GaussianNoiseObjective(Objective):
    """Cross-entropy through fixed Gaussian noise (after optional clipping) at the split."""

    name = "gaussian-noise"
    noise_at_split = True

    def __init__(self, config: GaussianNoiseConfig, context: RecipeContext) -> None:
        self.config = config
        self.layer = context.layer
        z, _ = context.train_activations()
        flat = z.flatten(1).double()
        # Scales of the pre-trained model's Z, so that σ can be read against the signal.
        self.z_rms = float(flat.pow(2).mean().sqrt())
        self.z_norm = float(flat.norm(dim=1).mean())
        self.noise = GaussianNoise(config.sigma, config.clip).to(context.device)

    def transform(self, z: torch.Tensor) -> torch.Tensor:
        return self.noise(z)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.noise.state_dict())

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.noise.load_state_dict(state)

    def wrap_encoder(self, encoder: nn.Module) -> nn.Module:
        return NoisyEncoder(encoder, GaussianNoise(self.config.sigma, self.config.clip))

    def describe(self) -> dict[str, Any]:
        return {
            "sigma": self.config.sigma,
            "clip": self.config.clip,
            "pretrained_z_rms": self.z_rms,
            "pretrained_z_norm": self.z_norm,
            "sigma_over_z_rms": self.config.sigma / self.z_rms if self.z_rms > 0 else None,
        }


@RECIPES.register("gaussian-noise", config=GaussianNoiseConfig)
def gaussian_noise(config: GaussianNoiseConfig, context: RecipeContext) -> GaussianNoiseObjective:
    """Gaussian noise of a stated scale σ at the split (after optional clipping to norm C), fine-tuned through."""
    return GaussianNoiseObjective(config, context)
