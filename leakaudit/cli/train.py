"""``leakaudit train``: plain cross-entropy training of the public task (the λ = 0 baseline).

Under ``torchrun`` every rank trains; rank 0 alone draws the progress bar, prints and writes.
"""

from __future__ import annotations

import os
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
    SeedOpt,
    TrustOpt,
    WeightsOpt,
    check_output,
    console,
    info,
    parse_key_values,
    parse_shape,
    write_json,
)
from leakaudit.cli.dump import _parse_split
from leakaudit.errors import ConfigError
from leakaudit.models import ModelSpec

# Options `train` and `harden` share, spelled as `dump` spells them.
DataOpt = Annotated[str, typer.Option("--data", "-d", help="Data: digits, idx:DIR[:train|:test], folder:DIR, npz:FILE, hdf5:FILE.", show_default=False)]
InputSizeOpt = Annotated[Optional[str], typer.Option("--input-size", help="Resize inputs to H[,W] (default: what the model declares, else the data's size).")]
NormalizeOpt = Annotated[Optional[str], typer.Option("--normalize", help="Normalise the model's input: MEAN,STD (or M1/M2/M3,S1/S2/S3).")]
SplitOpt = Annotated[str, typer.Option("--split", help="Attacker-train (training), attacker-validation (early stopping), test (scoring) fractions; the same split `dump` uses.")]
LimitOpt = Annotated[Optional[int], typer.Option("--limit", help="Use only the first N rows of the source.")]
BatchSizeOpt = Annotated[int, typer.Option("--batch-size", "-b", help="Rows per training step.")]
EpochsOpt = Annotated[int, typer.Option("--epochs", help="The most epochs; early stopping on validation usually ends sooner.")]
PatienceOpt = Annotated[int, typer.Option("--patience", help="Epochs without a better validation score before stopping.")]
JsonOpt = Annotated[Optional[str], typer.Option("--json", help="Also write the result as JSON to this file ('-' for stdout).")]


def input_size_option(text: str | None) -> tuple[int, int] | None:
    size = parse_shape(text, "--input-size", (1, 2))
    if size is not None and len(size) == 1:
        size = (size[0], size[0])
    return size  # type: ignore[return-value]


def check_outputs_before_training(output: Path, json_out: str | None, force: bool) -> None:
    """Refuse outputs that could not be written now, rather than after the training.

    Raises:
        OutputExistsError: the ``--json`` file exists and ``--force`` was not given.
        NotADirectoryError: a file is in the way of an output's folders.
    """
    from leakaudit._io import check_folders_possible

    check_folders_possible(output)
    if json_out not in (None, "-"):
        check_output(Path(json_out), force)


def epoch_line(stats: Any, prefix: str = "") -> str:
    """One line per epoch: the numbers the user watches (public accuracy, the recipe's own)."""
    parts = [f"val public acc {stats.val_public_accuracy:.4f}", f"val loss {stats.val_loss:.4g}"]
    shown = {
        "val_center_loss": "centre loss",
        "intra_class_distance": "intra-class dist",
        "scatter_ratio": "within/total scatter",
        "train_dcor": "batch dCor",
        "val_dcor": "val dCor",
        "noise_to_signal": "noise/signal",
    }
    for key, name in shown.items():
        if key in stats.metrics:
            parts.append(f"{name} {stats.metrics[key]:.4g}")
    return f"{prefix}epoch {stats.epoch}: " + ", ".join(parts)


def train(
    model: ModelArg,
    data: DataOpt,
    task: Annotated[list[str], typer.Option("--task", "-t", help="The public task NAME=SOURCE (label, parity, threshold:K, map:FILE.yaml, array name).", show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="Weights to write (.safetensors); a .json record goes beside it.", show_default=False)],
    weights: WeightsOpt = None,
    num_classes: Annotated[Optional[int], typer.Option("--num-classes", help="Output classes (default: the task's, where the model accepts the option).")] = None,
    in_chans: InChansOpt = None,
    model_arg: ModelArgOpt = None,
    input_size: InputSizeOpt = None,
    normalize: NormalizeOpt = None,
    split: SplitOpt = "0.4,0.4,0.2",
    limit: LimitOpt = None,
    batch_size: BatchSizeOpt = 128,
    epochs: EpochsOpt = 20,
    lr: Annotated[float, typer.Option("--lr", help="Adam's learning rate.")] = 1e-3,
    patience: PatienceOpt = 5,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    json_out: JsonOpt = None,
    force: ForceOpt = False,
    trust_checkpoint: TrustOpt = False,
) -> None:
    """Train MODEL on the public task with cross-entropy, early-stopping on validation rows."""
    from leakaudit.data import parse_task_option
    from leakaudit.train import TrainSettings
    from leakaudit.train import train as run_train

    if len(task) != 1:
        raise ConfigError(f"train takes one --task NAME=SOURCE (the public task), got {len(task)}.")
    settings = TrainSettings(
        model=ModelSpec(model, weights=weights, num_classes=num_classes, in_chans=in_chans, args=parse_key_values(model_arg, "--model-arg"), trust_checkpoint=trust_checkpoint),
        data=data,
        output=output,
        task=parse_task_option(task[0]),
        input_size=input_size_option(input_size),
        normalize=normalize,
        split=_parse_split(split),
        limit=limit,
        seed=seed,
        device=device,
        batch_size=batch_size,
        epochs=epochs,
        lr=lr,
        patience=patience,
        force=force,
    )
    check_outputs_before_training(output, json_out, force)
    is_main = os.environ.get("RANK", "0") == "0"  # under torchrun, rank 0 speaks for the group
    with LazyProgress() as bar:
        result = run_train(
            settings, progress=bar.update if is_main else None, on_epoch=(lambda s: info(epoch_line(s))) if is_main else None
        )
    if not is_main:
        return
    stop = f", stopped early after epoch {result.history[-1].epoch}" if result.stopped_early else ""
    console().print(
        f"wrote {result.output} (+ {result.record.name}) — public accuracy on test rows "
        f"{result.test_public_accuracy:.4f} (epoch {result.best_epoch}{stop})",
        highlight=False,
    )
    if json_out is not None:
        write_json(result.to_dict(), json_out)


def register(app: typer.Typer) -> None:
    app.command("train")(train)
