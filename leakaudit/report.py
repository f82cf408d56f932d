"""``report.json``: the numbers of an audit, under the names of DESIGN.md.

Layout (schema ``leakaudit.report`` version 1)::

    {
      "schema": "leakaudit.report", "schema_version": 1,
      "tool_version": "...", "updated": "...",
      "subject": {store path, model spec, layer, data spec, checkpoint SHA-256, rows},
      "metrics": {"private_accuracy": 0.93, "dcor": 0.71, ...},   # flat: name → number
      "results": {"attack:classifier": {...}, "metric:dcor": {...}},  # full typed results
      "baseline": {"subject": {...}, "metrics": {...}},              # optional
      "headline": {"ssim_p95": {"value": 0.41, "attack": "attack:inversion", "threat": {...}}},
      "threat_scope": {"knows": "weights", "holds": "pairs"},        # optional: an audit's scope
      "checks": [{"kind": "above-bound", "attack": ..., "message": ...}]  # optional: bounds beaten
    }

``metrics`` is what gates and reports read; ``results`` keeps each plugin's full output.
A headline number (``private_accuracy``, ``ssim_mean``, ``ssim_p95``, ``psnr``) that several
attacks measure is the strongest in-scope attack's; ``headline`` says which attack, playing
which attacker (:mod:`leakaudit.threat`), it came from. ``checks`` lists attacks that beat a
bound measured on the same store (:mod:`leakaudit.consistency`): a sign that something is wrong.
Every command that produces numbers builds a :class:`Report` (merging into the store's
existing report where there is one) and writes it once. The names are those of
:mod:`leakaudit.glossary`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from leakaudit import __version__
from leakaudit._io import atomic_write_text
from leakaudit.consistency import consistency_checks
from leakaudit.errors import ConfigError, LeakAuditError, UsageError
from leakaudit.intervals import as_interval, interval_name, is_interval_name
from leakaudit.threat import Scope, result_threat

REPORT_SCHEMA = "leakaudit.report"
REPORT_SCHEMA_VERSION = 1



def default_report_path(store: str | Path) -> Path:
    """``acts.h5`` → ``acts.report.json`` beside it."""
    store = Path(store)
    return store.with_name(store.stem + ".report.json")


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json`` object hook that refuses a key given twice in one object."""
    data: dict[str, Any] = {}
    for key, value in pairs:
        if key in data:
            raise _DuplicateKey(key)
        data[key] = value
    return data


