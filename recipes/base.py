"""What a hardening recipe is and what it sees: the base class of every recipe's objective.

A recipe's factory receives a :class:`RecipeContext` (the pre-trained model, split layer,
data, baseline) and returns an :class:`Objective`. The training loop of the core
(:mod:`leakaudit.training`) feeds the objective one :class:`Batch` at a time with the model's
logits and the split-layer activations Z, minimises its :meth:`Objective.loss`, and selects
epochs with :meth:`Objective.is_better` over :class:`EpochStats`. Z is recorded by a forward
hook on the split module that keeps the forward going (and keeps gradients), so any model
whose split layer is a module works, traceable or not.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from leakaudit.distributed import Context

if TYPE_CHECKING:
    from leakaudit.training.objective import Evaluation
    from leakaudit.training.prepared import PreparedData


@dataclass
class Batch:
    """One minibatch: raw inputs in [0, 1], the model's input, and labels of every task.

    Under ``torchrun`` a batch is this rank's share of the group's batch: rows ``rank``,
    ``rank + world``, … of its ``group_rows`` rows (see :func:`leakaudit.training.prepared.batches`), which
    :func:`leakaudit.distributed.gather_strided` puts back together.
    """

    inputs: torch.Tensor
    model_input: torch.Tensor
    labels: dict[str, torch.Tensor]
    public: str
    group: Context | None = None
    group_rows: int = 0

    @property
    def target(self) -> torch.Tensor:
        return self.labels[self.public]

    def __len__(self) -> int:
        return self.inputs.shape[0]


class Objective:
    """A training objective over the logits and the split-layer activations Z.

    The base class is plain cross-entropy on the public task (``leakaudit train`` and the
    λ = 0 baseline); recipes override what they change.

    Attributes:
        name: how results name it.
        layer: the split module whose output is Z, or ``None`` when Z is not needed.
        trains_model: whether the model's own parameters are trained (Shredder freezes them).
        default_lr: learning rate when the user gives none.
    """

    name = "cross-entropy"
    layer: str | None = None
    trains_model = True
    default_lr = 1e-3
    #: keep validation Z for :meth:`epoch_metrics` (costs memory on wide layers)
    needs_val_z = False
    #: the deployed encoder draws noise at the split (:meth:`wrap_encoder`) that the model's
    #: weights do not hold: its state is saved as ``noise.safetensors`` and evaluation dumps
    #: run ``encoder.pt2``. True wherever :attr:`trains_model` is False, since then the noise is the hardening.
    noise_at_split = False

    def parameters(self) -> list[nn.Parameter]:
        """Trainable tensors of the objective itself (Shredder's noise)."""
        return []

    def transform(self, z: torch.Tensor) -> torch.Tensor:
        """What the deployed encoder adds at the split (Shredder's noise); identity here."""
        return z

    def loss(self, batch: Batch, logits: torch.Tensor, z: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of one batch and its named parts (logged per epoch)."""
        ce = F.cross_entropy(logits, batch.target)
        return ce, {"cross_entropy": ce}

    def after_step(self, batch: Batch, z: torch.Tensor | None) -> None:
        """Update non-gradient state after an optimiser step (Wen et al.'s centres)."""

    def epoch_metrics(self, z: torch.Tensor | None, labels: torch.Tensor) -> dict[str, float]:
        """Extra per-epoch numbers from the validation activations."""
        return {}

    def is_better(self, candidate: EpochStats, best: EpochStats | None) -> bool:
        """Model selection (early stopping): lower validation loss wins."""
        return best is None or candidate.val_loss < best.val_loss

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        return None

    def shared_tensors(self) -> list[torch.Tensor]:
        """Tensors that must be identical on every rank under ``torchrun``, broadcast from rank 0 before training.

        The live tensors of :meth:`state_dict` (which holds trainable ones too, such as Shredder's noise).
        """
        return list(self.state_dict().values())

    def wrap_encoder(self, encoder: nn.Module) -> nn.Module:
        """The client's encoder as deployed: the model's prefix plus whatever :meth:`transform` adds."""
        return encoder

    def describe(self) -> dict[str, Any]:
        """Settings that go into ``harden.json``."""
        return {}



@dataclass
class EpochStats:
    """One epoch: training loss, validation loss and public accuracy, the objective's numbers."""

    epoch: int
    train_loss: float | None
    val_loss: float
    val_public_accuracy: float
    seconds: float
    metrics: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "train_loss": _round(self.train_loss),
            "val_loss": _round(self.val_loss),
            "val_public_accuracy": _round(self.val_public_accuracy),
            **{k: _round(v) for k, v in self.metrics.items()},
            "seconds": round(self.seconds, 3),
        }


def _round(value: float | None) -> float | None:
    if value is None or not math.isfinite(value):
        return value
    return float(f"{value:.6g}")


@dataclass
class RecipeContext:
    """What a recipe's factory may look at to build its objective.

    Attributes:
        model: the pre-trained model (on ``device``), before any hardening.
        layer: the split module.
        data: every row, task and role.
        device: where training runs.
        batch_size: rows per step.
        baseline: the pre-trained model on attacker-validation rows (public accuracy, loss).
        layer_shape: shape of one row of Z.
        group: this process's place under ``torchrun``; ``None`` when alone.
    """

    model: nn.Module
    layer: str
    data: PreparedData
    device: torch.device
    batch_size: int
    baseline: Evaluation
    layer_shape: tuple[int, ...]
    group: Context | None = None

    def train_activations(self, max_rows: int = 20_000) -> tuple[torch.Tensor, torch.Tensor]:
        """Flattened Z of the pre-trained model on (up to ``max_rows``) attacker-train rows, and their public labels."""
        from leakaudit.training.objective import evaluate  # the core imports this module
        from leakaudit.training.prepared import ROLE_TRAIN

        rows = self.data.rows(ROLE_TRAIN)[:max_rows]
        evaluation = evaluate(
            self.model, Objective(), self.data, rows, batch_size=self.batch_size, device=self.device,
            keep_z=True, max_z_rows=max_rows, layer=self.layer, group=self.group,
        )
        assert evaluation.z is not None
        return evaluation.z, evaluation.labels
