"""How the forward pass runs: the memory-format rule, the candidate shapes and the timing trial."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch


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

    ``random_forward``: the forward pass draws from torch's default generator (a noise layer
    such as Shredder's). Its passes then run one at a time, and each batch's draws are seeded
    from the dump's seed and the batch's first row (:func:`batch_seed`), so that the noise a
    row gets depends neither on how many draws came before (a timing trial's, an interrupted
    run's) nor on which rank or thread ran its batch.
    """

    memory_format: str
    threads: int
    workers: int = 1
    chosen_by: str = field(default="rule", compare=False)  # how, not what: equal tunings compute the same
    random_forward: bool = False

    def state(self) -> dict[str, Any]:
        """What the resume journal, the store's attributes and the other ranks are given."""
        return {"memory_format": self.memory_format, "threads": self.threads, "workers": self.workers,
                "tuning_chosen_by": self.chosen_by, "random_forward": self.random_forward}  # fmt: skip

    def describe(self) -> str:
        threads = f"{self.threads} thread{'s' if self.threads > 1 else ''}"
        return threads if self.workers == 1 else f"{self.workers} workers × {threads}"


def draws_random(encoder: Callable[[torch.Tensor], Any], example: torch.Tensor) -> bool:
    """Whether one forward pass of ``encoder`` on ``example`` draws from torch's default generators.

    A pass that draws changes the generator's state (CPU, and the example's CUDA device); one
    that does not leaves it as it was, whatever the draws' values. The state is restored after.
    """
    devices = [example.device] if example.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        before = _generator_states(example.device)
        with torch.inference_mode():
            encoder(example)
        return any(not torch.equal(a, b) for a, b in zip(before, _generator_states(example.device)))


def _generator_states(device: torch.device) -> list[torch.Tensor]:
    states = [torch.random.get_rng_state()]
    if device.type == "cuda":
        states.append(torch.cuda.get_rng_state(device))
    return states


def batch_seed(seed: int, first_row: int) -> int:
    """The seed of a random forward's draws for the batch that starts at ``first_row``.

    A function of the row, not of the batch's place in a run: a resumed dump, a shard under
    ``torchrun`` (shards hold whole batches) and one process draw the same noise for a row.
    """
    digest = hashlib.blake2b(f"dump-rows:{seed}:{first_row}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % (2**63)


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
        pool threads side by side.
        """
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
    shared machine).
    """
    fastest = min(timings.values())
    for count, passes in shapes:
        if timings[(count, passes)] <= fastest * (WORKERS_MARGIN if passes > 1 else 1 / 0.95):
            return count, passes
    raise AssertionError("the fastest shape is always within its own margin")

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
