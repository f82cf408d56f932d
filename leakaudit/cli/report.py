"""``leakaudit report``: a self-contained HTML page from a report.json."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from leakaudit.cli._common import ForceOpt, check_output, console, info


def report(
    report_path: Annotated[Path, typer.Argument(metavar="REPORT.json", help="A report written by attack, metrics or audit.", show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="HTML file to write.", show_default=False)],
    policy: Annotated[Optional[Path], typer.Option("--policy", "-p", help="Show the verdict of this policy.")] = None,
    store: Annotated[Optional[Path], typer.Option("--store", help="Store for the t-SNE of Z (default: the report's own store).")] = None,
    tsne: Annotated[bool, typer.Option("--tsne/--no-tsne", help="Draw a t-SNE of Z coloured by each task.")] = True,
    force: ForceOpt = False,
) -> None:
    """Write REPORT.html: verdict, metrics against the baseline, attacks, reconstructions, t-SNE."""
    from leakaudit._io import atomic_write_text
    from leakaudit.html_report import render, tsne_embedding
    from leakaudit.report import load_report

    data = load_report(report_path)
    check_output(output, force)
    verdict = None
    if policy is not None:
        from leakaudit.gate import evaluate, load_policy

        verdict = evaluate(data["metrics"], load_policy(policy)).to_dict()
    embedding = None
    if tsne:
        source = store or data.get("subject", {}).get("store")
        if source and Path(source).exists():
            info("computing the t-SNE of Z …")
            embedding = tsne_embedding(source, seed=int(data.get("subject", {}).get("seed") or 0))
            if embedding is not None and embedding.get("note"):
                info(embedding["note"])
        else:
            info("no store found for the t-SNE; pass --store STORE.h5 to draw it")
    atomic_write_text(output, render(data, verdict=verdict, embedding=embedding))
    console().print(f"wrote {output}", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("report")(report)
