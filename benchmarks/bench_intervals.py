"""Bootstrap intervals: seconds per interval, scipy.stats.bootstrap against a plain NumPy resampler.

    python benchmarks/bench_intervals.py            # 10,000 rows, B = 1,000, best of 3
    python benchmarks/bench_intervals.py --quick    # 1,000 rows, one repeat: a smoke run

Times every statistic leakaudit attaches an interval to, as :mod:`leakaudit.intervals` computes
it (``scipy.stats.bootstrap``, percentile method; BCa for two of them), then what one decoder
result and one classifier head cost in all, and the coverage of the accuracy interval over
200 simulated draws. The "NumPy" column is the plainest hand-written resampler (one index
matrix, ``values[idx].mean(1)``, ``np.percentile`` of the B means): the speed a hand-written
version would start from, to judge whether writing one is worth it.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    rows, repeats = (1_000, 1) if args.quick else (args.rows, args.repeats)

    from leakaudit import intervals as iv
    from leakaudit.attacks.decoders import ImageScores

    rng = np.random.default_rng(0)
    correct = rng.random(rows) < 0.8
    labels = rng.integers(0, 10, rows)
    reference = correct | (rng.random(rows) < 0.5)
    ssim = np.clip(rng.beta(8, 2, rows), -1, 1)
    mse = rng.gamma(2.0, 0.005, rows)
    iv.mean_interval(ssim)  # imports scipy

    def numpy_mean() -> None:
        idx = np.random.default_rng(0).integers(0, rows, (iv.RESAMPLES, rows))
        np.percentile(ssim[idx].mean(axis=1), [2.5, 97.5])

    cases = {
        "accuracy": lambda: iv.accuracy_interval(correct),
        "balanced accuracy (10 classes)": lambda: iv.balanced_accuracy_interval(correct, labels),
        "drop (paired)": lambda: iv.drop_interval(correct, reference),
        "mean (SSIM, PSNR, MSE)": lambda: iv.mean_interval(ssim),
        "percentile (SSIM p5/p50/p95)": lambda: iv.percentile_interval(ssim, 95),
        "mean, BCa": lambda: iv.mean_interval(ssim, method="BCa"),
        "percentile, BCa": lambda: iv.percentile_interval(ssim, 95, method="BCa"),
    }
    print(f"rows {rows:,}, B = {iv.RESAMPLES:,}, best of {repeats}")
    print(f"{'statistic':34s} {'seconds':>8s}")
    for name, fn in cases.items():
        print(f"{name:34s} {_best(fn, repeats):8.3f}")
    print(f"{'mean, plain NumPy resampler':34s} {_best(numpy_mean, repeats):8.3f}")
    print(f"{'one ImageScores (6 intervals)':34s} {_best(lambda: ImageScores.from_per_image(ssim, mse), repeats):8.3f}")
    head = _best(lambda: (iv.accuracy_interval(correct), iv.balanced_accuracy_interval(correct, labels)), repeats)
    print(f"{'one classifier head (2 intervals)':34s} {head:8.3f}")

    hits, start = 0, time.perf_counter()
    for i in range(200):
        draw = np.random.default_rng(1000 + i).random(400) < 0.7
        lo, hi = iv.accuracy_interval(draw)
        hits += lo <= 0.7 <= hi
    print(f"coverage of a known accuracy 0.7, n = 400, 200 draws: {hits / 200:.3f} ({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
