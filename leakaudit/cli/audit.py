"""``leakaudit audit``: dump, attack, measure, compare, gate and report from one YAML file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from leakaudit.cli._common import ForceOpt, LazyProgress, MemoryBudgetOpt, console, warn
from leakaudit.data_paths import summary_lines
from leakaudit.errors import EXIT_GATE_FAILED


def audit(
    audit_file: Annotated[Path, typer.Argument(metavar="AUDIT.yaml", help="The audit: model, layer, data, tasks, attacks, metrics, baseline, policy.", show_default=False)],
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Output folder (default: AUDIT-out beside the current directory).")] = None,
    force: ForceOpt = False,
    knows: Annotated[Optional[str], typer.Option("--knows", help="Threat scope: the most an attacker knows of the encoder: nothing, architecture or weights (default: the file's threat, else weights).", show_default=False)] = None,
    seeds: Annotated[Optional[int], typer.Option("--seeds", metavar="N", help="Train each attack N times (seeds s … s+N−1): numbers are means over seeds, intervals cover seeds and test rows (default: the file's seeds, else 1).", show_default=False)] = None,
    holds: Annotated[Optional[str], typer.Option("--holds", help="Threat scope: the most data an attacker holds: none, unpaired or pairs (default: the file's threat, else pairs).", show_default=False)] = None,
    memory_budget: MemoryBudgetOpt = None,
) -> None:
    """Run the whole audit of AUDIT.yaml; write report.json, report.html and the verdict.

    Exits 1 when the audit's policy fails, like `leakaudit gate`. The headline numbers
    (private_accuracy, ssim_mean, ssim_p95, psnr) are the strongest in-scope attack's; the
    table names the attack and its attacker beside each.
    """
    from rich.table import Table

    from leakaudit.audit import load_audit, run_audit, with_scope
    from leakaudit.glossary import names
    from leakaudit.intervals import format_interval, interval_name, is_interval_name
    from leakaudit.store.stream import budget, parse_budget
    from leakaudit.threat import Threat

    limit = parse_budget(memory_budget) if memory_budget is not None else None  # refused before the file is read
    config = with_scope(load_audit(audit_file), knows, holds)
    if seeds is not None:
        import dataclasses

        from leakaudit.pipeline import check_seeds

        config = dataclasses.replace(config, seeds=check_seeds(seeds))
    output = output or Path(f"{audit_file.stem}-out")
    with budget(limit if limit is not None else config.memory_budget), LazyProgress() as bar:
        result = run_audit(config, output, force=force, progress=bar.update, on_warning=warn)
    table = Table(title=f"leakaudit audit — {config.model.spec} at {config.layer}")
    for column in ("metric", "value", "baseline", "attack (attacker)", "meaning"):
        table.add_column(column)
    import json

    report = json.loads(result.report.read_text())
    baseline = (report.get("baseline") or {}).get("metrics", {})
    meanings = names()
    headline = report.get("headline", {})
    metrics = report["metrics"]
    for name, value in metrics.items():
        if is_interval_name(name):
            continue  # shown beside its number
        base = baseline.get(name)
        shown = f"{value:.4g} {format_interval(metrics[interval_name(name)], '.4g')}" if interval_name(name) in metrics else f"{value:.4g}"
        pick = headline.get(name)
        source = f"{pick['attack'].partition(':')[2]} ({Threat.from_dict(pick['threat']).label()})" if pick else ""
        table.add_row(name, shown, "" if base is None else f"{base:.4g}", source, meanings.get(name, ""))
    out = console()
    out.print(table)
    for name, reason in report.get("out_of_scope", {}).items():
        out.print(f"left out: attack {name} — {reason}", highlight=False)
    for line in summary_lines(report.get("results", {})):
        out.print(line, highlight=False, soft_wrap=True)
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
