"""The fit loop every attack shares: in-memory minibatches, Adam, early stopping on validation.

Attacks read their rows into memory once and index tensors directly: for data that fits,
that is far faster than a ``DataLoader`` (no workers, no per-row collation), and a seeded
:class:`torch.Generator` makes the order of minibatches reproducible.

Model selection follows the issue's contract: training uses attacker-train rows only, the
epoch kept (and the head or decoder reported as strongest) is chosen on attacker-validation
rows, and test rows are never seen before the final report.

Under ``torchrun`` (``WORLD_SIZE`` > 1) the same loop trains with DistributedDataParallel
(gloo on CPU, nccl on CUDA). Every rank draws the same permutation each epoch and takes
every ``world``-th row of it (as ``DistributedSampler`` does), in batches of
``batch_size // world`` rows, so the group's step ``k`` covers the rows of the
single-process batch ``k``. Validation and test rows are split the same way; validation
sums are all-reduced, so every rank takes the same early-stopping and learning-rate
decisions, and test predictions are gathered. Every rank ends with the same weights and
reports the same numbers. They are not the single-process numbers to the bit: batch norm
normalises each rank's half-batch on its own, the gradient is summed in another order,
and dropout draws other masks — tests/attacks/test_distributed_attacks.py states the
tolerance.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from leakaudit import distributed
from leakaudit.distributed import Context
from leakaudit.errors import UnknownNameError, UsageError

#: ``on_progress(done, total)``: what domain code knows of progress bars.
OnProgress = Callable[[float, float], None]
#: ``progress(description, done, total)``: how attacks report several bars (one per model).
Progress = Callable[[str, float, "float | None"], None]

#: Rows per forward pass when evaluating (no gradients, so larger than training batches).
EVAL_BATCH = 1024


def seed_for(seed: int, name: str) -> int:
    """A seed for model ``name`` derived from the run's ``seed``.

    Each head or decoder gets its own stream, so its result does not depend on which other
    models ran before it (``--head best`` and ``--head mlp`` train the same MLP).
    """
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


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
    history: list[dict[str, float]] = field(default_factory=list)


def fit(
    model: nn.Module,
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    *,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    score_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    epochs: int,
    batch_size: int,
    lr: float,
    patience: int,
    seed: int,
    device: torch.device,
    weight_decay: float = 0.0,
    val_loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    keep_initial: bool = False,
    autocast: torch.dtype | None = None,
    on_progress: OnProgress | None = None,
) -> FitResult:
    """Train ``model`` with Adam, keep the weights of its best validation epoch.

    The learning rate is halved when the validation score stalls for a third of
    ``patience`` epochs; training stops after ``patience`` epochs without improvement.
    The model is left in eval mode holding the best weights.

    Under ``torchrun`` every rank calls this with the same arguments and trains its share of
    each batch with DistributedDataParallel (see the module docstring); ``batch_size`` is
    the group's batch, ``world × (batch_size // world)`` rows.

    Args:
        model: the network to train (moved to ``device``).
        train: inputs and targets of the attacker-train rows.
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
            (see :func:`autocast_dtype`); validation, selection and predictions stay float32.
        on_progress: called with ``(epochs done, epochs)`` after each epoch.
    """
    ctx = distributed.current(device)
    device = distributed.rank_device(device, ctx)
    model.to(device)
    train_x, train_y = train
    val_x, val_y = val
    n = len(train_x)
    if n == 0 or len(val_x) == 0:
        raise ValueError("fit needs at least one training and one validation row")
    generator = torch.Generator().manual_seed(seed)  # the same permutations on every rank
    # Dropout masks; each rank draws its own, or it would drop the same units of different rows.
    torch.manual_seed(seed if ctx is None else (seed + ctx.rank) % 2**63)
    trainee = model if ctx is None else _data_parallel(model, device)
    step_rows = batch_size if ctx is None else max(1, batch_size // ctx.world_size)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="max", factor=0.5, patience=max(1, patience // 3)
    )
    has_batch_norm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    val_loss_fn = val_loss_fn or loss_fn

    best_state = copy.deepcopy(model.state_dict())
    best = (-math.inf, math.inf)  # (score, loss): higher score, then lower loss
    best_epoch = 0
    history: list[dict[str, float]] = []
    started = time.perf_counter()
    if keep_initial:
        best = evaluate(model, val_x, val_y, score_fn, val_loss_fn, device, ctx=ctx)
    epoch = 0
    for epoch in range(1, epochs + 1):
        trainee.train()
        order = torch.randperm(n, generator=generator)
        if ctx is not None:
            order = distributed.shard_strided(order, ctx)  # padded: the same step count on every rank
        total, seen = 0.0, 0
        for first in range(0, len(order), step_rows):
            index = order[first : first + step_rows]
            if has_batch_norm and len(index) < 2:
                continue  # batch norm cannot normalise a single row in training mode
            x = train_x[index].to(device, non_blocking=True)
            y = train_y[index].to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=autocast) if autocast is not None else contextlib.nullcontext():
                out = trainee(x)
            loss = loss_fn(out.float(), y)  # the loss (SSIM included) in float32 whatever the forward ran in
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(index)
            seen += len(index)
        if ctx is not None:
            total, seen = distributed.all_reduce_sum([total, seen], device)
            distributed.average_floating_buffers(model, ctx)
        val_score, val_loss = evaluate(model, val_x, val_y, score_fn, val_loss_fn, device, ctx=ctx)
        history.append({"train_loss": total / max(seen, 1), "val_loss": val_loss, "val_score": val_score})
        if not math.isfinite(val_loss):
            break  # diverged: keep the best finite epoch
        if val_score > best[0] + 1e-12 or (abs(val_score - best[0]) <= 1e-12 and val_loss < best[1]):
            best = (val_score, val_loss)
            best_epoch = epoch
            best_state = copy.deepcopy(model.state_dict())
        scheduler.step(val_score)
        if on_progress is not None:
            on_progress(epoch, epochs)
        if epoch - best_epoch >= patience:
            break
    if on_progress is not None:
        on_progress(epochs, epochs)  # complete the bar when early stopping ended the run
    model.load_state_dict(best_state)
    model.eval()
    seconds = time.perf_counter() - started
    return FitResult(
        epochs=epoch,
        best_epoch=best_epoch,
        val_score=float(best[0]),
        val_loss=float(best[1]),
        seconds=seconds,
        seconds_per_epoch=seconds / max(epoch, 1),
        history=history,
    )


#: ``precision`` values of the attack configs.
PRECISIONS = ("fp32", "bf16")


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``precision`` on ``device``: ``None`` for ``fp32``, bfloat16 for ``bf16``.

    bf16 autocast covers the training steps only; every reported number is computed in
    float32. Measured on digits (tests/attacks/test_distributed_attacks.py): it moves the
    decoder's test SSIM by less than 0.003 and the private accuracy by at most one test row.

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


def _data_parallel(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` wrapped for DistributedDataParallel; its parameters stay ``model``'s own.

    DDP's constructor broadcasts rank 0's parameters and buffers, so every rank starts from
    the same weights whatever its random state. Buffers are not broadcast before each
    forward: :func:`fit` averages them over ranks after each epoch instead, so the running
    statistics follow every rank's rows, not only rank 0's.
    """
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, forward_sync_buffers=False)


