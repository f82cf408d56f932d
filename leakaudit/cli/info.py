"""``leakaudit info``: validate a store and show its shapes, tasks, split and provenance."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from leakaudit.cli._common import console, write_json


def info(
    store: Annotated[Path, typer.Argument(metavar="STORE", help="Activation store (HDF5).", show_default=False)],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
) -> None:
    """Validate STORE and show its shapes, tasks, split sizes and provenance."""
    from leakaudit.store import open_store

    with open_store(store) as handle:
        summary = handle.summary()
    if as_json:
        write_json(summary, None)
        return
    from rich.table import Table

    out = console()
    prov = summary["provenance"]
    out.print(
        f"[bold]{summary['path']}[/bold]: {summary['rows']:,} rows, layer {prov.get('layer')!s} of "
        f"{prov.get('model_spec')!s}, data {prov.get('data_spec')!s}",
        highlight=False,
    )
    datasets = Table(title="datasets")
    datasets.add_column("name")
    datasets.add_column("shape")
    datasets.add_column("dtype")
    for name, meta in summary["datasets"].items():
        datasets.add_row(f"/{name}", "×".join(map(str, meta["shape"])), meta["dtype"])
    out.print(datasets)
    tasks = Table(title="tasks")
    for column in ("task", "source", "classes", "rows per class"):
        tasks.add_column(column)
    for name, meta in summary["tasks"].items():
        counts = ", ".join(f"{c}:{k}" for c, k in zip(meta["class_names"], meta["counts"]))
        tasks.add_row(name, meta["source"], str(meta["classes"]), counts)
    out.print(tasks)
    split = summary["split"]
    out.print("split: " + ", ".join(f"{role} {count:,}" for role, count in split.items()), highlight=False)
    provenance = Table(title="provenance")
    provenance.add_column("attribute")
    provenance.add_column("value", overflow="fold")
    for key in sorted(prov):
        provenance.add_row(key, str(prov[key]))
    out.print(provenance)


def register(app: typer.Typer) -> None:
    app.command("info")(info)
