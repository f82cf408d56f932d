"""``leakaudit audit``: dump, attack, measure, compare, gate and report from one YAML file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from leakaudit.cli._common import ForceOpt, LazyProgress, console, warn
from leakaudit.errors import EXIT_GATE_FAILED


def audit(
    audit_file: Annotated[Path, typer.Argument(metavar="AUDIT.yaml", help="The audit: model, layer, data, tasks, attacks, metrics, baseline, policy.", show_default=False)],
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Output folder (default: AUDIT-out beside the current directory).")] = None,
    force: ForceOpt = False,
) -> None:
    """Run the whole audit of AUDIT.yaml; write report.json, report.html and the verdict.

    Exits 1 when the audit's policy fails, like `leakaudit gate`.
    """
    from rich.table import Table

    from leakaudit.audit import load_audit, run_audit
    from leakaudit.glossary import names
    from leakaudit.intervals import format_interval, interval_name, is_interval_name

    config = load_audit(audit_file)
    output = output or Path(f"{audit_file.stem}-out")
    with LazyProgress() as bar:
        result = run_audit(config, output, force=force, progress=bar.update, on_warning=warn)
    table = Table(title=f"leakaudit audit — {config.model.spec} at {config.layer}")
    for column in ("metric", "value", "baseline", "meaning"):
        table.add_column(column)
    import json

    report = json.loads(result.report.read_text())
    baseline = (report.get("baseline") or {}).get("metrics", {})
    meanings = names()
    metrics = report["metrics"]
    for name, value in metrics.items():
        if is_interval_name(name):
            continue  # shown beside its number
        base = baseline.get(name)
        shown = f"{value:.4g} {format_interval(metrics[interval_name(name)], '.4g')}" if interval_name(name) in metrics else f"{value:.4g}"
        table.add_row(name, shown, "" if base is None else f"{base:.4g}", meanings.get(name, ""))
    out = console()
    out.print(table)
    reused = ", ".join(f"{k} {'reused' if v else 'dumped'}" for k, v in result.reused.items())
    out.print(f"stores: {reused}; wrote {result.report} and {result.html}", highlight=False)
    if result.verdict is not None:
        failed = [c for c in result.verdict["checks"] if not c["passed"]]
        if failed:
            out.print("[red]gate failed[/red]: " + "; ".join(f"{c['metric']} {c['reason']}" for c in failed))
            raise typer.Exit(EXIT_GATE_FAILED)
        out.print("[green]gate passed[/green]")


def register(app: typer.Typer) -> None:
    app.command("audit")(audit)
