"""The CI gate: thresholds on report metrics, failing closed.

A policy is YAML (read with ``yaml.safe_load``)::

    # policy.yaml
    thresholds:
      private_accuracy_drop: {min: 0.15}     # the attack must lose at least 15 % of raw accuracy
      dcor_u2: {max: 0.05}
      ssim_p95: {max: 0.5}
      public_accuracy_normalized: {min: 0.95}

Each threshold has ``min``, ``max`` or both. A metric the policy names but the report lacks
fails the gate: a missing number is never a pass. Nor is a value that is not a finite number:
JSON ``true`` would compare as 1 in Python and NaN fails every comparison silently, so a
boolean, a string, NaN or an infinity fails its check with the reason saying which it is.

A number measured on a finite set of test rows has a 95 % interval beside it in the report
(``<name>_ci95``), and a threshold may say which end of it must clear the bound:
``use: lower95`` (the low end), ``use: upper95`` (the high end) or ``use: point`` (the value
itself, the default). ``private_accuracy_drop: {min: 0.15, use: lower95}`` passes only when
even the low end of the drop's interval is at least 0.15, so a build does not pass on a lucky
draw of test rows. A policy may ask for the interval only of a number that has one (the
glossary knows which); a report that lacks the interval, or holds something other than a pair
of finite numbers lo ≤ hi, fails the check as a missing number does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

from leakaudit.config import load_yaml
from leakaudit.errors import ConfigError, closest
from leakaudit.intervals import format_interval, interval_name, interval_problem, is_interval_name

#: What a threshold is compared with: the value, or the low or high end of its 95 % interval.
USES = ("point", "lower95", "upper95")


@dataclass(frozen=True)
class Threshold:
    metric: str
    min: float | None = None
    max: float | None = None
    use: str = "point"

    def describe(self) -> str:
        """``≥ 0.15``; ``lower95 ≥ 0.15`` when an end of the interval is compared."""
        if self.min is not None and self.max is not None:
            bound = f"{self.min:g} ≤ x ≤ {self.max:g}"
        elif self.min is not None:
            bound = f"≥ {self.min:g}"
        else:
            bound = f"≤ {self.max:g}"
        return bound if self.use == "point" else f"{self.use} {bound}"


MISSING = "missing from the report"
MISSING_INTERVAL = "its 95 % interval is missing from the report"


@dataclass(frozen=True)
class Check:
    """One threshold's outcome.

    Attributes:
        value: the metric's value (``None`` when missing or not a number).
        use: ``point``, ``lower95`` or ``upper95``: what was compared with the threshold.
        interval: the metric's 95 % interval when ``use`` asks for it and the report has it.
        compared: the number compared: ``value``, or the end of ``interval`` that ``use`` names.
    """

    metric: str
    value: float | None
    threshold: str
    passed: bool
    reason: str
    use: str = "point"
    interval: list[float] | None = None
    compared: float | None = None

    def shown(self, digits: int = 4) -> str:
        """The value as a table cell: the number, ``missing``, or ``not a number``."""
        if self.value is not None:
            return f"{self.value:.{digits}g}"
        return "missing" if self.reason == MISSING else "not a number"

    def shown_interval(self, digits: int = 4) -> str:
        """The interval as a table cell: ``[0.1211, 0.2034]``, or ``—``."""
        return format_interval(self.interval, f".{digits}g")

    def shown_use(self, digits: int = 4) -> str:
        """Which number was compared: ``point``, or ``lower95 = 0.1211`` (``lower95``, when there was none)."""
        if self.use == "point" or self.compared is None:
            return self.use
        return f"{self.use} = {self.compared:.{digits}g}"


@dataclass(frozen=True)
class Verdict:
    passed: bool
    checks: tuple[Check, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "checks": [asdict(c) for c in self.checks]}


def parse_policy(data: Any, where: str = "policy") -> list[Threshold]:
    """Validate a parsed policy: known metric names, numeric bounds, ``min`` ≤ ``max``."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping with a 'thresholds' key, got {type(data).__name__}.")
    unknown = [k for k in data if k != "thresholds"]
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown key. Allowed: thresholds.")
    table = data.get("thresholds")
    if not isinstance(table, Mapping) or not table:
        raise ConfigError(f"{where}.thresholds: expected a mapping of metric names to {{min, max}}.")
    from leakaudit.glossary import names

    known = names()
    thresholds = []
    for metric, bounds in table.items():
        path = f"{where}.thresholds.{metric}"
        if metric not in known:
            near = closest(str(metric), known)
            hint = f" Closest: {', '.join(near)}." if near else ""
            raise ConfigError(f"{path}: unknown metric {metric!r}.{hint} See the metric names in the README.")
        if is_interval_name(str(metric)):
            raise ConfigError(
                f"{path}: {metric} is an interval [lo, hi], not a number; gate "
                f"{str(metric)[: -len('_ci95')]} with use: lower95 or use: upper95."
            )
        if not isinstance(bounds, Mapping) or not bounds:
            raise ConfigError(f"{path}: expected {{min: X}}, {{max: X}} or both, got {bounds!r}.")
        extra = [k for k in bounds if k not in ("min", "max", "use")]
        if extra:
            raise ConfigError(f"{path}.{extra[0]}: unknown key. Allowed: min, max, use.")
        if "min" not in bounds and "max" not in bounds:
            raise ConfigError(f"{path}: expected {{min: X}}, {{max: X}} or both beside use, got {bounds!r}.")
        use = bounds.get("use", "point")
        if use not in USES:
            raise ConfigError(f"{path}.use: expected one of {', '.join(USES)}, got {use!r}.")
        if use != "point" and interval_name(str(metric)) not in known:
            with_interval = sorted(n[: -len("_ci95")] for n in known if is_interval_name(n))
            raise ConfigError(
                f"{path}.use: {metric} is reported without a 95 % interval, so {use} is undefined; "
                f"use: point, or gate a number that has one ({', '.join(with_interval)})."
            )
        values: dict[str, float] = {}
        for key, value in bounds.items():
            if key == "use":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"{path}.{key}: expected a number, got {value!r}.")
            values[key] = float(value)
        if "min" in values and "max" in values and values["min"] > values["max"]:
            raise ConfigError(f"{path}: min {values['min']:g} is greater than max {values['max']:g}.")
        thresholds.append(Threshold(str(metric), values.get("min"), values.get("max"), use))
    return thresholds


