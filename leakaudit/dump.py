"""``leakaudit dump``: run a model up to its split layer over a data source into a store.

Three stages overlap so that the dump runs at the speed of the truncated forward pass:
a reader thread reads the next batches, the calling thread (and, on a CPU, side-by-side
worker threads) runs the encoder (torch releases the GIL while it computes), and a writer
thread checks the activations (non-finite values, float16 range), converts them and
writes them to HDF5, recording progress for ``--resume`` about once a second. The
preprocessing (conversion to float, resizing) runs in the reader for a GPU, which it keeps
busy meanwhile, and in the forward's own threads on a CPU, where the reader would take the
cores from the forward (see ``_write_rows``).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from leakaudit.data import open_source, preprocess_for, resolve_task, split_roles
from leakaudit.errors import ConfigError, LeakAuditError, NonFiniteError, OutputExistsError, UsageError
from leakaudit.layers import OUTPUT, capture, eval_mode, exported_split, forward_failure, resolve_layer, truncate
from leakaudit.models import load_model
from leakaudit.runtime import resolve_device
from leakaudit.store import StoreWriter, check_no_dump_running, journal_path, partial_path

FLOAT16_MAX = 65504.0


@dataclass(frozen=True)
class DumpSettings:
    """Everything that defines a dump. Mirrors the options of ``leakaudit dump``."""

    model: str
    #: The split layer; None only for a client encoder exported by ``harden`` (its output).
    layer: str | None
    data: str
    output: Path
    weights: str | None = None
    tasks: tuple[tuple[str, str], ...] = ()
    input_size: tuple[int, int] | None = None
    num_classes: int | None = None
    in_chans: int | None = None
    model_args: dict[str, Any] = field(default_factory=dict)
    normalize: str | None = None
    batch_size: int = 256
    dtype: Literal["float32", "float16"] = "float32"
    with_outputs: bool = False
    split: tuple[float, float, float] = (0.4, 0.4, 0.2)
    seed: int = 0
    device: str = "auto"
    memory_format: Literal["auto", "contiguous", "channels_last"] = "auto"
    #: Torch threads of the forward pass. None: chosen by the timing trial when
    #: ``memory_format`` is "auto", torch's current setting otherwise.
    threads: int | None = None
    #: Forward passes run at once on separate batches, each with ``threads`` threads. None:
    #: chosen by the timing trial (1, or one per core with 1 thread each).
    workers: int | None = None
    compression: str | None = None
    limit: int | None = None
    store_inputs: bool = True
    resume: bool = False
    force: bool = False
    trust_checkpoint: bool = False

    def __post_init__(self) -> None:
        if self.layer is not None and not self.layer.strip():
            raise ConfigError(
                f"--layer is empty ({self.layer!r}). Give a layer from `leakaudit layers MODEL`, or 'output' for the whole model."
            )
        if self.batch_size <= 0:
            raise ConfigError(f"--batch-size must be positive, got {self.batch_size}.")
        if self.dtype not in ("float32", "float16"):
            raise ConfigError(f"--dtype must be float32 or float16, got {self.dtype!r}.")
        if len(self.split) != 3 or any(f <= 0 for f in self.split):
            raise ConfigError(f"--split needs three positive fractions TRAIN,VAL,TEST, got {self.split}.")
        if abs(sum(self.split) - 1.0) > 1e-6:
            raise ConfigError(f"--split fractions must sum to 1, got {sum(self.split):g}.")
        if self.limit is not None and self.limit <= 0:
            raise ConfigError(f"--limit must be positive, got {self.limit}.")
        if self.threads is not None and self.threads <= 0:
            raise ConfigError(f"--threads must be positive, got {self.threads}.")
        if self.workers is not None and self.workers <= 0:
            raise ConfigError(f"--workers must be positive, got {self.workers}.")
        if self.compression not in (None, "gzip", "lzf"):
            raise ConfigError(f"--compression must be gzip or lzf, got {self.compression!r}.")


@dataclass
class DumpReport:
    """What a dump did: where, how many rows, how fast, and how it cut the model."""

    path: Path
    rows: int
    resumed_from: int
    seconds: float
    rows_per_second: float
    truncation: str
    memory_format: str
    device: str
    layer_shape: tuple[int, ...]
    threads: int = 0
    workers: int = 1
    #: Where the batch loop's time went: seconds the forward waited for the reader
    #: (input-bound) and for the writer (storage-bound), seconds in the forward itself, and
    #: the CPU seconds of the reader and writer threads. Waits near 0 mean the dump ran at
    #: the speed of its forward pass; on a machine whose cores the forward fills, the
    #: helpers' CPU seconds are what the forward loses to them.
    wait_reader_s: float = 0.0
    wait_writer_s: float = 0.0
    forward_s: float = 0.0
    #: Seconds the forward's threads spent preprocessing (on a CPU; 0 where the reader does).
    preprocess_s: float = 0.0
    reader_cpu_s: float = 0.0
    writer_cpu_s: float = 0.0


def _has_conv(module: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.Conv2d) for m in module.modules())


#: Most forward passes a dump runs side by side (each holds a batch's activations).
MAX_WORKERS = 4
#: How much slower than running one pass at a time side-by-side passes may be in the trial
#: and still be chosen: inside a dump they lose much less to the reader and writer than the
#: trial, which times the forward alone and cannot see a helper thread stalling a parallel
#: region, would predict (benchmarks/RESULTS.md has the measurements).
WORKERS_MARGIN = 1.5


@dataclass(frozen=True)
class Tuning:
    """How the forward pass runs: memory format, torch threads per pass, passes at once.

    ``workers`` > 1 runs that many forward passes concurrently on separate batches, each on
    ``threads`` threads (its share of the cores). On a small machine this is as fast as one
    pass over every core, and much less disturbed by the dump's reader and writer: a parallel
    region waits for its slowest thread, so a helper that preempts one of its threads stalls
    them all, while a preempted single-threaded pass stalls only itself.

    The memory format and the threads per pass change the numbers (they select other
    kernels, and other splits of a reduction), so they are fixed by rules or options, never
    by a timing: the same settings on the same machine store the same bits. Only ``workers``,
    which runs the same passes in other threads, is left to the timing trial. ``chosen_by``
    records how the configuration was decided (``rule``, ``options``, ``trial``, ``resume``).
    """

    memory_format: str
    threads: int
    workers: int = 1
    chosen_by: str = field(default="rule", compare=False)  # how, not what: equal tunings compute the same

    def state(self) -> dict[str, Any]:
        """What the resume journal, the store's attributes and the other ranks are given."""
        return {"memory_format": self.memory_format, "threads": self.threads, "workers": self.workers,
                "tuning_chosen_by": self.chosen_by}  # fmt: skip

    def describe(self) -> str:
        threads = f"{self.threads} thread{'s' if self.threads > 1 else ''}"
        return threads if self.workers == 1 else f"{self.workers} workers × {threads}"


