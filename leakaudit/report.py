"""``report.json``: the numbers of an audit, under the names of DESIGN.md.

Layout (schema ``leakaudit.report`` version 1)::

    {
      "schema": "leakaudit.report", "schema_version": 1,
      "tool_version": "...", "updated": "...",
      "subject": {store path, model spec, layer, data spec, checkpoint SHA-256, rows},
      "metrics": {"private_accuracy": 0.93, "dcor": 0.71, ...},   # flat: name → number
      "results": {"attack:classifier": {...}, "metric:dcor": {...}},  # full typed results
      "baseline": {"subject": {...}, "metrics": {...}}               # optional
    }

``metrics`` is what gates and reports read; ``results`` keeps each plugin's full output.
Every command that produces numbers merges them in with :func:`update_report`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from leakaudit import __version__
from leakaudit._io import atomic_write_text
from leakaudit.errors import ConfigError, UsageError

REPORT_SCHEMA = "leakaudit.report"
REPORT_SCHEMA_VERSION = 1

# The numbers a report can hold, with what they mean (DESIGN.md "Numbers and their names").
METRIC_NAMES: dict[str, str] = {
    "public_accuracy": "public-task accuracy of the model on the test rows",
    "public_accuracy_normalized": "public accuracy / public accuracy of the baseline (unhardened) model",
    "private_accuracy": "best accuracy of a classifier retrained on Z for the private task",
    "private_accuracy_raw": "accuracy of the same task trained on raw X",
    "private_accuracy_drop": "1 − private_accuracy / private_accuracy_raw",
    "private_chance": "accuracy of always predicting the most frequent private class",
    "mi_xz": "estimated I(X; Z) in nats",
    "mi_drop": "1 − I(X; Z) / I(X; Z_baseline)",
    "ssim_mean": "mean SSIM of the strongest decoder's reconstructions",
    "ssim_p95": "95th-percentile SSIM of the strongest decoder's reconstructions",
    "ssim_p95_drop": "1 − ssim_p95 / ssim_p95 of the baseline",
    "ssim_p95_mean_image": "95th-percentile SSIM of predicting the mean image (the no-information floor)",
    "psnr": "PSNR (dB) of the strongest decoder's reconstructions",
    "dcor": "distance correlation between X and Z (V-statistic, exponent 1, as in NoPeek)",
    "dcor_u2": "bias-corrected squared distance correlation (≈ 0 for independent X and Z)",
    "dcor_pvalue": "p-value of the test of independence of X and Z",
    "intra_class_distance": "mean distance of Z to its public-class centre",
}


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


def new_report(subject: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "schema": REPORT_SCHEMA,
        "schema_version": REPORT_SCHEMA_VERSION,
        "tool_version": __version__,
        "updated": _now(),
        "subject": dict(subject),
        "metrics": {},
        "results": {},
    }


def update_report(
    path: str | Path,
    *,
    subject: Mapping[str, Any],
    key: str,
    result: Mapping[str, Any],
    metrics: Mapping[str, float | None],
    baseline: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Merge one plugin's ``result`` and its headline ``metrics`` into the report at ``path``.

    Results are never mixed: see :func:`check_mergeable`, whose error this raises.
    """
    path = Path(path)
    report = check_mergeable(path, subject)
    if report is None:
        report = new_report(subject)
    report["subject"] = dict(subject)
    report["results"][key] = dict(result)
    for name, value in metrics.items():
        if value is not None:
            report["metrics"][name] = float(value)
    if baseline is not None:
        report["baseline"] = dict(baseline)
    report["updated"] = _now()
    atomic_write_text(path, json.dumps(report, indent=2, default=_default) + "\n")
    return report


def derive_drops(metrics: Mapping[str, float], baseline: Mapping[str, float]) -> dict[str, float]:
    """The numbers that compare a (hardened) model with its baseline, where both have the inputs.

    ``public_accuracy_normalized`` = public_accuracy / baseline's; ``mi_drop`` = 1 − mi_xz /
    baseline's; ``ssim_p95_drop`` = 1 − ssim_p95 / baseline's (Scrunch Table 1). The caller
    is responsible for both sides using the same rows and estimator settings.
    """
    derived: dict[str, float] = {}

    def ratio(name: str) -> float | None:
        value, base = metrics.get(name), baseline.get(name)
        if value is None or base is None or base == 0:
            return None
        return float(value) / float(base)

    if (r := ratio("public_accuracy")) is not None:
        derived["public_accuracy_normalized"] = r
    if (r := ratio("mi_xz")) is not None:
        derived["mi_drop"] = 1.0 - r
    if (r := ratio("ssim_p95")) is not None:
        derived["ssim_p95_drop"] = 1.0 - r
    return derived


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot serialise {type(value).__name__} to JSON")