def load_report(path: str | Path) -> dict[str, Any]:
    """Read and validate a report; older or foreign schemas are configuration errors."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_unique_keys)
    except _DuplicateKey as exc:
        # json keeps the last of two equal keys silently: a gate would read whichever came last.
        raise ConfigError(
            f"report {str(path)!r} gives the key {exc.key!r} twice in one object; a report that leakaudit "
            "wrote never does. Regenerate it rather than edit it."
        ) from None
    except FileNotFoundError:
        raise ConfigError(f"report {str(path)!r} does not exist.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read report {str(path)!r}: {exc}.") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"report {str(path)!r} is not valid JSON (line {exc.lineno}: {exc.msg}).") from None
    if not isinstance(data, dict) or data.get("schema") != REPORT_SCHEMA:
        raise ConfigError(f"{str(path)!r} is not a leakaudit report (no schema {REPORT_SCHEMA!r}).")
    version = data.get("schema_version")
    if version != REPORT_SCHEMA_VERSION:
        raise ConfigError(
            f"report {str(path)!r} has schema version {version!r}; this leakaudit reads version "
            f"{REPORT_SCHEMA_VERSION}. Re-run the audit to regenerate it."
        )
    if not isinstance(data.get("metrics"), dict):
        raise ConfigError(f"report {str(path)!r} has no metrics table.")
    return data


def subject_of(store: Any) -> dict[str, Any]:
    """The identity of a store, as recorded in reports (``store`` is an ActivationStore)."""
    attrs = store.attrs
    return {
        "store": str(store.path),
        "model_spec": attrs.get("model_spec"),
        "weights": attrs.get("weights"),
        "checkpoint_sha256": attrs.get("checkpoint_sha256"),
        "layer": attrs.get("layer"),
        "data_spec": attrs.get("data_spec"),
        "rows": len(store),
        "seed": attrs.get("seed"),
        # Hashes every attribute and dataset checksum: the same value means the same store content.
        "store_sha256": attrs.get("store_sha256"),
    }


def _same_path(a: Any, b: Any) -> bool:
    return a is not None and b is not None and os.path.realpath(str(a)) == os.path.realpath(str(b))


def check_mergeable(path: str | Path, subject: Mapping[str, Any]) -> dict[str, Any] | None:
    """The report at ``path`` that results about ``subject`` may be merged into, or ``None`` to start anew.

    A report belongs to one store. The store is recognised by ``store_sha256`` (so a copy or
    another spelling of its path is the same store); a report about a store once at the same
    path but since dumped again is stale and replaced. Stores written before checksums are
    recognised by path alone.

    Raises:
        UsageError: the report holds results of another store.
    """
    path = Path(path)
    if not path.exists():
        return None
    try:
        report = load_report(path)
    except ConfigError:
        return None  # unreadable: rewritten whole, as before
    theirs = report.get("subject", {})
    mine_id, their_id = subject.get("store_sha256"), theirs.get("store_sha256")
    if mine_id and their_id and mine_id == their_id:
        return report
    if _same_path(theirs.get("store"), subject.get("store")):
        return report if mine_id == their_id else None  # both written before checksums, or a stale report
    raise UsageError(
        f"report {str(path)!r} holds results of store {theirs.get('store')!r}, not of {subject.get('store')!r}; "
        "results of different stores are never merged. Give this store its own report with --report, "
        "or delete the report to start over."
    )


_TOP = ("schema", "schema_version", "tool_version", "updated", "subject", "metrics", "results", "baseline", "headline",
        "checks")


@dataclass
class Report:
    """One store's numbers, as a value: what every command builds, then writes once.

    ``measured`` holds the numbers plugins returned; ``carried`` those a workflow recorded
    (harden's own evaluation of public accuracy), which never override a measured or derived
    number; ``baseline`` the baseline's subject and numbers. :attr:`metrics` — what gates read —
    is all three together with every number :func:`leakaudit.glossary.derive` defines from them:
    drops are derived in that one place, whenever the report is written.
    """

    subject: dict[str, Any]
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    measured: dict[str, Any] = field(default_factory=dict)
    carried: dict[str, float] = field(default_factory=dict)
    baseline: dict[str, Any] | None = None
    sections: dict[str, Any] = field(default_factory=dict)

    @property
    def metrics(self) -> dict[str, float]:
        from leakaudit.glossary import DERIVED, derive

        table = dict(self.measured)
        for name, pick in self.headline().items():
            numbers = self.results[pick["attack"]]["report_metrics"]
            table[name] = pick["value"]
            # Its interval, and those of the drops derived from it, come from the same attack or not at all.
            for companion in (interval_name(name), *(interval_name(d.name) for d in DERIVED if d.value == name)):
                table.pop(companion, None)
                if companion in numbers:
                    table[companion] = numbers[companion]
        table.update(derive(table, (self.baseline or {}).get("metrics")))
        for name, value in self.carried.items():
            table.setdefault(name, value)
        return table

    def add(self, key: str, result: Any, **extra: Any) -> None:
        """Record a plugin's result under ``key`` (``attack:NAME``, ``metric:NAME``), replacing an earlier one."""
        numbers = result.report_metrics()
        self.results[key] = {**result.to_dict(), **extra}
        if "threat" in self.results[key]:  # an attack: a candidate for the headline numbers
            self.results[key]["report_metrics"] = {k: v for k, v in numbers.items() if v is not None}
        self.measure(numbers)

    @property
    def scope(self) -> Scope:
        """The threat scope the report's headline numbers cover (every attacker unless an audit bounded it)."""
        return Scope.parse(self.sections.get("threat_scope"), "threat_scope")

    def headline(self) -> dict[str, dict[str, Any]]:
        """Each headline number (:data:`leakaudit.glossary.HEADLINE`) as the strongest in-scope attack measured it.

        ``{name: {"value", "attack" (its result key), "threat"}}``, for the names some attack that
        declares its threat reported; the others keep the value last measured. Ties go to the
        first attack in key order, so the choice does not depend on the order attacks ran in.
        """
        from leakaudit.glossary import HEADLINE, LOWER_LEAKS_MORE

        scope = self.scope
        picks: dict[str, dict[str, Any]] = {}
        for key in sorted(self.results):
            result = self.results[key]
            threat = result_threat(result)
            numbers = result.get("report_metrics")
            if threat is None or not isinstance(numbers, Mapping) or not scope.allows(threat):
                continue
            for name in HEADLINE:
                value = numbers.get(name)
                if not isinstance(value, (int, float)):
                    continue
                best = picks.get(name)
                if best is None or (value < best["value"] if name in LOWER_LEAKS_MORE else value > best["value"]):
                    picks[name] = {"value": float(value), "attack": key, "threat": threat.to_dict()}
        return picks

    def measure(self, numbers: Mapping[str, Any]) -> None:
        """Record numbers (and ``<name>_ci95`` intervals ``[lo, hi]``); ``None`` values are skipped.

        An interval belongs to the value it was measured with: a different value of ``name``
        recorded without an interval removes the earlier ``name_ci95`` rather than leave it
        beside a number it does not describe.

        Raises:
            LeakAuditError: an interval that is not ``[lo, hi]`` of finite numbers with lo ≤ hi.
        """
        for name, value in numbers.items():
            if value is None:
                continue
            if is_interval_name(name):
                self.measured[name] = _interval(name, value)
                continue
            value = float(value)
            stale = interval_name(name)
            if stale not in numbers and self.measured.get(name, value) != value:
                self.measured.pop(stale, None)
            self.measured[name] = value

    def carry(self, numbers: Mapping[str, float | None]) -> None:
        for name, value in numbers.items():
            if value is not None:
                self.carried[name] = float(value)

    def set_baseline(self, subject: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
        self.baseline = {"subject": dict(subject), "metrics": dict(metrics)}

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "schema": REPORT_SCHEMA,
            "schema_version": REPORT_SCHEMA_VERSION,
            "tool_version": __version__,
            "updated": _now(),
            "subject": dict(self.subject),
            "metrics": self.metrics,
            "results": dict(self.results),
        }
        headline = self.headline()
        if headline:
            data["headline"] = headline
        checks = consistency_checks(self.results)
        if checks:
            data["checks"] = checks
        if self.baseline is not None:
            data["baseline"] = self.baseline
        data.update(self.sections)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Report:
        """The report a :meth:`to_dict` wrote (as :func:`load_report` returns it)."""
        from leakaudit.glossary import DERIVED, derive

        derived_names = {d.name for d in DERIVED}
        metrics = dict(data.get("metrics", {}))
        measured = {k: v for k, v in metrics.items() if k not in derived_names}
        for name, value in measured.items():
            if is_interval_name(name):
                measured[name] = _interval(f"report metrics.{name}", value, ConfigError)
        baseline = data.get("baseline")
        rederived = derive(measured, (baseline or {}).get("metrics"))
        carried = {k: v for k, v in metrics.items() if k in derived_names and k not in rederived}
        sections = {k: v for k, v in data.items() if k not in _TOP}
        return cls(dict(data.get("subject", {})), dict(data.get("results", {})), measured, carried, baseline, sections)

    @classmethod
    def for_store(cls, path: str | Path, subject: Mapping[str, Any]) -> Report:
        """The report at ``path`` to merge results about ``subject`` into, or a new one (see :func:`check_mergeable`)."""
        existing = check_mergeable(path, subject)
        report = cls.from_dict(existing) if existing is not None else cls(dict(subject))
        report.subject = dict(subject)
        return report

    def save(self, path: str | Path) -> dict[str, Any]:
        """Write the report to ``path`` atomically; return what was written."""
        data = self.to_dict()
        atomic_write_text(Path(path), json.dumps(data, indent=2, default=_default) + "\n")
        return data


def _interval(name: str, value: Any, error: type[LeakAuditError] = LeakAuditError) -> list[float]:
    """``value`` as an interval ``[lo, hi]``, or ``error`` saying what ``name`` holds instead."""
    try:
        return as_interval(value)
    except ValueError as exc:
        raise error(f"{name}: expected an interval [lo, hi] of finite numbers with lo ≤ hi; it is {exc}.") from None


def new_report(subject: Mapping[str, Any]) -> dict[str, Any]:
    """An empty report about ``subject``, as a dict."""
    return Report(dict(subject)).to_dict()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot serialise {type(value).__name__} to JSON")
