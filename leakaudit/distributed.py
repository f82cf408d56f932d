"""Running under ``torchrun``: the process group, sharding, and agreeing on outcomes.

leakaudit scales on the engine its users already run: ``torch.distributed`` launched by
``torchrun`` (and by SLURM's ``srun`` through it). When ``WORLD_SIZE`` > 1 in the
environment, commands join the process group (gloo on CPU, nccl on CUDA); each rank does
a disjoint, deterministic share of the work and rank 0 writes the results.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

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
