"""Scrunch (center loss): pull every split activation towards its public class's centre.

The split activations Z feed two branches (the paper's Fig. 2): the rest of the model,
trained with the cross-entropy L_S of the public task, and a centre-loss branch

    L_C = ½ · mean_i ‖f(z_i) − c_{y_i}‖²

with one centre per public class (``center_scale="absolute"``, the paper's form). ``f`` is
the identity, or with ``center_dim`` a fixed dimensionality reduction fitted once on the
pre-trained model's attacker-train activations (a PCA projection, standing in for the
paper's fixed pre-trained autoencoder; it is never trained). The joint loss is
λ·L_C + (1 − λ)·L_S and the whole model is fine-tuned with a low learning rate.

The paper's L_C is not scale-free: a network can shrink every activation and let the next
layer scale them back up, which lowers L_C without making the classes any tighter relative
to one another. Measured on Fashion-MNIST (4 public groups, λ = 0.9), the intra-class
distance fell 70× but the inter-centre distance 43×, so an attacker that standardises Z sees
almost the same geometry. ``center_scale="relative"`` divides by the batch's total scatter,

    L_C = Σ_i ‖f(z_i) − c_{y_i}‖² / Σ_i ‖f(z_i) − mean_b f(z_b)‖²

(within-class scatter over total scatter, in [0, 1] when the centres are the class means),
which no rescaling of Z can lower.

Centres are not trained by gradient: after each step they move towards the batch as in
Wen et al. (2016), ``c_j ← c_j − α · Σ_{i: y_i = j} (c_j − f(z_i)) / (1 + n_j)``, with rate
α = ``center_alpha``; they start at the class means of the pre-trained model's
activations. L_C is averaged over the batch (per-sample, as Keras averages a loss layer's
output), so λ weighs comparable magnitudes whatever the batch size.

Under ``torchrun`` every rank holds the same centres: they start from the class means of
the activations of all attacker-train rows (gathered across ranks), are broadcast from
rank 0 before training, and each update sums the counts and ``f(z_i)`` of the whole
group's batch (one all-reduce per step), so it is the single-process update of that batch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from leakaudit.metrics.distance import intra_class_distance_stats
from leakaudit.recipes.base import Batch, Objective, RecipeContext
from leakaudit.registry import RECIPES

CENTER_SCALES = ("absolute", "relative")


@dataclass(frozen=True)
class CenterLossConfig:
    """Settings of Scrunch's centre loss.

    Attributes:
        lambda_: λ, the weight of the centre loss in λ·L_C + (1 − λ)·L_S, in [0, 1]
            (``--lambda``; the paper's best MNIST value is 0.9).
        center_alpha: α, the rate at which centres follow the batches (Wen et al. 2016), in (0, 1].
        center_dim: reduce Z to this many dimensions with a fixed PCA before the centre loss
            (the paper's Fig. 2 autoencoder); ``None`` applies the loss to Z itself.
        center_scale: ``absolute`` (the paper's ½·mean squared distance to the centre) or
            ``relative`` (within-class over total scatter of the batch; scale-free).
    """

    lambda_: float = 0.9
    center_alpha: float = 0.5
    center_dim: int | None = None
    center_scale: str = "absolute"

    def __post_init__(self) -> None:
        if not 0.0 <= self.lambda_ <= 1.0:
            raise ValueError(f"--lambda must lie in [0, 1], got {self.lambda_:g}.")
        if not 0.0 < self.center_alpha <= 1.0:
            raise ValueError(f"--center-alpha must lie in (0, 1], got {self.center_alpha:g}.")
        if self.center_dim is not None and self.center_dim <= 0:
            raise ValueError(f"--center-dim must be positive, got {self.center_dim}.")
        if self.center_scale not in CENTER_SCALES:
            raise ValueError(f"--center-scale must be one of {', '.join(CENTER_SCALES)}, got {self.center_scale!r}.")


class CenterLoss(Objective):
    """λ·L_C + (1 − λ)·L_S with Wen et al.'s centre updates (see the module docstring)."""

    name = "center-loss"
    default_lr = 1e-4  # the paper fine-tunes with a low rate (1e-5 in Keras, for many more epochs)
    needs_val_z = True

    def __init__(self, config: CenterLossConfig, context: RecipeContext) -> None:
        self.config = config
        self.layer = context.layer
        self.group = context.group
        z, labels = context.train_activations()
        self.mean: torch.Tensor | None = None
        self.components: torch.Tensor | None = None
        if config.center_dim is not None:
            dim = min(config.center_dim, z.shape[1], z.shape[0])
            self.mean = z.mean(0)
            # Principal directions of the pre-trained activations; fixed from here on.
            _, _, v = torch.linalg.svd(z - self.mean, full_matrices=False)
            self.components = v[:dim].contiguous()
        features = self._reduce(z)
        k = context.data.num_classes
        centers = torch.zeros(k, features.shape[1])
        for j in range(k):
            members = features[labels == j]
            if len(members):
                centers[j] = members.mean(0)
        self.centers = centers.to(context.device)
        if self.mean is not None:
            assert self.components is not None  # set with the mean, from the same SVD
            self.mean = self.mean.to(context.device)
            self.components = self.components.to(context.device)

    def _reduce(self, z: torch.Tensor) -> torch.Tensor:
        flat = z.flatten(1)
        if self.components is None:
            return flat
        assert self.mean is not None  # set with the components
        return (flat - self.mean) @ self.components.T

    def center_loss(self, z: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """L_C = ½ · mean_i ‖f(z_i) − c_{y_i}‖², or with ``relative`` within / total scatter."""
        features = self._reduce(z)
        within = (features - self.centers[target]).pow(2).sum(1)
        if self.config.center_scale == "absolute":
            return 0.5 * within.mean()
        within = within.sum()
        total = (features - features.mean(0)).pow(2).sum()
        # A batch whose activations (nearly) coincide has no scale to compare with: cap the
        # ratio at 1e6 (a constant there, so no gradient) rather than divide by zero.
        return within / torch.maximum(total, 1e-6 * within.detach()).clamp_min(torch.finfo(features.dtype).tiny)

    def loss(self, batch: Batch, logits: torch.Tensor, z: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        assert z is not None
        ce = F.cross_entropy(logits, batch.target)
        lc = self.center_loss(z, batch.target)
        lam = self.config.lambda_
        return lam * lc + (1.0 - lam) * ce, {"cross_entropy": ce, "center_loss": lc}

    @torch.no_grad()
    def after_step(self, batch: Batch, z: torch.Tensor | None) -> None:
        assert z is not None
        features = self._reduce(z)
        target = batch.target
        k = self.centers.shape[0]
        counts = torch.bincount(target, minlength=k).to(features.dtype)
        # Σ_{i: y_i=j} (c_j − f(z_i)) = n_j c_j − Σ_{i: y_i=j} f(z_i)
        sums = torch.zeros_like(self.centers).index_add_(0, target, features)
        if self.group is not None:  # the group's batch, not this rank's share of it
            both = torch.cat([counts[:, None], sums], dim=1)
            dist.all_reduce(both, op=dist.ReduceOp.SUM)
            counts, sums = both[:, 0], both[:, 1:]
        delta = (counts[:, None] * self.centers - sums) / (1.0 + counts[:, None])
        self.centers -= self.config.center_alpha * delta

    def epoch_metrics(self, z: torch.Tensor | None, labels: torch.Tensor) -> dict[str, float]:
        if z is None:
            return {}
        stats = intra_class_distance_stats(z, labels)
        return {"intra_class_distance": stats.value, "scatter_ratio": stats.scatter_ratio}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"centers": self.centers}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.centers = state["centers"].clone()

    def shared_tensors(self) -> list[torch.Tensor]:
        fixed = [t for t in (self.mean, self.components) if t is not None]
        return [self.centers, *fixed]

    def describe(self) -> dict[str, Any]:
        return {"lambda": self.config.lambda_, "center_alpha": self.config.center_alpha, "center_dim": self.config.center_dim,
                "center_scale": self.config.center_scale}


@RECIPES.register("center-loss", config=CenterLossConfig)
def center_loss(config: CenterLossConfig, context: RecipeContext) -> CenterLoss:
    """Scrunch: centre loss on the split activations, joint with cross-entropy (λ)."""
    return CenterLoss(config, context)
