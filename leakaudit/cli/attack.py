"""``leakaudit attack``: run any registered attack on a store; table, JSON, artifacts, report.json.

``--attack NAME [--set KEY=VALUE]…`` runs any attack ``leakaudit list attacks`` shows;
``--classifier`` and ``--decoder [ARCH]`` are shorthands, and the per-setting options
(``--task``, ``--epochs`` …) are shorthands for ``--set``.

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
from typing import Annotated, Any, Optional

import typer
from typer.core import TyperCommand

from leakaudit.cli._common import ForceOpt, LazyProgress, MemoryBudgetOpt, check_output, console, warn, write_json
from leakaudit.data_paths import records
from leakaudit.errors import ConfigError, LeakAuditError, UsageError

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
    attack_name: Annotated[Optional[str], typer.Option("--attack", "-a", metavar="NAME", help="Any registered attack (see `leakaudit list attacks`); its settings with --set or --config.", show_default=False)] = None,
    setting: Annotated[Optional[list[str]], typer.Option("--set", metavar="KEY=VALUE", help="A setting of the attack, e.g. --set epochs=20 (repeatable; the options below are shorthands).", show_default=False)] = None,
    classifier: Annotated[bool, typer.Option("--classifier", help="Shorthand for --attack classifier: retrain classifiers on Z for --task (Scrunch §3.2).")] = False,
    decoder: Annotated[Optional[str], typer.Option("--decoder", metavar="[upsample|alexnet|resnet|best]", help="Shorthand for --attack decoder --set arch=ARCH: reconstruct X from Z; alone it means best (all three decoders).", show_default=False)] = None,
    task: Annotated[Optional[str], typer.Option("--task", "-t", help="Classifier: the store's task to attack.  [default: private]", show_default=False)] = None,
    head: Annotated[Optional[str], typer.Option("--head", help="Classifier head: linear, svm, mlp, conv, continuation, best (all) or fresh (all but continuation).  [default: best]", show_default=False)] = None,
    leaked: Annotated[Optional[str], typer.Option("--leaked", metavar="SHARES", help="Decoder: also train on these shares of the attacker's pairs, e.g. 0.01,0.1,1: SSIM/PSNR against the number of leaked pairs.", show_default=False)] = None,
    loss: Annotated[Optional[str], typer.Option("--loss", help="Decoder loss: mse or mse+ssim.  [default: mse]", show_default=False)] = None,
    training_budget: Annotated[Optional[str], typer.Option("--budget", metavar="[halving|full]", help="Decoder: with all three decoders, halving trains each a few epochs and continues the best on attacker-validation; full trains each to its own early stop.  [default: halving]", show_default=False)] = None,
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
    grid: Annotated[Optional[Path], typer.Option("--grid", metavar="OUT.png", help="Decoder: PNG of test originals above their reconstructions (shorthand for --artifact grid=OUT.png).", show_default=False)] = None,
    reconstructions: Annotated[Optional[Path], typer.Option("--reconstructions", metavar="OUT.h5", help="Decoder: HDF5 of the best decoder's test reconstructions (--artifact reconstructions=OUT.h5).", show_default=False)] = None,
    artifact: Annotated[Optional[list[str]], typer.Option("--artifact", metavar="NAME=PATH", help="Write the attack's artifact NAME to PATH (see `leakaudit list attacks`; repeatable).", show_default=False)] = None,
    memory_budget: MemoryBudgetOpt = None,
    seeds: Annotated[int, typer.Option("--seeds", metavar="N", help="Train the attack N times, with seeds s … s+N−1 (s: --seed): each number is the mean over seeds, its 95 % interval covers seeds and test rows.")] = 1,
    force: ForceOpt = False,
) -> None:
    """Attack STORE with any registered attack: --classifier retrains a private-task classifier on Z, --decoder reconstructs X from Z."""
    from leakaudit import pipeline
    from leakaudit.config import load_yaml
    from leakaudit.registry import ATTACKS

    chosen = [n for n, given in (("classifier", classifier), ("decoder", decoder is not None), (attack_name, attack_name is not None)) if given]
    if len(chosen) != 1:
        raise UsageError("give exactly one of --attack NAME, --classifier and --decoder [ARCH].")
    name = str(chosen[0])
    plugin = ATTACKS.get(name)
    shorthands = {"--task": ("task", task), "--head": ("head", head), "--loss": ("loss", loss), "--leaked": ("leaked", leaked), "--budget": ("budget", training_budget), "--epochs": ("epochs", epochs),
                  "--batch-size": ("batch_size", batch_size), "--lr": ("lr", lr), "--patience": ("patience", patience),
                  "--device": ("device", device), "--seed": ("seed", seed), "--precision": ("precision", precision)}  # fmt: skip
    wanted: dict[str, Path] = {}
    for item in artifact or []:
        key, sep, text = item.partition("=")
        if not sep or not key or not text:
            raise UsageError(f"--artifact expects NAME=PATH, got {item!r}.")
        wanted[key] = Path(text)
    for option, (key, given) in {"--grid": ("grid", grid), "--reconstructions": ("reconstructions", reconstructions)}.items():
        if given is not None:
            if key not in plugin.artifacts:
                raise UsageError(f"{option} {_applies_to(ATTACKS, lambda p, key=key: key in p.artifacts, name)}")
            wanted[key] = given
    for key in wanted:
        if key not in plugin.artifacts:
            raise UsageError(f"attack {name!r} writes no artifact {key!r}; it writes: {', '.join(plugin.artifacts) or 'none'}.")
    fields = _fields(plugin)
    for option, (key, value) in shorthands.items():
        if value is not None and key not in fields:
            raise UsageError(f"{option} {_applies_to(ATTACKS, lambda p, key=key: key in _fields(p), name)}")

    settings: dict[str, Any] = {}
    if config_file is not None:
        loaded = load_yaml(config_file, "attack config")
        try:  # checked on its own first, so that its mistakes are reported with the file's name
            plugin.configure(loaded)
        except UsageError as exc:
            raise ConfigError(f"{config_file}: {exc}") from None
        settings.update(loaded or {})
    settings.update(pipeline.parse_settings(setting or []))
    if decoder is not None:
        settings["arch"] = decoder
    settings.update({key: value for key, value in shorthands.values() if value is not None})
    step = pipeline.Step(plugin, plugin.configure(settings))
    pipeline.check_seeds(seeds)
    if seeds > 1 and not pipeline.has_seed(step):
        raise UsageError(f"--seeds: attack {name!r} has no seed setting to vary; it runs once.")

    outputs = [Path(json_out)] if json_out not in (None, "-") else []
    outputs += list(wanted.values())

    from leakaudit import distributed
    from leakaudit.report import Report, default_report_path, subject_of
    from leakaudit.runtime import resolve_device
    from leakaudit.store import open_store
    from leakaudit.store.stream import budget

    # `--device cuda` without CUDA is refused here, before any rank joins a process group.
    ctx = distributed.current(resolve_device(getattr(step.config, "device", "auto")))
    is_main = ctx is None or ctx.is_main
    with ExitStack() as stack:
        stack.enter_context(budget(memory_budget))
        with distributed.agreed(ctx):  # every rank starts, or none does
            if is_main:
                for path in outputs:
                    check_output(path, force)
            handle = stack.enter_context(open_store(store))
            report_path = report if report is not None else default_report_path(handle.path)
            if is_main:  # refused before training, not after it
                merged = Report.for_store(report_path, subject_of(handle))
        with LazyProgress() as bar:
            result = pipeline.run_step(step, handle, progress=bar.update if is_main else None, seeds=seeds)
        # Reached by every rank only when every rank finished its training; rank 0 then writes,
        # but only numbers that every rank computed: rank 0 speaks for the group.
        numbers = distributed.all_gather(result.report_metrics()) if ctx is not None else []
        with distributed.agreed(ctx):
            if is_main:
                _check_ranks_agree(numbers)
                for message in getattr(result, "warnings", None) or ():
                    warn(message)
                pipeline.write_artifacts(step, result, handle, wanted)
                world_size = ctx.world_size if ctx is not None else 1
                # The JSON records ``world_size``: the numbers of a distributed run are close to,
                # not equal to, those of a single process (see leakaudit.training).
                data = {"store": str(handle.path), **result.to_dict(), "world_size": world_size}
                if json_out is not None:
                    write_json(data, json_out)
                merged.add(step.key, result, store=str(handle.path), world_size=world_size)
                for check in merged.save(report_path).get("checks", []):
                    warn(check["message"])
    distributed.shutdown()
    if is_main and json_out != "-":
        _show(result)
        show_data_path(getattr(result, "data_path", None))
        console().print(f"merged into {report_path}", highlight=False)
    if ctx is not None:
        distributed.exit_without_teardown(0)  # see there: a DDP rank may abort in the teardown


def show_data_path(paths: dict[str, dict[str, Any]] | None) -> None:
    """One line per role: which path read it (memory, stream or subsample) and why."""
    for record in records({"": {"data_path": paths}}):
        console().print(record.line(), highlight=False, soft_wrap=True)


def _fields(plugin: Any) -> set[str]:
    import dataclasses

    return {f.name for f in dataclasses.fields(plugin.config_cls)} if plugin.config_cls is not None else set()


def _applies_to(registry: Any, accepts: Any, name: str) -> str:
    """The end of "--OPTION …": which attacks with a shorthand flag take it, or that ``name`` does not."""
    takers = [p.name for p in registry if accepts(p) and p.name in _SHORTHAND_FLAGS]
    chosen = f"--{name}" if name in _SHORTHAND_FLAGS else f"attack {name!r}"
    if takers:
        return f"applies to {', '.join('--' + t for t in takers)}, not to {chosen}."
    return f"does not apply to {chosen}."


#: Attacks that have a flag of their own (``--classifier``, ``--decoder``): CLI spelling only.
_SHORTHAND_FLAGS = ("classifier", "decoder")


def _show(result: Any) -> None:
    """The result's own view when it renders itself; a table of its numbers otherwise."""
    out = console()
    render = getattr(result, "render", None)
    if callable(render):
        for item in render():
            out.print(item, highlight=False)
        return
    from rich.table import Table

    from leakaudit.glossary import names

    meanings = names()
    table = Table(title=f"attack {getattr(result, 'attack', '')}".strip())
    for column in ("metric", "value", "meaning"):
        table.add_column(column)
    from leakaudit.intervals import format_interval, interval_problem

    for metric, value in result.report_metrics().items():
        shown = format_interval(value, ".4g") if interval_problem(value) is None else "—" if value is None else f"{value:.4g}"
        table.add_row(metric, shown, meanings.get(metric, ""))
    out.print(table)


def _check_ranks_agree(numbers: list[dict[str, float]], rel: float = 1e-6) -> None:
    """Refuse to write when the ranks' reported numbers differ (beyond float noise across machines).

    Every rank trains the same model on the same data with DistributedDataParallel and should
    report the same numbers; different ones mean the ranks did not train one model.

    Raises:
        LeakAuditError: the first number on which a rank differs from rank 0.
    """
    import math

    def close(a: Any, b: Any) -> bool:  # numbers, or the two ends of intervals [lo, hi]
        if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
            pairs = isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b)
            return pairs and all(close(x, y) for x, y in zip(a, b))
        return isinstance(b, (int, float)) and math.isclose(a, b, rel_tol=rel, abs_tol=rel)

    for rank, mine in enumerate(numbers[1:], start=1):
        for name, value in numbers[0].items():
            other = mine.get(name)
            if other is None or not close(value, other):
                raise LeakAuditError(
                    f"rank {rank} computed {name} = {other} where rank 0 computed {value}; the ranks did not train "
                    "the same model, so nothing was written. Run again; report it if it repeats."
                )


def register(app: typer.Typer) -> None:
    app.command("attack", cls=_AttackCommand)(attack)
