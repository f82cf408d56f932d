"""The one training loop: seeded minibatches, Adam, selection on validation, divergence, torchrun.

Every model this tool trains — an attack's classifier head or decoder, ``leakaudit train``'s
baseline, a recipe's hardened model — goes through :func:`fit`. What differs between them is
a :class:`Task`: how a minibatch of training rows becomes a loss, how an epoch is validated,
and which validation is better (attacks select on validation accuracy or SSIM, recipes on
their objective's :meth:`~leakaudit.recipes.base.Objective.is_better`). The loop owns the
rest, so it is written once:

* **Order.** Each epoch draws a permutation of the training rows from a seeded
  :class:`torch.Generator`, so the order of minibatches is reproducible.
* **Selection.** After each epoch the task validates; the best validation so far is kept as a
  snapshot and restored at the end, and training stops after ``patience`` epochs without a
  better one. Training uses attacker-train rows only and selection attacker-validation rows,
  so test rows are never seen before the final report.
* **Divergence.** A non-finite training loss, gradient or validation loss stops the run at
  once with the best state restored, and the outcome says where (:class:`Diverged`). Callers
  choose what that means: an attack reports its best epoch as it would after early stopping;
  ``train`` and ``harden`` refuse the run and say where it diverged.
* **Options.** A plateau schedule (the learning rate halves when the validation score stalls
  for a third of ``patience``), and autocast of the training forward passes
  (:func:`autocast_dtype`); every reported number stays float32.

Under ``torchrun`` (``WORLD_SIZE`` > 1) the same loop trains with DistributedDataParallel
(:func:`leakaudit.distributed.data_parallel`; gloo on CPU, nccl on CUDA). Every rank draws
the same permutation each epoch and takes every ``world``-th row of it, padded as
``DistributedSampler`` pads (:func:`leakaudit.distributed.shard_strided`), in steps of
``batch_size // world`` rows, so the group's step ``k`` covers the rows of the
single-process batch ``k``. The epoch's loss sums are all-reduced, floating-point buffers
(batch-norm statistics) averaged after each epoch, gradients of tensors outside the wrapped
model averaged after each backward, and a non-finite loss on any rank stops every rank: every
rank takes the same decisions and ends with the same weights. Tasks validate on their share of
the rows and all-reduce, so that every rank selects the same epoch.
"""

from __future__ import annotations

import contextlib
import math
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar

import torch
from torch import nn

from leakaudit import distributed
from leakaudit.distributed import Context
from leakaudit.errors import UnknownNameError, UsageError

#: What one validation returns (the attacks' scores, the recipes' :class:`EpochStats`).
V = TypeVar("V")
#: ``forward(x)``: the model being trained, wrapped for torchrun and autocast where asked.
Forward = Callable[[torch.Tensor], Any]

#: ``precision`` values of the attack configs.
PRECISIONS = ("fp32", "bf16")


