"""95 % confidence intervals of attack statistics, by bootstrap over test rows.

An attack is scored on a finite set of test rows; another draw of rows from the same
distribution would give another number, and a gate that stands on one draw flips between
builds. Each statistic therefore comes with an interval: the percentile bootstrap (Efron) —
resample the n test rows with replacement B times, recompute the statistic on each resample,
and take the 2.5th and 97.5th percentiles of the B values. The trained attacker is held
fixed: the interval covers the sampling of test rows, not the randomness of training.
With ``--seeds N`` the attack is retrained N times and :func:`seed_bootstrap` gives the
interval of the mean over seeds, resampling seeds and test rows both.

Resampling is :func:`scipy.stats.bootstrap`'s, vectorised (each batch of resamples is one
NumPy call of the statistic), with a fixed seed: the same rows give the same interval, bit
for bit. Statistics of paired per-row values (balanced accuracy from correctness and labels,
a drop from two attackers' correctness on the same rows) resample whole rows.

``method="BCa"`` (bias-corrected and accelerated) is accepted, but it needs a jackknife —
the statistic on each of the n leave-one-out sets — which for a percentile statistic costs
about ten times the percentile method at n = 10,000; the percentile method is the default.

A closed form exists for one statistic: an accuracy is a binomial proportion, and
:func:`wilson_interval` gives its Wilson score interval, the check the bootstrap is tested
against.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from leakaudit.errors import DataError, UnknownNameError

CONFIDENCE = 0.95
RESAMPLES = 1000
SEED = 0
METHODS = ("percentile", "BCa")
#: The suffix of an interval's name: ``private_accuracy`` → ``private_accuracy_ci95``.
SUFFIX = "_ci95"
#: Bootstrap values held in memory at once (resamples × rows), about 16 MB of float64.
_BATCH_VALUES = 2_000_000

Interval = list[float]


def interval_name(name: str) -> str:
    """The report name of ``name``'s 95 % interval."""
    return name + SUFFIX


def is_interval_name(name: str) -> bool:
    return name.endswith(SUFFIX)


