"""What every attack's training shares: its fit on in-memory tensors, evaluation, prediction, scaling.

Attacks read their rows into memory once and index tensors directly: for data that fits,
that is far faster than a ``DataLoader`` (no workers, no per-row collation). :func:`fit`
trains through the core's one loop (:func:`leakaudit.training.engine.fit`) with Adam, a
plateau schedule and selection on the validation score; a seeded :class:`torch.Generator`
makes the order of minibatches reproducible.

Model selection: training uses attacker-train rows only, the epoch kept (and the head or
decoder reported as strongest) is chosen on attacker-validation rows, and test rows are never
seen before the final report. A run whose loss becomes non-finite stops and keeps its best
epoch, as early stopping would.

Under ``torchrun`` (``WORLD_SIZE`` > 1) the loop trains with DistributedDataParallel
(gloo on CPU, nccl on CUDA), each rank on its share of every batch (see
:mod:`leakaudit.training.engine`). Validation and test rows are split the same way;
validation sums are all-reduced, so every rank takes the same early-stopping and
learning-rate decisions, and test predictions are gathered. Every rank ends with the same
weights and reports the same numbers. They are not the single-process numbers to the bit:
batch norm normalises each rank's half-batch on its own, the gradient is summed in another
order, and dropout draws other masks — tests/attacks/test_distributed_attacks.py states the
tolerance.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from leakaudit import distributed
from leakaudit.attacks._sources import Source, StreamSource, TensorSource, as_source, statistic_chunk_rows
from leakaudit.distributed import Context
from leakaudit.training import engine
from leakaudit.training.engine import EpochTraining, Schedule, StepLoss

#: ``on_progress(done, total)``: what domain code knows of progress bars.
OnProgress = Callable[[float, float], None]
#: ``progress(description, done, total)``: how attacks report several bars (one per model).
Progress = Callable[[str, float, "float | None"], None]
#: ``fn(outputs, targets)`` → a loss (scalar) or a score (one value per row).
TensorFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

#: Rows per forward pass when evaluating (no gradients, so larger than training batches).
EVAL_BATCH = 1024


@dataclass
class FitResult:
    """What one training run did.

    Attributes:
        epochs: epochs run (less than asked when early stopping ended the run).
        best_epoch: the epoch (1-based) whose weights were kept.
        val_score: validation score of the kept weights (higher is better).
        val_loss: validation loss of the kept weights.
        seconds: wall time of the whole run, validation included.
        seconds_per_epoch: ``seconds / epochs``.
        history: per epoch, ``train_loss``, ``val_loss`` and ``val_score``.
    """

    epochs: int
    best_epoch: int
    val_score: float
    val_loss: float
    seconds: float
    seconds_per_epoch: float
    history: list[dict[str, float | None]] = field(default_factory=list)


@dataclass(frozen=True)
class _Validation:
    epoch: int
    train_loss: float | None
    val_score: float
    val_loss: float


class _TensorTask(engine.Task[_Validation]):
    """The engine's view of an attack: (x, y) rows from a source, selection on the mean validation score."""

    def __init__(self, model: nn.Module, train: Source | tuple[torch.Tensor, torch.Tensor],
                 val: Source | tuple[torch.Tensor, torch.Tensor], loss_fn: TensorFn, score_fn: TensorFn,
                 val_loss_fn: TensorFn, device: torch.device, ctx: Context | None, *, step_rows: int | None = None) -> None:
        self.model, self.train, self.val = model, as_source(train), as_source(val)
        self.loss_fn, self.score_fn, self.val_loss_fn = loss_fn, score_fn, val_loss_fn
        self.device, self.ctx, self.step_rows = device, ctx, step_rows
        self.rows = self.train.rows
        has_batch_norm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
        self.short_batches = "drop" if has_batch_norm else "keep"  # batch norm cannot normalise one row
        self._order: torch.Tensor | None = None

    def epoch_order(self, generator: torch.Generator, ctx: Context | None) -> torch.Tensor:
        self._order = self.train.epoch_order(generator, ctx)
        return self._order

    @contextlib.contextmanager
    def training(self, forward: engine.Forward) -> Iterator[Callable[[torch.Tensor], StepLoss]]:
        self.model.train()
        assert self._order is not None, "the engine draws the epoch's order before training it"
        if self.step_rows is None and isinstance(self.train, StreamSource):
            raise ValueError("a streamed task needs step_rows to read its batches ahead")
        bounds = engine.step_bounds(len(self._order), self.step_rows or 1, self.short_batches) if self.step_rows else []

        with self.train.epoch(self._order, bounds) as take:

            def step(index: torch.Tensor) -> StepLoss:
                xb, yb = take(index)
                x = xb.to(self.device, non_blocking=True)
                y = yb.to(self.device, non_blocking=True)
                loss = self.loss_fn(forward(x).float(), y)  # the loss (SSIM included) in float32 whatever the forward ran in
                return StepLoss(loss, len(index))

            yield step

    def validate(self, training: EpochTraining) -> _Validation:
        score, loss = evaluate_source(self.model, self.val, self.score_fn, self.val_loss_fn, self.device, ctx=self.ctx)
        return _Validation(training.epoch, training.loss, score, loss)

    def val_loss(self, stats: _Validation) -> float:
        return stats.val_loss

    def is_better(self, candidate: _Validation, best: _Validation | None) -> bool:
        """A higher score; ties (within 1e-12) go to the lower validation loss."""
        score, loss = (-math.inf, math.inf) if best is None else (best.val_score, best.val_loss)
        return candidate.val_score > score + 1e-12 or (abs(candidate.val_score - score) <= 1e-12 and candidate.val_loss < loss)

    def plateau_score(self, stats: _Validation) -> float:
        return stats.val_score

    def snapshot(self) -> dict[str, torch.Tensor]:
        return copy.deepcopy(self.model.state_dict())

    def restore(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)


