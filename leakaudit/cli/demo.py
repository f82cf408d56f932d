"""``leakaudit demo``: train, audit, harden three ways, compare — on built-in data, offline."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from leakaudit.cli._common import ForceOpt, LazyProgress, console


def demo(
    output: Annotated[Path, typer.Option("--output", "-o", help="Output folder.")] = Path("demo-out"),
    epochs: Annotated[int, typer.Option("--epochs", help="Most epochs for training and each hardening recipe.")] = 40,
    force: ForceOpt = False,
) -> None:
    """LeNet-5 on digits (public: parity, private: the digit): baseline vs Shredder, Scrunch and NoPeek."""
    from rich.table import Table

    from leakaudit._io import check_folders_possible
    from leakaudit.demo import COLUMNS, run_demo

    check_folders_possible(output)  # a file in the way is refused now, not after minutes of training
    with LazyProgress() as bar:
        result = run_demo(output, force=force, progress=bar.update, epochs=epochs)
    table = Table(title="LeNet-5 on digits, split at conv3 (public: parity; private: the digit)")
    table.add_column("hardening", style="bold", no_wrap=True)
    for _, header, _ in COLUMNS:
        table.add_column(header, justify="right", no_wrap=True)
    for row in result.rows:
        table.add_row(row["name"], *["—" if row[key] is None else f"{row[key]:.3f}" for key, *_ in COLUMNS])
    out = console()
    out.print(table)
    for _, header, meaning in COLUMNS:
        out.print(f"  [bold]{' '.join(header.split())}[/bold]: {meaning}", highlight=False)
    verdict = "[green]passed[/green]" if result.verdict["passed"] else "[red]failed[/red]"
    out.print(f"gate on the Scrunch model ({result.output / 'policy.yaml'}): {verdict}")
    out.print(f"wrote {result.report} and {result.html}", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
