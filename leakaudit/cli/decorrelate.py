"""``leakaudit decorrelate``: NoPeek's universal decorrelation of a client's rows, on the client alone."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from leakaudit.cli._common import ForceOpt, SeedOpt, console
from leakaudit.cli.train import LimitOpt


def decorrelate(
    data: Annotated[str, typer.Option("--data", "-d", help="Rows: digits, idx:DIR, folder:DIR, hdf5:FILE, or npz:FILE (images, or a table: 2-D 'x' and 'y').", show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output folder: decorrelate.json (history), z.npy, rows.npy.", show_default=False)],
    task: Annotated[str, typer.Option("--task", "-t", help="Labels Z should keep (image sources): label, parity, threshold:K, map:FILE.yaml or an array name.")] = "label",
    iterations: Annotated[int, typer.Option("--iterations", "-n", help="Updates Z_t = H Z_{t-1}.")] = 30,
    method: Annotated[str, typer.Option("--method", help="mm (the paper's update) or gradient (plain gradient ascent on the same objective).")] = "mm",
    alpha: Annotated[float, typer.Option("--alpha", help="α, the weight of S in H.")] = 1.0,
    beta: Annotated[float, typer.Option("--beta", help="β, the weight of dCor²(X, Z) against dCor²(Y, Z).")] = 1.0,
    gamma: Annotated[float, typer.Option("--gamma", help="γ: γ² D is the damping of each step (raised where a step would lower the objective).")] = 0.1,
    lr: Annotated[float, typer.Option("--lr", help="gradient: step relative to |Z|.")] = 0.1,
    max_rows: Annotated[int, typer.Option("--max-rows", help="Above this many rows, a seeded subsample (n × n matrices).")] = 2000,
    limit: LimitOpt = None,
    seed: SeedOpt = 0,
    force: ForceOpt = False,
) -> None:
    """Lower dCor(X, Z) while keeping dCor(Y, Z) on the client's rows, logging both per iteration."""
    from rich.table import Table

    from leakaudit.decorrelate import DecorrelateConfig, load_rows, write_result
    from leakaudit.decorrelate import decorrelate as run
    from leakaudit.export import check_output_dir

    config = DecorrelateConfig(
        iterations=iterations, alpha=alpha, beta=beta, gamma=gamma, method=method,  # type: ignore[arg-type]
        lr=lr, max_rows=max_rows, seed=seed,
    )
    check_output_dir(output, force)
    rows = load_rows(data, task, limit)
    result = run(rows.x, rows.y, config)
    write_result(result, output, force, {"input": rows.description})
    table = Table(title=f"decorrelation ({method}) of {len(result.rows):,} rows" + (" (subsample)" if result.subsampled else ""))
    for column in ("iteration", "dCor(X, Z)", "dCor(Y, Z)", "objective", "γ²"):
        table.add_column(column)
    for step in result.history:
        gamma2 = "—" if step.gamma2 is None else f"{step.gamma2:.4g}"
        table.add_row(str(step.iteration), f"{step.dcor_x:.4f}", f"{step.dcor_y:.4f}", f"{step.objective:.4f}", gamma2)
    out = console()
    out.print(table)
    if result.stopped:
        out.print(f"stopped early: {result.stopped}", highlight=False)
    out.print(f"wrote {output} (decorrelate.json, z.npy, rows.npy)", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("decorrelate")(decorrelate)