def seeded_start(model: nn.Module, seed: int, device: torch.device) -> tuple[Context | None, torch.device, torch.Generator]:
    """Where a run of an attack trains (``model`` moved there) and the generator of its minibatch order.

    The generator is seeded alike on every rank (the same permutations); alone, torch's own
    generator is seeded too (dropout masks; under torchrun the engine seeds each rank its own).
    """
    ctx = distributed.current(device)
    device = distributed.rank_device(device, ctx)
    model.to(device)
    generator = torch.Generator().manual_seed(seed)
    if ctx is None:
        torch.manual_seed(seed)
    return ctx, device, generator


def fit(
    model: nn.Module,
    train: Source | tuple[torch.Tensor, torch.Tensor],
    val: Source | tuple[torch.Tensor, torch.Tensor],
    **options: Any,
) -> FitResult:
    """Train ``model`` with Adam, keep the weights of its best validation epoch.

    A :class:`Fitting` (whose arguments these are) advanced to its last epoch and finished.
    """
    fitting = Fitting(model, train, val, **options)
    fitting.advance(fitting.epochs)
    return fitting.finish()


class Fitting:
    """:func:`fit` in steps: :meth:`advance` trains up to an epoch, :meth:`finish` keeps the best weights.

    Candidates trained side by side (:func:`leakaudit.attacks.halving.successive_halving`) are
    each a ``Fitting``; one advanced in pieces trains as :func:`fit` would (see
    :class:`leakaudit.training.engine.Run`).

    The learning rate is halved when the validation score stalls for a third of
    ``patience`` epochs; training stops after ``patience`` epochs without improvement.
    :meth:`finish` leaves the model in eval mode holding the best weights.

    Under ``torchrun`` every rank calls this with the same arguments and trains its share of
    each batch with DistributedDataParallel (see the module docstring); ``batch_size`` is
    the group's batch, ``world × (batch_size // world)`` rows.

    Args:
        model: the network to train (moved to ``device``).
        train: inputs and targets of the attacker-train rows (tensors, or a source: in memory or streamed).
        val: inputs and targets of the attacker-validation rows.
        loss_fn: ``loss(outputs, targets)`` → scalar, minimised.
        score_fn: ``score(outputs, targets)`` → one value per row, its mean maximised on
            validation (accuracy, negative MSE, SSIM); ties go to the lower validation loss.
        epochs: the most epochs to run.
        batch_size: rows per step.
        lr: Adam's learning rate.
        patience: epochs without a better validation score before stopping.
        seed: seeds initialisation-independent randomness (minibatch order, dropout).
        device: where to train (bare ``cuda`` is ``cuda:LOCAL_RANK`` under torchrun).
        weight_decay: Adam's L2 penalty.
        val_loss_fn: the loss reported on validation, if not ``loss_fn`` (must average over rows).
        keep_initial: the untrained model is a candidate too (epoch 0): for decoders that start
            out predicting the mean image, so that training which only fits noise is undone.
        autocast: run the training forward passes under ``torch.autocast`` with this dtype
            (see :func:`leakaudit.training.engine.autocast_dtype`); validation, selection and predictions stay float32.
        on_progress: called with ``(epochs done, epochs)`` after each epoch.
    """

    def __init__(
        self,
        model: nn.Module,
        train: Source | tuple[torch.Tensor, torch.Tensor],
        val: Source | tuple[torch.Tensor, torch.Tensor],
        *,
        loss_fn: TensorFn,
        score_fn: TensorFn,
        epochs: int,
        batch_size: int,
        lr: float,
        patience: int,
        seed: int,
        device: torch.device,
        weight_decay: float = 0.0,
        val_loss_fn: TensorFn | None = None,
        keep_initial: bool = False,
        autocast: torch.dtype | None = None,
        on_progress: OnProgress | None = None,
    ) -> None:
        if as_source(train).rows == 0 or as_source(val).rows == 0:
            raise ValueError("fit needs at least one training and one validation row")
        ctx, device, generator = seeded_start(model, seed, device)
        task = _TensorTask(model, train, val, loss_fn, score_fn, val_loss_fn or loss_fn, device, ctx,
                           step_rows=engine.step_rows_of(batch_size, ctx))
        self.epochs, self.on_progress = epochs, on_progress
        started = time.perf_counter()
        self.run = engine.Run(
            model,
            task,
            Schedule(epochs=epochs, batch_size=batch_size, lr=lr, patience=patience, weight_decay=weight_decay, plateau=True),
            generator=generator,
            device=device,
            ctx=ctx,
            params=list(model.parameters()),
            initial_candidate=keep_initial,
            autocast=autocast,
            on_epoch=(lambda v: on_progress(v.epoch, epochs) if v.epoch else None) if on_progress is not None else None,
        )
        self.seconds = time.perf_counter() - started

    @property
    def epoch(self) -> int:
        """Epochs trained so far."""
        return self.run.epoch

    @property
    def done(self) -> bool:
        """Early stopping, divergence or the last epoch ended the run."""
        return self.run.done

    @property
    def val_score(self) -> float:
        """The best validation score so far (−∞ before any)."""
        best = self.run.best
        return float(best.val_score) if best is not None else -math.inf

    @property
    def val_loss(self) -> float:
        """The validation loss of the best validation so far (+∞ before any)."""
        best = self.run.best
        return float(best.val_loss) if best is not None else math.inf

    def advance(self, until: int) -> bool:
        """Train up to epoch ``until``; whether the run may go on."""
        started = time.perf_counter()
        try:
            return self.run.advance(until)
        finally:
            self.seconds += time.perf_counter() - started

    def finish(self) -> FitResult:
        """Restore the best weights (eval mode) and say what the run did."""
        outcome = self.run.finish()
        if self.on_progress is not None:
            self.on_progress(self.epochs, self.epochs)  # complete the bar when early stopping ended the run
        return FitResult(
            epochs=outcome.epochs,
            best_epoch=outcome.best_epoch,
            val_score=self.val_score,
            val_loss=self.val_loss,
            seconds=self.seconds,
            seconds_per_epoch=self.seconds / max(outcome.epochs, 1),
            history=[
                {"train_loss": v.train_loss, "val_loss": v.val_loss, "val_score": v.val_score}
                for v in outcome.history
                if v.epoch > 0
            ],
        )


