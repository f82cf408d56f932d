"""The dump's three stages: reader, forward pass(es) and writer, in threads joined by two queues.

Three stages overlap so that the dump runs at the speed of the truncated forward pass:
a reader thread reads the next batches, the calling thread (and, on a CPU, side-by-side
worker threads) runs the encoder (torch releases the GIL while it computes), and a writer
thread checks the activations (non-finite values, float16 range), converts them and
writes them to HDF5, recording progress for ``--resume`` about once a second. The
preprocessing (conversion to float, resizing) runs in the reader for a GPU, which it keeps
busy meanwhile, and in the forward's own threads on a CPU, where the reader would take the
cores from the forward (see :func:`leakaudit.dump.plan._preprocess_in_forward`).

The queues carry ``(begin, x)`` batches from the reader and ``(begin, x, z, y)`` results
to the writer, each ended by :data:`_DONE`; every wait polls a stop event, so that one
stage's error stops the others and reaches the caller.
"""

from __future__ import annotations

import functools
import queue
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from leakaudit.dump.plan import _captures_outputs, _pad, _Plan, _preprocess_in_forward
from leakaudit.dump.settings import DumpReport, DumpSettings
from leakaudit.dump.tuning import Tuning, _format, _torch_threads, batch_seed
from leakaudit.errors import NonFiniteError
from leakaudit.layers import LayerCapture, capture
from leakaudit.store import StoreWriter

FLOAT16_MAX = 65504.0


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
                    raise RuntimeError(f"{worker.name} stopped without delivering its data") from None


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

