"""``leakaudit dump``: run the model up to the split layer and write the activation store."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

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
    info,
    parse_key_values,
    parse_shape,
)
from leakaudit.errors import ConfigError
from leakaudit.models import ModelSpec


def _parse_split(text: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"--split expects TRAIN,VAL,TEST fractions, got {text!r}.") from None
    if len(values) != 3:
        raise ConfigError(f"--split expects three fractions TRAIN,VAL,TEST, got {text!r}.")
    return values  # type: ignore[return-value]


def dump(
    model: ModelArg,
    data: Annotated[str, typer.Option("--data", "-d", help="Data: digits, idx:DIR[:train|:test], folder:DIR, npz:FILE, hdf5:FILE.", show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="Store to write (HDF5).", show_default=False)],
    layer: Annotated[Optional[str], typer.Option("--layer", "-l", help="Split layer (see `leakaudit layers MODEL`), or 'output'. Not needed for an encoder.pt2 exported by `leakaudit harden`: its output is the split.", show_default=False)] = None,
    weights: WeightsOpt = None,
    task: Annotated[Optional[list[str]], typer.Option("--task", "-t", help="Task NAME=SOURCE (label, parity, threshold:K, map:FILE.yaml, array name); repeatable.")] = None,
    input_size: Annotated[Optional[str], typer.Option("--input-size", help="Resize inputs to H[,W] (default: what the model declares, else the data's size).")] = None,
    normalize: Annotated[Optional[str], typer.Option("--normalize", help="Normalise the model's input: MEAN,STD (or M1/M2/M3,S1/S2/S3). Stored inputs stay in [0, 1].")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Rows per forward pass.")] = 256,
    dtype: Annotated[str, typer.Option("--dtype", help="Activation storage: float32 or float16.")] = "float32",
    with_outputs: Annotated[bool, typer.Option("--with-outputs", help="Also store the full model's logits (/outputs).")] = False,
    no_inputs: Annotated[bool, typer.Option("--no-inputs", help="Do not store the raw inputs (/inputs); decoders and input metrics need them.")] = False,
    split: Annotated[str, typer.Option("--split", help="Attacker-train, attacker-validation, test fractions.")] = "0.4,0.4,0.2",
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    limit: Annotated[Optional[int], typer.Option("--limit", help="Dump only the first N rows of the source.")] = None,
    compression: Annotated[Optional[str], typer.Option("--compression", help="gzip or lzf (chunked storage; slower to read shuffled).")] = None,
    memory_format: Annotated[str, typer.Option("--memory-format", help="auto (channels_last for convolutional models, else contiguous: a rule, not a timing, so that a dump repeats bit for bit), contiguous or channels_last.")] = "auto",
    threads: Annotated[Optional[int], typer.Option("--threads", help="Torch threads per forward pass (default: each pass's share of the cores with --memory-format auto, else torch's setting).", show_default=False)] = None,
    workers: Annotated[Optional[int], typer.Option("--workers", help="Forward passes at once on separate batches, each with --threads threads (default: timed with --memory-format auto, which gives the same numbers either way; else 1).", show_default=False)] = None,
    num_classes: NumClassesOpt = None,
    in_chans: InChansOpt = None,
    model_arg: ModelArgOpt = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted dump of the same settings.")] = False,
    force: ForceOpt = False,
    trust_checkpoint: TrustOpt = False,
) -> None:
    """Dump inputs X, activations Z at --layer, labels and the attacker split to an HDF5 store."""
    from leakaudit.data import parse_task_option
    from leakaudit.dump import DumpSettings, Tuning
    from leakaudit.dump import dump as run_dump

    size = parse_shape(input_size, "--input-size", (1, 2))
    if size is not None and len(size) == 1:
        size = (size[0], size[0])
    if memory_format not in ("auto", "contiguous", "channels_last"):
        raise ConfigError(f"--memory-format must be auto, contiguous or channels_last, got {memory_format!r}.")
    settings = DumpSettings(
        model=ModelSpec(model, weights=weights, num_classes=num_classes, in_chans=in_chans, args=parse_key_values(model_arg, "--model-arg"), trust_checkpoint=trust_checkpoint),
        layer=layer,
        data=data,
        output=output,
        tasks=tuple(parse_task_option(t) for t in task or ()),
        input_size=size,  # type: ignore[arg-type]
        normalize=normalize,
        batch_size=batch_size,
        dtype=dtype,  # type: ignore[arg-type]
        with_outputs=with_outputs,
        store_inputs=not no_inputs,
        split=_parse_split(split),
        seed=seed,
        device=device,
        memory_format=memory_format,  # type: ignore[arg-type]
        threads=threads,
        workers=workers,
        compression=compression,
        limit=limit,
        resume=resume,
        force=force,
    )
    with LazyProgress() as bar:
        report = run_dump(settings, bar.callback(f"dump {layer or 'output'}"))
    if os.environ.get("RANK", "0") != "0":
        return  # under torchrun, rank 0 speaks for the group
    if report.resumed_from:
        info(f"resumed at row {report.resumed_from:,}")
    how = [f"{report.truncation} truncation", report.memory_format, report.device]
    if report.device == "cpu" and report.threads:
        how.append(Tuning(report.memory_format, report.threads, report.workers).describe())
    console().print(
        f"wrote {report.path} — {report.rows:,} rows, Z {'×'.join(map(str, report.layer_shape))} "
        f"({', '.join(how)}), {report.rows_per_second:,.0f} rows/s",
        highlight=False,
    )


def register(app: typer.Typer) -> None:
    app.command("dump")(dump)
