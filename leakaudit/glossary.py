"""The one glossary of report numbers, and the one place every drop is derived.

A number reaches a report in one of two ways. A plugin *measures* it: the plugin declares
the names it reports when it registers (``@ATTACKS.register(..., metrics={name: meaning})``),
and those names join this glossary. Or it is *derived* here, from numbers of the same report
(``private_accuracy_drop`` from ``private_accuracy`` and ``private_accuracy_raw``) or of the
same report and its baseline (``mi_drop`` from ``mi_xz`` on both sides). Reports, the gate,
the CLI's tables, sweeps and the HTML report all read names from :func:`names`, so every
number shown anywhere can be gated by the name it is shown under.

A number that comes with a 95 % interval has a second name, ``<name>_ci95``, holding
``[lo, hi]`` (:mod:`leakaudit.intervals`); the plugin that measures the interval declares
that name too (:func:`with_intervals`), so the gate knows which numbers it may judge by an
end of their interval. A derived drop has an interval only where a plugin measured one
from the per-row values behind both of its numbers; the ratio of two intervals is not one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Derived:
    """A number computed from two others.

    ``kind`` is ``"ratio"`` (``value / reference``) or ``"drop"`` (``1 − value / reference``).
    ``reference`` names a number of the same report, or — when ``against`` is ``"baseline"`` —
    the same-named number of the baseline's report.
    """

    name: str
    kind: Literal["ratio", "drop"]
    value: str
    reference: str
    against: Literal["self", "baseline"]
    meaning: str


DERIVED: tuple[Derived, ...] = (
    Derived("private_accuracy_drop", "drop", "private_accuracy", "private_accuracy_raw", "self",
            "1 − private_accuracy / private_accuracy_raw"),
    Derived("private_accuracy_drop_continuation", "drop", "private_accuracy_continuation", "private_accuracy_raw", "self",
            "1 − private_accuracy_continuation / private_accuracy_raw (the Scrunch paper's attacker)"),
    Derived("public_accuracy_normalized", "ratio", "public_accuracy", "public_accuracy", "baseline",
            "public accuracy / public accuracy of the baseline (unhardened) model"),
    Derived("mi_drop", "drop", "mi_xz", "mi_xz", "baseline", "1 − I(X; Z) / I(X; Z_baseline)"),
    Derived("ssim_p95_drop", "drop", "ssim_p95", "ssim_p95", "baseline", "1 − ssim_p95 / ssim_p95 of the baseline"),
)  # fmt: skip

#: The headline numbers of leakage that several attacks can measure: a report's value is the
#: strongest in-scope attack's (:meth:`leakaudit.report.Report.headline`) — the largest, or for
#: the names in :data:`LOWER_LEAKS_MORE` the smallest.
HEADLINE: dict[str, str] = {
    "private_accuracy": "test accuracy of the strongest in-scope attack on Z for the private task (see the report's headline)",
    "ssim_mean": "mean SSIM of the strongest in-scope reconstruction attack (see the report's headline)",
    "ssim_p95": "95th-percentile SSIM of the strongest in-scope reconstruction attack (see the report's headline)",
    "psnr": "PSNR (dB) of the strongest in-scope reconstruction attack (see the report's headline)",
    "mse": "per-element MSE of the in-scope reconstruction attack that reconstructs closest (see the report's headline)",
}

#: Headline numbers that are smaller when more leaks.
LOWER_LEAKS_MORE = frozenset({"mse"})

#: Numbers the core itself records (not a plugin): the model's public accuracy as evaluated by
#: ``harden`` while training, which an audit or a sweep carries into its report.
CORE: dict[str, str] = {
    "public_accuracy": "public-task accuracy of the model on the test rows",
}


def names() -> dict[str, str]:
    """Every number a report can hold, with what it means: core, plugins' and derived ones."""
    from leakaudit.registry import ATTACKS, METRICS

    table = {**CORE, **HEADLINE}
    for registry in (ATTACKS, METRICS):
        for plugin in registry:
            for name, meaning in plugin.metrics.items():
                table.setdefault(name, meaning)
    for derived in DERIVED:
        table.setdefault(derived.name, derived.meaning)
    return table


def with_intervals(metrics: Mapping[str, str], *measured: str, how: str = "bootstrap over test rows") -> dict[str, str]:
    """``metrics`` (a plugin's names and meanings) with ``<name>_ci95`` added for each of ``measured``.

    ``how`` says where the interval comes from, in the meaning shown by ``leakaudit list``.

    Raises:
        KeyError: a name in ``measured`` is neither in ``metrics`` nor derived here.
    """
    from leakaudit.intervals import interval_name

    derived = {d.name for d in DERIVED}
    table = dict(metrics)
    for name in measured:
        if name not in metrics and name not in derived:
            raise KeyError(f"{name!r} has an interval but is not among the plugin's metrics")
        table[interval_name(name)] = f"95 % interval [lo, hi] of {name} ({how})"
    return table


def has_interval(name: str, known: Mapping[str, str] | None = None) -> bool:
    """Whether some plugin reports a 95 % interval for ``name``."""
    from leakaudit.intervals import interval_name

    return interval_name(name) in (known if known is not None else names())


def relative(kind: str, value: float | None, reference: float | None) -> float | None:
    """``value / reference`` (``ratio``) or ``1 − value / reference`` (``drop``); ``None`` when undefined."""
    if value is None or reference is None or reference == 0:
        return None
    r = float(value) / float(reference)
    return r if kind == "ratio" else 1.0 - r


def derive(measured: Mapping[str, float], baseline: Mapping[str, float] | None = None) -> dict[str, float]:
    """Every derived number that ``measured`` (and ``baseline``, when given) define."""
    out: dict[str, float] = {}
    for d in DERIVED:
        source = measured if d.against == "self" else baseline
        if source is None:
            continue
        value = relative(d.kind, measured.get(d.value), source.get(d.reference))
        if value is not None:
            out[d.name] = value
    return out


def derived_from_baseline() -> set[str]:
    """The names that exist only against a baseline."""
    return {d.name for d in DERIVED if d.against == "baseline"}
