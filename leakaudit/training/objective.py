"""Training a whole model with an :class:`~leakaudit.recipes.base.Objective`: ``train`` and ``harden``.

One objective serves every such run: plain cross-entropy (``leakaudit train``), Scrunch's
centre loss, NoPeek's distance correlation and Shredder's learned noise. :func:`fit` runs it
through the engine's loop (:func:`leakaudit.training.engine.fit`) over a
:class:`~leakaudit.training.prepared.PreparedData`: epoch 0 is the model as given, selection
is the objective's :meth:`~leakaudit.recipes.base.Objective.is_better`, and divergence is
reported to the caller, which refuses the run (:func:`divergence_message`).

Z is recorded at the split module by :class:`leakaudit.layers.LayerCapture`, with the
objective's :meth:`~leakaudit.recipes.base.Objective.transform` replacing the layer's output
(Shredder's noise), so the rest of the model computes on what the deployed encoder would send.

Under ``torchrun`` (``group`` below is this process's
:class:`~leakaudit.distributed.Context`) evaluation splits each single-process evaluation
batch across ranks and all-reduces the sums, so every rank sees the same validation numbers
and takes the same early-stopping and selection decisions; validation Z is gathered in row
order. The objective's own state (centres, Shredder's noise) is broadcast from rank 0 at the
start and kept identical after (centre updates use the whole group's batch, noise gradients
are averaged). With a model without batch norm or dropout, a run on ``world`` ranks follows
the single-process run with the same ``--batch-size`` up to float noise, the padded rows of
each epoch's last step and where its last short batch falls
(tests/recipes/test_distributed_harden.py states the tolerance).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from leakaudit import distributed
from leakaudit.distributed import Context
from leakaudit.errors import DataError, LeakAuditError, UsageError
from leakaudit.layers import LayerCapture
from leakaudit.recipes.base import EpochStats, Objective
from leakaudit.training import engine
from leakaudit.training.engine import Diverged, EpochTraining, Outcome, Schedule, StepLoss
from leakaudit.training.prepared import ROLE_TRAIN, ROLE_VAL, PreparedData, batches, check_group, make_batch

#: ``progress(description, done, total)``: what domain code reports to a progress bar.
Progress = Callable[[str, float, "float | None"], None]
#: ``forward(x)`` → (logits, Z): one forward pass with Z recorded at the split.
ZForward = Callable[[torch.Tensor], "tuple[torch.Tensor, torch.Tensor | None]"]


@contextlib.contextmanager
def z_capture(
    model: nn.Module,
    layer: str | None,
    transform: Callable[[torch.Tensor], torch.Tensor],
    runner: Callable[[torch.Tensor], object] | None = None,
) -> Iterator[ZForward]:
    """``forward(x)`` → (logits, Z), with Z the (transformed) output of ``layer``; ``None`` without a layer.

    Forwards run through ``runner`` (the model's DistributedDataParallel wrapper) if given.
    """
    run = runner if runner is not None else model
    if layer is None:
        yield lambda x: (_logits(run(x)), None)
        return

    def checked(output: object) -> torch.Tensor:
        if not isinstance(output, torch.Tensor):
            raise UsageError(f"layer {layer!r} outputs a {type(output).__name__}, not a tensor.")
        return transform(output)

    with LayerCapture(model, layer, transform=checked, runner=run) as hook:

        def forward(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
            logits, z = hook.run(x)
            logits = _logits(logits)
            if z is None:
                raise LeakAuditError(f"the hook on layer {layer!r} obtained no output: the layer was not called.")
            assert isinstance(z, torch.Tensor)
            return logits, z

        yield forward


def _logits(out: object) -> torch.Tensor:
    if not isinstance(out, torch.Tensor):
        raise UsageError(f"the model returns a {type(out).__name__}; training needs a logits tensor.")
    return out


# --------------------------------------------------------------------------- evaluation


@dataclass
class Evaluation:
    """A pass over some rows in eval mode: mean loss, public accuracy, loss parts, Z."""

    loss: float
    accuracy: float
    parts: dict[str, float]
    z: torch.Tensor | None
    labels: torch.Tensor
    rows: int


def evaluate(
    model: nn.Module,
    objective: Objective,
    data: PreparedData,
    rows: np.ndarray,
    *,
    batch_size: int,
    device: torch.device,
    keep_z: bool = False,
    max_z_rows: int = 20_000,
    layer: str | None = None,
    group: Context | None = None,
) -> Evaluation:
    """Run ``model`` (with the objective's transform at the split) over ``rows``.

    ``layer`` records Z at another layer than the objective's (the plain objective has none).
    With a distributed ``group`` each rank runs its share of every batch, the sums are
    all-reduced and Z is gathered in row order: every rank returns the same evaluation.
    """
    was_training = model.training
    model.eval()
    total = 0
    correct: float = 0  # a count, summed as a float over ranks
    loss_sum = 0.0
    parts_sum: dict[str, float] = {}
    zs: list[torch.Tensor] = []
    kept = 0
    try:
        with z_capture(model, layer or objective.layer, objective.transform) as forward, torch.no_grad():
            for batch in batches(data, rows, batch_size, device, None, group):
                logits, z = forward(batch.model_input)
                loss, parts = objective.loss(batch, logits, z)
                size = len(batch)
                total += size
                correct += int((logits.argmax(1) == batch.target).sum())
                if size:  # under torchrun a rank may hold no rows of a batch (its loss is then NaN)
                    loss_sum += float(loss) * size
                    for name, value in parts.items():
                        parts_sum[name] = parts_sum.get(name, 0.0) + float(value) * size
                if keep_z and z is not None and kept < max_z_rows:
                    if group is not None:  # every rank keeps the whole batch's Z, in row order
                        z = distributed.gather_strided(z.detach(), batch.group_rows, group)
                    zs.append(z[: max_z_rows - kept].flatten(1).float().cpu())
                    kept += zs[-1].shape[0]
    finally:
        model.train(was_training)
    if group is not None:
        names = sorted(parts_sum)
        sums = distributed.all_reduce_sum([loss_sum, correct, total, *(parts_sum[k] for k in names)], device)
        loss_sum, correct, total = sums[0], sums[1], int(sums[2])
        parts_sum = dict(zip(names, sums[3:]))
    labels = data.labels(data.public.name)[torch.from_numpy(rows)]
    return Evaluation(
        loss=loss_sum / max(total, 1),
        accuracy=correct / max(total, 1),
        parts={k: v / max(total, 1) for k, v in parts_sum.items()},
        z=torch.cat(zs) if zs else None,
        labels=labels[:kept] if zs else labels,
        rows=total,
    )


def accuracy_on(
    model: nn.Module,
    objective: Objective,
    data: PreparedData,
    role: int,
    *,
    batch_size: int,
    device: torch.device,
    group: Context | None = None,
) -> float:
    """Public-task accuracy of ``model`` (with the objective's transform) on the rows of ``role``."""
    return evaluate(model, objective, data, data.rows(role), batch_size=batch_size, device=device, group=group).accuracy


# --------------------------------------------------------------------------- training


def snapshot(model: nn.Module, objective: Objective) -> dict[str, dict[str, torch.Tensor]]:
    """Detached copies of the model's and the objective's state."""
    return {
        "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "objective": {k: v.detach().clone() for k, v in objective.state_dict().items()},
    }


def restore(model: nn.Module, objective: Objective, state: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
    model.load_state_dict(state["model"])
    objective.load_state_dict(state["objective"])


class _ObjectiveTask(engine.Task[EpochStats]):
    """The engine's view of an objective: batches of attacker-train rows, validation on attacker-validation rows."""

    short_batches = "merge"  # batch statistics (BatchNorm, dCor) need two rows: a lone last row joins its batch

    def __init__(self, model: nn.Module, objective: Objective, data: PreparedData, batch_size: int,
                 device: torch.device, group: Context | None) -> None:
        self.model, self.objective, self.data = model, objective, data
        self.batch_size, self.device, self.group = batch_size, device, group
        self.train_rows = torch.from_numpy(data.rows(ROLE_TRAIN))
        self.val_rows = data.rows(ROLE_VAL)
        self.rows = len(self.train_rows)

    @contextlib.contextmanager
    def training(self, forward: engine.Forward) -> Iterator[Callable[[torch.Tensor], StepLoss]]:
        if self.objective.trains_model:
            self.model.train()
        else:
            self.model.eval()  # frozen model: BatchNorm statistics and dropout as deployed
        # The hook lives for the training batches only: validation installs its own.
        with z_capture(self.model, self.objective.layer, self.objective.transform, runner=forward) as z_forward:

            def step(positions: torch.Tensor) -> StepLoss:
                batch = make_batch(self.data, self.train_rows[positions], self.device, self.group)
                logits, z = z_forward(batch.model_input)
                loss, parts = self.objective.loss(batch, logits, z)
                after = lambda: self.objective.after_step(batch, None if z is None else z.detach())  # noqa: E731
                return StepLoss(loss, len(batch), parts, after)

            yield step

    def validate(self, training: EpochTraining) -> EpochStats:
        val = evaluate(
            self.model, self.objective, self.data, self.val_rows, batch_size=self.batch_size, device=self.device,
            keep_z=self.objective.needs_val_z, group=self.group,
        )
        metrics = {f"train_{k}": v for k, v in training.parts.items()}
        metrics.update({f"val_{k}": v for k, v in val.parts.items()})
        metrics.update(self.objective.epoch_metrics(val.z, val.labels))
        seconds = time.perf_counter() - training.started
        return EpochStats(training.epoch, training.loss, val.loss, val.accuracy, seconds, metrics)

    def val_loss(self, stats: EpochStats) -> float:
        return stats.val_loss

    def is_better(self, candidate: EpochStats, best: EpochStats | None) -> bool:
        return self.objective.is_better(candidate, best)

    def snapshot(self) -> dict[str, dict[str, torch.Tensor]]:
        return snapshot(self.model, self.objective)

    def restore(self, state: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        restore(self.model, self.objective, state)


def fit(
    model: nn.Module,
    objective: Objective,
    data: PreparedData,
    *,
    device: torch.device,
    epochs: int,
    batch_size: int,
    lr: float,
    patience: int,
    generator: torch.Generator,
    progress: Progress | None = None,
    description: str = "train",
    on_epoch: Callable[[EpochStats], None] | None = None,
    group: Context | None = None,
) -> Outcome[EpochStats]:
    """Train ``model`` on attacker-train rows with ``objective``, early-stopping on validation.

    Epoch 0 is the model as given; the selected epoch (by :meth:`Objective.is_better`) is
    restored into ``model`` and ``objective`` at the end — also when the loss diverges, in
    which case the outcome carries where (and nothing after the last good epoch is kept).

    With a distributed ``group`` every rank calls this with the same arguments (the same
    ``generator`` seed) and trains its share of each batch with DistributedDataParallel (see
    the module docstring); every rank ends with the same weights, objective state and outcome.
    """
    train_rows, val_rows = data.rows(ROLE_TRAIN), data.rows(ROLE_VAL)
    if len(train_rows) < 2 or len(val_rows) < 1:
        raise DataError(
            f"too few rows to train: {len(train_rows)} attacker-train and {len(val_rows)} attacker-validation. "
            "Use more data (--limit) or other --split fractions."
        )
    if objective.trains_model:
        params = [p for p in model.parameters() if p.requires_grad]
    else:
        model.requires_grad_(False)
        params = []
    own = objective.parameters()  # not the model's: DistributedDataParallel does not average their gradients
    params += own
    if group is not None:
        check_group(data, batch_size, group)
        distributed.broadcast_tensors([*model.state_dict().values(), *objective.shared_tensors()])
    outcome = engine.fit(
        model,
        _ObjectiveTask(model, objective, data, batch_size, device, group),
        Schedule(epochs=epochs, batch_size=batch_size, lr=lr, patience=patience),
        generator=generator,
        device=device,
        ctx=group,
        params=params,
        own_params=own,
        data_parallel=objective.trains_model,
        initial_candidate=True,
        on_epoch=on_epoch,
        on_step=(lambda done, total: progress(description, done, total)) if progress is not None else None,
    )
    if progress is not None and outcome.diverged is None:
        progress(description, outcome.total_steps, outcome.total_steps)
    return outcome


def divergence_message(diverged: Diverged, best_epoch: int, kept: Path, hint: str) -> str:
    """The one-line error for a diverged run (see :class:`leakaudit.errors.NonFiniteError`)."""
    where = f"epoch {diverged.epoch}, batch {diverged.batch + 1}" if diverged.batch >= 0 else f"epoch {diverged.epoch}"
    return (
        f"the {diverged.what} became NaN or infinite at step {diverged.step} ({where}); training stopped. "
        f"The last good checkpoint (epoch {best_epoch}) is in {str(kept)!r}. {hint}"
    )
