"""``leakaudit layers``: every layer a model can be split at, with its output shape."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from leakaudit.cli._common import (
    InChansOpt,
    ModelArg,
    ModelArgOpt,
    NumClassesOpt,
    TrustOpt,
    WeightsOpt,
    console,
    load_model_from_options,
    parse_shape,
    write_json,
)
from leakaudit.errors import UsageError


def layers(
    model: ModelArg,
    weights: WeightsOpt = None,
    input_shape: Annotated[Optional[str], typer.Option("--input-shape", help="Input shape C,H,W (default: what the model declares).")] = None,
    num_classes: NumClassesOpt = None,
    in_chans: InChansOpt = None,
    model_arg: ModelArgOpt = None,
    trust_checkpoint: TrustOpt = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """List every addressable layer (dotted module names) with output shape and parameters."""
    import torch

    from leakaudit.layers import exported_split, graph_node_names, list_layers

    loaded = load_model_from_options(model, weights, num_classes, in_chans, model_arg, trust_checkpoint)
    shape = parse_shape(input_shape, "--input-shape", (3,))
    if shape is None:
        if loaded.input_size is None or loaded.in_chans is None:
            raise UsageError(f"model {model!r} declares no input shape; pass --input-shape C,H,W.")
        shape = (loaded.in_chans, *loaded.input_size)
    batch = loaded.fixed_batch or 1
    rows = list_layers(loaded.module, torch.zeros(batch, *shape), channels_hint=_CHANNELS_HINT)
    module_set = {r.name for r in rows}
    nodes = [n for n in graph_node_names(loaded.module) if n not in module_set]
    split = exported_split(model) if loaded.kind in ("export", "onnx") else None
    boundaries = set(_scan_candidates(loaded, torch.zeros(batch, *shape)))
    if as_json:
        write_json(
            {
                "model": model,
                "input_shape": list(shape),
                "layers": [
                    {"name": r.name, "type": r.type, "output_shape": list(r.output_shape) if r.output_shape else None, "params": r.params, "calls": r.calls,
                     "block_boundary": r.name in boundaries}
                    for r in rows
                ],
                "graph_nodes": nodes,
                "encoder_split_layer": split,
            },
            None,
        )
        return
    from rich.table import Table

    table = Table(title=f"{model} — input {','.join(map(str, shape))}")
    table.add_column("layer", style="bold")
    table.add_column("type")
    table.add_column("output shape")
    table.add_column("params", justify="right")
    if boundaries:
        table.add_column("scan auto", justify="center")
    for r in rows:
        shape_text = "×".join(map(str, r.output_shape)) if r.output_shape else "—"
        if r.calls > 1:
            shape_text += f" (called {r.calls}×, first call)"
        cells = [r.name, r.type, shape_text, f"{r.params:,}"]
        table.add_row(*cells, *(["●" if r.name in boundaries else ""] if boundaries else []))
    out = console()
    out.print(table)
    if boundaries:
        out.print(
            "● block boundaries: the candidates of `leakaudit scan --layers auto` (at most --max-layers of them, "
            "spread over the depth).",
            highlight=False,
        )
    if split is not None:
        out.print(
            f"This is a client encoder exported at {split!r}: its output is {split}'s activations. "
            f"Dump it without --layer (or with --layer output or --layer {split}).",
            highlight=False,
        )
    if nodes:
        out.print(f"FX graph nodes also usable as --layer: {', '.join(nodes[:40])}" + (" …" if len(nodes) > 40 else ""), highlight=False)


def _scan_candidates(loaded, example) -> list[str]:
    """The block boundaries a scan's ``--layers auto`` chooses from (none for a TorchScript or exported model).

    Those run no Python forward hooks, which the rule (see :func:`leakaudit.scan.block_boundaries`)
    needs; a scan cannot capture several of their layers from one pass either.
    """
    import torch

    from leakaudit.scan import block_boundaries

    if loaded.kind in ("export", "onnx") or isinstance(loaded.module, torch.jit.ScriptModule):
        return []
    return block_boundaries(loaded.module, example)


_CHANNELS_HINT = (
    "Pass --input-shape {expected},H,W, or build the model for {got}-channel input with --in-chans {got} "
    "where its factory takes in_chans."
)


def register(app: typer.Typer) -> None:
    app.command("layers")(layers)
