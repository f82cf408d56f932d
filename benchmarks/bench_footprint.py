"""The networks' share of the memory budget: the ``meta``-device estimate against a real CPU forward.

Usage: python benchmarks/bench_footprint.py [--batch 64] [--no-real]

For each decoder at the split shapes of ``benchmarks/RESULTS-scale.md`` (VGG-16's first block
on 32×32 inputs, ResNet-18's ``layer2`` on 128×128), prints the weights and the activations
one training batch saves for backward, as :func:`leakaudit.training.footprint.network_footprint`
estimates them without allocating, and as a real forward of random rows on the CPU saves them
(distinct storages, weights excluded), with the seconds each took. ``--no-real`` skips the
real forwards (they allocate what they measure: about 1.4 GiB for the largest).
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import torch

from leakaudit.attacks.decoder_nets import build_decoder
from leakaudit.store.stream import format_bytes
from leakaudit.training.footprint import measured_footprint, network_footprint

CASES = (
    ("upsample", (64, 32, 32), (3, 32, 32), 16),
    ("alexnet", (64, 32, 32), (3, 32, 32), 16),
    ("alexnet", (64, 32, 32), (3, 32, 32), 32),
    ("resnet", (64, 32, 32), (3, 32, 32), 32),
    ("upsample", (128, 16, 16), (3, 128, 128), 32),
    ("alexnet", (128, 16, 16), (3, 128, 128), 32),
    ("resnet", (128, 16, 16), (3, 128, 128), 32),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--no-real", action="store_true")
    args = parser.parse_args()
    print("| decoder | Z → X | width | weights | activations (meta) | activations (real) | total while training | meta s | real s |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for arch, z_shape, x_shape, width in CASES:
        start = time.perf_counter()
        estimate = network_footprint(partial(build_decoder, arch, z_shape, x_shape, width), z_shape, args.batch)
        meta_s = time.perf_counter() - start
        real, real_s = "-", "-"
        if not args.no_real:
            start = time.perf_counter()
            torch.manual_seed(0)
            model = build_decoder(arch, z_shape, x_shape, width)
            measured = measured_footprint(model, torch.randn(args.batch, *z_shape))
            assert (measured.parameters, measured.buffers) == (estimate.parameters, estimate.buffers)
            real = format_bytes(measured.activations)
            real_s = f"{time.perf_counter() - start:.2f}"
            del model
        shapes = f"{'×'.join(map(str, z_shape))} → {'×'.join(map(str, x_shape))}"
        print(f"| {arch} | {shapes} | {width} | {format_bytes(estimate.parameters)} | {format_bytes(estimate.activations)} "
              f"| {real} | {format_bytes(estimate.total)} | {meta_s:.2f} | {real_s} |")


if __name__ == "__main__":
    main()
