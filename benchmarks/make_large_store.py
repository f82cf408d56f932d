"""Write a synthetic store of a real network's split shape, as large as asked, for the streaming benchmark.

Usage: python benchmarks/make_large_store.py OUT.h5 [--rows 100000] [--side 128] [--layer-shape 128,16,16]
       [--dtype float16] [--seed 0]

The defaults are the shapes a dump of ``timm:resnet18 --layer layer2 --input-size 128 --dtype float16``
writes — X float32 [3, 128, 128] in [0, 1], Z float16 [128, 16, 16]; ``--side 32 --layer-shape
64,32,32 --dtype float32`` is VGG-16's first block on CIFAR-sized inputs. A store larger than this
machine's memory takes minutes to write this way instead of the hours its forward pass would.
The data have structure an attack can find (so the benchmark trains real heads on a real signal):
each of 10 classes has a smooth colour pattern, each row adds its own smooth noise, and Z is a
fixed random 1×1 convolution (+ ReLU) of X average-pooled to Z's side, plus noise. It is written with the
dump's :class:`~leakaudit.store.StoreWriter` (contiguous datasets, checksums recorded at the end,
a ``.partial`` file renamed when complete), split by :func:`~leakaudit.data.stratified_split`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from leakaudit.data import stratified_split
from leakaudit.store import StoreWriter

CLASSES = 10
BLOCK = 256


def _smooth(generator: torch.Generator, rows: int, side: int, coarse: int) -> torch.Tensor:
    """Random [rows, 3, side, side] images in [0, 1], smooth at the scale of ``coarse`` cells."""
    cells = torch.rand(rows, 3, coarse, coarse, generator=generator)
    return F.interpolate(cells, size=(side, side), mode="bilinear", align_corners=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--side", type=int, default=128)
    parser.add_argument("--layer-shape", default="128,16,16", help="C,H,W of Z (H divides the side)")
    parser.add_argument("--dtype", choices=("float16", "float32"), default="float16")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    n, side = args.rows, args.side
    layer_shape = tuple(int(s) for s in args.layer_shape.split(","))
    channels, factor = layer_shape[0], side // layer_shape[1]
    if len(layer_shape) != 3 or layer_shape[1] != layer_shape[2] or factor * layer_shape[1] != side:
        parser.error(f"--layer-shape must be C,H,H with H dividing --side {side}")
    generator = torch.Generator().manual_seed(args.seed)
    patterns = _smooth(generator, CLASSES, side, 6)
    weight = torch.randn(channels, 3, 1, 1, generator=generator)
    bias = torch.randn(channels, generator=generator) * 0.5
    labels = torch.randint(0, CLASSES, (n,), generator=generator).numpy()
    split = stratified_split(labels, (0.4, 0.1, 0.5), args.seed)
    writer = StoreWriter(
        args.out,
        n=n,
        input_shape=(3, side, side),
        layer_shape=layer_shape,
        dtype=args.dtype,
        labels={"private": (labels, [f"class{c}" for c in range(CLASSES)], "synthetic")},
        index=np.arange(n),
        split=split,
        attrs={"model_spec": f"synthetic:{'x'.join(map(str, layer_shape))}", "layer": "synthetic", "data_spec": "synthetic",
               "seed": args.seed},
        fingerprint={"rows": n, "side": side, "layer_shape": list(layer_shape), "dtype": args.dtype, "seed": args.seed},
    )
    started = time.perf_counter()
    try:
        for first in range(0, n, BLOCK):
            rows = min(BLOCK, n - first)
            y = torch.from_numpy(labels[first : first + rows])
            x = (0.6 * patterns[y] + 0.4 * _smooth(generator, rows, side, 12)).clamp_(0.0, 1.0)
            pooled = F.avg_pool2d(x, factor) if factor > 1 else x
            z = F.relu(F.conv2d(pooled, weight, bias)) + 0.1 * torch.randn(rows, *layer_shape, generator=generator)
            writer.write(first, x.numpy(), z.numpy().astype(args.dtype))
            writer.checkpoint(first + rows)
            if (first // BLOCK) % 40 == 0:
                print(f"{first + rows:,}/{n:,} rows, {time.perf_counter() - started:.0f} s", flush=True)
        writer.finish()
    except BaseException:
        writer.abort()
        raise
    print(f"wrote {args.out} ({args.out.stat().st_size / 2**30:.1f} GiB) in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
