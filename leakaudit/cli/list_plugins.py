"""``leakaudit list attacks|metrics|recipes``: the registered plugins."""

from __future__ import annotations

import dataclasses
import typing
from typing import Annotated, Any

import typer

from leakaudit.cli._common import console, write_json
from leakaudit.errors import UnknownNameError


def list_plugins(
    family: Annotated[str, typer.Argument(help="attacks, metrics or recipes.", show_default=False)],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table: name, description and options (type, default) of each.")] = False,
) -> None:
    """List the registered attacks, metrics or recipes with their options."""
    from leakaudit.registry import FAMILIES

    registry = FAMILIES.get(family)
    if registry is None:
        raise UnknownNameError("plugin family", family, FAMILIES)
    described = [describe_plugin(plugin) for plugin in registry]
    if as_json:
        write_json({"family": family, "plugins": described}, None)
        return
    from rich.table import Table

    table = Table(title=family)
    table.add_column("name", style="bold")
    table.add_column("what it does")
    table.add_column("options")
    for plugin in described:
        options = ", ".join(
            f"{o['name']}={o['default']!r}" if not o["required"] else o["name"] for o in plugin["options"]
        )
        what = plugin["description"]
        if plugin["reports"]:
            what += "\nreports: " + ", ".join(plugin["reports"])
        if plugin["artifacts"]:
            what += "\nwrites: " + ", ".join(plugin["artifacts"])
        table.add_row(plugin["name"], what, options)
    console().print(table)


def describe_plugin(plugin: Any) -> dict[str, Any]:
    """A plugin as JSON: its name, one-line description and options as ``--set`` spells them."""
    options: list[dict[str, Any]] = []
    if plugin.config_cls is not None:
        try:
            hints = typing.get_type_hints(plugin.config_cls)
        except Exception:  # noqa: BLE001 - a third-party annotation that does not resolve still lists
            hints = {}
        for field in dataclasses.fields(plugin.config_cls):
            if not field.init:
                continue
            # A trailing underscore dodges a Python keyword (`lambda_`); the CLI spells `lambda`.
            option: dict[str, Any] = {
                "name": field.name.rstrip("_").replace("_", "-"),
                "type": _type_name(hints.get(field.name, field.type)),
            }
            if field.default is not dataclasses.MISSING:
                default: Any = field.default
            elif field.default_factory is not dataclasses.MISSING:
                default = field.default_factory()
            else:
                default = dataclasses.MISSING
            option["required"] = default is dataclasses.MISSING
            option["default"] = None if default is dataclasses.MISSING else _jsonable(default)
            options.append(option)
    return {
        "name": plugin.name,
        "description": plugin.summary,
        "options": options,
        "reports": dict(plugin.metrics),
        "artifacts": {name: artifact.meaning for name, artifact in plugin.artifacts.items()},
    }


def _type_name(annotation: Any) -> str:
    if isinstance(annotation, str):
        return annotation
    if isinstance(annotation, type) and not typing.get_args(annotation):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return repr(value)


def register(app: typer.Typer) -> None:
    app.command("list")(list_plugins)
