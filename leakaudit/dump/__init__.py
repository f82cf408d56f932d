"""``leakaudit dump``: run a model up to its split layer over a data source into a store.

:func:`dump` turns :class:`DumpSettings` into a plan (:mod:`.plan`: the model, its split
layer and truncation, the data; :mod:`.tuning`: how the forward pass runs), then runs the
rows through reader, forward and writer threads (:mod:`.pipeline`) into a
:class:`~leakaudit.store.StoreWriter`; under ``torchrun``, one shard per rank (:mod:`.shards`).
:func:`dump_many` writes one store per layer for several layers from one pass (:mod:`.multi`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from leakaudit.dump.multi import MultiTruncation, dump_many, execution_order, truncate_many
from leakaudit.dump.pipeline import _Pipeline
from leakaudit.dump.plan import _apply_tuning, _check_paths, _open_writer, _plan
from leakaudit.dump.settings import DumpReport, DumpSettings
from leakaudit.dump.shards import _dump_distributed, _shard_hint, shard_path
from leakaudit.dump.tuning import MAX_WORKERS, WORKERS_MARGIN, Tuning, tune_forward
from leakaudit.errors import OutputExistsError, UsageError
from leakaudit.runtime import resolve_device
from leakaudit.store import StoreWriter, check_no_dump_running, partial_path

__all__ = [
    "MAX_WORKERS",
    "WORKERS_MARGIN",
    "DumpReport",
    "DumpSettings",
    "MultiTruncation",
    "Tuning",
    "dump",
    "dump_many",
    "execution_order",
    "shard_path",
    "truncate_many",
    "tune_forward",
]


def dump(settings: DumpSettings, on_progress: Callable[[int, int], None] | None = None) -> DumpReport:
    """Write the store ``settings.output`` (see :class:`DumpSettings` and the module docstring).

    Under ``torchrun`` (``WORLD_SIZE`` > 1) each rank writes a shard of whole batches to
    ``STORE.h5.shards/`` and rank 0 stitches them into ``STORE.h5`` with HDF5 virtual
    datasets: the same content, row for row, as a single-process dump with the same seed.
    """
    from leakaudit import distributed

    output = Path(settings.output)
    _check_paths(settings, output)
    ctx = distributed.current(resolve_device(settings.device))
    if ctx is None:
        check_no_dump_running(output)  # a running dump's .partial is not an interrupted one
        partial = partial_path(output)
        if partial.exists() and not settings.resume and not settings.force:
            raise OutputExistsError(
                f"an interrupted dump left {str(partial)!r}. Continue it with --resume, or start over with --force."
            )
        if settings.resume and not partial.exists():
            raise UsageError(
                f"nothing to resume: {str(partial)!r} does not exist"
                + (" and the store is already complete." if output.exists() else ".")
                + _shard_hint(output)
            )
        plan = _plan(settings)
        try:
            resuming = settings.resume
            tuning = _apply_tuning(plan, settings, StoreWriter.resume_state(output) if resuming else {})
            writer = _open_writer(
                settings, plan, output, 0, plan.n, resume=resuming, tuning=tuning,
                fingerprint=plan.fingerprint, attrs=plan.attrs,
            )  # fmt: skip
            return _Pipeline(settings, plan, writer, lo=0, hi=plan.n, tuning=tuning, on_progress=on_progress).run()
        finally:
            plan.guard.restore()
    return _dump_distributed(settings, output, ctx, on_progress)
