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

from leakaudit.cli._common import ForceOpt, LazyProgress, check_output, console, info, write_json


def metrics(
    store: Annotated[Path, typer.Argument(metavar="STORE", help="Activation store (HDF5).", show_default=False)],
    baseline: Annotated[Optional[Path], typer.Option("--baseline", "-b", help="Baseline store (metrics computed the same way) or report.json.")] = None,
    only: Annotated[Optional[str], typer.Option("--only", help="Comma-separated metric names (default: every metric that applies).")] = None,
    setting: Annotated[Optional[list[str]], typer.Option("--set", help="Metric setting METRIC.KEY=VALUE, e.g. mi.estimator=ksg (repeatable).")] = None,
    json_out: Annotated[Optional[str], typer.Option("--json", help="Write the results as JSON ('-' for stdout).")] = None,
    report_path: Annotated[Optional[Path], typer.Option("--report", help="Report to merge into (default: STORE's stem + .report.json).")] = None,
    force: ForceOpt = False,
) -> None:
    """Compute leakage metrics on STORE and merge them into its report.json."""
    from rich.table import Table

    from leakaudit.metrics_run import baseline_metrics, check_comparable, parse_settings, record, run_metrics
    from leakaudit.registry import METRICS
    from leakaudit.report import METRIC_NAMES, check_mergeable, default_report_path, subject_of
    from leakaudit.store import open_store

    names = [n.strip() for n in only.split(",") if n.strip()] if only else None
    for name in names or []:
        METRICS.get(name)  # unknown names list the closest, before any work
    settings = parse_settings(setting or [], METRICS.names())
    is_main = os.environ.get("RANK", "0") == "0"  # under torchrun, rank 0 speaks for the group
    if json_out not in (None, "-"):
        check_output(Path(json_out), force)
    report_path = report_path or default_report_path(store)
    with open_store(store) as handle, LazyProgress() as bar:
        if is_main:
            check_mergeable(report_path, subject_of(handle))  # before the work, not after it
        callback = bar.callback if is_main else (lambda name: None)
        run = run_metrics(handle, names, settings, callback)
        if baseline is not None:
            run.baseline = baseline_metrics(handle, baseline, list(run.results), settings, lambda n: callback(f"baseline {n}"))
            check_comparable(run.results, run.baseline.get("results", {}))
        if not is_main:
            return
        report = record(report_path, handle, run)
    for name, reason in run.skipped.items():
        info(f"skipped {name}: {reason}")
    payload = {
        "store": str(store),
        "metrics": {k: v for k, v in run.values.items()},
        "derived": run.derived,
        "baseline": run.baseline["metrics"] if run.baseline else None,
        "results": {k: r.to_dict() for k, r in run.results.items()},
        "skipped": run.skipped,
    }
    if json_out is not None:
        write_json(payload, json_out)
    if json_out == "-":
        return
    table = Table(title=f"leakage metrics — {store}")
    for column in ("metric", "value", "baseline", "meaning"):
        table.add_column(column)
    shown = {**run.values, **run.derived}
    base = run.baseline["metrics"] if run.baseline else {}
    for name, value in shown.items():
        text = "—" if value is None else f"{value:.4g}"
        table.add_row(name, text, f"{base[name]:.4g}" if name in base else "", METRIC_NAMES.get(name, ""))
    console().print(table)
    console().print(f"merged into {report_path} ({len(report['metrics'])} metrics)", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("metrics")(metrics)
