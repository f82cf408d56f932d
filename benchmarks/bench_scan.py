"""Wall time of a scan's one-pass capture of K layers, beside K separate dumps and one dump, in one run.

Each repeat runs, in turn: one dump of the deepest layer, K dumps (one per layer), and one
``dump_many`` of the K layers; the best of each over the repeats is kept, so load from other
processes hits all three alike. The target: the K-layer capture at most 1.5× one dump. The
one-minute load average is printed beside the numbers (this machine is shared).

``--costs MODEL`` prints instead the cost columns of a scan (bytes per sample, client
parameters and MACs) of MODEL's automatic candidates, without dumping anything.

Usage::

    python benchmarks/bench_scan.py                          # lenet5, Fashion-MNIST if installed, else digits
    python benchmarks/bench_scan.py --data digits --repeats 3
    python benchmarks/bench_scan.py --costs timm:resnet18 --input-size 224
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time
from pathlib import Path

FASHION = "/usr/share/datasets/fashion-mnist"


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def capture(args: argparse.Namespace) -> None:
    from leakaudit.dump import DumpSettings, dump, dump_many

    layers = args.layers.split(",")
    data = args.data or (f"idx:{FASHION}" if Path(FASHION).is_dir() else "digits")
    best = {"one dump": float("inf"), f"{len(layers)} dumps": float("inf"), f"dump_many K={len(layers)}": float("inf")}
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        folder = Path(tmp)
        settings = DumpSettings(model=args.model, layer=None, data=data, output=folder / "x.h5", tasks=(("private", "label"),),
                                limit=args.limit, force=True)  # fmt: skip
        dump(dataclasses.replace(settings, layer=layers[-1], output=folder / "warm.h5"))  # imports, caches
        for _ in range(args.repeats):
            t = _timed(lambda: dump(dataclasses.replace(settings, layer=layers[-1], output=folder / "one.h5")))
            best["one dump"] = min(best["one dump"], t)
            t = _timed(lambda: [dump(dataclasses.replace(settings, layer=n, output=folder / f"s-{n}.h5")) for n in layers])
            best[f"{len(layers)} dumps"] = min(best[f"{len(layers)} dumps"], t)
            t = _timed(lambda: dump_many(settings, layers, [folder / f"m-{n}.h5" for n in layers]))
            best[f"dump_many K={len(layers)}"] = min(best[f"dump_many K={len(layers)}"], t)
        rows = dump(dataclasses.replace(settings, layer=layers[-1], output=folder / "one.h5")).rows
    one = best["one dump"]
    print(f"{args.model} on {data}, {rows:,} rows, layers {','.join(layers)}; best of {args.repeats}; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")  # fmt: skip
    print("| run | wall s | × one dump |\n|---|---:|---:|")
    for name, seconds in best.items():
        print(f"| {name} | {seconds:.2f} | {seconds / one:.2f} |")


def costs(args: argparse.Namespace) -> None:
    import torch

    from leakaudit.layers import eval_mode
    from leakaudit.models import load_model
    from leakaudit.scan import block_boundaries, client_cost, spread

    loaded = load_model(args.costs)
    size = (args.input_size, args.input_size) if args.input_size else loaded.input_size
    example = torch.rand(2, loaded.in_chans or 3, *size)
    with eval_mode(loaded.module):
        names = spread(block_boundaries(loaded.module, example), args.max_layers)
        print(f"{args.costs}, input {loaded.in_chans or 3}×{size[0]}×{size[1]}, candidates (auto): {', '.join(names)}")
        print("| layer | Z shape | bytes/sample (float32) | client params | client MACs |\n|---|---|---:|---:|---:|")
        for name in names:
            c = client_cost(loaded.module, name, example, "float32")
            print(f"| {name} | {'×'.join(map(str, c.shape))} | {c.bytes_per_sample:,} | {c.client_params:,} | {c.client_macs:,} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="lenet5")
    parser.add_argument("--layers", default="conv1,conv2,pool2,conv3,fc1")
    parser.add_argument("--data", default=None)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tmp", default=None, help="Folder for the temporary stores (a real disk, not tmpfs).")
    parser.add_argument("--costs", default=None, metavar="MODEL")
    parser.add_argument("--input-size", type=int, default=None)
    parser.add_argument("--max-layers", type=int, default=6)
    args = parser.parse_args()
    costs(args) if args.costs else capture(args)


if __name__ == "__main__":
    main()
