"""Bootstrap intervals: they cover known values, agree with closed forms, and are the same bytes twice."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from scipy import stats

from leakaudit import intervals
from leakaudit.errors import ConfigError, DataError, LeakAuditError, UnknownNameError
from leakaudit.html_report import render
from leakaudit.report import Report, load_report


def _coverage(draw, interval, truth: float, draws: int = 200) -> float:
    """The share of ``draws`` simulated samples whose interval holds ``truth``."""
    hits = 0
    for i in range(draws):
        lo, hi = interval(*draw(np.random.default_rng(1000 + i)))
        hits += lo <= truth <= hi
    return hits / draws


def test_accuracy_intervals_cover_a_known_accuracy():
    coverage = _coverage(lambda rng: (rng.random(200) < 0.7,), intervals.accuracy_interval, 0.7)
    assert 0.9 <= coverage <= 0.99  # nominal 0.95; above 0.99 would mean intervals far too wide


def test_mean_intervals_cover_a_known_mean_of_a_skewed_distribution():
    coverage = _coverage(lambda rng: (rng.exponential(1.0, 200),), intervals.mean_interval, 1.0)
    assert 0.9 <= coverage <= 0.99


@pytest.mark.slow
@pytest.mark.parametrize("case", ["percentile", "balanced", "drop"])
def test_other_statistics_cover_their_known_values(case):
    if case == "percentile":  # the 95th percentile of U(0, 1) is 0.95
        coverage = _coverage(lambda rng: (rng.random(500),), lambda v: intervals.percentile_interval(v, 95), 0.95)
    elif case == "balanced":  # recalls 0.9 and 0.6: balanced accuracy 0.75, whatever the class sizes

        def draw(rng):
            y = (rng.random(400) < 0.25).astype(int)
            return np.where(y == 0, rng.random(400) < 0.9, rng.random(400) < 0.6), y

        coverage = _coverage(draw, intervals.balanced_accuracy_interval, 0.75)
    else:  # the reference is right on 90 % of rows, the attack on 80 % of those: drop 1 − 0.72 / 0.9 = 0.2

        def draw(rng):
            reference = rng.random(400) < 0.9
            return reference & (rng.random(400) < 0.8), reference

        coverage = _coverage(draw, intervals.drop_interval, 0.2)
    assert 0.9 <= coverage <= 0.99


def test_accuracy_interval_agrees_with_wilson_and_the_mean_with_student_t():
    rng = np.random.default_rng(7)
    correct = rng.random(1000) < 0.83
    wilson = intervals.wilson_interval(int(correct.sum()), len(correct))
    assert wilson == pytest.approx(
        [float(v) for v in stats.binomtest(int(correct.sum()), 1000).proportion_ci(method="wilson")]
    )
    # Wilson's half-width here is about 0.023; the bootstrap's ends agree to a fifth of it.
    assert intervals.accuracy_interval(correct) == pytest.approx(wilson, abs=0.005)
    values = rng.normal(3.0, 2.0, 800)
    t = stats.t.interval(0.95, len(values) - 1, loc=values.mean(), scale=stats.sem(values))
    assert intervals.mean_interval(values) == pytest.approx(list(t), abs=0.03)  # half-width about 0.14
    bca = intervals.mean_interval(values, method="BCa")
    assert bca == pytest.approx(list(t), abs=0.03)


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")  # the resample without class 1
def test_vectorised_balanced_accuracy_matches_scikit_learn_on_each_resample():
    from sklearn.metrics import balanced_accuracy_score

    rng = np.random.default_rng(5)
    labels = rng.integers(0, 4, 120)
    labels[labels == 3] = 2  # class 3 never occurs: codes 0..2 over the labels present
    pred = np.where(rng.random(120) < 0.7, labels, rng.integers(0, 4, 120))
    idx = rng.integers(0, 120, (5, 120))
    idx[0] = np.flatnonzero(labels != 1)[rng.integers(0, np.sum(labels != 1), 120)]  # a resample without class 1
    _, codes = np.unique(labels, return_inverse=True)
    got = intervals.balanced_accuracy((pred == labels)[idx], codes[idx], 3)
    for row, value in zip(idx, got):
        assert value == pytest.approx(balanced_accuracy_score(labels[row], pred[row]))


def test_balanced_accuracy_and_drop_reduce_to_what_they_are_defined_as():
    rng = np.random.default_rng(3)
    correct = rng.random(300) < 0.8
    # One class: the balanced accuracy is the accuracy, resample by resample.
    assert intervals.balanced_accuracy_interval(correct, np.zeros(300)) == pytest.approx(intervals.accuracy_interval(correct))
    # An attack as good as its reference on every row drops nothing, on every resample.
    assert intervals.drop_interval(correct, correct) == [0.0, 0.0]
    worse = correct & (rng.random(300) < 0.5)
    lo, hi = intervals.drop_interval(worse, correct)
    assert lo <= 1 - worse.mean() / correct.mean() <= hi


def test_the_same_values_give_the_same_bytes_and_another_seed_another_interval():
    values = np.random.default_rng(11).random(500)
    first = json.dumps([intervals.percentile_interval(values, 95), intervals.mean_interval(values)])
    assert json.dumps([intervals.percentile_interval(values, 95), intervals.mean_interval(values)]) == first
    assert intervals.mean_interval(values, seed=1) != intervals.mean_interval(values)


def test_degenerate_inputs():
    assert intervals.accuracy_interval([True]) is None  # one row: no spread to resample
    assert intervals.accuracy_interval(np.ones(40)) == [1.0, 1.0]
    assert intervals.balanced_accuracy_interval(np.ones(30), np.arange(30) % 3) == [1.0, 1.0]
    assert intervals.mean_interval(np.full(20, 0.25), method="BCa") == [0.25, 0.25]
    assert intervals.drop_interval(np.zeros(20), np.zeros(20)) is None  # a reference that is never right: undefined
    with pytest.raises(UnknownNameError, match="unknown bootstrap method 'bca'. Closest: BCa."):
        intervals.mean_interval(np.arange(5.0), method="bca")
    with pytest.raises(DataError, match=r"got lengths \[3, 4\]"):
        intervals.drop_interval(np.ones(3), np.ones(4))


@pytest.mark.parametrize(
    "value, problem",
    [
        ([0.1, 0.2], None),
        ((0.1, 0.1), None),
        (None, "missing"),
        (0.1, "a float, not a pair [lo, hi]"),
        ([0.1, 0.2, 0.3], "a list of 3, not a pair [lo, hi]"),
        ([0.1, "0.2"], "a pair holding something other than a finite number"),
        ([float("-inf"), 0.2], "a pair holding something other than a finite number"),
        ([0.3, 0.2], "a pair whose low end is above its high end"),
    ],
)
def test_interval_problem_names_what_is_wrong(value, problem):
    assert intervals.interval_problem(value) == problem


# --------------------------------------------------------------------------- in reports


def test_report_measures_intervals_and_drops_one_left_beside_a_changed_value():
    report = Report({})
    report.measure({"private_accuracy": 0.9, "private_accuracy_ci95": (0.88, 0.92)})
    assert report.metrics["private_accuracy_ci95"] == [0.88, 0.92]
    report.measure({"private_accuracy": 0.9})  # the same value again: its interval still describes it
    assert report.metrics["private_accuracy_ci95"] == [0.88, 0.92]
    report.measure({"private_accuracy": 0.8})  # another value without an interval: the old one is stale
    assert "private_accuracy_ci95" not in report.metrics
    with pytest.raises(LeakAuditError) as info:
        report.measure({"ssim_p95_ci95": [0.5]})
    assert str(info.value) == (
        "ssim_p95_ci95: expected an interval [lo, hi] of finite numbers with lo ≤ hi; it is a list of 1, not a pair [lo, hi]."
    )


def test_report_round_trips_intervals_and_refuses_a_broken_one(tmp_path):
    report = Report({"store": "a.h5"})
    report.measure({"private_accuracy": 0.7, "private_accuracy_raw": 0.9, "private_accuracy_ci95": [0.65, 0.75],
                    "private_accuracy_drop_ci95": [0.18, 0.26]})  # fmt: skip
    report.save(tmp_path / "r.json")
    again = Report.from_dict(load_report(tmp_path / "r.json"))
    assert again.metrics == report.metrics
    assert again.metrics["private_accuracy_drop"] == pytest.approx(1 - 0.7 / 0.9)
    data = load_report(tmp_path / "r.json")
    data["metrics"]["private_accuracy_ci95"] = [0.75, 0.65]
    with pytest.raises(ConfigError, match="report metrics.private_accuracy_ci95: .* a pair whose low end is above its high end"):
        Report.from_dict(data)


def test_html_shows_each_interval_beside_its_value_and_the_gate_end_used():
    report = Report({"store": "a.h5"})
    report.measure({"private_accuracy": 0.7, "private_accuracy_raw": 0.9, "private_accuracy_ci95": [0.65, 0.75],
                    "private_accuracy_drop_ci95": [0.18, 0.26], "dcor": 0.4})  # fmt: skip
    report.set_baseline({"store": "b.h5"}, {"private_accuracy": 0.95, "private_accuracy_ci95": [0.93, 0.97]})
    verdict = {"passed": False, "checks": [{"metric": "private_accuracy_drop", "value": 0.22, "threshold": "lower95 ≥ 0.2",
               "passed": False, "reason": "lower95 0.18 below 0.2", "use": "lower95", "interval": [0.18, 0.26], "compared": 0.18}]}  # fmt: skip
    page = render(report.to_dict(), verdict=verdict)
    assert "<td class=\"num\">0.7</td><td class=\"num\">[0.65, 0.75]</td><td class=\"num\">0.95</td>" in page
    assert "<code>private_accuracy_ci95</code>" not in page  # not a row of its own
    assert "<td>lower95 = 0.18</td>" in page and "[0.18, 0.26]" in page


# --------------------------------------------------------------------------- end to end


def test_the_same_store_gives_the_same_interval_bytes_twice(cli, tmp_path, small_digits_store):
    store = tmp_path / "acts.h5"
    shutil.copy(small_digits_store, store)
    written = []
    for i in range(2):
        report = tmp_path / f"report{i}.json"
        result = cli("--quiet", "attack", store, "--classifier", "--task", "private", "--head", "linear",
                     "--set", "epochs=3", "--set", "raw_reference=false", "--report", report)  # fmt: skip
        assert result.exit_code == 0, result.stderr
        metrics = json.loads(report.read_text())["metrics"]
        written.append(json.dumps({k: v for k, v in metrics.items() if k.endswith("_ci95")}))
    assert written[0] == written[1]
    metrics = json.loads(written[0])
    assert set(metrics) == {"private_accuracy_ci95", "private_balanced_accuracy_ci95"}
    lo, hi = metrics["private_accuracy_ci95"]
    assert 0 <= lo < hi <= 1
