"""NoPeek: decorrelate the split activations from the raw input (or a protected attribute).

Each batch is trained with α₁·dCor(X, Z) + α₂·CE (NoPeek's eq. 1), dCor being the
differentiable batch distance correlation of :mod:`leakaudit.metrics.dcor` (V-statistic,
exponent 1, as in NoPeek's code), whose square roots have a zero subgradient at 0 — with
plain ``sqrt`` a strong weight turns the loss into NaN as soon as distances collapse.

``against="input"`` decorrelates Z from the raw input rows (in [0, 1], as ``dump`` stores
them); ``against=TASK`` from the one-hot labels of a protected attribute instead — the
paper's attribute privacy (§IV-D), where the attacker should not learn that attribute.
The mean batch dCor is logged per epoch (the paper's Fig. 11).

Under ``torchrun`` each rank holds a share of every batch, and dCor is not a sum over rows:
the mean of per-rank dCors would be a different (smaller-batch, more biased) penalty. So X
and Z are gathered across ranks (:func:`leakaudit.distributed.gather_strided`) and every
rank computes dCor of the *whole group batch*, as a single process would; this rank's rows
of Z keep their gradient and the others' are constants, and the term's gradient is scaled
by the world size so that DistributedDataParallel's average over ranks is the
single-process gradient. Cost: one all-gather of X and Z per step, and the b × b distance
matrices (b = the group's batch) on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from leakaudit import distributed
from leakaudit.errors import ConfigError, UnknownNameError
from leakaudit.metrics.dcor import distance_correlation_torch
from leakaudit.recipes.base import Batch, Objective, RecipeContext
from leakaudit.registry import RECIPES


@dataclass(frozen=True)
class NoPeekConfig:
    """Settings of NoPeek.

    Attributes:
        alpha: α₁, the weight of dCor(X, Z) (``--alpha``, non-negative).
        ce_weight: α₂, the weight of the public task's cross-entropy.
        against: ``input`` (the raw rows) or the name of a task given with ``--task``
            (its one-hot labels: attribute privacy).
    """

    alpha: float = 1.0
    ce_weight: float = 1.0
    against: str = "input"

    def __post_init__(self) -> None:
        if not self.alpha >= 0.0:
            raise ValueError(f"--alpha must be non-negative, got {self.alpha:g}.")
        if not self.ce_weight > 0.0:
            raise ValueError(f"ce_weight must be positive, got {self.ce_weight:g}.")


class NoPeek(Objective):
    """α₁·dCor(X, Z) + α₂·CE on each batch."""

    name = "nopeek"
    default_lr = 1e-4

    def __init__(self, config: NoPeekConfig, context: RecipeContext) -> None:
        self.config = config
        self.layer = context.layer
        self.classes: int | None = None
        if config.against != "input":
            tasks = context.data.tasks
            if config.against not in tasks:
                raise UnknownNameError(
                    "task for --against",
                    config.against,
                    ["input", *tasks],
                    hint="Give it with --task NAME=SOURCE, or use --against input.",
                )
            if config.against == context.data.public.name:
                raise ConfigError("--against names the public task; NoPeek would decorrelate Z from what it must predict.")
            self.classes = len(tasks[config.against].class_names)

    def reference(self, batch: Batch) -> torch.Tensor:
        """What Z is decorrelated from: the raw inputs, or a protected attribute's one-hot labels."""
        if self.classes is None:
            return batch.inputs
        return F.one_hot(batch.labels[self.config.against], self.classes).to(batch.inputs.dtype)

    def loss(self, batch: Batch, logits: torch.Tensor, z: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        assert z is not None
        ce = F.cross_entropy(logits, batch.target)
        reference = self.reference(batch)
        group = batch.group
        if group is None:
            dcor = distance_correlation_torch(reference, z)
        else:  # the whole group's batch on every rank (see the module docstring)
            whole_x = distributed.gather_strided(reference, batch.group_rows, group)
            whole_z = distributed.gather_strided(z, batch.group_rows, group, differentiable=True)
            dcor = distance_correlation_torch(whole_x, whole_z)
            if dcor.requires_grad:
                dcor = distributed.scale_gradient(dcor, group.world_size)
        return self.config.alpha * dcor + self.config.ce_weight * ce, {"cross_entropy": ce, "dcor": dcor}

    def describe(self) -> dict[str, Any]:
        return {"alpha": self.config.alpha, "ce_weight": self.config.ce_weight, "against": self.config.against}


@RECIPES.register("nopeek", config=NoPeekConfig)
def nopeek(config: NoPeekConfig, context: RecipeContext) -> NoPeek:
    """NoPeek: α·dCor(X, Z) + CE, against the input or a protected attribute."""
    return NoPeek(config, context)
