"""Running metric plugins on a store, with an optional baseline: what `leakaudit metrics` does."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from leakaudit.config import from_mapping
from leakaudit.errors import ConfigError, DataError, LeakAuditError
from leakaudit.registry import METRICS
from leakaudit.report import derive_drops, load_report, subject_of, update_report
from leakaudit.store import ActivationStore, open_store

ProgressFactory = Callable[[str], Callable[[int, int], None]] | None


@dataclass
class MetricsRun:
    """The results of one `metrics` run: per-metric results, skipped metrics, baseline numbers."""

    results: dict[str, Any]
    values: dict[str, float | None]
    skipped: dict[str, str] = field(default_factory=dict)
    baseline: dict[str, Any] | None = None
    derived: dict[str, float] = field(default_factory=dict)


def parse_settings(items: Sequence[str], names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``--set NAME.KEY=VALUE`` options → per-metric settings mappings."""
    from leakaudit.config import parse_cli_value

    settings: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        metric, dot, option = key.partition(".")
        if not sep or not dot or not option:
            raise ConfigError(f"--set expects METRIC.KEY=VALUE, got {item!r}.")
        METRICS.get(metric)  # unknown names list the closest
        settings.setdefault(metric, {})[option.replace("-", "_")] = parse_cli_value(value)
    return settings


def configure(name: str, settings: Mapping[str, Any] | None, path: str) -> Any:
    plugin = METRICS.get(name)
    return from_mapping(plugin.config_cls, dict(settings or {}), path) if plugin.config_cls else None


def _applies(name: str, store: ActivationStore, config: Any) -> str | None:
    """Why metric ``name`` cannot run on ``store`` by default, or ``None`` if it can."""
    task = getattr(config, "task", None)
    if task is not None and task not in store.tasks:
        return f"the store has no task {task!r}"
    if name == "public-accuracy":
        if not store.has_outputs:
            return "the store has no /outputs (dump with --with-outputs)"
        outputs = store.file["outputs"].shape[1:]
        if task is not None and (len(outputs) != 1 or outputs[0] != len(store.class_names(task))):
            return f"the model's {outputs[0] if outputs else '?'} outputs are not the classes of task {task!r}"
    if name in ("dcor", "mi") and not store.has_inputs:
        return "the store has no /inputs (dumped with --no-inputs)"
    return None


def run_metrics(
    store: ActivationStore,
    names: Sequence[str] | None,
    settings: Mapping[str, Mapping[str, Any]],
    progress: ProgressFactory = None,
) -> MetricsRun:
    """Run ``names`` (all registered metrics that apply, when ``None``) on ``store``."""
    explicit = names is not None
    names = list(names) if explicit else METRICS.names()
    run = MetricsRun({}, {})
    for name in names:
        config = configure(name, settings.get(name), name)
        reason = _applies(name, store, config)
        if reason is not None and not explicit:
            run.skipped[name] = reason
            continue
        plugin = METRICS.get(name)
        result = plugin.target(store, config, progress(name) if progress else None)
        run.results[name] = result
        run.values.update(result.report_metrics())
    return run


def check_same_rows(subject: ActivationStore, baseline: ActivationStore) -> None:
    """A drop is only meaningful on the same rows of the same data: refuse anything else."""
    a, b = subject.attrs, baseline.attrs
    if a.get("data_spec") != b.get("data_spec"):
        raise DataError(
            f"the baseline was dumped from data {b.get('data_spec')!r}, the subject from {a.get('data_spec')!r}; "
            "a drop is only meaningful on the same rows. Dump both from the same data."
        )
    if len(subject) != len(baseline):
        raise DataError(
            f"the baseline has {len(baseline):,} rows and the subject {len(subject):,}; "
            "a drop is only meaningful on the same rows. Dump both with the same --limit."
        )
    import numpy as np

    if not np.array_equal(subject.file["index"][()], baseline.file["index"][()]):
        raise DataError("the baseline and the subject hold different rows of the data; dump both the same way.")
    if subject.has_inputs and baseline.has_inputs and subject.input_shape != baseline.input_shape:
        raise DataError(
            f"the baseline's inputs are {baseline.input_shape} and the subject's {subject.input_shape}; "
            "a drop is only meaningful on the same inputs."
        )


def baseline_metrics(
    subject: ActivationStore,
    baseline: str | Path,
    names: Sequence[str],
    settings: Mapping[str, Mapping[str, Any]],
    progress: ProgressFactory = None,
) -> dict[str, Any]:
    """The baseline's numbers: computed on a baseline store, or read from a baseline report."""
    path = Path(baseline)
    if path.suffix == ".json":
        report = load_report(path)
        info = report.get("subject", {})
        if info.get("data_spec") != subject.attrs.get("data_spec") or info.get("rows") != len(subject):
            raise DataError(
                f"the baseline report is about {info.get('rows')} rows of {info.get('data_spec')!r}, the subject has "
                f"{len(subject):,} rows of {subject.attrs.get('data_spec')!r}; a drop is only meaningful on the same rows."
            )
        return {"subject": info, "metrics": dict(report["metrics"]), "results": report.get("results", {})}
    with open_store(path) as other:
        check_same_rows(subject, other)
        run = run_metrics(other, names, settings, progress)
        return {
            "subject": subject_of(other),
            "metrics": {k: v for k, v in run.values.items() if v is not None},
            "results": {f"metric:{k}": r.to_dict() for k, r in run.results.items()},
        }


def check_comparable(subject_results: Mapping[str, Any], baseline_results: Mapping[str, Any]) -> None:
    """Mutual information from different estimator settings is not comparable: refuse it."""
    mine = subject_results.get("mi")
    theirs = baseline_results.get("metric:mi")
    if mine is None or theirs is None:
        return
    keys = ("estimator", "dims", "k", "seed")
    a = {k: mine.details.get(k) for k in keys}
    b = {k: theirs.get("details", {}).get(k) for k in keys}
    if a != b:
        raise ConfigError(f"mutual information of subject {a} and baseline {b} used different settings; mi_drop needs the same.")


def record(report_path: Path, store: ActivationStore, run: MetricsRun) -> dict[str, Any]:
    """Merge the run (and derived drops against the baseline) into the report at ``report_path``."""
    subject = subject_of(store)
    report: dict[str, Any] | None = None
    for name, result in run.results.items():
        report = update_report(report_path, subject=subject, key=f"metric:{name}", result=result.to_dict(), metrics=result.report_metrics())
    if run.baseline is not None:
        current = dict((report or {}).get("metrics", {})) or {k: v for k, v in run.values.items() if v is not None}
        run.derived = derive_drops(current, run.baseline["metrics"])
        report = update_report(
            report_path, subject=subject, key="baseline", result={"subject": run.baseline["subject"]},
            metrics=run.derived, baseline={"subject": run.baseline["subject"], "metrics": run.baseline["metrics"]},
        )  # fmt: skip
    if report is None:
        raise LeakAuditError("no metric ran, so nothing was recorded.")
    return report
