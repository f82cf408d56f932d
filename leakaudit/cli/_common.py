"""Shared plumbing of the command modules: consoles, progress bars, option parsing."""

from __future__ import annotations

import errno
import json
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from leakaudit.errors import ConfigError, OutputExistsError


@dataclass
class _State:
    debug: bool = False
    quiet: bool = False
    json_on_stdout: bool = False  # set per command by the group, see leakaudit.cli


state = _State()


def console() -> Console:
    """The console for results: tables and "wrote …" lines.

    It is stdout, looked up each time so that test runners capture it — except while the
    command's JSON goes to stdout (``--json -``), when stdout must hold that JSON alone and
    these go to stderr instead.
    """
    return _Console(file=sys.stderr if state.json_on_stdout else sys.stdout, soft_wrap=True)


def err_console() -> Console:
    return _Console(file=sys.stderr, soft_wrap=True)


class _Console(Console):
    def on_broken_pipe(self) -> None:
        # rich would exit 1, the gate-failed code; the group ends a closed pipe the same
        # way for every writer (see leakaudit.cli).
        raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))


def print_error(message: str) -> None:
    """Print ``Error: message`` as one line on stderr, without rich markup interpretation."""
    line = " ".join(message.split())
    sys.stderr.write(f"Error: {line}\n")
    sys.stderr.flush()


def info(message: str) -> None:
    """A progress note on stderr, silenced by ``--quiet``."""
    if not state.quiet:
        err_console().print(message, highlight=False)


def warn(message: str) -> None:
    sys.stderr.write(f"Warning: {' '.join(message.split())}\n")


class LazyProgress:
    """A progress bar that appears on the first update, so failed validation draws none.

    Use as a context manager; :meth:`callback` returns an ``on_progress(done, total)``
    function for domain code, which knows nothing of rich.
    """

    def __init__(self) -> None:
        self._progress: Progress | None = None
        self._tasks: dict[str, Any] = {}

    def __enter__(self) -> LazyProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def update(self, description: str, done: float, total: float | None) -> None:
        if state.quiet:
            return
        if self._progress is None:
            self._progress = progress()
            self._progress.start()
        if description not in self._tasks:
            self._tasks[description] = self._progress.add_task(description, total=total)
        self._progress.update(self._tasks[description], completed=done, total=total)

    def callback(self, description: str):
        def on_progress(done: float, total: float | None) -> None:
            self.update(description, done, total)

        return on_progress


def progress() -> Progress:
    """A rich progress bar on stderr; disabled under ``--quiet``."""
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err_console(),
        disable=state.quiet,
        transient=False,
    )


def parse_key_values(items: Sequence[str] | None, option: str) -> dict[str, Any]:
    """Parse repeated ``KEY=VALUE`` options; values are read as YAML scalars."""
    from leakaudit.config import parse_cli_value

    result: dict[str, Any] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{option} expects KEY=VALUE, got {item!r}.")
        result[key.strip()] = parse_cli_value(value.strip())
    return result


def parse_shape(text: str | None, option: str, length: Iterable[int] = (3,)) -> tuple[int, ...] | None:
    """Parse ``C,H,W`` or ``H,W`` style options into positive integers."""
    if text is None:
        return None
    parts = [p for p in text.replace("x", ",").split(",") if p.strip()]
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        raise ConfigError(f"{option} expects comma-separated integers, got {text!r}.") from None
    allowed = tuple(length)
    if len(values) not in allowed or any(v <= 0 for v in values):
        counts = " or ".join(str(n) for n in allowed)
        raise ConfigError(f"{option} expects {counts} positive integers, got {text!r}.")
    return values


def check_output(path: Path, force: bool) -> None:
    """Refuse to overwrite an existing output unless ``--force`` was given.

    A device or pipe (``/dev/stdout``) is written into, not replaced, so it needs no ``--force``.
    A file in the way of the output's folders is refused here too, before any work.
    """
    from leakaudit._io import check_folders_possible

    check_folders_possible(path)
    if not force and (path.is_file() or path.is_dir()):
        raise OutputExistsError(f"{str(path)!r} exists. Pass --force to overwrite it.")


def write_json(data: Any, path: str | None) -> None:
    """Write JSON to ``path`` atomically, or to stdout for ``-``."""
    text = json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n"
    if path in (None, "-"):
        sys.stdout.write(text)
        return
    from leakaudit._io import atomic_write_text

    atomic_write_text(Path(path), text)


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot serialise {type(value).__name__} to JSON")


# --------------------------------------------------------------------------- shared options
# Annotated aliases keep one spelling of each option across commands.

from typing import Annotated, Optional  # noqa: E402

import typer  # noqa: E402

ModelArg = Annotated[str, typer.Argument(metavar="MODEL", help="Model spec: lenet5, timm:NAME, torchvision:NAME, file.py:Factory, pkg.module:Factory, model.ts or model.pt2.", show_default=False)]
WeightsOpt = Annotated[Optional[str], typer.Option("--weights", "-w", help="Weights: .safetensors, or a torch.save file (read with weights_only=True).")]
NumClassesOpt = Annotated[Optional[int], typer.Option("--num-classes", help="Architecture option: number of output classes.")]
InChansOpt = Annotated[Optional[int], typer.Option("--in-chans", help="Architecture option: number of input channels.")]
ModelArgOpt = Annotated[Optional[list[str]], typer.Option("--model-arg", help="Further architecture option KEY=VALUE (repeatable).")]
TrustOpt = Annotated[bool, typer.Option("--trust-checkpoint", help="Allow unpickling the checkpoint. Unpickling runs code from the file: only for files you trust.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Overwrite existing outputs.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu or cuda[:N].")]
MemoryBudgetOpt = Annotated[Optional[str], typer.Option("--memory-budget", metavar="BYTES|FRACTION", help="Read a role into memory when it fits in this many bytes (2G, 500M) or this fraction of available memory (0.5); stream it in shuffled contiguous slices otherwise. The networks the attack trains (weights, optimiser state, a batch's activations) are counted first; the rows get the rest.  [default: 0.5 of MemAvailable]", show_default=False)]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed (splits, initialisation, training).")]


def load_model_from_options(
    model: str,
    weights: str | None,
    num_classes: int | None,
    in_chans: int | None,
    model_arg: list[str] | None,
    trust_checkpoint: bool,
):
    """Build the model named on the command line (lazy import: torch loads only when needed)."""
    from leakaudit.models import ModelSpec

    return ModelSpec(
        model, weights=weights, num_classes=num_classes, in_chans=in_chans,
        args=parse_key_values(model_arg, "--model-arg"), trust_checkpoint=trust_checkpoint,
    ).load()  # fmt: skip
