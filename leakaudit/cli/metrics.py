"""``leakaudit metrics``: dCor, mutual information, intra-class distance, public accuracy; drops vs a baseline.

Under ``torchrun`` the exact dCor splits its tiles across the ranks (the other metrics run
whole on every rank); rank 0 alone draws progress bars, prints, writes ``--json`` and
merges into the report.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from leakaudit.cli._common import ForceOpt, LazyProgress, MemoryBudgetOpt, check_output, console, info, warn, write_json
from leakaudit.data_paths import summary_lines
from leakaudit.errors import LeakAuditError
from leakaudit.intervals import format_interval, interval_name, interval_problem, is_interval_name


def metrics(
    store: Annotated[Path, typer.Argument(metavar="STORE", help="Activation store (HDF5).", show_default=False)],
    baseline: Annotated[Optional[Path], typer.Option("--baseline", "-b", help="Baseline store (metrics computed the same way) or report.json.")] = None,
    only: Annotated[Optional[str], typer.Option("--only", help="Comma-separated metric names (default: every metric that applies).")] = None,
    setting: Annotated[Optional[list[str]], typer.Option("--set", help="Metric setting METRIC.KEY=VALUE, e.g. mi.estimator=ksg (repeatable).")] = None,
    json_out: Annotated[Optional[str], typer.Option("--json", help="Write the results as JSON ('-' for stdout).")] = None,
    report_path: Annotated[Optional[Path], typer.Option("--report", help="Report to merge into (default: STORE's stem + .report.json).")] = None,
    memory_budget: MemoryBudgetOpt = None,
    force: ForceOpt = False,
) -> None:
    """Compute leakage metrics on STORE and merge them into its report.json."""
    from rich.table import Table

    from leakaudit import glossary, pipeline
    from leakaudit.registry import METRICS
    from leakaudit.report import Report, default_report_path, subject_of
    from leakaudit.store import open_store
    from leakaudit.store.stream import budget

    names = [n.strip() for n in only.split(",") if n.strip()] if only else None
    for name in names or []:
        METRICS.get(name)  # unknown names list the closest, before any work
    settings = pipeline.parse_settings(setting or [], METRICS)
    steps = pipeline.metric_steps(names, settings)
    is_main = os.environ.get("RANK", "0") == "0"  # under torchrun, rank 0 speaks for the group
    if json_out not in (None, "-"):
        check_output(Path(json_out), force)
    report_path = report_path or default_report_path(store)
    with budget(memory_budget), open_store(store) as handle, LazyProgress() as bar:
        if is_main:
            report = Report.for_store(report_path, subject_of(handle))  # refused before the work, not after it
        else:
            report = Report(subject_of(handle))
        this_run = Report(report.subject)
        outcome = pipeline.run(handle, steps, this_run, progress=bar.update if is_main else None)
        base = None
        if baseline is not None:
            ran = [s for s in steps if s.key in outcome.results]
            explicit = [pipeline.Step(s.plugin, s.config) for s in ran]
            base = pipeline.baseline_report(handle, baseline, explicit, bar.update if is_main else None)
            pipeline.check_comparable(this_run, base)
        if not is_main:
            return
        if not outcome.results:
            raise LeakAuditError("no metric ran, so nothing was recorded.")
        for key in outcome.results:
            report.results[key] = this_run.results[key]
        report.measure(this_run.measured)
        derived: dict[str, float] = {}
        if base is not None:
            baseline_numbers = base.metrics
            report.set_baseline(base.subject, baseline_numbers)
            report.results["baseline"] = {"subject": base.subject}
            derived = {k: v for k, v in glossary.derive(report.measured, baseline_numbers).items() if k in glossary.derived_from_baseline()}
        written = report.save(report_path)
        for check in written.get("checks", []):
            warn(check["message"])
    for name, reason in outcome.skipped.items():
        info(f"skipped {name}: {reason}")
    values = {k: v for r in outcome.results.values() for k, v in r.report_metrics().items()}
    payload = {
        "store": str(store),
        "metrics": values,
        "derived": derived,
        "baseline": base.metrics if base is not None else None,
        "results": {key.partition(":")[2]: r.to_dict() for key, r in outcome.results.items()},
        "skipped": outcome.skipped,
    }
    if json_out is not None:
        write_json(payload, json_out)
    if json_out == "-":
        return
    table = Table(title=f"leakage metrics — {store}")
    for column in ("metric", "value", "baseline", "meaning"):
        table.add_column(column)
    shown = {**values, **derived}
    base_numbers = base.metrics if base is not None else {}
    meanings = glossary.names()
    for name, value in shown.items():
        if is_interval_name(name):
            continue  # shown beside its number
        text = "—" if value is None else f"{value:.4g}"
        interval = shown.get(interval_name(name))
        if value is not None and interval_problem(interval) is None:
            text += f" {format_interval(interval, '.4g')}"
        table.add_row(name, text, f"{base_numbers[name]:.4g}" if name in base_numbers else "", meanings.get(name, ""))
    console().print(table)
    for line in summary_lines({key: r.to_dict() for key, r in outcome.results.items()}):
        console().print(line, highlight=False, soft_wrap=True)
    console().print(f"merged into {report_path} ({len(written['metrics'])} metrics)", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("metrics")(metrics)
