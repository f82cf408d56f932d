"""``leakaudit info``: validate a store and show its shapes, tasks, split and provenance."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from leakaudit.cli._common import console, write_json


def info(
    store: Annotated[Path, typer.Argument(metavar="STORE", help="Activation store (HDF5).", show_default=False)],
    verify: Annotated[bool, typer.Option("--verify", help="Also check /inputs and /activations against their checksums (reads the whole store).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
) -> None:
    """Validate STORE and show its shapes, tasks, split sizes and provenance.

    Checks the attributes and every dataset but /inputs and /activations against the
    checksums recorded when STORE was dumped; --verify checks those two as well.
    """
    from leakaudit.store import LARGE_DATASETS, NOT_VERIFIED, open_store

    with open_store(store, verify="all" if verify else "attributes") as handle:
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
    checks = summary["integrity"]["datasets"]
    datasets = Table(title="datasets")
    datasets.add_column("name")
    datasets.add_column("shape")
    datasets.add_column("dtype")
    datasets.add_column("checksum")
    for name, meta in summary["datasets"].items():
        datasets.add_row(f"/{name}", "×".join(map(str, meta["shape"])), meta["dtype"], checks.get(name, ""))
    out.print(datasets)
    status = summary["integrity"]["status"]
    if status == NOT_VERIFIED:
        line = f"integrity: {NOT_VERIFIED}"
    elif status == "verified":
        line = "integrity: verified (attributes and every dataset match the checksums recorded at dump time)"
    else:
        unread = ", ".join(f"/{n}" for n in LARGE_DATASETS if checks.get(n) == "not read")
        line = f"integrity: attributes and small datasets verified; {unread} not read (run with --verify to check them)"
    out.print(line, highlight=False)
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
