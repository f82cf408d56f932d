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


@dataclass(frozen=True)
class Threshold:
    metric: str
    min: float | None = None
    max: float | None = None

    def describe(self) -> str:
        if self.min is not None and self.max is not None:
            return f"{self.min:g} ≤ x ≤ {self.max:g}"
        if self.min is not None:
            return f"≥ {self.min:g}"
        return f"≤ {self.max:g}"


MISSING = "missing from the report"


@dataclass(frozen=True)
class Check:
    metric: str
    value: float | None
    threshold: str
    passed: bool
    reason: str

    def shown(self, digits: int = 4) -> str:
        """The value as a table cell: the number, ``missing``, or ``not a number``."""
        if self.value is not None:
            return f"{self.value:.{digits}g}"
        return "missing" if self.reason == MISSING else "not a number"


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
        if not isinstance(bounds, Mapping) or not bounds:
            raise ConfigError(f"{path}: expected {{min: X}}, {{max: X}} or both, got {bounds!r}.")
        extra = [k for k in bounds if k not in ("min", "max")]
        if extra:
            raise ConfigError(f"{path}.{extra[0]}: unknown key. Allowed: min, max.")
        values: dict[str, float] = {}
        for key, value in bounds.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"{path}.{key}: expected a number, got {value!r}.")
            values[key] = float(value)
        if "min" in values and "max" in values and values["min"] > values["max"]:
            raise ConfigError(f"{path}: min {values['min']:g} is greater than max {values['max']:g}.")
        thresholds.append(Threshold(str(metric), values.get("min"), values.get("max")))
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
    """Check every threshold against ``metrics``; a value that is not a finite number fails."""
    checks = []
    for t in thresholds:
        value = metrics.get(t.metric)
        problem = not_a_number(value)
        if problem is not None:
            checks.append(Check(t.metric, None, t.describe(), False, problem))
            continue
        assert value is not None  # not_a_number() returned None: a finite int or float
        low_ok = t.min is None or value >= t.min
        high_ok = t.max is None or value <= t.max
        reason = "" if low_ok and high_ok else (f"below {t.min:g}" if not low_ok else f"above {t.max:g}")
        checks.append(Check(t.metric, float(value), t.describe(), low_ok and high_ok, reason))
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
    lines += ["| metric | value | threshold | verdict |", "|---|---|---|---|"]
    for c in verdict.checks:
        value = c.shown()
        mark = "pass" if c.passed else f"**fail** ({c.reason})"
        lines.append(f"| `{c.metric}` | {value} | {c.threshold} | {mark} |")
    return "\n".join(lines) + "\n"