class _Pipeline:
    """Runs rows ``[lo, hi)`` of the source through the encoder into ``writer`` (its rows 0…hi−lo).

    One reader thread, ``tuning.workers`` forward passes (the calling thread and
    ``workers − 1`` others) and one writer thread. Several passes finish batches out of
    order; the writer writes rows, and advances the resume journal, strictly in order.
    An interrupted dump (Ctrl-C) keeps its ``.partial`` file for ``--resume``; any other
    failure deletes it.
    """

    def __init__(
        self,
        settings: DumpSettings,
        plan: _Plan,
        writer: StoreWriter,
        *,
        lo: int,
        hi: int,
        tuning: Tuning,
        on_progress: Callable[[int, int], None] | None,
    ) -> None:
        self.settings, self.plan, self.writer, self.tuning, self.on_progress = settings, plan, writer, tuning, on_progress
        self.lo, self.n = lo, hi - lo
        self.start_row = writer.rows_done
        self.passes = tuning.workers
        self.started = time.perf_counter()
        self.stop = threading.Event()
        self.batches: queue.Queue = queue.Queue(maxsize=2 + self.passes)
        self.results: queue.Queue = queue.Queue(maxsize=2 + self.passes)
        self.pin = plan.device.type == "cuda"
        self.inline = _preprocess_in_forward(plan)
        self.capture_outputs = _captures_outputs(settings, plan)
        self.timing = {"reader_cpu": 0.0, "writer_cpu": 0.0}
        self.waits = [{"wait_reader": 0.0, "wait_writer": 0.0, "forward": 0.0, "preprocess": 0.0} for _ in range(self.passes)]
        self.reader = _Worker(self._read_batches, "leakaudit-reader")
        self.writer_thread = _Worker(self._write_results, "leakaudit-writer")
        self.forward_workers = [
            _Worker(functools.partial(self._run_forward, i), f"leakaudit-forward-{i}") for i in range(1, self.passes)
        ]

    def run(self) -> DumpReport:
        """Start the threads, run the first forward pass here, and finish the store."""
        writer, writer_thread, forward_workers = self.writer, self.writer_thread, self.forward_workers
        try:
            self.reader.start()
            writer_thread.start()
            if self.on_progress is not None:
                self.on_progress(self.start_row, self.n)
            for worker in forward_workers:
                worker.start()
            self._run_forward(0, forward_workers)
            for worker in forward_workers:
                while worker.is_alive():
                    worker.join(timeout=0.1)
                    writer_thread.check()
                worker.check()
            t3 = time.perf_counter()
            _put_final(self.results, writer_thread)
            writer_thread.join()
            writer_thread.check()
            self.waits[0]["wait_writer"] += time.perf_counter() - t3
            elapsed = time.perf_counter() - self.started
            path = writer.finish({"dump_seconds": round(elapsed, 3)})
        except KeyboardInterrupt:
            self.stop.set()
            _join_all([*forward_workers, writer_thread])
            writer.close()  # keep the .partial file and its journal for --resume
            raise
        except BaseException:
            self.stop.set()
            _join_all([*forward_workers, writer_thread])
            writer.abort()  # a failed dump leaves nothing behind
            raise
        finally:
            self.stop.set()
        return self._report(path, elapsed)

    def _read_batches(self) -> None:
        source, prep, lo, n, batch_size = self.plan.source, self.plan.prep, self.lo, self.n, self.plan.batch_size
        # Preprocessing runs torch ops too; in their own thread pool beside the forward's they
        # would put twice as many busy threads as cores on a small machine. One thread here.
        with _torch_threads(1):
            cpu = time.thread_time()
            for begin in range(self.start_row, n, batch_size):
                end = min(n, begin + batch_size)
                x = source.read(lo + begin, lo + end)
                if self.inline:
                    # A view of a mapped file would be read from disk in the forward's thread.
                    x = x if x.flags.writeable else x.copy()
                else:
                    x = prep.images(x)
                if self.pin:
                    x = x.pin_memory()
                self.timing["reader_cpu"] = time.thread_time() - cpu
                if not _put(self.batches, (begin, x), self.stop):
                    return
            for _ in range(self.passes):  # one end mark for each forward worker
                _put(self.batches, _DONE, self.stop)

    def _write_results(self) -> None:
        writer, results, stop, n = self.writer, self.results, self.stop, self.n
        last_checkpoint = time.perf_counter()
        cpu = time.thread_time()
        # Several forward workers finish batches out of order; rows are written, and the
        # resume journal advanced, strictly in order.
        pending: dict[int, tuple] = {}
        expected = self.start_row
        while True:
            self.timing["writer_cpu"] = time.thread_time() - cpu
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
            writer.write(begin, x, cast(np.ndarray, self._checked(z, begin)), y)  # one layer: one array
            now = time.perf_counter()
            if now - last_checkpoint > 1.0:
                writer.checkpoint(begin + len(x))
                last_checkpoint = now
            if self.on_progress is not None:
                self.on_progress(begin + len(x), n)

    def _checked(self, z: np.ndarray | list[np.ndarray], begin: int) -> np.ndarray | list[np.ndarray]:
        """``z`` as it is stored, refused if it holds non-finite values or exceeds float16's range."""
        if isinstance(z, list):  # a multi-layer dump: one array per layer
            return [self._checked_layer(zi, layer, begin) for zi, layer in zip(z, self.plan.layers)]
        return self._checked_layer(z, self.plan.layer, begin)

    def _checked_layer(self, z: np.ndarray, layer: str, begin: int) -> np.ndarray:
        check_finite(z, layer, self.lo + begin)
        if self.settings.dtype == "float16":
            peak = float(np.abs(z).max()) if z.size else 0.0
            if peak > FLOAT16_MAX:
                raise NonFiniteError(
                    f"activations at layer {layer!r} reach {peak:.4g}, beyond float16's range "
                    f"(±{FLOAT16_MAX:g}); nothing was stored. Use --dtype float32."
                )
            z = z.astype(np.float16)
        return z

    def _run_forward(self, index: int, others: Sequence[_Worker] = ()) -> None:
        plan, prep, device, stop, wait = self.plan, self.plan.prep, self.plan.device, self.stop, self.waits[index]
        torch_format = _format(self.tuning.memory_format)
        with torch.inference_mode(), _torch_threads(self.tuning.threads):
            while not stop.is_set():
                t0 = time.perf_counter()
                item = _get(self.batches, [self.reader])
                t1 = time.perf_counter()
                wait["wait_reader"] += t1 - t0
                if item is _DONE:
                    return
                for other in others:  # the main thread's pass reports the other workers' errors
                    other.check()
                # What _read_batches puts: (first row, rows), an array until prep.images runs, then a tensor.
                begin, x = cast(tuple[int, Any], item)
                if self.inline:
                    x = prep.images(x)
                    t_prep = time.perf_counter()
                    wait["preprocess"] += t_prep - t1
                    t1 = t_prep
                rows = x.shape[0]
                model_x = prep.model_input(x.to(device, non_blocking=self.pin)).contiguous(memory_format=torch_format)
                model_x = _pad(model_x, plan.loaded.fixed_batch)
                z, y = self._forward(model_x, self.lo + begin)
                z_np = [zi[:rows].float().cpu().numpy() for zi in z] if isinstance(z, list) else z[:rows].float().cpu().numpy()
                y_np = y[:rows].float().cpu().numpy() if y is not None else None
                t2 = time.perf_counter()
                wait["forward"] += t2 - t1
                while not stop.is_set():
                    self.writer_thread.check()
                    try:
                        self.results.put((begin, x.numpy(), z_np, y_np), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                wait["wait_writer"] += time.perf_counter() - t2

    def _forward(self, model_x: torch.Tensor, first_row: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The split layer's activations of one batch and, with ``--with-outputs``, the model's logits.

        A random forward is seeded for the batch, and seeded again before the whole model runs
        apart from the encoder: the noise drawn up to the split is the same in both, so the
        logits are those of the stored activations.
        """
        module, layer, encoder = self.plan.loaded.module, self.plan.layer, self.plan.truncation.encoder
        seed = batch_seed(self.settings.seed, first_row) if self.tuning.random_forward else None
        _seed(seed)
        if self.capture_outputs:
            return _forward_with_capture(module, layer, encoder, model_x, seed)
        z = encoder(model_x)
        if not self.settings.with_outputs:
            return z, None
        _seed(seed)
        return z, module(model_x)

    def _report(self, path: Path, elapsed: float) -> DumpReport:
        plan, tuning, waits = self.plan, self.tuning, self.waits
        rows_done = self.n - self.start_row
        return DumpReport(
            path=path,
            rows=self.n,
            resumed_from=self.start_row,
            seconds=elapsed,
            rows_per_second=rows_done / elapsed if elapsed > 0 else float("inf"),
            truncation=plan.truncation.method,
            memory_format=tuning.memory_format,
            device=str(plan.device),
            layer_shape=plan.layer_shape,
            threads=tuning.threads,
            workers=self.passes,
            wait_reader_s=sum(w["wait_reader"] for w in waits),
            wait_writer_s=sum(w["wait_writer"] for w in waits),
            forward_s=sum(w["forward"] for w in waits),
            preprocess_s=sum(w["preprocess"] for w in waits),
            reader_cpu_s=self.timing["reader_cpu"],
            writer_cpu_s=self.timing["writer_cpu"],
        )


def _join_all(threads: Sequence[threading.Thread], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(timeout=max(0.0, deadline - time.monotonic()))


def _put_final(results: queue.Queue, writer_thread: _Worker) -> None:
    while True:
        writer_thread.check()
        try:
            results.put(_DONE, timeout=0.1)
            return
        except queue.Full:
            continue


def _seed(seed: int | None) -> None:
    """Seed torch's default generators for a random forward's batch (nothing for ``None``)."""
    if seed is not None:
        torch.manual_seed(seed)


def _forward_with_capture(
    module: torch.nn.Module, layer: str, encoder: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
    seed: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """One full forward pass that also records ``layer``'s first output (for ``--with-outputs``).

    Through the tool's one capture hook (:class:`leakaudit.layers.LayerCapture`); such passes
    run one at a time (see ``_serial_reason``), so the hook sees only its own forward. Where a
    second pass is needed, a random forward's generator is seeded again with ``seed`` before it.
    """
    if dict(module.named_modules()).get(layer) is None:  # a graph node, not a module: two passes
        first = encoder(x)
        _seed(seed)
        return first, module(x)
    with LayerCapture(module, layer) as hook:
        y, z = hook.run(x)
    # The model's output is a tensor here as on the other paths (nothing checks it per batch);
    # the layer's was checked to be one when the plan truncated the model at it.
    if z is None:
        _seed(seed)
        return capture(module, layer, x), cast(torch.Tensor, y)
    return cast(torch.Tensor, z), cast(torch.Tensor, y)
