"""How each attack and metric of a report read its rows — in memory, streamed, or a subsample — and why.

Results record this under ``data_path``: an attack's result at its top level, a metric's in its
``details``; either one record (``{"data_path": "memory", "reason": ...}``) or one per role or
part (``{"test": {...}, "attacker-train": {...}}``). The terminals and the HTML report show them
from here, so that a number computed on a subsample never reads as one computed on every row.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple


class PathRecord(NamedTuple):
    """One data-path record: the result it belongs to, the role or part it covers ("" for all), the record."""

    result: str
    part: str
    record: Mapping[str, Any]

    @property
    def path(self) -> str:
        return str(self.record.get("data_path"))

    @property
    def reason(self) -> str:
        return str(self.record.get("reason", ""))

    def line(self) -> str:
        where = f"{self.result} {self.part}".strip()
        return f"data: {where} {self.path} ({self.reason})" if self.reason else f"data: {where} {self.path}"


def _of(result: Mapping[str, Any]) -> Any:
    found = result.get("data_path")
    details = result.get("details")
    if found is None and isinstance(details, Mapping):
        found = details.get("data_path")
    return found


def records(results: Mapping[str, Any]) -> list[PathRecord]:
    """Every data-path record of ``results`` (report.json's ``results``: key → result dict), in order."""
    out: list[PathRecord] = []
    for key, result in results.items():
        if not isinstance(result, Mapping):
            continue
        found = _of(result)
        if not isinstance(found, Mapping):
            continue
        if "data_path" in found:
            out.append(PathRecord(str(key), "", found))
            continue
        out.extend(PathRecord(str(key), str(part), rec) for part, rec in found.items() if isinstance(rec, Mapping) and "data_path" in rec)
    return out


def summary_lines(results: Mapping[str, Any]) -> list[str]:
    """Terminal lines: one per role or part that did not read its rows into memory, or one line saying all did."""
    found = records(results)
    other = [r for r in found if r.path != "memory"]
    if other:
        return [r.line() for r in other]
    return ["data: every attack and metric read its rows into memory (within the memory budget)"] if found else []
