"""``leakaudit gate``: pass or fail a build on a report's numbers (exit 0 / 1; 2 for a bad policy)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from leakaudit.cli._common import ForceOpt, check_output, console, write_json
from leakaudit.errors import EXIT_GATE_FAILED


def gate(
    report: Annotated[Path, typer.Argument(metavar="REPORT.json", help="A report written by attack, metrics or audit.", show_default=False)],
    policy: Annotated[Path, typer.Option("--policy", "-p", help="Policy YAML: thresholds: {metric: {min: X, max: Y, use: point|lower95|upper95}}.", show_default=False)],
    junit: Annotated[Optional[Path], typer.Option("--junit", help="Write JUnit XML (one test case per threshold).")] = None,
    summary: Annotated[Optional[Path], typer.Option("--summary", help="Write a Markdown table (GitHub step summary, PR comment).")] = None,
    json_out: Annotated[Optional[str], typer.Option("--json", help="Write the verdict as JSON ('-' for stdout).")] = None,
    force: ForceOpt = False,
) -> None:
    """Check REPORT.json against the thresholds of POLICY.yaml. Exit 0 when all hold, 1 when any fails."""
    from rich.table import Table

    from leakaudit._io import atomic_write_text
    from leakaudit.gate import evaluate, junit_xml, load_policy, markdown_summary
    from leakaudit.report import load_report

    thresholds = load_policy(policy)
    data = load_report(report)
    for path in (junit, summary, Path(json_out) if json_out not in (None, "-") else None):
        if path is not None:
            check_output(path, force)
    verdict = evaluate(data["metrics"], thresholds)
    if junit is not None:
        atomic_write_text(junit, junit_xml(verdict))
    if summary is not None:
        atomic_write_text(summary, markdown_summary(verdict, data.get("subject")))
    if json_out is not None:
        write_json(verdict.to_dict(), json_out)
    if json_out != "-":
        table = Table(title="leakaudit gate — " + ("[green]passed[/green]" if verdict.passed else "[red]failed[/red]"))
        # The threshold names the end of the interval it judged (``lower95 ≥ 0.15``); the interval
        # column is there when some threshold judges one.
        intervals = any(c.use != "point" for c in verdict.checks)
        columns = ("metric", "value", *(("95 % interval",) if intervals else ()), "threshold", "verdict")
        for column in columns:
            table.add_column(column, no_wrap=column in ("metric", "value", "95 % interval"))
        for c in verdict.checks:
            mark = "[green]pass[/green]" if c.passed else f"[red]fail[/red] ({c.reason})"
            cells = (c.metric, c.shown(), *((c.shown_interval(),) if intervals else ()), c.threshold, mark)
            table.add_row(*cells)
        console().print(table)
    if not verdict.passed:
        raise typer.Exit(EXIT_GATE_FAILED)


def register(app: typer.Typer) -> None:
    app.command("gate")(gate)
