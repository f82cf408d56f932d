"""Combining an attack's numbers over training seeds: the two-level (seeds × test rows) bootstrap."""

from __future__ import annotations

import numpy as np
import pytest

from leakaudit.errors import UsageError
from leakaudit.intervals import accuracy_interval, mean_rows, percentile_rows, seed_bootstrap
from leakaudit.pipeline import SeededResult, check_seeds


def _draws(seeds: int, seed_sd: float, *, rows: int = 400, mean: float = 0.8, draws: int = 200, resamples: int = 400):
    """Coverage of ``mean`` and mean widths: the combined interval, and the rows-only interval of the first seed.

    Each draw: per-seed accuracies mean + seed_sd·N(0, 1) (the between-seed variance), then each
    seed's test rows right with that probability (the within-seed binomial noise).
    """
    rng = np.random.default_rng(1)
    covered = rows_covered = 0
    widths, row_widths = [], []
    for _ in range(draws):
        p = np.clip(mean + seed_sd * rng.standard_normal(seeds), 0.0, 1.0)
        correct = [(rng.random(rows) < pk).astype(np.float64) for pk in p]
        lo, hi = seed_bootstrap([[mean_rows(c)] for c in correct], resamples=resamples)
        rlo, rhi = accuracy_interval(correct[0], resamples=resamples)
        covered += lo <= mean <= hi
        rows_covered += rlo <= mean <= rhi
        widths.append(hi - lo)
        row_widths.append(rhi - rlo)
    return covered / draws, rows_covered / draws, float(np.mean(widths)), float(np.mean(row_widths))


def test_covers_the_true_mean_with_binomial_noise_alone():
    coverage, _, _, _ = _draws(5, 0.0)
    assert coverage >= 0.90


def test_covers_the_true_mean_with_a_large_seed_effect_where_rows_alone_do_not():
    # Ten seeds: with five and a seed spread four times the row noise it covers about 87 %
    # (RESULTS-intervals.md): N seeds estimate the seed variance only so well.
    coverage, rows_coverage, width, row_width = _draws(10, 0.08)
    assert coverage >= 0.90
    assert width > row_width  # the seeds' spread is in the interval
    assert rows_coverage < 0.80  # one seed's rows-only interval misses it: the reason for --seeds


def test_constant_rows_give_the_bootstrap_of_the_mean_over_seeds_closed_form():
    # No row noise: each seed's rows all hold its value, and the interval is that of the mean
    # of N values, mean ± 1.96·σ/√N with σ the values' (population) standard deviation.
    rng = np.random.default_rng(3)
    values = rng.normal(0.7, 0.05, size=400)
    lo, hi = seed_bootstrap([[mean_rows(np.full(50, v))] for v in values], resamples=4000)
    half = 1.959964 * values.std() / np.sqrt(len(values))
    assert lo == pytest.approx(values.mean() - half, abs=0.1 * half)
    assert hi == pytest.approx(values.mean() + half, abs=0.1 * half)


def test_one_seed_is_the_bootstrap_over_rows():
    rng = np.random.default_rng(4)
    correct = (rng.random(2000) < 0.9).astype(np.float64)
    lo, hi = seed_bootstrap([[mean_rows(correct)]], resamples=2000)
    wlo, whi = accuracy_interval(correct, resamples=2000)
    assert lo == pytest.approx(wlo, abs=0.003) and hi == pytest.approx(whi, abs=0.003)


def test_a_drop_is_the_drop_of_the_two_means_and_deterministic():
    rng = np.random.default_rng(5)
    seeds = [[mean_rows(rng.random(300) < a), mean_rows(rng.random(300) < 0.95)] for a in (0.5, 0.55, 0.6)]

    def drop(means):
        return 1.0 - means[:, 0] / means[:, 1]

    first = seed_bootstrap(seeds, drop)
    assert first == seed_bootstrap(seeds, drop)
    point = 1.0 - np.mean([s[0].value() for s in seeds]) / np.mean([s[1].value() for s in seeds])
    assert first[0] < point < first[1]


def test_percentile_statistics_are_resampled_too():
    rng = np.random.default_rng(6)
    seeds = [[percentile_rows(rng.beta(5, 2, size=500), 95)] for _ in range(3)]
    lo, hi = seed_bootstrap(seeds)
    values = [s[0].value() for s in seeds]
    assert lo < np.mean(values) < hi


class _Fake:
    """A plugin result with per-row values (what the classifier attack exposes)."""

    def __init__(self, correct, chosen):
        self.correct, self.chosen = np.asarray(correct, dtype=np.float64), chosen
        self.warnings = ["same for every seed"]

    def report_metrics(self):
        return {"private_accuracy": float(self.correct.mean()), "private_accuracy_ci95": [0.0, 1.0], "other": 1.0,
                "other_ci95": [0.5, 1.5]}

    def row_statistics(self):
        return {"private_accuracy": mean_rows(self.correct)}

    def to_dict(self):
        return {"attack": "fake", "best_head": self.chosen, **self.report_metrics(), "threat": {"knows": "nothing", "holds": "pairs"}}


def test_seeded_result_means_lists_seeds_and_drops_what_it_cannot_combine():
    rng = np.random.default_rng(7)
    fakes = [_Fake(rng.random(200) < p, head) for p, head in ((0.6, "mlp"), (0.7, "linear"), (0.8, "mlp"))]
    combined = SeededResult([4, 5, 6], fakes)
    metrics = combined.report_metrics()
    assert metrics["private_accuracy"] == pytest.approx(np.mean([f.correct.mean() for f in fakes]))
    assert metrics["private_accuracy_ci95"] != [0.0, 1.0]
    assert metrics["other"] == 1.0 and "other_ci95" not in metrics  # no rows behind it: no interval from one seed
    data = combined.to_dict()
    assert data["seeds"] == 3 and data["seed_values"] == [4, 5, 6]
    assert [row["seed"] for row in data["per_seed"]] == [4, 5, 6]
    assert [row["choices"]["best_head"] for row in data["per_seed"]] == ["mlp", "linear", "mlp"]
    assert data["no_combined_interval"] == ["other_ci95"] and "other_ci95" not in data
    assert combined.warnings == ["seed 4: same for every seed", "seed 5: same for every seed", "seed 6: same for every seed"]


@pytest.mark.parametrize("bad", [0, -1, 1.5, "3", True, None])
def test_bad_seed_counts_are_refused(bad):
    with pytest.raises(UsageError, match="expected a positive integer"):
        check_seeds(bad)


def test_the_gate_judges_the_combined_interval():
    # Seeds that disagree: the point passes a minimum that the low end of the interval over seeds fails.
    from leakaudit.gate import evaluate, parse_policy
    from leakaudit.report import Report

    rng = np.random.default_rng(8)
    fakes = [_Fake(rng.random(300) < p, "mlp") for p in (0.55, 0.7, 0.85)]
    report = Report({"store": "s.h5"})
    report.add("attack:fake", SeededResult([0, 1, 2], fakes))
    metrics = report.metrics
    lo, _ = metrics["private_accuracy_ci95"]
    assert lo < 0.65 < metrics["private_accuracy"]
    point = evaluate(metrics, parse_policy({"thresholds": {"private_accuracy": {"min": 0.65}}}))
    bound = evaluate(metrics, parse_policy({"thresholds": {"private_accuracy": {"min": 0.65, "use": "lower95"}}}))
    assert point.to_dict()["passed"] and not bound.to_dict()["passed"]
