"""``leakaudit list attacks|metrics|recipes``: the registered plugins."""

from __future__ import annotations

from typing import Annotated

import typer

from leakaudit.cli._common import console
from leakaudit.errors import UnknownNameError


def list_plugins(
    family: Annotated[str, typer.Argument(help="attacks, metrics or recipes.", show_default=False)],
) -> None:
    """List the registered attacks, metrics or recipes with their options."""
    import dataclasses

    from rich.table import Table

    from leakaudit.registry import FAMILIES

    registry = FAMILIES.get(family)
    if registry is None:
        raise UnknownNameError("plugin family", family, FAMILIES)
    table = Table(title=family)
    table.add_column("name", style="bold")
    table.add_column("what it does")
    table.add_column("options")
    for plugin in registry:
        options = ""
        if plugin.config_cls is not None:
            options = ", ".join(
                f"{f.name.replace('_', '-')}={f.default!r}" if f.default is not dataclasses.MISSING else f.name.replace("_", "-")
                for f in dataclasses.fields(plugin.config_cls)
            )
        table.add_row(plugin.name, plugin.summary, options)
    console().print(table)


def register(app: typer.Typer) -> None:
    app.command("list")(list_plugins)
