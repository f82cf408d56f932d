"""Coverage and width of the seeds × rows bootstrap (RESULTS-intervals.md, "Over training seeds")."""

from __future__ import annotations

import time

import numpy as np

from leakaudit.intervals import accuracy_interval, mean_rows, seed_bootstrap


def simulate(seeds: int, seed_sd: float, rows: int = 400, mean: float = 0.8, draws: int = 200, resamples: int = 400):
    rng = np.random.default_rng(1)
    covered, widths, row_widths = 0, [], []
    for _ in range(draws):
        p = np.clip(mean + seed_sd * rng.standard_normal(seeds), 0, 1)
        correct = [(rng.random(rows) < pk).astype(float) for pk in p]
        lo, hi = seed_bootstrap([[mean_rows(c)] for c in correct], resamples=resamples)
        covered += lo <= mean <= hi
        widths.append(hi - lo)
        rlo, rhi = accuracy_interval(correct[0], resamples=resamples)
        row_widths.append(rhi - rlo)
    return covered / draws, float(np.mean(widths)), float(np.mean(row_widths))


if __name__ == "__main__":
    start = time.time()
    for n in (3, 5, 10):
        for sd in (0.0, 0.02, 0.05):
            print(n, sd, simulate(n, sd), flush=True)
    print(f"{time.time() - start:.1f} s")