def evaluate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    score_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    device: torch.device,
    *,
    ctx: Context | None = None,
) -> tuple[float, float]:
    """Mean per-row score and mean loss of ``model`` on ``(x, y)`` in memory (see :func:`evaluate_source`)."""
    return evaluate_source(model, TensorSource(x, y), score_fn, loss_fn, device, ctx=ctx)


@torch.no_grad()
def evaluate_source(
    model: nn.Module,
    source: Source,
    score_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    device: torch.device,
    *,
    ctx: Context | None = None,
) -> tuple[float, float]:
    """Mean per-row score and mean loss of ``model`` on ``source``'s rows, in eval mode.

    With a distributed ``ctx`` each rank scores its share of the rows and the sums are
    all-reduced: every rank returns the same two numbers.
    """
    model.eval()
    score, loss, rows = 0.0, 0.0, 0
    for xb, yb in source.chunks(EVAL_BATCH, ctx):
        xb, yb = xb.to(device), yb.to(device)
        out = model(xb)
        score += float(score_fn(out, yb).double().sum())
        loss += float(loss_fn(out, yb)) * len(xb)
        rows += len(xb)
    if ctx is None:
        return score / rows, loss / rows
    score, loss, total = distributed.all_reduce_sum([score, loss, rows], device)
    return score / total, loss / total


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor | Source, device: torch.device) -> torch.Tensor:
    """``model(x)`` in eval mode, batch by batch, gathered on the CPU (``x`` a tensor or a source's inputs).

    Under ``torchrun`` each rank predicts its share of the rows and the predictions are
    gathered: every rank returns all of them, in order.
    """
    source = TensorSource(x, x) if isinstance(x, torch.Tensor) else x
    ctx = distributed.current(device)
    if ctx is None:
        model.eval()
        outs = [model(xb.to(device)).float().cpu() for xb, _ in source.chunks(EVAL_BATCH, None)]
        return torch.cat(outs) if outs else torch.empty(0)
    if source.rows == 0:
        return torch.empty(0)
    device = distributed.rank_device(device, ctx)
    model.to(device).eval()
    outs = [model(xb.to(device)).float() for xb, _ in source.chunks(EVAL_BATCH, ctx)]
    if not outs:  # a rank with no rows (fewer rows than ranks) still needs the shape of a prediction
        first, _ = next(source.chunks(1, None))
        local = model(first.to(device)).float()[:0]
    else:
        local = torch.cat(outs)
    return source.gather(local, ctx).cpu()