def _format(name: str) -> torch.memory_format:
    return torch.channels_last if name == "channels_last" else torch.contiguous_format


def memory_format_rule(module: torch.nn.Module, example: torch.Tensor) -> str:
    """The memory format of ``--memory-format auto``: a rule, so that it never depends on a timing.

    ``channels_last`` for models with 2-D convolutions fed 4-D batches, where oneDNN's and
    cuDNN's channels-last kernels are the fast ones (the timing trial this rule replaced
    picked it for LeNet-5 and resnet18 alike); ``contiguous`` otherwise, and for TorchScript
    archives, whose compiled graphs were not traced in it.
    """
    if example.dim() == 4 and _has_conv(module) and not isinstance(module, torch.jit.ScriptModule):
        return "channels_last"
    return "contiguous"


def forward_shapes(
    module: torch.nn.Module, example: torch.Tensor, requested: str, threads: int | None, workers: int | None,
    parallel: bool,
) -> tuple[str, list[tuple[int, int]]]:  # fmt: skip
    """The memory format and the candidate (threads per pass, passes at once), preferred first.

    Every candidate runs each batch with the same format and the same threads per pass, so
    they all compute the same bits; the trial only picks which runs fastest here.
    """
    fmt = memory_format_rule(module, example) if requested == "auto" else requested
    default_threads = torch.get_num_threads()
    if workers is not None:
        return fmt, [(threads or max(1, default_threads // workers), workers)]
    if threads is not None:
        return fmt, [(threads, 1)]
    if requested == "auto" and example.device.type == "cpu" and default_threads > 1 and parallel:
        # At most 4 passes, each on its share of the cores, to bound the memory of batches in
        # flight; one pass with the same share of threads is the alternative for a machine
        # whose other processes leave no room for several.
        passes = min(default_threads, MAX_WORKERS)
        share = default_threads // passes
        return fmt, [(share, passes), (share, 1)]
    return fmt, [(default_threads, 1)]


def tune_forward(
    module: torch.nn.Module,
    encoder: Callable[[torch.Tensor], torch.Tensor],
    example: torch.Tensor,
    requested: str,
    threads: int | None = None,
    workers: int | None = None,
    parallel: bool = True,
    prepare: Callable[[], torch.Tensor] | None = None,
) -> Tuning:
    """Fix the memory format and threads per pass, and time how many passes to run at once.

    The memory format is ``requested``, or :func:`memory_format_rule`'s for ``"auto"``;
    ``threads`` and ``workers`` fix those. Otherwise, on a CPU with several cores and where
    ``parallel`` (the forward may run in several threads at once), up to ``MAX_WORKERS``
    passes side by side are timed against one pass with the same threads, in interleaved
    rounds; the side-by-side passes are kept unless one pass is more than ``WORKERS_MARGIN``
    faster. ``prepare``, where given, makes each pass's input from raw rows and is timed with
    it: what a dump's pass does on a CPU. The module is left in the chosen memory format.
    """
    fmt, shapes = forward_shapes(module, example, requested, threads, workers, parallel)
    module.to(memory_format=_format(fmt))
    chosen_by = "options" if requested != "auto" or threads is not None or workers is not None else "rule"
    if len(shapes) == 1:
        return Tuning(fmt, *shapes[0], chosen_by=chosen_by)
    default_threads = torch.get_num_threads()
    example = example.contiguous(memory_format=_format(fmt))
    timings: dict[tuple[int, int], float] = {}

    def forward(repeat: int) -> None:
        with torch.inference_mode():
            for _ in range(repeat):
                encoder(example if prepare is None else prepare().contiguous(memory_format=_format(fmt)))

    # Side-by-side passes run in threads that live for the whole trial, as the dump's workers
    # do: a fresh thread's first forward pass is slow (torch sets up its per-thread state),
    # which made them look slower than they run.
    pool = ThreadPoolExecutor(max(passes for _, passes in shapes), thread_name_prefix="leakaudit-trial")

    def pooled(count: int, repeat: int) -> None:
        if torch.get_num_threads() != count:  # set, not restored: the pool's threads are ours
            torch.set_num_threads(count)
        forward(repeat)

    def run(count: int, passes: int, repeat: int = 1) -> float:
        """Seconds per batch: ``repeat`` passes in a row, in this thread or in each of ``passes``
        pool threads side by side."""
        start = time.perf_counter()
        if passes == 1:
            with _torch_threads(count):
                forward(repeat)
        else:
            for future in [pool.submit(pooled, count, repeat) for _ in range(passes)]:
                future.result()
        return (time.perf_counter() - start) / (repeat * passes)

    # Rounds interleave the configurations and keep each one's best time, so that a burst of
    # load from other processes cannot single one out (the minimum is the robust statistic).
    try:
        warm = max(run(*shape) for shape in shapes)  # allocator, kernel selection, threads
        rounds = 5 if warm < 0.1 else 3 if warm < 0.5 else 1  # keep the trial short for big models
        repeat = 3 if warm < 0.1 else 1
        for _ in range(rounds):
            for shape in shapes:
                elapsed = run(*shape, repeat)
                timings[shape] = min(elapsed, timings.get(shape, elapsed))
    finally:
        pool.shutdown()
        # A thread's torch.set_num_threads also becomes the count of threads started later;
        # the pool's must not outlive the trial.
        torch.set_num_threads(default_threads)
    count, passes = _choose(timings, shapes)
    return Tuning(fmt, count, passes, chosen_by="trial")


def _choose(timings: dict[tuple[int, int], float], shapes: list[tuple[int, int]]) -> tuple[int, int]:
    """The first shape in order of preference within its margin of the fastest: WORKERS_MARGIN
    for side-by-side passes, 5 % otherwise (differences smaller than that are noise on a
    shared machine)."""
    fastest = min(timings.values())
    for count, passes in shapes:
        if timings[(count, passes)] <= fastest * (WORKERS_MARGIN if passes > 1 else 1 / 0.95):
            return count, passes
    raise AssertionError("the fastest shape is always within its own margin")


class _Worker(threading.Thread):
    """A daemon thread whose exception is re-raised in the caller by :meth:`check`."""

    def __init__(self, target: Callable[[], None], name: str) -> None:
        super().__init__(name=name, daemon=True)
        self._target_fn = target
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._target_fn()
        except BaseException as exc:  # re-raised in the main thread
            self.error = exc

    def check(self) -> None:
        if self.error is not None:
            raise self.error


_DONE = object()


def _put(q: queue.Queue, item: object, stop: threading.Event) -> bool:
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def _get(q: queue.Queue, workers: Sequence[_Worker]) -> object:
    while True:
        try:
            return q.get(timeout=0.1)
        except queue.Empty:
            for worker in workers:
                worker.check()
                if not worker.is_alive() and worker.error is None and q.empty():
                    raise RuntimeError(f"{worker.name} stopped without delivering its data")


def check_finite(z: np.ndarray, layer: str, start: int) -> None:
    """Refuse non-finite activations, reporting counts and the row range."""
    finite = np.isfinite(z)
    if finite.all():
        return
    nan = int(np.isnan(z).sum())
    inf = int(z.size - finite.sum() - nan)
    raise NonFiniteError(
        f"activations at layer {layer!r} contain {nan:,} NaN and {inf:,} infinite values in rows "
        f"{start}–{start + len(z) - 1}; nothing was stored. Check the weights and the input scaling (--normalize)."
    )


class _ModelGuard:
    """Puts a model in eval mode for a dump and, on :meth:`restore`, back as it was.

    The dump moves the model to its device and memory format and runs it in eval mode; a
    model passed in by the caller (a factory may return one it keeps) must come back with
    every submodule's mode, and every parameter's and buffer's device and memory format, as
    they were. Values are never written: eval mode updates no statistics.
    """

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module
        self._modes = eval_mode(module)
        self._modes.__enter__()
        self._layout = {name: (t.device, _layout(t)) for name, t in _tensors(module)}

    def restore(self) -> None:
        for name, tensor in _tensors(self.module):
            if name not in self._layout:
                continue
            device, layout = self._layout[name]
            if tensor.device == device and _layout(tensor) == layout:
                continue
            moved = tensor.data.to(device)
            if layout in ("contiguous", "channels_last"):
                moved = moved.contiguous(memory_format=_format(layout))
            tensor.data = moved
        self._modes.__exit__(None, None, None)


def _tensors(module: torch.nn.Module):
    yield from module.named_parameters(remove_duplicate=False)
    yield from module.named_buffers(remove_duplicate=False)


def _layout(tensor: torch.Tensor) -> str:
    if tensor.is_contiguous():
        return "contiguous"
    if tensor.dim() == 4 and tensor.is_contiguous(memory_format=torch.channels_last):
        return "channels_last"
    return "strided"


@dataclass
class _Plan:
    """Everything decided before the first row is written."""

    guard: _ModelGuard
    loaded: Any
    layer: str
    source: Any
    tasks: list
    prep: Any
    n: int
    roles: np.ndarray
    stratified_by: str
    batch_size: int
    device: torch.device
    truncation: Any
    example: torch.Tensor
    layer_shape: tuple[int, ...]
    output_shape: tuple[int, ...] | None
    fingerprint: dict[str, Any]
    attrs: dict[str, Any]


def _check_paths(settings: DumpSettings, output: Path) -> None:
    if output.exists() and not settings.force and not settings.resume:
        raise OutputExistsError(f"{str(output)!r} exists. Pass --force to overwrite it.")
    if output.is_dir():
        raise UsageError(f"{str(output)!r} is a directory; give a file name such as acts.h5.")


def _split_layer(settings: DumpSettings) -> tuple[str, str | None]:
    """The layer to dump, and the split an exported client encoder was cut at (if it is one)."""
    split = exported_split(settings.model)
    if settings.layer is None:
        if split is None:
            raise UsageError(
                "--layer is missing: name the split layer (see `leakaudit layers MODEL`), or 'output' for the whole model."
            )
        return OUTPUT, split
    # The encoder's output is its split layer's: the name it was cut at means that output.
    return (OUTPUT if split is not None and settings.layer == split else settings.layer), split


def _plan(settings: DumpSettings) -> _Plan:
    """Load the model and data and run one batch; on failure, the model is left as it was."""
    device = resolve_device(settings.device)
    # Seed before building the model: a randomly initialised model must be the same on resume.
    torch.manual_seed(settings.seed)
    loaded = load_model(
        settings.model,
        weights=settings.weights,
        num_classes=settings.num_classes,
        in_chans=settings.in_chans,
        model_args=settings.model_args,
        trust_checkpoint=settings.trust_checkpoint,
    )
    requested, split = _split_layer(settings)
    guard = _ModelGuard(loaded.module)
    try:
        return _plan_loaded(settings, loaded, guard, requested, split, device)
    except BaseException:
        guard.restore()
        raise


def _plan_loaded(
    settings: DumpSettings, loaded: Any, guard: _ModelGuard, requested: str, split: str | None, device: torch.device
) -> _Plan:
    module = loaded.module
    layer = resolve_layer(module, requested)
    source = open_source(settings.data)
    n = len(source) if settings.limit is None else min(settings.limit, len(source))
    if len(set(name for name, _ in settings.tasks)) != len(settings.tasks):
        raise ConfigError("task names given with --task must be unique.")
    tasks = [resolve_task(name, src, source) for name, src in settings.tasks]
    prep = preprocess_for(
        source,
        model_input_size=loaded.input_size,
        model_in_chans=loaded.in_chans,
        input_size=settings.input_size,
        normalize=settings.normalize,
    )
    roles, stratified_by = split_roles(source, n, settings.split, settings.seed, tasks)
    batch_size = settings.batch_size
    if loaded.fixed_batch is not None and loaded.fixed_batch != batch_size:
        batch_size = loaded.fixed_batch  # the exported program only runs at its traced batch size

    module.to(device)
    example = prep.model_input(prep.images(source.read(0, min(n, batch_size)))).to(device)
    example = _pad(example, loaded.fixed_batch)
    try:
        truncation = truncate(module, layer, example)
        with torch.inference_mode():
            z_example = truncation.encoder(example)
            output_shape = tuple(module(example).shape[1:]) if settings.with_outputs else None
    except LeakAuditError:
        raise
    except Exception as exc:
        raise forward_failure(exc, tuple(example.shape[1:]), size_option="--input-size", channels_hint=_CHANNELS_HINT) from None
    if z_example.shape[0] != example.shape[0]:
        raise UsageError(
            f"layer {layer!r} output has {z_example.shape[0]} rows for a batch of {example.shape[0]}; "
            "its first dimension is not the batch, so it cannot be dumped."
        )
    fingerprint = {
        "model": settings.model,
        "checkpoint_sha256": loaded.checkpoint_sha256,
        "model_options": loaded.options,
        "layer": layer,
        "data": settings.data,
        "rows": n,
        "tasks": [list(t) for t in settings.tasks],
        "input_size": list(prep.input_size),
        "in_chans": prep.in_chans,
        "normalize": settings.normalize,
        "split": list(settings.split),
        "seed": settings.seed,
        "dtype": settings.dtype,
        "batch_size": batch_size,
        "with_outputs": settings.with_outputs,
        "compression": settings.compression,
        "store_inputs": settings.store_inputs,
    }
    attrs = {
        "model_spec": settings.model,
        "model_kind": loaded.kind,
        "model_options": loaded.options,
        "weights": str(settings.weights or ""),
        "checkpoint_sha256": loaded.checkpoint_sha256 or "",
        "layer": layer,
        "truncation": truncation.method,
        "data_spec": settings.data,
        "source_rows": len(source),
        "input_shape": [prep.in_chans, *prep.input_size],
        "input_size": list(prep.input_size),
        "normalize": settings.normalize or "",
        "seed": settings.seed,
        "split_fractions": list(settings.split),
        "stratified_by": stratified_by,
        "dtype": settings.dtype,
        "batch_size": batch_size,
        "device": str(device),
        "eval_mode": True,
    }
    if split is not None:
        attrs["encoder_split_layer"] = split
    return _Plan(
        guard, loaded, layer, source, tasks, prep, n, roles, stratified_by, batch_size, device, truncation, example,
        tuple(z_example.shape[1:]), output_shape, fingerprint, attrs,
    )  # fmt: skip


_CHANNELS_HINT = (
    "Inputs are converted to the channels a model declares: declare them on the model (input_size = "
    "({expected}, H, W)), build it for {got}-channel input with --in-chans {got} where its factory takes in_chans, "
    "or use {expected}-channel data."
)


def _open_writer(
    settings: DumpSettings, plan: _Plan, path: Path, lo: int, hi: int, *, resume: bool, tuning: Tuning,
    fingerprint: dict[str, Any], attrs: dict[str, Any],
) -> StoreWriter:  # fmt: skip
    return StoreWriter(
        path,
        n=hi - lo,
        input_shape=(plan.prep.in_chans, *plan.prep.input_size),
        layer_shape=plan.layer_shape,
        dtype=settings.dtype,
        labels={t.name: (t.labels[lo:hi], t.class_names, t.source) for t in plan.tasks},
        index=np.arange(lo, hi),
        split=plan.roles[lo:hi],
        attrs={**attrs, **tuning.state()},
        fingerprint=fingerprint,
        output_shape=plan.output_shape,
        compression=settings.compression,
        store_inputs=settings.store_inputs,
        resume=resume,
        state=tuning.state(),
        replace=settings.force or settings.resume or path != Path(settings.output),  # shards: as before
    )


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
            tuning = _apply_tuning(plan, settings, _journal_state(output) if resuming else {})
            writer = _open_writer(
                settings, plan, output, 0, plan.n, resume=resuming, tuning=tuning,
                fingerprint=plan.fingerprint, attrs=plan.attrs,
            )  # fmt: skip
            return _write_rows(settings, plan, writer, 0, plan.n, tuning, on_progress)
        finally:
            plan.guard.restore()
    return _dump_distributed(settings, output, ctx, on_progress)


def _apply_tuning(plan: _Plan, settings: DumpSettings, state: dict[str, Any]) -> Tuning:
    """The tuning of an interrupted dump (same kernels, same bits on resume), else a new trial."""
    if "memory_format" in state:
        tuning = Tuning(str(state["memory_format"]), int(state.get("threads") or torch.get_num_threads()),
                        int(state.get("workers") or 1), str(state.get("tuning_chosen_by") or "resume"))  # fmt: skip
        plan.loaded.module.to(memory_format=_format(tuning.memory_format))
        return tuning
    serial = _serial_reason(plan, settings)
    if settings.workers is not None and settings.workers > 1 and serial is not None:
        raise ConfigError(f"--workers {settings.workers}: this forward pass cannot run in several threads at once ({serial}).")
    if plan.n <= 4 * plan.batch_size and settings.memory_format == "auto":
        # A trial would cost about as much as the dump itself: the preferred shape, whose
        # numbers are the same as any other candidate's.
        fmt, shapes = forward_shapes(plan.loaded.module, plan.example, settings.memory_format, settings.threads,
                                     settings.workers, serial is None)  # fmt: skip
        plan.loaded.module.to(memory_format=_format(fmt))
        return Tuning(fmt, *shapes[0], chosen_by="rule" if settings.threads is None and settings.workers is None else "options")
    prepare = None
    if _preprocess_in_forward(plan):  # each pass also makes its input, as in the dump
        prep, fixed_batch, block = plan.prep, plan.loaded.fixed_batch, plan.source.read(0, min(plan.n, plan.batch_size))

        def prepare() -> torch.Tensor:
            return _pad(prep.model_input(prep.images(block)), fixed_batch)

    return tune_forward(
        plan.loaded.module, plan.truncation.encoder, plan.example, settings.memory_format, settings.threads,
        settings.workers, parallel=serial is None, prepare=prepare,
    )  # fmt: skip


def _preprocess_in_forward(plan: _Plan) -> bool:
    """Whether the forward's threads preprocess their own batches (on a CPU) or the reader does.

    On a CPU every core already runs the forward, so a reader thread that resizes images
    takes its time from the forward, and more than its CPU time when the forward runs in
    parallel regions (a region waits for the thread it preempted). In the forward's threads
    the same work is shared as the forward is. Measured on 2 cores, LeNet-5 on 60,000
    Fashion-MNIST rows resized to 32×32, 6 rounds alternating with the bare forward: median
    ratio to it 0.93 with the preprocessing in the forward's threads against 0.86 in the
    reader (2 workers), 0.78 against 0.69 (2 threads). A GPU's forward leaves the CPU free,
    so there the reader preprocesses (and pins) while the GPU computes.
    """
    return plan.device.type == "cpu"


def _serial_reason(plan: _Plan, settings: DumpSettings) -> str | None:
    """Why the forward passes must run one at a time, or None where they may overlap."""
    if plan.device.type != "cpu":
        return f"on {plan.device.type} one pass fills the device"
    if plan.truncation.method == "hook":
        return "the model is cut by a forward hook, which passes in other threads would trip"
    if _captures_outputs(settings, plan):
        return "--with-outputs records the split layer with a forward hook"
    return None


def _captures_outputs(settings: DumpSettings, plan: _Plan) -> bool:
    module = plan.loaded.module
    return settings.with_outputs and plan.layer != OUTPUT and not isinstance(module, torch.jit.ScriptModule)


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


def _dump_distributed(settings: DumpSettings, output: Path, ctx, on_progress) -> DumpReport:
    from leakaudit import distributed
    from leakaudit.store import write_virtual_store

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
        state = _journal_state(mine) if settings.resume and partial_path(mine).exists() else {}
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
            report = _write_rows(settings, plan, writer, lo, hi, tuning, on_progress if ctx.is_main else None)
    except BaseException as exc:
        error = exc
    finally:
        if plan is not None:
            plan.guard.restore()
    distributed.agree(error)
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


def _write_rows(
    settings: DumpSettings,
    plan: _Plan,
    writer: StoreWriter,
    lo: int,
    hi: int,
    tuning: Tuning,
    on_progress: Callable[[int, int], None] | None,
) -> DumpReport:
    """Run rows ``[lo, hi)`` of the source through the encoder into ``writer`` (rows 0…hi−lo)."""
    module, layer, prep, source = plan.loaded.module, plan.layer, plan.prep, plan.source
    encoder, device, batch_size, n = plan.truncation.encoder, plan.device, plan.batch_size, hi - lo
    fixed_batch = plan.loaded.fixed_batch
    torch_format = _format(tuning.memory_format)
    start_row = writer.rows_done
    capture_outputs = _captures_outputs(settings, plan)
    passes = tuning.workers
    started = time.perf_counter()
    stop = threading.Event()
    batches: queue.Queue = queue.Queue(maxsize=2 + passes)
    results: queue.Queue = queue.Queue(maxsize=2 + passes)
    pin = device.type == "cuda"
    inline = _preprocess_in_forward(plan)
    timing = {"reader_cpu": 0.0, "writer_cpu": 0.0}
    waits = [{"wait_reader": 0.0, "wait_writer": 0.0, "forward": 0.0, "preprocess": 0.0} for _ in range(passes)]

    def read_batches() -> None:
        # Preprocessing runs torch ops too; in their own thread pool beside the forward's they
        # would put twice as many busy threads as cores on a small machine. One thread here.
        with _torch_threads(1):
            cpu = time.thread_time()
            for begin in range(start_row, n, batch_size):
                end = min(n, begin + batch_size)
                x = source.read(lo + begin, lo + end)
                if inline:
                    # A view of a mapped file would be read from disk in the forward's thread.
                    x = x if x.flags.writeable else x.copy()
                else:
                    x = prep.images(x)
                if pin:
                    x = x.pin_memory()
                timing["reader_cpu"] = time.thread_time() - cpu
                if not _put(batches, (begin, x), stop):
                    return
            for _ in range(passes):  # one end mark for each forward worker
                _put(batches, _DONE, stop)

    def write_results() -> None:
        last_checkpoint = time.perf_counter()
        cpu = time.thread_time()
        # Several forward workers finish batches out of order; rows are written, and the
        # resume journal advanced, strictly in order.
        pending: dict[int, tuple] = {}
        expected = start_row
        while True:
            timing["writer_cpu"] = time.thread_time() - cpu
            if expected in pending:
                item = pending.pop(expected)
            else:
                try:
                    item = results.get(timeout=0.1)
                except queue.Empty:
                    if stop.is_set():
                        return
                    continue
                if item is _DONE:
                    if pending:
                        raise RuntimeError(f"rows from {min(pending)} arrived without the rows before them")
                    writer.checkpoint(n)
                    return
                if item[0] != expected:
                    pending[item[0]] = item
                    continue
            begin, x, z, y = item
            expected = begin + len(x)
            check_finite(z, layer, lo + begin)
            if settings.dtype == "float16":
                peak = float(np.abs(z).max()) if z.size else 0.0
                if peak > FLOAT16_MAX:
                    raise NonFiniteError(
                        f"activations at layer {layer!r} reach {peak:.4g}, beyond float16's range "
                        f"(±{FLOAT16_MAX:g}); nothing was stored. Use --dtype float32."
                    )
                z = z.astype(np.float16)
            writer.write(begin, x, z, y)
            now = time.perf_counter()
            if now - last_checkpoint > 1.0:
                writer.checkpoint(begin + len(x))
                last_checkpoint = now
            if on_progress is not None:
                on_progress(begin + len(x), n)

    def run_forward(index: int, others: Sequence[_Worker] = ()) -> None:
        wait = waits[index]
        with torch.inference_mode(), _torch_threads(tuning.threads):
            while not stop.is_set():
                t0 = time.perf_counter()
                item = _get(batches, [reader])
                t1 = time.perf_counter()
                wait["wait_reader"] += t1 - t0
                if item is _DONE:
                    return
                for other in others:  # the main thread's pass reports the other workers' errors
                    other.check()
                begin, x = item
                if inline:
                    x = prep.images(x)
                    t_prep = time.perf_counter()
                    wait["preprocess"] += t_prep - t1
                    t1 = t_prep
                rows = x.shape[0]
                model_x = prep.model_input(x.to(device, non_blocking=pin)).contiguous(memory_format=torch_format)
                model_x = _pad(model_x, fixed_batch)
                y = None
                if capture_outputs:
                    z, y = _forward_with_capture(module, layer, encoder, model_x)
                else:
                    z = encoder(model_x)
                    if settings.with_outputs:
                        y = module(model_x)
                z_np = z[:rows].float().cpu().numpy()
                y_np = y[:rows].float().cpu().numpy() if y is not None else None
                t2 = time.perf_counter()
                wait["forward"] += t2 - t1
                while not stop.is_set():
                    writer_thread.check()
                    try:
                        results.put((begin, x.numpy(), z_np, y_np), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                wait["wait_writer"] += time.perf_counter() - t2

    reader = _Worker(read_batches, "leakaudit-reader")
    writer_thread = _Worker(write_results, "leakaudit-writer")
    forward_workers = [_Worker(lambda i=i: run_forward(i), f"leakaudit-forward-{i}") for i in range(1, passes)]
    try:
        reader.start()
        writer_thread.start()
        if on_progress is not None:
            on_progress(start_row, n)
        for worker in forward_workers:
            worker.start()
        run_forward(0, forward_workers)
        for worker in forward_workers:
            while worker.is_alive():
                worker.join(timeout=0.1)
                writer_thread.check()
            worker.check()
        t3 = time.perf_counter()
        _put_final(results, writer_thread)
        writer_thread.join()
        writer_thread.check()
        waits[0]["wait_writer"] += time.perf_counter() - t3
        elapsed = time.perf_counter() - started
        path = writer.finish({"dump_seconds": round(elapsed, 3)})
    except KeyboardInterrupt:
        stop.set()
        _join_all([*forward_workers, writer_thread])
        writer.close()  # keep the .partial file and its journal for --resume
        raise
    except BaseException:
        stop.set()
        _join_all([*forward_workers, writer_thread])
        writer.abort()  # a failed dump leaves nothing behind
        raise
    finally:
        stop.set()
    rows_done = n - start_row
    return DumpReport(
        path=path,
        rows=n,
        resumed_from=start_row,
        seconds=elapsed,
        rows_per_second=rows_done / elapsed if elapsed > 0 else float("inf"),
        truncation=plan.truncation.method,
        memory_format=tuning.memory_format,
        device=str(device),
        layer_shape=plan.layer_shape,
        threads=tuning.threads,
        workers=passes,
        wait_reader_s=sum(w["wait_reader"] for w in waits),
        wait_writer_s=sum(w["wait_writer"] for w in waits),
        forward_s=sum(w["forward"] for w in waits),
        preprocess_s=sum(w["preprocess"] for w in waits),
        reader_cpu_s=timing["reader_cpu"],
        writer_cpu_s=timing["writer_cpu"],
    )


def _join_all(threads: Sequence[threading.Thread], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(timeout=max(0.0, deadline - time.monotonic()))


class _torch_threads:
    """Run torch with ``count`` intra-op threads in this thread, restoring the setting after.

    ``torch.set_num_threads`` sets the calling thread's OpenMP/MKL thread count (and the
    default for threads not yet started), so the reader can run single-threaded beside a
    forward pass that uses every core.
    """

    def __init__(self, count: int) -> None:
        self.count = count
        self.previous = 0

    def __enter__(self) -> None:
        self.previous = torch.get_num_threads()
        if self.count != self.previous:
            torch.set_num_threads(self.count)

    def __exit__(self, *exc: object) -> None:
        if torch.get_num_threads() != self.previous:
            torch.set_num_threads(self.previous)


def _put_final(results: queue.Queue, writer_thread: _Worker) -> None:
    while True:
        writer_thread.check()
        try:
            results.put(_DONE, timeout=0.1)
            return
        except queue.Full:
            continue


def _pad(x: torch.Tensor, fixed_batch: int | None) -> torch.Tensor:
    """Pad a batch to an exported program's static batch size (extra rows are dropped later)."""
    if fixed_batch is None or x.shape[0] == fixed_batch:
        return x
    if x.shape[0] > fixed_batch:
        raise UsageError(f"the exported program runs batches of {fixed_batch}; got {x.shape[0]} rows.")
    pad = x[-1:].expand(fixed_batch - x.shape[0], *x.shape[1:])
    return torch.cat([x, pad])


def _forward_with_capture(
    module: torch.nn.Module, layer: str, encoder: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One full forward pass that also records ``layer``'s first output (for ``--with-outputs``)."""
    target = dict(module.named_modules()).get(layer)
    if target is None:  # a graph node, not a module: two passes
        return encoder(x), module(x)
    seen: list[torch.Tensor] = []

    def hook(_m, _i, out):
        if not seen:
            seen.append(out)

    handle = target.register_forward_hook(hook)
    try:
        y = module(x)
    finally:
        handle.remove()
    if not seen:
        return capture(module, layer, x), y
    return seen[0], y


def _journal_state(output: Path) -> dict[str, Any]:
    import json

    try:
        return dict(json.loads(journal_path(output).read_text()).get("state", {}))
    except (OSError, ValueError):
        return {}
