"""``leakaudit attack``: run the classifier or decoder attack on a store; table, JSON, report.json.

``--decoder`` takes an optional value (``--decoder`` alone means ``best``, all three decoders).
The click that Typer vendors parses only options that always or never take a value, so
:class:`_AttackCommand` supplies the default value before parsing where none was given:
when ``--decoder`` ends the line, is followed by another option, or by the store's path.

Under ``torchrun`` every rank trains its share (DistributedDataParallel, see
:mod:`leakaudit.attacks._training`); rank 0 alone draws progress bars, prints, and writes
``--json``, ``--grid``, ``--reconstructions`` and the report, after every rank finished.
A rank that fails makes every rank fail (or torchrun stops them): nothing is written then.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer
from typer.core import TyperCommand

from leakaudit.cli._common import ForceOpt, LazyProgress, check_output, console, warn, write_json
from leakaudit.errors import ConfigError, LeakAuditError, UsageError

if TYPE_CHECKING:  # imported lazily at run time: `leakaudit --help` must not load torch
    from leakaudit.attacks import ClassifierResult, DecoderResult
    from leakaudit.store import ActivationStore

DECODER_ARCHS = ("upsample", "alexnet", "resnet", "best")
DECODER_DEFAULT = "best"
_STORE_SUFFIXES = {".h5", ".hdf5", ".hdf"}


def fill_optional_decoder(args: list[str]) -> list[str]:
    """Insert ``best`` after a ``--decoder`` that has no value of its own."""
    out: list[str] = []
    for i, arg in enumerate(args):
        if arg == "--":  # everything after is positional
            out.extend(args[i:])
            break
        out.append(arg)
        if arg == "--decoder":
            following = args[i + 1] if i + 1 < len(args) else None
            if following is None or following.startswith("-") or _looks_like_store(following):
                out.append(DECODER_DEFAULT)
    return out


def _looks_like_store(token: str) -> bool:
    if token in DECODER_ARCHS:
        return False
    path = Path(token)
    return path.suffix.lower() in _STORE_SUFFIXES or path.is_file()


class _AttackCommand(TyperCommand):
    def parse_args(self, ctx, args: list[str]) -> list[str]:  # type: ignore[override]
        return super().parse_args(ctx, fill_optional_decoder(list(args)))


def attack(
    store: Annotated[Path, typer.Argument(metavar="STORE", help="Activation store (HDF5) written by `leakaudit dump`.", show_default=False)],
    classifier: Annotated[bool, typer.Option("--classifier", help="Retrain classifiers on Z for --task (Scrunch §3.2).")] = False,
    decoder: Annotated[Optional[str], typer.Option("--decoder", metavar="[upsample|alexnet|resnet|best]", help="Reconstruct X from Z; alone it means best (all three decoders).", show_default=False)] = None,
    task: Annotated[Optional[str], typer.Option("--task", "-t", help="Classifier: the store's task to attack.  [default: private]", show_default=False)] = None,
    head: Annotated[Optional[str], typer.Option("--head", help="Classifier head: linear, mlp, conv, continuation or best.  [default: best]", show_default=False)] = None,
    loss: Annotated[Optional[str], typer.Option("--loss", help="Decoder loss: mse or mse+ssim.  [default: mse]", show_default=False)] = None,
    epochs: Annotated[Optional[int], typer.Option("--epochs", help="Most epochs per model; early stopping on attacker-validation usually ends sooner.  [default: 200 classifier, 100 decoder]", show_default=False)] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", "-b", help="Rows per training step.  [default: 128 classifier, 64 decoder]", show_default=False)] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", help="Adam learning rate.  [default: 0.001]", show_default=False)] = None,
    patience: Annotated[Optional[int], typer.Option("--patience", help="Epochs without a better validation score before stopping.  [default: 20 classifier, 10 decoder]", show_default=False)] = None,
    device: Annotated[Optional[str], typer.Option("--device", help="auto, cpu or cuda[:N].  [default: auto]", show_default=False)] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Random seed (initialisation, minibatch order).  [default: 0]", show_default=False)] = None,
    precision: Annotated[Optional[str], typer.Option("--precision", help="fp32, or bf16: train under bfloat16 autocast; every score is still computed in float32.  [default: fp32]", show_default=False)] = None,
    config_file: Annotated[Optional[Path], typer.Option("--config", help="YAML mapping of the attack's settings (see `leakaudit list attacks`); options given here win.", show_default=False)] = None,
    json_out: Annotated[Optional[str], typer.Option("--json", metavar="OUT", help="Write the attack's result as JSON to OUT ('-' for stdout).", show_default=False)] = None,
    report: Annotated[Optional[Path], typer.Option("--report", help="report.json to merge the numbers into.  [default: STORE's stem + .report.json]", show_default=False)] = None,
    grid: Annotated[Optional[Path], typer.Option("--grid", metavar="OUT.png", help="Decoder: PNG of test originals above their reconstructions.", show_default=False)] = None,
    reconstructions: Annotated[Optional[Path], typer.Option("--reconstructions", metavar="OUT.h5", help="Decoder: HDF5 of the best decoder's test reconstructions.", show_default=False)] = None,
    force: ForceOpt = False,
) -> None:
    """Attack STORE: --classifier retrains a private-task classifier on Z, --decoder reconstructs X from Z."""
    if classifier == (decoder is not None):
        raise UsageError("give exactly one of --classifier and --decoder [ARCH].")
    name = "classifier" if classifier else "decoder"
    only = {
        "classifier": {"--task": task, "--head": head},
        "decoder": {"--loss": loss, "--grid": grid, "--reconstructions": reconstructions},
    }
    for family, options in only.items():
        if family != name:
            given = [option for option, value in options.items() if value is not None]
            if given:
                raise UsageError(f"{given[0]} applies to --{family}, not to --{name}.")

    from leakaudit.config import from_mapping, load_yaml
    from leakaudit.registry import ATTACKS

    plugin = ATTACKS.get(name)
    settings: dict[str, Any] = {}
    if config_file is not None:
        loaded = load_yaml(config_file, "attack config")
        try:  # checked on its own first, so that its mistakes are reported with the file's name
            from_mapping(plugin.config_cls, loaded)
        except UsageError as exc:
            raise ConfigError(f"{config_file}: {exc}") from None
        settings.update(loaded or {})
    cli_values = {
        "task": task,
        "head": head,
        "arch": decoder,
        "loss": loss,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "patience": patience,
        "device": device,
        "seed": seed,
        "precision": precision,
    }
    settings.update({key: value for key, value in cli_values.items() if value is not None})
    config = from_mapping(plugin.config_cls, settings)

    outputs = [Path(json_out)] if json_out not in (None, "-") else []
    outputs += [p for p in (grid, reconstructions) if p is not None]

    from leakaudit import distributed
    from leakaudit.runtime import resolve_device
    from leakaudit.store import open_store

    # `--device cuda` without CUDA is refused here, before any rank joins a process group.
    ctx = distributed.current(resolve_device(config.device))
    is_main = ctx is None or ctx.is_main
    with ExitStack() as stack:
        with distributed.agreed(ctx):  # every rank starts, or none does
            if is_main:
                for path in outputs:
                    check_output(path, force)
            handle = stack.enter_context(open_store(store))
            if is_main:  # refused before training, not after it
                from leakaudit.report import check_mergeable, default_report_path, subject_of

                check_mergeable(report if report is not None else default_report_path(handle.path), subject_of(handle))
        with LazyProgress() as bar:
            result = plugin.target(handle, config, progress=bar.update if is_main else None)
        # Reached by every rank only when every rank finished its training; rank 0 then writes,
        # but only numbers that every rank computed: rank 0 speaks for the group.
        numbers = distributed.all_gather(result.report_metrics()) if ctx is not None else []
        with distributed.agreed(ctx):
            if is_main:
                _check_ranks_agree(numbers)
                report_path = _write_outputs(
                    result, handle, name, world_size=ctx.world_size if ctx is not None else 1,
                    json_out=json_out, grid=grid, reconstructions=reconstructions, report=report,
                )  # fmt: skip
    distributed.shutdown()
    if is_main and json_out != "-":
        (_show_classifier if name == "classifier" else _show_decoder)(result, store)
        console().print(f"merged into {report_path}", highlight=False)
    if ctx is not None:
        distributed.exit_without_teardown(0)  # see there: a DDP rank may abort in the teardown


def _check_ranks_agree(numbers: list[dict[str, float]], rel: float = 1e-6) -> None:
    """Refuse to write when the ranks' reported numbers differ (beyond float noise across machines).

    Every rank trains the same model on the same data with DistributedDataParallel and should
    report the same numbers; different ones mean the ranks did not train one model.

    Raises:
        LeakAuditError: the first number on which a rank differs from rank 0.
    """
    import math

    for rank, mine in enumerate(numbers[1:], start=1):
        for name, value in numbers[0].items():
            other = mine.get(name)
            if other is None or not math.isclose(value, other, rel_tol=rel, abs_tol=rel):
                raise LeakAuditError(
                    f"rank {rank} computed {name} = {other} where rank 0 computed {value}; the ranks did not train "
                    "the same model, so nothing was written. Run again; report it if it repeats."
                )


def _write_outputs(
    result: ClassifierResult | DecoderResult,
    handle: ActivationStore,
    name: str,
    *,
    world_size: int,
    json_out: str | None,
    grid: Path | None,
    reconstructions: Path | None,
    report: Path | None,
) -> Path:
    """Warnings, then ``--reconstructions``, ``--grid``, ``--json`` and the report; the report's path.

    The JSON records ``world_size``: the numbers of a distributed run are close to, not
    equal to, those of a single process (see :mod:`leakaudit.attacks._training`).
    """
    from leakaudit.report import default_report_path, subject_of, update_report

    for message in result.warnings:
        warn(message)
    if name == "decoder":
        from leakaudit.attacks.decoders import save_grid, save_reconstructions

        if reconstructions is not None:
            save_reconstructions(result, reconstructions, store_path=handle.path)
        if grid is not None:
            save_grid(result, handle, grid)
    data = {"store": str(handle.path), **result.to_dict(), "world_size": world_size}
    if json_out is not None:
        write_json(data, json_out)
    report_path = report if report is not None else default_report_path(handle.path)
    update_report(
        report_path, subject=subject_of(handle), key=f"attack:{name}", result=data, metrics=result.report_metrics()
    )
    return report_path


# Narrow terminals shrink columns; numbers must not be cut to "0.6…".
_MIN_WIDTH = {"head": 12, "decoder": 10, "test acc": 6, "balanced": 8, "val acc": 6, "epochs": 8, "s/epoch": 6,
              "SSIM": 5, "p5": 5, "p50": 5, "p95": 5, "PSNR": 5, "MSE": 6, "val": 5, "s/ep": 5}  # fmt: skip


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"


def _num(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _time(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def _show_classifier(result, store: Path) -> None:
    from rich import box
    from rich.table import Table

    rows = result.rows
    table = Table(
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        title=f"classifier attack, task {result.task!r} ({len(result.class_names)} classes), Z "
        f"{'×'.join(map(str, result.layer_shape))}, {rows['attacker-train']:,}/{rows['attacker-validation']:,}/"
        f"{rows['test']:,} rows"
    )
    for column in ("head", "input", "test acc", "balanced", "val acc", "epochs", "s/epoch", "note"):
        table.add_column(
            column, justify="left" if column in ("head", "input", "note") else "right", min_width=_MIN_WIDTH.get(column)
        )
    skipped: list[str] = []
    for head in [*result.heads, *result.raw_heads]:
        mark = " *" if head.name in (result.best_head, result.raw_best_head) else ""
        if head.ok:
            table.add_row(
                head.name + mark,
                head.input,
                _pct(head.accuracy),
                _pct(head.balanced_accuracy),
                _pct(head.val_accuracy),
                f"{head.epochs} ({head.best_epoch})",
                _time(head.seconds_per_epoch),
                "",
            )
        else:
            # The reason is a sentence: below the table, where it is not folded into a narrow column.
            table.add_row(head.name, head.input, "—", "—", "—", "—", "—", f"skipped ({len(skipped) + 1})")
            skipped.append(f"({len(skipped) + 1}) {head.name}: {head.reason}")
    table.add_row("chance", "", _pct(result.chance), _pct(result.chance_balanced), "", "", "", "majority class")
    table.caption = "* strongest on attacker-validation · epochs: run (best)"
    out = console()
    out.print(table)
    for line in skipped:
        out.print(f"skipped {line}", highlight=False)
    out.print(
        f"private_accuracy {_num(result.accuracy)} ({result.best_head}) · private_accuracy_raw "
        f"{_num(result.private_accuracy_raw)} ({result.raw_best_head or 'no /inputs'}) · private_accuracy_drop "
        f"{_num(result.private_accuracy_drop)} · private_chance {_num(result.chance)}",
        highlight=False,
    )


def _show_decoder(result, store: Path) -> None:
    from rich import box
    from rich.table import Table

    rows = result.rows
    table = Table(
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        title=f"decoder attack, Z {'×'.join(map(str, result.layer_shape))} → X {'×'.join(map(str, result.input_shape))}, "
        f"{rows['attacker-train']:,}/{rows['attacker-validation']:,}/{rows['test']:,} rows"
    )
    for column in ("decoder", "SSIM", "p5", "p50", "p95", "PSNR", "MSE", "val", "epochs", "s/ep"):
        table.add_column(column, justify="left" if column == "decoder" else "right", min_width=_MIN_WIDTH[column])
    for run in result.runs:
        s = run.test
        table.add_row(
            run.arch + (" *" if run.arch == result.best else ""),
            _num(s.ssim_mean), _num(s.ssim_p5), _num(s.ssim_p50), _num(s.ssim_p95), _num(s.psnr, 2), _num(s.mse, 4),
            _num(run.val_ssim), f"{run.epochs} ({run.best_epoch})", _time(run.seconds_per_epoch),
        )  # fmt: skip
    m = result.mean_image
    table.add_row(
        "mean-image", _num(m.ssim_mean), _num(m.ssim_p5), _num(m.ssim_p50), _num(m.ssim_p95), _num(m.psnr, 2),
        _num(m.mse, 4), "", "", "",
    )  # fmt: skip
    table.caption = "* strongest on attacker-validation (val: mean SSIM there) · epochs: run (best) · PSNR in dB"
    out = console()
    out.print(table)
    out.print(
        f"ssim_mean {_num(result.scores.ssim_mean)} · ssim_p95 {_num(result.scores.ssim_p95)} · psnr "
        f"{_num(result.scores.psnr, 2)} ({result.best}) · ssim_p95_mean_image {_num(result.mean_image.ssim_p95)}",
        highlight=False,
    )


def register(app: typer.Typer) -> None:
    app.command("attack", cls=_AttackCommand)(attack)
