"""A distributed dump: each rank writes a shard of whole batches, rank 0 stitches them into one store."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from leakaudit.dump.pipeline import _Pipeline
from leakaudit.dump.plan import _apply_tuning, _open_writer, _Plan, _plan
from leakaudit.dump.settings import DumpReport, DumpSettings
from leakaudit.errors import OutputExistsError, UsageError
from leakaudit.store import StoreWriter, partial_path, write_virtual_store


def shard_dir(output: Path) -> Path:
    return output.with_name(output.name + ".shards")


def shard_path(output: Path, rank: int, world_size: int) -> Path:
    return shard_dir(output) / f"rank-{rank:05d}-of-{world_size:05d}.h5"


def _shard_hint(output: Path) -> str:
    """Which world size left the shards of an interrupted distributed dump, if any did."""
    if not shard_dir(output).is_dir():
        return ""
    sizes = sorted({int(p.name.split("-of-")[1][:5]) for p in shard_dir(output).glob("rank-*-of-*.h5*")})
    if not sizes:
        return ""
    return (
        f" {str(shard_dir(output))!r} holds shards of a dump run with world size {', '.join(map(str, sizes))}: "
        f"resume it under torchrun with --nproc-per-node={sizes[0]}."
    )


def _dump_distributed(
    settings: DumpSettings, output: Path, ctx: Any, on_progress: Callable[[int, int], None] | None
) -> DumpReport:
    """This rank's shard of the dump; rank 0 then stitches the shards into ``output`` (see :func:`leakaudit.dump.dump`)."""
    from leakaudit import distributed

    mine = shard_path(output, ctx.rank, ctx.world_size)
    error: BaseException | None = None
    report = None
    plan: _Plan | None = None
    try:
        if settings.resume:
            if not partial_path(mine).exists() and not mine.exists():
                raise UsageError(
                    f"nothing to resume for rank {ctx.rank} of {ctx.world_size} in {str(shard_dir(output))!r}."
                    + _shard_hint(output)
                )
        elif partial_path(mine).exists() and not settings.force:
            raise OutputExistsError(
                f"an interrupted dump left {str(partial_path(mine))!r}. Continue it with --resume, or start over with --force."
            )
    except BaseException as exc:
        error = exc
    distributed.agree(error)
    if ctx.is_main and settings.force and not settings.resume and shard_dir(output).exists():
        import shutil

        shutil.rmtree(shard_dir(output))
    distributed.barrier()
    try:
        plan = _plan(settings)
        lo, hi = ctx.shard(plan.n, plan.batch_size)
        fingerprint = {**plan.fingerprint, "world_size": ctx.world_size, "rank": ctx.rank, "rows_lo": lo, "rows_hi": hi}
        state = StoreWriter.resume_state(mine) if settings.resume and partial_path(mine).exists() else {}
        if "memory_format" in state:
            chosen = state
        else:
            trial = _apply_tuning(plan, settings, {}) if ctx.is_main else None
            # Every rank runs the same kernels: rank 0's trial decides.
            chosen = distributed.broadcast(None if trial is None else trial.state())
        tuning = _apply_tuning(plan, settings, chosen)
        memory_format = tuning.memory_format
        if mine.exists() and settings.resume:
            report = None  # this shard finished before the interruption
        else:
            shard_attrs = {**plan.attrs, "shard_rank": ctx.rank, "shard_world_size": ctx.world_size,
                           "shard_rows": [lo, hi], "shard_fingerprint": plan.fingerprint}  # fmt: skip
            writer = _open_writer(
                settings, plan, mine, lo, hi, resume=settings.resume and partial_path(mine).exists(),
                tuning=tuning, fingerprint=fingerprint, attrs=shard_attrs,
            )  # fmt: skip
            progress = on_progress if ctx.is_main else None
            report = _Pipeline(settings, plan, writer, lo=lo, hi=hi, tuning=tuning, on_progress=progress).run()
    except BaseException as exc:
        error = exc
    finally:
        if plan is not None:
            plan.guard.restore()
    distributed.agree(error)
    assert plan is not None  # agree() re-raised any rank's failure, so this rank has planned
    if ctx.is_main:
        try:
            shards = [shard_path(output, rank, ctx.world_size) for rank in range(ctx.world_size)]
            attrs = {**plan.attrs, **tuning.state(), "world_size": ctx.world_size}
            write_virtual_store(output, shards, plan.fingerprint, attrs)
        except BaseException as exc:
            error = exc
    distributed.agree(error)
    rate = report.rows_per_second * ctx.world_size if report is not None else 0.0
    return DumpReport(
        path=output,
        rows=plan.n,
        resumed_from=report.resumed_from if report is not None else hi - lo,
        seconds=report.seconds if report is not None else 0.0,
        rows_per_second=rate,
        truncation=plan.truncation.method,
        memory_format=memory_format,
        device=str(plan.device),
        layer_shape=plan.layer_shape,
        threads=tuning.threads,
        workers=tuning.workers,
    )
