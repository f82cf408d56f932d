"""Running under ``torchrun``: the process group, sharding, and agreeing on outcomes.

leakaudit scales on the engine its users already run: ``torch.distributed`` launched by
``torchrun`` (and by SLURM's ``srun`` through it). When ``WORLD_SIZE`` > 1 in the
environment, commands join the process group (gloo on CPU, nccl on CUDA); each rank does
a disjoint, deterministic share of the work and rank 0 writes the results.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, NoReturn

import torch
import torch.distributed as dist

from leakaudit.errors import LeakAuditError


@dataclass(frozen=True)
class Context:
    """This process's place in the group."""

    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, n: int, batch_size: int) -> tuple[int, int]:
        """Rows ``[lo, hi)`` of this rank: whole batches, contiguous, in source order.

        Aligning shards to batch boundaries means every batch is the one a single-process
        run would form, so the activations are the same to the bit.
        """
        batches = -(-n // batch_size)
        first = self.rank * batches // self.world_size
        last = (self.rank + 1) * batches // self.world_size
        return min(n, first * batch_size), min(n, last * batch_size)


def world_size_from_env() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def current(device: torch.device | None = None) -> Context | None:
    """The distributed context, joining the process group on first use; ``None`` when alone."""
    if world_size_from_env() <= 1:
        return None
    if not dist.is_initialized():
        backend = "nccl" if device is not None and device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=30))
        if device is not None and device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return Context(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def broadcast(value: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``value`` on every rank (a picklable Python object)."""
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather(value: Any) -> list[Any]:
    """Every rank's ``value``, indexed by rank."""
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def agree(error: BaseException | None) -> None:
    """Collective check that every rank succeeded; re-raise here if any rank failed.

    A rank that failed passes its exception; the others learn of it instead of waiting for a
    collective that never comes.
    """
    message = None if error is None else f"{type(error).__name__}: {error}"
    outcomes = all_gather(message)
    if error is not None:
        raise error
    failed = [(rank, m) for rank, m in enumerate(outcomes) if m is not None]
    if failed:
        rank, message = failed[0]
        raise LeakAuditError(f"rank {rank} failed ({message}); nothing was written as complete.")


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# --------------------------------------------------------------------------- training helpers
# Used by the training loop (leakaudit.training.engine) and what it trains: DistributedDataParallel
# needs every rank to take the same number of steps, and every rank to reach the same decisions.


def rank_device(device: torch.device, ctx: Context | None) -> torch.device:
    """The device this rank computes on: bare ``cuda`` means ``cuda:LOCAL_RANK`` under torchrun.

    An explicit index (``cuda:1``) is kept as given; ``cpu`` stays ``cpu``.
    """
    if ctx is not None and device.type == "cuda" and device.index is None:
        return torch.device("cuda", ctx.local_rank)
    return device


def shard_strided(order: torch.Tensor, ctx: Context, *, pad: bool = True) -> torch.Tensor:
    """This rank's elements of ``order``: positions ``rank``, ``rank + world``, ``rank + 2·world``, …

    With ``pad`` the end of ``order`` is first filled up with its own first elements to a
    multiple of the world size, as :class:`torch.utils.data.DistributedSampler` does
    (``drop_last=False``): every rank then holds the same number of rows and takes the same
    number of steps, which DistributedDataParallel requires. Cutting each rank's share into
    batches of ``b`` rows makes step ``k`` of the group cover ``order[k·b·world : (k+1)·b·world]``
    — the rows of the single-process batch ``k`` of ``b·world`` rows.
    """
    world = ctx.world_size
    if pad and len(order) % world:
        short = world - len(order) % world
        order = torch.cat([order, order.repeat(-(-short // len(order)))[:short]])
    return order[ctx.rank :: world]


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sums of ``values`` over all ranks, in float64, identical on every rank.

    ``device`` must be a CUDA device under nccl (it reduces CUDA tensors only).
    """
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return [float(v) for v in tensor.cpu()]


def average_floating_buffers(module: torch.nn.Module, ctx: Context) -> None:
    """Replace each floating-point buffer of ``module`` (batch-norm running statistics) by its mean over ranks.

    Without it each rank's running statistics follow only its own rows, and ranks would
    evaluate (and keep) different models.
    """
    for buffer in module.buffers():
        if buffer.is_floating_point():
            dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
            buffer.div_(ctx.world_size)


def average_gradients(params: Sequence[torch.Tensor], ctx: Context) -> None:
    """Average the gradients of tensors DistributedDataParallel does not cover (a recipe's own) over ranks."""
    for param in params:
        if param.grad is not None:
            dist.all_reduce(param.grad, op=dist.ReduceOp.SUM)
            param.grad.div_(ctx.world_size)


def gather_strided(local: torch.Tensor, n: int, ctx: Context, *, differentiable: bool = False) -> torch.Tensor:
    """Undo ``shard_strided(…, pad=False)``: every rank's ``local`` rows put back in order, on every rank.

    Rank ``r`` holds rows ``r, r + world, …`` of ``n``; the result has all ``n`` rows, on
    ``local``'s device.

    With ``differentiable`` this rank's rows of the result keep ``local``'s autograd graph and
    the other ranks' rows are constants. A loss computed from the result on every rank then
    sends each rank's gradient to its own rows only; since DistributedDataParallel *averages*
    gradients over ranks, a loss term that is the same function of the gathered rows on every
    rank must be scaled by the world size (in its gradient, not its value) to get the
    single-process gradient — see :func:`scale_gradient`.
    """
    world = ctx.world_size
    size = -(-n // world)
    padded = local.detach().new_zeros((size, *local.shape[1:]))
    padded[: len(local)] = local.detach()
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    out = padded.new_empty((n, *local.shape[1:]))
    for rank, part in enumerate(parts):
        out[rank::world] = part[: len(range(rank, n, world))]
    if differentiable and local.requires_grad:
        out[ctx.rank :: world] = local  # autograd records the copy: gradients reach `local`
    return out


def scale_gradient(value: torch.Tensor, factor: float) -> torch.Tensor:
    """``value`` unchanged, with its gradient multiplied by ``factor``."""
    return factor * value - (factor - 1.0) * value.detach()


def any_rank(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` is true on any rank; the same answer on every rank."""
    return all_reduce_sum([1.0 if flag else 0.0], device)[0] > 0


def broadcast_tensors(tensors: list[torch.Tensor], src: int = 0) -> None:
    """Overwrite each tensor, in place, with rank ``src``'s (model weights, recipe state)."""
    with torch.no_grad():
        for tensor in tensors:
            dist.broadcast(tensor.data, src=src)


def data_parallel(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``model`` wrapped for DistributedDataParallel; its parameters stay ``model``'s own.

    DDP's constructor broadcasts rank 0's parameters and buffers, so every rank starts from
    the same weights. Buffers are not broadcast before each forward: callers average them
    over ranks after each epoch (:func:`average_floating_buffers`) instead, so batch-norm
    running statistics follow every rank's rows, not only rank 0's.
    """
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, forward_sync_buffers=False)


@contextmanager
def agreed(ctx: Context | None) -> Iterator[None]:
    """Run the block; if it raised on any rank, raise on every rank (see :func:`agree`).

    Alone (``ctx`` is ``None``) the block runs as it would without this. The block must not
    itself run collectives: a rank that failed before one would leave the others waiting in it.
    """
    error: BaseException | None = None
    try:
        yield
    except BaseException as exc:  # re-raised below, here or on every rank
        error = exc
    if ctx is None:
        if error is not None:
            raise error
        return
    agree(error)


def exit_without_teardown(code: int = 0) -> NoReturn:
    """Flush stdout and stderr and end this process now, skipping the interpreter's teardown.

    For a rank whose work is done and written: with gloo, a rank can abort in the
    interpreter's teardown (SIGABRT) after every output was written, and torchrun then reports
    the whole run as failed; ``os._exit`` skips that teardown (benchmarks/RESULTS.md has the
    counts). Close files before calling this.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