def bootstrap_interval(
    statistic: Callable[..., np.ndarray],
    samples: Sequence[np.ndarray],
    *,
    resamples: int = RESAMPLES,
    confidence: float = CONFIDENCE,
    seed: int = SEED,
    method: str = "percentile",
) -> Interval | None:
    """The bootstrap interval ``[lo, hi]`` of ``statistic`` over rows of ``samples``.

    Args:
        statistic: ``statistic(*samples, axis=-1)``, vectorised over leading axes.
        samples: per-row arrays of equal length; rows are resampled together (paired).
        resamples: bootstrap resamples B.
        confidence: the interval's coverage.
        seed: seeds the resampling (same rows and seed, same interval).
        method: ``percentile`` or ``BCa``.

    Returns:
        ``[lo, hi]`` as floats, or ``None`` with fewer than two rows or where the statistic
        is undefined on some resample (a drop whose reference is 0 there).

    Raises:
        UnknownNameError: an unknown ``method``.
        DataError: paired samples of different lengths.
    """
    from scipy import stats

    if method not in METHODS:
        raise UnknownNameError("bootstrap method", method, METHODS)
    arrays = [np.asarray(s, dtype=np.float64).reshape(-1) for s in samples]
    n = len(arrays[0])
    if any(len(a) != n for a in arrays):
        raise DataError(f"paired samples must have one value per row each; got lengths {[len(a) for a in arrays]}.")
    if n < 2:
        return None
    if all(np.all(a == a[0]) for a in arrays):
        with np.errstate(divide="ignore", invalid="ignore"):
            point = float(statistic(*arrays, axis=-1))  # every resample is the sample itself
        return [point, point] if math.isfinite(point) else None
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        # A degenerate bootstrap distribution (every resample scoring alike) warns; it is handled below.
        warnings.simplefilter("ignore")
        result = stats.bootstrap(
            tuple(arrays),
            statistic,
            n_resamples=resamples,
            batch=max(1, min(resamples, _BATCH_VALUES // n)),
            vectorized=True,
            paired=len(arrays) > 1,
            confidence_level=confidence,
            method=method,
            random_state=np.random.default_rng(seed),
        )
    lo, hi = float(result.confidence_interval.low), float(result.confidence_interval.high)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        distribution = np.asarray(result.bootstrap_distribution, dtype=np.float64)
        if method == "BCa" and np.all(np.isfinite(distribution)):
            # BCa divides by the spread of the jackknife; with none, the percentile interval is exact.
            return bootstrap_interval(statistic, arrays, resamples=resamples, confidence=confidence, seed=seed)
        return None
    return [lo, hi]


# --------------------------------------------------------------------------- statistics


def _mean(values: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(values, axis=axis)


def mean_interval(values: Any, **options: Any) -> Interval | None:
    """The interval of the mean of per-row ``values`` (an accuracy when they are 0/1)."""
    return bootstrap_interval(_mean, [np.asarray(values)], **options)


def accuracy_interval(correct: Any, **options: Any) -> Interval | None:
    """The interval of an accuracy, from per-row correctness (booleans or 0/1)."""
    return mean_interval(np.asarray(correct, dtype=np.float64), **options)


def percentile_interval(values: Any, q: float, **options: Any) -> Interval | None:
    """The interval of the ``q``-th percentile (linear interpolation, NumPy's default) of ``values``."""

    def percentile(v: np.ndarray, axis: int = -1) -> np.ndarray:
        return np.percentile(v, q, axis=axis)

    return bootstrap_interval(percentile, [np.asarray(values)], **options)


def balanced_accuracy(correct: np.ndarray, codes: np.ndarray, classes: int, axis: int = -1) -> np.ndarray:
    """Mean recall over the classes present, along ``axis`` of per-row correctness and class codes 0..K−1.

    Hits and rows per (resample, class) come from two bincounts over the whole batch of
    resamples, not a pass per class.
    """
    c, y = np.moveaxis(np.asarray(correct, dtype=np.float64), axis, -1), np.moveaxis(np.asarray(codes), axis, -1)
    lead = c.shape[:-1]
    count = int(np.prod(lead))
    bins = (y.astype(np.int64) + classes * np.arange(count, dtype=np.int64).reshape(*lead, 1)).ravel()
    hits = np.bincount(bins, weights=c.ravel(), minlength=count * classes).reshape(*lead, classes)
    rows = np.bincount(bins, minlength=count * classes).reshape(*lead, classes)
    with np.errstate(invalid="ignore"):
        return np.nanmean(hits / rows, axis=-1)  # a class absent from a resample is NaN there, and skipped


def balanced_accuracy_interval(correct: Any, labels: Any, **options: Any) -> Interval | None:
    """The interval of the balanced accuracy: mean recall over the classes present in a resample."""
    _, codes = np.unique(np.asarray(labels).reshape(-1), return_inverse=True)  # classes as 0..K−1
    classes = int(codes.max()) + 1 if codes.size else 0

    def statistic(c: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
        return balanced_accuracy(c, y, classes, axis=axis)

    return bootstrap_interval(statistic, [np.asarray(correct, dtype=np.float64), codes.astype(np.float64)], **options)


def drop_interval(correct: Any, reference_correct: Any, **options: Any) -> Interval | None:
    """The interval of ``1 − accuracy / reference accuracy`` for two attackers scored on the same rows.

    Each resample draws rows once for both attackers, so the interval keeps their
    correlation (both tend to fail on the same hard rows) instead of treating them as
    independent.
    """

    def drop(c: np.ndarray, r: np.ndarray, axis: int = -1) -> np.ndarray:
        return 1.0 - np.mean(c, axis=axis) / np.mean(r, axis=axis)

    samples = [np.asarray(correct, dtype=np.float64), np.asarray(reference_correct, dtype=np.float64)]
    return bootstrap_interval(drop, samples, **options)


def wilson_interval(successes: int, n: int, confidence: float = CONFIDENCE) -> Interval:
    """The Wilson score interval of a binomial proportion ``successes / n`` (closed form)."""
    from scipy import stats

    ci = stats.binomtest(int(successes), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return [float(ci.low), float(ci.high)]


# --------------------------------------------------------------------------- values


def interval_problem(value: Any) -> str | None:
    """What ``value`` is when it is not an interval ``[lo, hi]`` of finite numbers with lo ≤ hi, else ``None``.

    The answer completes "it is …": ``missing``, ``a str, not a pair [lo, hi]``, ….
    """
    if value is None:
        return "missing"
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        kind = f"a list of {len(value)}" if isinstance(value, (list, tuple)) else f"a {type(value).__name__}"
        return f"{kind}, not a pair [lo, hi]"
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) for v in value):
        return "a pair holding something other than a finite number"
    if value[0] > value[1]:
        return "a pair whose low end is above its high end"
    return None


def as_interval(value: Any) -> Interval:
    """``value`` as ``[lo, hi]`` floats.

    Raises:
        ValueError: it is not a pair of finite numbers with lo ≤ hi.
    """
    problem = interval_problem(value)
    if problem is not None:
        raise ValueError(problem)
    return [float(value[0]), float(value[1])]


def format_interval(value: Any, spec: str = ".3g", scale: float = 1.0) -> str:
    """``[0.912, 0.948]``: the ends formatted with ``spec`` after multiplying by ``scale``; ``—`` for no interval."""
    if interval_problem(value) is not None:
        return "—"
    lo, hi = (scale * v for v in value)
    return f"[{lo:{spec}}, {hi:{spec}}]"


# --------------------------------------------------------------------------- over training seeds


@dataclass(frozen=True)
class RowStatistic:
    """A statistic and the per-row values it is computed from: what an attack exposes so that
    its numbers over several training seeds can be combined on the same rows.

    ``statistic(*samples, axis=-1)`` is vectorised over leading axes, as for
    :func:`bootstrap_interval`; ``samples`` are per-row arrays of equal length (paired).
    """

    statistic: Callable[..., np.ndarray]
    samples: tuple[np.ndarray, ...]

    @property
    def rows(self) -> int:
        return len(self.samples[0])

    def value(self) -> float:
        return float(self.statistic(*self.samples, axis=-1))

    def on(self, index: np.ndarray) -> np.ndarray:
        """The statistic on each resample of rows ``index`` [..., rows]."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.asarray(self.statistic(*(s[index] for s in self.samples), axis=-1), dtype=np.float64)


def _percentile_statistic(q: float) -> Callable[..., np.ndarray]:
    def percentile(v: np.ndarray, axis: int = -1) -> np.ndarray:
        return np.percentile(v, q, axis=axis)

    return percentile


def mean_rows(values: Any) -> RowStatistic:
    """The mean of per-row ``values`` (an accuracy from 0/1 correctness)."""
    return RowStatistic(_mean, (np.asarray(values, dtype=np.float64).reshape(-1),))


def percentile_rows(values: Any, q: float) -> RowStatistic:
    """The ``q``-th percentile of per-row ``values`` (linear interpolation, as :func:`percentile_interval`)."""
    return RowStatistic(_percentile_statistic(q), (np.asarray(values, dtype=np.float64).reshape(-1),))


def balanced_accuracy_rows(correct: Any, labels: Any) -> RowStatistic:
    """The balanced accuracy of per-row correctness against ``labels`` (as :func:`balanced_accuracy_interval`)."""
    _, codes = np.unique(np.asarray(labels).reshape(-1), return_inverse=True)
    classes = int(codes.max()) + 1 if codes.size else 0

    def statistic(c: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
        return balanced_accuracy(c, y.astype(np.int64), classes, axis=axis)

    return RowStatistic(statistic, (np.asarray(correct, dtype=np.float64).reshape(-1), codes.astype(np.float64)))


def seed_bootstrap(
    per_seed: Sequence[Sequence[RowStatistic]],
    combine: Callable[[np.ndarray], np.ndarray] | None = None,
    *,
    resamples: int = RESAMPLES,
    confidence: float = CONFIDENCE,
    seed: int = SEED,
) -> Interval | None:
    """The interval of the mean over training seeds of one statistic (or of several, combined).

    ``per_seed[k]`` holds seed k's row statistics (one, or several that ``combine`` turns into
    one number). Each of the B resamples draws N seeds with replacement and, for the rows, one
    draw of row indices with replacement, shared by every seed: every seed was scored on the
    same test rows, so a row hard for one is hard for the others and a shared draw keeps that
    (resampling rows per seed independently would average the row noise away N-fold). The
    statistic is recomputed for each drawn seed on the drawn rows; the resample's value is the
    mean over its N seeds (with several statistics, ``combine`` of their means: a drop of two
    means, as the report derives it). The interval is the percentiles of the B values.

    This is the pigeonhole bootstrap of a crossed seeds × rows design (Owen 2007, "The pigeonhole
    bootstrap", Ann. Appl. Stat. 1(2)): resampling both factors counts the rows' share of the
    variance a second time, so it is a little conservative when row noise dominates. Between-seed
    variance is estimated from N seeds only: with few seeds and a large seed effect it covers
    less than its nominal 95 % (RESULTS-intervals.md measures by how much). With one seed it is
    the bootstrap over test rows alone. Where the seeds' row counts differ, rows are drawn per
    seed instead.

    Args:
        per_seed: for each seed, its statistics (the same ones, in the same order, for every seed).
        combine: maps the [..., statistics] means to the combined value; ``None``: one statistic.
        resamples: bootstrap resamples B.
        confidence: the interval's coverage.
        seed: seeds the resampling (same values and seed, same interval).

    Returns:
        ``[lo, hi]``, or ``None`` with fewer than two rows or where the statistic is undefined
        on some resample.
    """
    count = len(per_seed)
    stats_n = len(per_seed[0]) if count else 0
    if count == 0 or stats_n == 0 or any(len(s) != stats_n for s in per_seed):
        raise DataError("every seed must expose the same statistics to be combined.")
    rows = [s[0].rows for s in per_seed]
    if any(r.rows != rows[k] for k, s in enumerate(per_seed) for r in s):
        raise DataError("the statistics of one seed must be computed on the same rows.")
    if min(rows) < 2:
        return None
    shared = len(set(rows)) == 1
    rng = np.random.default_rng(seed)
    chosen = rng.integers(0, count, size=(resamples, count))  # the seeds of each resample
    totals = np.zeros((resamples, stats_n), dtype=np.float64)
    batch = max(1, _BATCH_VALUES // max(rows))
    for start in range(0, resamples, batch):
        stop = min(resamples, start + batch)
        if shared:
            index = rng.integers(0, rows[0], size=(stop - start, rows[0]))
        for k in range(count):
            times = (chosen[start:stop] == k).sum(axis=1)  # how often resample b drew seed k
            if not times.any():
                continue
            own = index if shared else rng.integers(0, rows[k], size=(stop - start, rows[k]))
            for j, statistic in enumerate(per_seed[k]):
                totals[start:stop, j] += times * statistic.on(own)
    means = totals / count
    with np.errstate(divide="ignore", invalid="ignore"):
        values = np.asarray(combine(means) if combine is not None else means[:, 0], dtype=np.float64)
    if not np.all(np.isfinite(values)):
        return None
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.percentile(values, [100 * alpha, 100 * (1 - alpha)])
    return [float(lo), float(hi)]