def seed_for(seed: int, name: str) -> int:
    """A seed for model ``name`` derived from the run's ``seed``.

    Each head or decoder gets its own stream, so its result does not depend on which other
    models ran before it (``--head best`` and ``--head mlp`` train the same MLP).
    """
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``precision`` on ``device``: ``None`` for ``fp32``, bfloat16 for ``bf16``.

    bf16 autocast covers the training forward passes only; every reported number is computed
    in float32 (tests/attacks/test_distributed_attacks.py states how far it moves them).

    Raises:
        UsageError: ``bf16`` on a GPU without bfloat16 support.
    """
    if precision == "fp32":
        return None
    if precision != "bf16":
        raise UnknownNameError("precision", precision, PRECISIONS)
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UsageError(f"--precision bf16 was given but {device} does not support bfloat16; use --precision fp32.")
    return torch.bfloat16


# --------------------------------------------------------------------------- order


#: What becomes of a minibatch of fewer than two rows (batch statistics are undefined on one row):
#: ``merge`` joins a trailing one to the batch before it, ``drop`` skips it, ``keep`` trains on it.
ShortBatches = Literal["merge", "drop", "keep"]


def epoch_order(n: int, generator: torch.Generator, ctx: Context | None) -> torch.Tensor:
    """This epoch's positions ``0 … n-1`` in seeded order; this rank's share (padded) under torchrun."""
    order = torch.randperm(n, generator=generator)
    return order if ctx is None else distributed.shard_strided(order, ctx)


def step_bounds(n: int, step_rows: int, short: ShortBatches) -> list[tuple[int, int]]:
    """``[start, stop)`` of each training step over ``n`` ordered positions, ``step_rows`` at a time."""
    starts = list(range(0, n, step_rows))
    if short == "merge":
        if len(starts) > 1 and n - starts[-1] < 2:
            starts.pop()
        return [(a, starts[i + 1] if i + 1 < len(starts) else n) for i, a in enumerate(starts)]
    bounds = [(a, min(a + step_rows, n)) for a in starts]
    return bounds if short == "keep" else [(a, b) for a, b in bounds if b - a >= 2]


def step_rows_of(batch_size: int, ctx: Context | None) -> int:
    """Rows per step on this rank: the group's ``batch_size`` split over the ranks."""
    return batch_size if ctx is None else max(1, batch_size // ctx.world_size)


# --------------------------------------------------------------------------- the loop


@dataclass(frozen=True)
class Schedule:
    """How long and how fast to train.

    Attributes:
        epochs: the most epochs to run.
        batch_size: rows per step (the group's, under torchrun).
        lr: Adam's learning rate.
        patience: epochs without a better validation before stopping.
        weight_decay: Adam's L2 penalty.
        plateau: halve the learning rate when :meth:`Task.plateau_score` stalls for
            ``max(1, patience // 3)`` epochs.
    """

    epochs: int
    batch_size: int
    lr: float
    patience: int
    weight_decay: float = 0.0
    plateau: bool = False


@dataclass(frozen=True)
class Diverged:
    """Where the loss or its gradient became non-finite (global step, epoch, batch index; -1 for validation)."""

    step: int
    epoch: int
    batch: int
    what: str


@dataclass(frozen=True)
class EpochTraining:
    """What an epoch's training did, for its validation: mean loss and loss parts, start time."""

    epoch: int
    loss: float | None
    parts: dict[str, float]
    started: float


@dataclass
class StepLoss:
    """One step's loss, its named parts (averaged per epoch), its rows, and what to do after the update."""

    loss: torch.Tensor
    rows: int
    parts: dict[str, torch.Tensor] = field(default_factory=dict)
    after_step: Callable[[], None] | None = None


class Task(Generic[V]):
    """What :func:`fit` needs to know of one training run beyond the loop itself."""

    #: positions handed to :meth:`training`'s step are ``0 … rows-1``
    rows: int = 0
    short_batches: ShortBatches = "keep"

    def epoch_order(self, generator: torch.Generator, ctx: Context | None) -> torch.Tensor:
        """This epoch's positions (this rank's share); a task whose rows stream draws its own."""
        return epoch_order(self.rows, generator, ctx)

    def training(self, forward: Forward) -> contextlib.AbstractContextManager[Callable[[torch.Tensor], StepLoss]]:
        """Set up one epoch's training (modes, hooks); yields ``step(positions)`` → :class:`StepLoss`."""
        raise NotImplementedError

    def validate(self, training: EpochTraining) -> V:
        """Validate the model after ``training.epoch`` epochs (epoch 0: as given)."""
        raise NotImplementedError

    def val_loss(self, stats: V) -> float:
        """The validation loss in ``stats``: a non-finite one is divergence."""
        raise NotImplementedError

    def is_better(self, candidate: V, best: V | None) -> bool:
        """Whether ``candidate`` beats ``best`` (``None``: nothing kept yet)."""
        raise NotImplementedError

    def plateau_score(self, stats: V) -> float:
        """The score the plateau schedule watches (higher is better)."""
        raise NotImplementedError

    def snapshot(self) -> Any:
        """A copy of every tensor that selection restores."""
        raise NotImplementedError

    def restore(self, state: Any) -> None:
        raise NotImplementedError


@dataclass
class Outcome(Generic[V]):
    """What :func:`fit` did; the selected state is restored into the model (left in eval mode).

    Attributes:
        history: every validation, in order (epoch 0 first when it was a candidate).
        best: the selected validation (``None`` when no epoch beat the untrained state).
        best_epoch: its epoch; 0 for the model as given.
        epochs: epochs started.
        stopped_early: patience or divergence ended the run before ``epochs``.
        diverged: where the run diverged, if it did.
        steps: optimiser steps taken; ``total_steps``: those a full run would take.
    """

    history: list[V]
    best: V | None
    best_epoch: int
    epochs: int
    stopped_early: bool
    diverged: Diverged | None
    steps: int
    total_steps: int


def fit(model: nn.Module, task: Task[V], schedule: Schedule, **options: Any) -> Outcome[V]:
    """Train ``model`` on ``task`` with Adam and keep the state of its best validation.

    A :class:`Run` (whose arguments these are) advanced to ``schedule.epochs`` and finished.
    Under ``torchrun`` every rank calls this with the same arguments and the same
    ``generator`` seed (see the module docstring).
    """
    run: Run[V] = Run(model, task, schedule, **options)
    run.advance(schedule.epochs)
    return run.finish()


class Run(Generic[V]):
    """One training run that can be advanced a few epochs at a time (:func:`fit` runs it to the end).

    Several runs may be advanced in turn (successive halving trains candidates side by side):
    each keeps its own optimiser, schedule, order generator and selection, and its own state of
    torch's generator (dropout masks), saved when :meth:`advance` returns and restored when it
    is called again, so a run advanced in pieces, between other runs, takes the steps it would
    take alone, bit for bit.

    Args:
        model: the network (already on ``device``).
        task: rows, loss, validation and selection.
        schedule: epochs, batch size, learning rate, patience, weight decay, plateau.
        generator: draws each epoch's order; under torchrun torch's own generator is reseeded
            with its seed + rank (dropout masks, noise: each rank draws its own).
        device: where this rank trains.
        ctx: this process's place under torchrun; ``None`` when alone.
        params: what Adam trains (``own_params`` included).
        own_params: trained tensors outside ``model`` (a recipe's noise), whose gradients
            DistributedDataParallel does not average: averaged here under torchrun.
        data_parallel: wrap ``model`` in DistributedDataParallel under torchrun (and average its
            buffers after each epoch); ``False`` for a frozen model.
        initial_candidate: validate the model as given as epoch 0, a candidate for selection.
        autocast: run the training forward passes under ``torch.autocast`` with this dtype.
        on_epoch: called with each validation (epoch 0 included), before selection.
        on_step: called with ``(steps done, total steps)`` at the start and after each step.
    """

    def __init__(
        self,
        model: nn.Module,
        task: Task[V],
        schedule: Schedule,
        *,
        generator: torch.Generator,
        device: torch.device,
        ctx: Context | None,
        params: Sequence[torch.Tensor],
        own_params: Sequence[torch.Tensor] = (),
        data_parallel: bool = True,
        initial_candidate: bool = False,
        autocast: torch.dtype | None = None,
        on_epoch: Callable[[V], None] | None = None,
        on_step: Callable[[int, int], None] | None = None,
    ) -> None:
        self.model, self.task, self.schedule = model, task, schedule
        self.generator, self.device, self.ctx = generator, device, ctx
        self.params, self.own_params, self.data_parallel = list(params), list(own_params), data_parallel
        self.on_epoch, self.on_step = on_epoch, on_step
        runner: nn.Module = model
        if ctx is not None:
            torch.manual_seed((generator.initial_seed() + ctx.rank) % 2**63)
            if data_parallel:
                runner = distributed.data_parallel(model, device)
        self.forward = _autocast_forward(runner, device, autocast)
        self.optimizer = torch.optim.Adam(self.params, lr=schedule.lr, weight_decay=schedule.weight_decay)
        self.scheduler = None
        if schedule.plateau:
            self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
                self.optimizer, mode="max", factor=0.5, patience=max(1, schedule.patience // 3)
            )
        self.step_rows = step_rows_of(schedule.batch_size, ctx)
        shard = task.rows if ctx is None else -(-task.rows // ctx.world_size)
        self.total_steps = schedule.epochs * len(step_bounds(shard, self.step_rows, task.short_batches))
        self.history: list[V] = []
        self.best: V | None = None
        self.best_epoch = 0
        if initial_candidate:
            self.best = task.validate(EpochTraining(0, None, {}, time.perf_counter()))
            self.history.append(self.best)
            if on_epoch is not None:
                on_epoch(self.best)
        self.best_state = task.snapshot()
        self.steps = 0
        self.epoch = 0
        self.stopped_early = False
        self.diverged: Diverged | None = None
        self.done = False
        if on_step is not None:
            on_step(0, self.total_steps)
        self._rng = self._rng_state()  # what the first epoch starts from, whatever runs are set up after this one

    def _rng_state(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return torch.get_rng_state(), torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None

    def advance(self, until: int) -> bool:
        """Train up to epoch ``until`` (at most the schedule's epochs); whether the run may go on."""
        until = min(until, self.schedule.epochs)
        if self.done or self.epoch >= until:
            return not self.done
        torch.set_rng_state(self._rng[0])
        if self._rng[1] is not None:
            torch.cuda.set_rng_state(self._rng[1], self.device)
        try:
            while self.epoch < until and not self.done:
                self._epoch()
        finally:
            self._rng = self._rng_state()
        if self.epoch >= self.schedule.epochs:
            self.done = True
        return not self.done

    def _epoch(self) -> None:
        task, ctx, device = self.task, self.ctx, self.device
        self.epoch += 1
        epoch = self.epoch
        started = time.perf_counter()
        order = task.epoch_order(self.generator, ctx)
        loss_sum, seen = 0.0, 0
        parts_sum: dict[str, float] = {}
        with task.training(self.forward) as train_step:
            for index, (first, stop) in enumerate(step_bounds(len(order), self.step_rows, task.short_batches)):
                self.steps += 1
                out = train_step(order[first:stop])
                self.diverged = _check(out.loss, self.steps, epoch, index, "loss", device, ctx)
                if self.diverged is not None:
                    break
                self.optimizer.zero_grad(set_to_none=True)
                out.loss.backward()
                if ctx is not None and self.own_params:
                    distributed.average_gradients(self.own_params, ctx)
                norm = torch.nn.utils.clip_grad_norm_(self.params, float("inf"))
                if not torch.isfinite(norm):
                    self.diverged = Diverged(self.steps, epoch, index, "gradient")
                    break
                self.optimizer.step()
                if out.after_step is not None:
                    out.after_step()
                seen += out.rows
                loss_sum += float(out.loss.detach()) * out.rows
                for name, value in out.parts.items():
                    parts_sum[name] = parts_sum.get(name, 0.0) + float(value.detach()) * out.rows
                if self.on_step is not None:
                    self.on_step(self.steps, self.total_steps)
        if self.diverged is not None:
            self.done = True
            return
        if ctx is not None:
            names = sorted(parts_sum)
            sums = distributed.all_reduce_sum([loss_sum, seen, *(parts_sum[k] for k in names)], device)
            loss_sum, seen, parts_sum = sums[0], int(sums[1]), dict(zip(names, sums[2:]))
            if self.data_parallel:
                distributed.average_floating_buffers(self.model, ctx)
        seen = max(seen, 1)
        stats = task.validate(EpochTraining(epoch, loss_sum / seen, {k: v / seen for k, v in parts_sum.items()}, started))
        self.history.append(stats)
        if self.on_epoch is not None:
            self.on_epoch(stats)
        if not math.isfinite(task.val_loss(stats)):
            self.diverged = Diverged(self.steps, epoch, -1, "validation loss")
            self.done = True
            return
        if task.is_better(stats, self.best):
            self.best, self.best_epoch, self.best_state = stats, epoch, task.snapshot()
        if self.scheduler is not None:
            self.scheduler.step(task.plateau_score(stats))
        if epoch - self.best_epoch >= self.schedule.patience:
            self.stopped_early = epoch < self.schedule.epochs
            self.done = True

    def finish(self) -> Outcome[V]:
        """Restore the selected state (the model left in eval mode) and say what the run did."""
        self.done = True
        self.task.restore(self.best_state)
        self.model.eval()
        return Outcome(
            history=self.history,
            best=self.best,
            best_epoch=self.best_epoch,
            epochs=self.epoch,
            stopped_early=self.stopped_early or self.diverged is not None,
            diverged=self.diverged,
            steps=self.steps,
            total_steps=self.total_steps,
        )


def _check(loss: torch.Tensor, step: int, epoch: int, index: int, what: str, device, ctx) -> Diverged | None:
    bad = not bool(torch.isfinite(loss))
    if ctx is not None:
        bad = distributed.any_rank(bad, device)  # a rank that stops alone leaves the others waiting
    return Diverged(step, epoch, index, what) if bad else None


def _autocast_forward(runner: nn.Module, device: torch.device, dtype: torch.dtype | None) -> Forward:
    if dtype is None:
        return runner

    def forward(x: torch.Tensor) -> Any:
        with torch.autocast(device.type, dtype=dtype):
            return runner(x)

    return forward


@contextlib.contextmanager
def no_setup(step: Callable[[torch.Tensor], StepLoss]) -> Iterator[Callable[[torch.Tensor], StepLoss]]:
    """A :meth:`Task.training` context for tasks whose epochs need no hooks."""
    yield step