@torch.no_grad()
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
    """Mean per-row score and mean loss of ``model`` on ``(x, y)``, in eval mode.

    With a distributed ``ctx`` each rank scores every ``world``-th row and the sums are
    all-reduced: every rank returns the same two numbers.
    """
    model.eval()
    if ctx is not None:
        x, y = x[ctx.rank :: ctx.world_size].contiguous(), y[ctx.rank :: ctx.world_size].contiguous()
    score, loss = 0.0, 0.0
    for first in range(0, len(x), EVAL_BATCH):
        xb = x[first : first + EVAL_BATCH].to(device)
        yb = y[first : first + EVAL_BATCH].to(device)
        out = model(xb)
        score += float(score_fn(out, yb).double().sum())
        loss += float(loss_fn(out, yb)) * len(xb)
    if ctx is None:
        return score / len(x), loss / len(x)
    score, loss, rows = distributed.all_reduce_sum([score, loss, len(x)], device)
    return score / rows, loss / rows


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``model(x)`` in eval mode, batch by batch, gathered on the CPU.

    Under ``torchrun`` each rank predicts every ``world``-th row and the predictions are
    gathered: every rank returns all of them, in order.
    """
    ctx = distributed.current(device)
    if ctx is None:
        model.eval()
        outs = [model(x[first : first + EVAL_BATCH].to(device)).float().cpu() for first in range(0, len(x), EVAL_BATCH)]
        return torch.cat(outs) if outs else torch.empty(0)
    if len(x) == 0:
        return torch.empty(0)
    device = distributed.rank_device(device, ctx)
    model.to(device).eval()
    mine = x[ctx.rank :: ctx.world_size].contiguous()
    # A rank with no rows (fewer rows than ranks) still needs the shape of a prediction.
    rows = mine if len(mine) else x[:1]
    outs = [model(rows[first : first + EVAL_BATCH].to(device)).float() for first in range(0, len(rows), EVAL_BATCH)]
    local = torch.cat(outs)[: len(mine)]
    return distributed.gather_strided(local, len(x), ctx).cpu()


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

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def as_tensor(array: np.ndarray) -> torch.Tensor:
    """A float32 tensor sharing ``array``'s memory where possible."""
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