def load_policy(path: str | Path) -> list[Threshold]:
    return parse_policy(load_yaml(path, what="policy"), where=Path(path).name)


def not_a_number(value: Any) -> str | None:
    """Why ``value`` cannot be compared with a threshold, or ``None`` when it is a finite number."""
    if value is None:
        return MISSING
    if isinstance(value, bool):  # before the number test: bool is an int subclass
        return f"a boolean ({str(value).lower()}), not a number"
    if not isinstance(value, (int, float)):
        kinds: dict[type, str] = {str: "a string", list: "a list", dict: "a mapping"}
        kind = kinds.get(type(value), f"a {type(value).__name__}")
        return f"{kind}, not a number"
    if not math.isfinite(value):
        return "not a finite number"
    return None


def evaluate(metrics: Mapping[str, Any], thresholds: list[Threshold]) -> Verdict:
    """Check every threshold against ``metrics``; a value that is not a finite number fails.

    With ``use: lower95`` or ``upper95`` the value must still be there and finite, and the
    end of its interval that ``use`` names is what the threshold judges; an interval that is
    missing or malformed fails the check.
    """
    checks = []
    for t in thresholds:
        value = metrics.get(t.metric)
        problem = not_a_number(value)
        if problem is not None:
            checks.append(Check(t.metric, None, t.describe(), False, problem, t.use))
            continue
        assert value is not None  # not_a_number() returned None: a finite int or float
        value = float(value)
        interval = None
        compared = value
        if t.use != "point":
            raw = metrics.get(interval_name(t.metric))
            malformed = interval_problem(raw)
            if malformed is not None:
                reason = MISSING_INTERVAL if raw is None else f"its 95 % interval is {malformed}"
                checks.append(Check(t.metric, value, t.describe(), False, reason, t.use))
                continue
            assert raw is not None  # interval_problem refused a missing one
            interval = [float(raw[0]), float(raw[1])]
            compared = interval[0] if t.use == "lower95" else interval[1]
        low_ok = t.min is None or compared >= t.min
        high_ok = t.max is None or compared <= t.max
        reason = "" if low_ok and high_ok else (f"below {t.min:g}" if not low_ok else f"above {t.max:g}")
        if reason and t.use != "point":
            reason = f"{t.use} {compared:.4g} {reason}"
        checks.append(Check(t.metric, value, t.describe(), low_ok and high_ok, reason, t.use, interval, compared))
    return Verdict(all(c.passed for c in checks), tuple(checks))


def junit_xml(verdict: Verdict, name: str = "leakaudit.gate") -> str:
    """JUnit XML: one test case per threshold, a failure element for each that fails."""
    failures = sum(not c.passed for c in verdict.checks)
    suite = ElementTree.Element(
        "testsuite", name=name, tests=str(len(verdict.checks)), failures=str(failures), errors="0", skipped="0"
    )
    for check in verdict.checks:
        case = ElementTree.SubElement(suite, "testcase", classname=name, name=f"{check.metric} {check.threshold}")
        if not check.passed:
            value = check.shown(6)
            if check.interval is not None:
                value += f", 95 % interval {check.shown_interval(6)}"
            failure = ElementTree.SubElement(case, "failure", message=f"{check.metric} = {value}: {check.reason}")
            failure.text = f"{check.metric} = {value}, required {check.threshold}: {check.reason}"
    ElementTree.indent(suite)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ElementTree.tostring(suite, encoding="unicode") + "\n"


def markdown_summary(verdict: Verdict, subject: Mapping[str, Any] | None = None) -> str:
    """A Markdown table for a GitHub step summary or a pull-request comment."""
    head = "✅ leakaudit gate passed" if verdict.passed else "❌ leakaudit gate failed"
    lines = [f"### {head}", ""]
    if subject:
        lines += [f"`{subject.get('model_spec')}` split at `{subject.get('layer')}`, data `{subject.get('data_spec')}`", ""]
    lines += ["| metric | value | 95 % interval | compared | threshold | verdict |", "|---|---|---|---|---|---|"]
    for c in verdict.checks:
        mark = "pass" if c.passed else f"**fail** ({c.reason})"
        lines.append(f"| `{c.metric}` | {c.shown()} | {c.shown_interval()} | {c.shown_use()} | {c.threshold} | {mark} |")
    return "\n".join(lines) + "\n"
