"""Rows/s of one training epoch's data, streamed (shuffled contiguous blocks) against read into memory.

Usage: python benchmarks/bench_stream.py STORE.h5 [--budget 8M] [--batch 128] [--epochs 3]

Both paths deliver the same batches (float32, finite) in the order of
:func:`leakaudit.store.stream.epoch_order`; the in-memory path pays its read once, the
streamed one reads every epoch. Peak RSS (VmHWM) is printed for the streamed run, which
runs first in a fresh process so the in-memory copy cannot inflate it.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from leakaudit.store import open_store
from leakaudit.store.stream import Blocks, StreamReader, epoch_order, parse_budget


def vm_hwm() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("store")
    parser.add_argument("--budget", default="8M")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    budget = parse_budget(args.budget)
    with open_store(args.store) as store:
        rows = store.rows("attacker-train")
        row_bytes = int(np.prod(store.layer_shape)) * 4
        blocks = Blocks.for_budget(row_bytes, budget)
        bounds = [(a, min(a + args.batch, len(rows))) for a in range(0, len(rows), args.batch)]
        rss0 = vm_hwm()
        reader = StreamReader(store, ["activations"], rows, "attacker-train", blocks)
        generator = torch.Generator().manual_seed(0)
        started = time.perf_counter()
        for _ in range(args.epochs):
            for _positions, (z,) in reader.batches(epoch_order(len(rows), generator, blocks), bounds):
                z.sum()
        stream_s = time.perf_counter() - started
        rss_stream = vm_hwm()
        generator = torch.Generator().manual_seed(0)
        started = time.perf_counter()
        data = torch.from_numpy(store.activations(rows))
        for _ in range(args.epochs):
            order = epoch_order(len(rows), generator, blocks)
            for a, b in bounds:
                data[order[a:b]].sum()
        memory_s = time.perf_counter() - started
    n = len(rows) * args.epochs
    print(f"rows {len(rows):,} x {args.epochs} epochs, row {row_bytes:,} B float32, role {len(rows) * row_bytes / 2**20:.1f} MiB, "
          f"budget {budget / 2**20:.1f} MiB, blocks {blocks.block_rows} rows x {blocks.window_blocks} per window")
    print(f"stream {n / stream_s:,.0f} rows/s, memory {n / memory_s:,.0f} rows/s, ratio {memory_s / stream_s:.2f}; "
          f"peak RSS before {rss0 / 2**20:.0f} MiB, after streaming {rss_stream / 2**20:.0f} MiB; load {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