@dataclass(frozen=True)
class Standardizer:
    """Feature-wise (or channel-wise) standardisation fitted on attacker-train rows only.

    Constant features (dead ReLUs, black image borders) keep a scale of 1 instead of
    dividing by zero.
    """

    mean: torch.Tensor
    std: torch.Tensor

    @classmethod
    def fit(cls, x: torch.Tensor, *, per_channel: bool = False) -> Standardizer:
        """Fit on ``x`` [N, ...]; ``per_channel`` pools the statistics over spatial positions."""
        data = x.double()
        if per_channel and data.dim() >= 3:
            dims = [0, *range(2, data.dim())]
            mean = data.mean(dim=dims, keepdim=True)[0]
            std = data.std(dim=dims, keepdim=True, unbiased=False)[0]
        else:
            mean = data.mean(dim=0)
            std = data.std(dim=0, unbiased=False)
        std = torch.where(std > 1e-8 * (1.0 + mean.abs()), std, torch.ones_like(std))
        return cls(mean.float(), std.float())

    @classmethod
    def fit_source(cls, source: Source, *, per_channel: bool = False) -> Standardizer:
        """:meth:`fit` over a source's rows batch by batch (Chan's pairwise update of mean and squared deviations).

        Equal to :meth:`fit` on the same rows up to float64 rounding.
        """
        count, mean, m2 = 0, None, None
        if isinstance(source, StreamSource) and source.y_name is not None and source.transform is None:
            source = source.dataset_only(source.x_name)  # the targets are not read
        for xb, _ in source.chunks(statistic_chunk_rows(source.row_elements()[0]), None):
            data = xb.double()
            if per_channel and data.dim() >= 3:
                dims = [0, *range(2, data.dim())]
                n = data.numel() // data.shape[1]
                b_mean = data.mean(dim=dims, keepdim=True)[0]
                b_m2 = ((data - b_mean) ** 2).sum(dim=dims, keepdim=True)[0]
            else:
                n = len(data)
                b_mean = data.mean(dim=0)
                b_m2 = ((data - b_mean) ** 2).sum(dim=0)
            if mean is None or m2 is None:
                count, mean, m2 = n, b_mean, b_m2
                continue
            delta = b_mean - mean
            total = count + n
            mean = mean + delta * (n / total)
            m2 = m2 + b_m2 + delta**2 * (count * n / total)
            count = total
        if mean is None or m2 is None:
            raise ValueError("fit_source needs at least one row")
        std = (m2 / count).sqrt()
        std = torch.where(std > 1e-8 * (1.0 + mean.abs()), std, torch.ones_like(std))
        return cls(mean.float(), std.float())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def as_tensor(array: np.ndarray) -> torch.Tensor:
    """A float32 tensor sharing ``array``'s memory where possible."""
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
