"""``leakaudit scan``: measure every candidate split layer from one forward pass and recommend one."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from leakaudit.cli._common import (
    DeviceOpt,
    ForceOpt,
    InChansOpt,
    LazyProgress,
    ModelArg,
    ModelArgOpt,
    NumClassesOpt,
    SeedOpt,
    TrustOpt,
    WeightsOpt,
    console,
    parse_key_values,
    parse_shape,
    warn,
    write_json,
)
from leakaudit.errors import EXIT_GATE_FAILED


def scan(
    model: ModelArg,
    data: Annotated[str, typer.Option("--data", "-d", help="Data: digits, idx:DIR[:train|:test], folder:DIR, npz:FILE, hdf5:FILE.", show_default=False)],
    task: Annotated[list[str], typer.Option("--task", "-t", help="Task NAME=SOURCE; private=SOURCE is required (the task whose leakage is measured); repeatable.", show_default=False)],
    layers: Annotated[str, typer.Option("--layers", "-l", help=(
        "Candidate layers NAME,NAME,… (see `leakaudit layers MODEL`), or auto: the modules the model declares as "
        "feature points (timm's feature_info), else its top-level children (descending into a lone container) that "
        "output a batched tensor, without the last one and without those that send as many values as the block "
        "before them (an activation, reshape or dropout after it). Ordered by depth in the forward pass."))] = "auto",
    max_layers: Annotated[int, typer.Option("--max-layers", help="With --layers auto: at most this many candidates, spread evenly over the depth.")] = 6,
    policy: Annotated[Optional[Path], typer.Option("--policy", "-p", help="Policy YAML (the gate's format): recommend the shallowest layer that passes it; exit 1 when none does.")] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Output folder: stores/, report.json (with a scan section), report.html.")] = Path("scan-out"),
    json_out: Annotated[Optional[str], typer.Option("--json", help="Also write the scan section as JSON ('-' for stdout).")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override a step's setting PLUGIN.KEY=VALUE, e.g. classifier.epochs=10 or decoder.device=cuda (repeatable).")] = None,
    full: Annotated[bool, typer.Option("--full", help="Run the audit's default attacks and every applicable metric at each layer, not the cheap ones.")] = False,
    weights: WeightsOpt = None,
    input_size: Annotated[Optional[str], typer.Option("--input-size", help="Resize inputs to H[,W] (default: what the model declares, else the data's size).")] = None,
    normalize: Annotated[Optional[str], typer.Option("--normalize", help="Normalise the model's input: MEAN,STD (or M1/M2/M3,S1/S2/S3).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Rows per forward pass.")] = 256,
    dtype: Annotated[str, typer.Option("--dtype", help="Activation storage: float32 or float16 (bytes per sample are counted at it).")] = "float32",
    limit: Annotated[Optional[int], typer.Option("--limit", help="Scan only the first N rows of the source.")] = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    num_classes: NumClassesOpt = None,
    in_chans: InChansOpt = None,
    model_arg: ModelArgOpt = None,
    force: ForceOpt = False,
    trust_checkpoint: TrustOpt = False,
) -> None:
    """Where should the model be split? Dump every candidate layer from one forward pass, measure each
    one's cost (bytes sent per sample, client parameters and MACs) and leakage, and recommend a layer.

    Client MACs are FLOPs / 2 as torch's FlopCounterMode counts them on the truncated forward of one
    sample (matrix products and convolutions). Exits 1 when --policy is given and no layer passes it.
    """
    from leakaudit.data import parse_task_option
    from leakaudit.errors import ConfigError
    from leakaudit.models import ModelSpec
    from leakaudit.scan import ScanSettings, run_scan

    if dtype not in ("float32", "float16"):
        raise ConfigError(f"--dtype must be float32 or float16, got {dtype!r}.")
    size = parse_shape(input_size, "--input-size", (1, 2))
    if size is not None and len(size) == 1:
        size = (size[0], size[0])
    names = None if layers.strip() == "auto" else tuple(n.strip() for n in layers.split(",") if n.strip())
    settings = ScanSettings(
        model=ModelSpec(model, weights=weights, num_classes=num_classes, in_chans=in_chans,
                        args=parse_key_values(model_arg, "--model-arg"), trust_checkpoint=trust_checkpoint),  # fmt: skip
        data=data,
        tasks=tuple(parse_task_option(t) for t in task),
        output=output,
        layers=names,
        max_layers=max_layers,
        policy=policy,
        full=full,
        overrides=_overrides(set_ or ()),
        force=force,
        input_size=size,  # type: ignore[arg-type]
        normalize=normalize,
        batch_size=batch_size,
        dtype=dtype,  # type: ignore[arg-type]
        seed=seed,
        limit=limit,
        device=device,
    )
    with LazyProgress() as bar:
        result = run_scan(settings, progress=bar.update, on_warning=warn)
    section = result.section
    if json_out is not None:
        write_json(section, json_out)
    out = console()
    out.print(scan_table(section, f"leakaudit scan — {model}"))
    for line in section["why_not_shallower"]:
        out.print(f"  shallower layer failed: {line}", highlight=False)
    out.print(f"wrote {result.report} and {result.html}", highlight=False)
    if section["policy"] is not None:
        if result.failed:
            out.print("[red]no candidate layer passes the policy[/red]")
            raise typer.Exit(EXIT_GATE_FAILED)
        out.print(f"[green]recommended split: {section['recommended']}[/green] (the shallowest layer that passes the policy)")


def _overrides(items: list[str] | tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """``--set NAME.KEY=VALUE`` options, by plugin name (checked against the steps by the scan)."""
    from leakaudit.config import parse_cli_value
    from leakaudit.errors import ConfigError

    nested: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        name, dot, option = key.partition(".")
        if not sep or not dot or not name or not option:
            raise ConfigError(f"--set expects PLUGIN.KEY=VALUE, got {item!r}.")
        nested.setdefault(name, {})[option.replace("-", "_")] = parse_cli_value(value)
    return nested


def scan_table(section: dict[str, Any], title: str):
    """The scan as a rich table, one row per layer, shallowest first."""
    from rich.table import Table

    rows = section["layers"]
    columns = [c for c in section["columns"] if any(c in r["metrics"] for r in rows)]
    table = Table(title=title)
    for name in ("layer", "Z shape", "bytes/sample", "client params", "client MACs", *columns):
        table.add_column(name, justify="left" if name in ("layer", "Z shape") else "right")
    if section["policy"] is not None:
        table.add_column("policy")
    for r in rows:
        cells = [r["layer"], "×".join(map(str, r["shape"])), f"{r['bytes_per_sample']:,}", f"{r['client_params']:,}", f"{r['client_macs']:,}"]
        cells += [_number(r["metrics"].get(c)) for c in columns]
        if "gate" in r:
            mark = "[green]pass[/green]" if r["gate"]["passed"] else "[red]fail[/red]"
            cells.append(mark + (" [bold]← recommended[/bold]" if r["layer"] == section["recommended"] else ""))
        table.add_row(*cells)
    return table


def _number(value: Any) -> str:
    return "—" if value is None else f"{value:.4g}"


def register(app: typer.Typer) -> None:
    app.command("scan")(scan)
