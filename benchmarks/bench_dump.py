"""Dump throughput against the bare truncated forward pass, measured in one run.

For each case the *bare* forward is what a careful user would time: the whole data set
already preprocessed in memory, the model cut at the layer by FX, ``inference_mode``,
and the fastest of the contiguous and channels_last memory formats with torch's default
thread count, with 1 thread, or as one single-threaded loop per core over alternate batches
(each tried on the first 16 batches). The
*dump* is ``leakaudit.dump.dump`` writing a real HDF5 store (inputs + activations +
labels) from the raw idx files, reading and resizing them as it goes. Runs alternate
(bare, dump, bare, dump, …) and the best of each is kept, so load from other processes
hits both alike. The ratio is dump rows/s ÷ bare rows/s over the batch loop; end-to-end
wall time (model build, FX trace, memory-format trial) is reported too. For context, not
the target, each repeat also times the bare loop fed from the raw rows, each pass resizing
its batch first (what a user's own loop must do to run the model on these files); the last
column is the dump's best against that loop's best.

Usage::

    python benchmarks/bench_dump.py                 # both cases, 60,000 rows, 3 repeats
    python benchmarks/bench_dump.py --limit 10000   # quicker
    python benchmarks/bench_dump.py --quick         # 5,000 rows, one repeat: a smoke run
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from leakaudit.data import open_source, preprocess_for
from leakaudit.dump import DumpSettings, Tuning, dump
from leakaudit.layers import truncate
from leakaudit.models import load_model

FASHION = "/usr/share/datasets/fashion-mnist"
CASES = [
    # name, model spec, layer, options
    ("LeNet-5 @ conv3", "lenet5", "conv3", {}),
    ("timm:resnet18 @ layer2, 32×32", "timm:resnet18", "layer2", {"num_classes": 10}),
]


def bare_forward(spec: str, layer: str, options: dict, data: str, limit: int, batch_size: int,
                 preprocess: bool = False) -> tuple[float, Tuning]:
    """Best rows/s of the truncated forward over preprocessed in-memory data, and its configuration.

    The configuration a careful user would pick: each memory format (contiguous, channels_last)
    with torch's default thread count, with 1 thread, and as one single-threaded loop per core
    over alternate batches (Python threads: torch releases the GIL in its kernels) is tried on
    the first batches, and the whole loop is timed in the fastest one. The images are resized
    to 32 × 32, as the dump is told. With ``preprocess`` the raw rows are in memory instead and
    each pass resizes its batch before running it: what a user's own loop must do to run this
    model on these files, the context column, not the target's measure.
    """
    torch.manual_seed(0)
    loaded = load_model(spec, **options)
    source = open_source(data)
    prep = preprocess_for(source, model_input_size=loaded.input_size, model_in_chans=loaded.in_chans,
                          input_size=(32, 32))
    raw = source.read(0, limit).copy()
    x = prep.images(raw)
    module = loaded.module
    encoder = truncate(module, layer, x[:batch_size]).encoder
    default_threads = torch.get_num_threads()
    probe = min(limit, 16 * batch_size)

    def loop(memory_format: torch.memory_format, rows: int, workers: int) -> float:
        xs = None if preprocess else x.contiguous(memory_format=memory_format)

        def run(first: int) -> None:
            with torch.inference_mode():
                for begin in range(first * batch_size, rows, workers * batch_size):
                    if preprocess:
                        encoder(prep.images(raw[begin : begin + batch_size]).contiguous(memory_format=memory_format))
                    else:
                        encoder(xs[begin : begin + batch_size])

        with torch.inference_mode():  # warm-up
            encoder(x[:batch_size].contiguous(memory_format=memory_format))
        start = time.perf_counter()
        if workers == 1:
            run(0)
        else:
            pool = [threading.Thread(target=run, args=(i,)) for i in range(workers)]
            for thread in pool:
                thread.start()
            for thread in pool:
                thread.join()
        return rows / (time.perf_counter() - start)

    formats = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
    shapes = [(default_threads, 1), (1, 1)] + ([(1, default_threads)] if default_threads > 1 else [])
    trials = []
    try:
        for threads, workers in shapes:
            torch.set_num_threads(threads)
            for fmt, memory_format in formats.items():
                module.to(memory_format=memory_format)
                trials.append((loop(memory_format, probe, workers), fmt, threads, workers))
        _, fmt, threads, workers = max(trials)
        torch.set_num_threads(threads)
        module.to(memory_format=formats[fmt])
        rate = loop(formats[fmt], limit, workers)
    finally:
        torch.set_num_threads(default_threads)
    return rate, Tuning(fmt, threads, workers)


def run_dump(spec: str, layer: str, options: dict, data: str, limit: int, batch_size: int, out: Path) -> tuple[float, float, str, float]:
    """Rows/s of the dump's batch loop, its end-to-end seconds, the configuration it chose, and
    the CPU seconds of the work beside the forward: the reader's and writer's, and (on a CPU,
    where the forward's threads preprocess their batches) the preprocessing's, counted as its
    seconds × the threads of a pass.
    """
    start = time.perf_counter()
    report = dump(
        DumpSettings(
            model=spec,
            layer=layer,
            data=data,
            output=out,
            tasks=(("label", "label"),),
            input_size=(32, 32),
            batch_size=batch_size,
            limit=limit,
            force=True,
            **options,
        )
    )
    wall = time.perf_counter() - start
    tuning = Tuning(report.memory_format, report.threads, report.workers)
    print(f"    dump: {report.rows_per_second:,.0f} rows/s, loop {report.seconds:.2f} s (forward {report.forward_s:.2f} s, "
          f"waiting for the reader {report.wait_reader_s:.2f} s, for the writer {report.wait_writer_s:.2f} s); "
          f"preprocessing in the forward's threads {report.preprocess_s:.2f} s; "
          f"CPU s of the reader {report.reader_cpu_s:.2f}, of the writer {report.writer_cpu_s:.2f}; "
          f"{report.memory_format}, {tuning.describe()}; end to end {wall:.2f} s", flush=True)
    chosen = f"{report.memory_format}, {tuning.describe()}"
    extra = report.reader_cpu_s + report.writer_cpu_s + report.preprocess_s * report.threads
    return report.rows_per_second, wall, chosen, extra


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=None, help="rows (default 60,000; 5,000 with --quick)")
    parser.add_argument("--quick", action="store_true", help="5,000 rows and one repeat unless given")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=None, help="alternating runs, best kept (default 3; 1 with --quick)")
    parser.add_argument("--data", default=f"idx:{FASHION}:train")
    args = parser.parse_args()
    if args.limit is None:
        args.limit = 5_000 if args.quick else 60_000
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    if not Path(FASHION).is_dir() and args.data.startswith(f"idx:{FASHION}"):
        sys.exit(f"{FASHION} is missing: apt-get install dataset-fashion-mnist")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; "
          f"{args.limit:,} rows, batch {args.batch_size}, best of {args.repeats}; "
          f"load average {os.getloadavg()[0]:.1f} at start\n")
    rows = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        for name, spec, layer, options in CASES:
            bare, dumped, wall, bare_fmt, dump_fmt, bare_cores = 0.0, 0.0, float("inf"), "", "", 1
            pairs, helpers, fed = [], float("inf"), 0.0
            for _ in range(args.repeats):
                fed_rate, config = bare_forward(spec, layer, options, args.data, args.limit, args.batch_size, preprocess=True)
                print(f"    bare with its preprocessing: {fed_rate:,.0f} rows/s "
                      f"({config.memory_format}, {config.describe()})", flush=True)
                fed = max(fed, fed_rate)
                bare_rate, config = bare_forward(spec, layer, options, args.data, args.limit, args.batch_size)
                fmt = f"{config.memory_format}, {config.describe()}"
                print(f"    bare: {bare_rate:,.0f} rows/s ({fmt})", flush=True)
                if bare_rate > bare:
                    bare, bare_fmt, bare_cores = bare_rate, fmt, config.threads * config.workers
                rate, seconds, fmt, cpu = run_dump(spec, layer, options, args.data, args.limit, args.batch_size, Path(tmp) / "bench.h5")
                if rate > dumped:
                    dumped, dump_fmt = rate, fmt
                wall = min(wall, seconds)
                pairs.append(rate / bare_rate)
                helpers = min(helpers, cpu)
            # The forward's own CPU time, if its threads were all busy, against the work beside it
            # (reader, writer, preprocessing): on a machine whose cores the forward fills, the
            # best ratio possible.
            forward_cpu = args.limit / bare * bare_cores
            ceiling = forward_cpu / (forward_cpu + helpers)
            rows.append((name, bare, bare_fmt, dumped, dump_fmt, dumped / bare, statistics.median(pairs), ceiling,
                         helpers, args.limit / wall, fed))  # fmt: skip
            print(f"  {name}: bare {bare:,.0f} rows/s ({bare_fmt}), dump {dumped:,.0f} rows/s ({dump_fmt}); "
                  f"ratios of the pairs {', '.join(f'{r:.2f}' for r in pairs)}", flush=True)
    print("\n| case | bare forward rows/s (format) | dump rows/s (format chosen) | ratio (best/best) | median ratio of the pairs "
          "| CPU s beside the forward | ceiling | dump end-to-end rows/s | bare with its preprocessing rows/s (dump ÷ it) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, bare, bare_fmt, dumped, dump_fmt, ratio, median, ceiling, helpers, e2e, fed in rows:
        print(f"| {name} | {bare:,.0f} ({bare_fmt}) | {dumped:,.0f} ({dump_fmt}) | {ratio:.2f} | {median:.2f} | "
              f"{helpers:.2f} | {ceiling:.2f} | {e2e:,.0f} | {fed:,.0f} ({dumped / fed:.2f}) |")
    print("\nCPU s beside the forward: the reader's and writer's, and the preprocessing's in the forward's threads "
          "(its seconds × a pass's threads)\nceiling: forward CPU s (rows / bare rate × its threads) ÷ (that + the CPU s beside it)"
          "\nbare with its preprocessing: the same loop resizing each raw batch before its pass, as a user's own loop "
          "must to run the model on these files (context; the target's ratio is against the bare forward)")
    print("\nTarget ratio >= 0.9: " + "; ".join(f"{row[0]} {row[5]:.2f} -> {'met' if row[5] >= 0.9 else 'NOT met'}" for row in rows))
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
