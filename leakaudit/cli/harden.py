"""``leakaudit harden``: fine-tune a pre-trained split model with center-loss, nopeek or shredder.

Under ``torchrun`` every rank trains (see :mod:`leakaudit.harden`); rank 0 alone
draws the progress bar, prints the epochs and the result, and writes ``--json``.
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
    NumClassesOpt,
    SeedOpt,
    TrustOpt,
    WeightsOpt,
    console,
    info,
    parse_key_values,
    warn,
    write_json,
)
from leakaudit.cli.dump import _parse_split
from leakaudit.cli.train import (
    BatchSizeOpt,
    DataOpt,
    EpochsOpt,
    InputSizeOpt,
    JsonOpt,
    LimitOpt,
    NormalizeOpt,
    PatienceOpt,
    SplitOpt,
    check_outputs_before_training,
    epoch_line,
    input_size_option,
)
from leakaudit.errors import ConfigError
from leakaudit.models import ModelSpec


def parse_sweep(text: str | None) -> tuple[str, tuple[float, ...]] | None:
    """``lambda=0.5,0.7,0.9`` → ("lambda", (0.5, 0.7, 0.9))."""
    if text is None:
        return None
    name, sep, values = text.partition("=")
    try:
        numbers = tuple(float(v) for v in values.split(",") if v.strip())
    except ValueError:
        numbers = ()
    if not sep or not name.strip() or not numbers:
        raise ConfigError(f"--sweep expects NAME=V1,V2,... with numbers (e.g. lambda=0.5,0.9), got {text!r}.")
    return name.strip(), numbers


def parse_epochs(text: str | None) -> tuple[int, ...]:
    """``1,2,5`` → (1, 2, 5)."""
    if text is None:
        return ()
    try:
        epochs = tuple(sorted({int(v) for v in text.split(",") if v.strip()}))
    except ValueError:
        epochs = ()
    if not epochs:
        raise ConfigError(f"--record-sent expects epochs E1,E2,... (e.g. 1,2,5), got {text!r}.")
    return epochs


def harden(
    model: ModelArg,
    layer: Annotated[str, typer.Option("--layer", "-l", help="Split layer (a module name; see `leakaudit layers MODEL`).", show_default=False)],
    data: DataOpt,
    task: Annotated[list[str], typer.Option("--task", "-t", help="Tasks NAME=SOURCE; public=SOURCE is trained, others can be --against or --private targets. Repeatable.", show_default=False)],
    method: Annotated[str, typer.Option("--method", "-m", help="center-loss, nopeek, shredder or gaussian-noise (see `leakaudit list recipes`).", show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output folder: hardened model, encoder.pt2, classifier.pt2, encoder.onnx (with the onnx extra), harden.json.", show_default=False)],
    weights: WeightsOpt = None,
    lambda_: Annotated[Optional[float], typer.Option("--lambda", help="center-loss: λ in λ·L_C + (1 − λ)·L_S, in [0, 1] (default 0.9).")] = None,
    center_alpha: Annotated[Optional[float], typer.Option("--center-alpha", help="center-loss: rate at which centres follow the batches (default 0.5).")] = None,
    center_dim: Annotated[Optional[int], typer.Option("--center-dim", help="center-loss: fixed PCA reduction of Z to this many dimensions before the centre loss.")] = None,
    center_scale: Annotated[Optional[str], typer.Option("--center-scale", help="center-loss: 'absolute' (the paper's, default) or 'relative' (within-class over total scatter; no rescaling of Z lowers it).")] = None,
    alpha: Annotated[Optional[float], typer.Option("--alpha", help="nopeek: weight α of dCor(X, Z) against the cross-entropy (default 1).")] = None,
    sigma: Annotated[Optional[float], typer.Option("--sigma", help="gaussian-noise: scale σ of the Gaussian noise added at the split (default 1).")] = None,
    clip: Annotated[Optional[float], typer.Option("--clip", help="gaussian-noise: clip each row of Z to L2 norm C before the noise (default: no clipping).")] = None,
    against: Annotated[Optional[str], typer.Option("--against", help="nopeek: 'input' (default) or a task name, to decorrelate Z from that attribute.")] = None,
    option: Annotated[Optional[list[str]], typer.Option("--option", help="Further recipe setting KEY=VALUE (see `leakaudit list recipes`); repeatable.")] = None,
    sweep: Annotated[Optional[str], typer.Option("--sweep", help="Train each value of one setting, e.g. lambda=0.5,0.7,0.9,0.99, and measure the privacy–utility table.")] = None,
    private: Annotated[Optional[str], typer.Option("--private", help="Task the evaluation attacks (default: 'private', else the first non-public task).")] = None,
    evaluate: Annotated[Optional[bool], typer.Option("--evaluate/--no-evaluate", help="Dump, attack and measure each result (default: with --sweep only).", show_default=False)] = None,
    decoder: Annotated[bool, typer.Option("--decoder", help="Also run the decoder attack in the evaluation (SSIM p95).")] = False,
    decoder_arch: Annotated[str, typer.Option("--decoder-arch", help="Decoders of the evaluation: upsample, alexnet, resnet or best (all).")] = "best",
    keep_stores: Annotated[bool, typer.Option("--keep-stores", help="Keep the evaluation's activation stores in OUTDIR/stores.")] = False,
    attack_epochs: Annotated[Optional[int], typer.Option("--attack-epochs", help="Cap on the evaluation attacks' epochs.")] = None,
    num_classes: NumClassesOpt = None,
    in_chans: InChansOpt = None,
    model_arg: ModelArgOpt = None,
    input_size: InputSizeOpt = None,
    normalize: NormalizeOpt = None,
    split: SplitOpt = "0.4,0.4,0.2",
    limit: LimitOpt = None,
    batch_size: BatchSizeOpt = 128,
    epochs: EpochsOpt = 30,
    lr: Annotated[Optional[float], typer.Option("--lr", help="Adam's learning rate (default: the recipe's; low, for fine-tuning).")] = None,
    patience: PatienceOpt = 5,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    burn_in: Annotated[Optional[int], typer.Option("--burn-in", help="nopeek: fit the encoder on the client alone for STEPS steps to decorrelated targets before training (the paper's burn-in).")] = None,
    record_sent: Annotated[Optional[str], typer.Option("--record-sent", help="Epochs (e.g. 1,2,5; 0 = before training) after which the activations the server receives are written as stores in OUTDIR/sent/, plus the end.")] = None,
    json_out: JsonOpt = None,
    force: ForceOpt = False,
    trust_checkpoint: TrustOpt = False,
) -> None:
    """Harden MODEL at --layer with a recipe and export the client encoder and server classifier."""
    from rich.markup import escape

    from leakaudit.data import parse_task_option
    from leakaudit.harden import HardenSettings
    from leakaudit.harden import harden as run_harden

    options: dict[str, Any] = parse_key_values(option, "--option")
    for name, value in (("lambda", lambda_), ("center_alpha", center_alpha), ("center_dim", center_dim),
                        ("center_scale", center_scale), ("alpha", alpha), ("against", against), ("burn_in", burn_in),
                        ("sigma", sigma), ("clip", clip)):
        if value is not None:
            options[name] = value
    settings = HardenSettings(
        model=ModelSpec(model, weights=weights, num_classes=num_classes, in_chans=in_chans, args=parse_key_values(model_arg, "--model-arg"), trust_checkpoint=trust_checkpoint),
        data=data,
        layer=layer,
        output=output,
        method=method,
        tasks=tuple(parse_task_option(t) for t in task),
        options=options,
        sweep=parse_sweep(sweep),
        private=private,
        evaluate=evaluate,
        decoder=decoder,
        decoder_arch=decoder_arch,
        keep_stores=keep_stores,
        attack_epochs=attack_epochs,
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
        record_sent=parse_epochs(record_sent),
    )
    check_outputs_before_training(output, json_out, force)
    is_main = os.environ.get("RANK", "0") == "0"  # under torchrun, rank 0 speaks for the group
    with LazyProgress() as bar:
        result = run_harden(
            settings,
            progress=bar.update if is_main else None,
            on_epoch=(lambda label, stats: info(escape(epoch_line(stats, f"[{label}] " if label else "")))) if is_main else None,
        )
    if not is_main:
        return
    _print_result(result)
    if json_out is not None:
        write_json(result.to_dict(), json_out)


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _print_result(result) -> None:
    from rich.table import Table

    out = console()
    runs = Table(title=f"{result.method} at {result.layer}")
    for column in ("run", "best epoch", "public acc (test)", "normalized", "lr"):
        runs.add_column(column)
    runs.add_row("unhardened", "—", _fmt(result.baseline["public_accuracy"]), "1.0000", "—")
    for run in result.runs:
        runs.add_row(run.label, str(run.best_epoch), _fmt(run.public_accuracy), _fmt(run.public_accuracy_normalized), f"{run.lr:g}")
    out.print(runs)
    if result.table:
        table = Table(title="privacy–utility (test rows)")
        columns = ("label", "public_accuracy_normalized", "private_accuracy", "private_accuracy_drop",
                   "private_accuracy_continuation", "private_accuracy_drop_continuation", "dcor", "intra_class_distance", "intra_class_scatter_ratio")
        extra = ("ssim_p95",) if any(r.get("ssim_p95") is not None for r in result.table) else ()
        for column in (*columns, *extra):
            table.add_column(column.replace("_", " "))
        for row in result.table:
            table.add_row(*(_fmt(row.get(c)) for c in (*columns, *extra)))
        out.print(table)
    out.print(f"wrote {result.output} (harden.json, model.safetensors, encoder.pt2, classifier.pt2)", highlight=False)
    for run in result.runs:
        onnx = run.onnx or {}
        where = run.folder / "encoder.onnx"
        if "skipped" in onnx:
            warn(f"the ONNX export of {run.label} was skipped: {onnx['skipped']}. encoder.pt2 and classifier.pt2 were written.")
        elif "encoder.onnx" in run.files:
            out.print(f"wrote {where} (ONNX opset {onnx.get('opset')}, dynamic batch; onnxruntime matches the "
                      f"PyTorch encoder within rtol={onnx.get('rtol')}, atol={onnx.get('atol')})", highlight=False)  # fmt: skip


def register(app: typer.Typer) -> None:
    app.command("harden")(harden)
