"""The ``leakaudit`` command line: one module per command, errors converted in one place.

Domain code raises :class:`leakaudit.errors.LeakAuditError`; :class:`_LeakAuditGroup`
turns it into one ``Error: …`` line on stderr and the error's exit code. Any other
exception is a bug or an environment failure: one line too, exit code 3, and the
traceback only with ``--debug``. Tensors and locals are never printed.
"""

from __future__ import annotations

import importlib
import sys

import typer
from typer.core import TyperGroup

from leakaudit import __version__
from leakaudit.cli._common import print_error, state
from leakaudit.errors import EXIT_RUNTIME, LeakAuditError

# Each module defines ``register(app)``; the order is the order of `leakaudit --help`.
COMMAND_MODULES = (
    "demo", "audit", "layers", "dump", "info", "train", "attack", "metrics", "harden", "gate", "report", "list_plugins",
)  # fmt: skip


class _LeakAuditGroup(TyperGroup):
    def invoke(self, ctx):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except LeakAuditError as exc:
            if state.debug:
                raise
            print_error(str(exc))
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            print_error("interrupted.")
            ctx.exit(130)
        except Exception as exc:  # noqa: BLE001 - the one place that turns crashes into a line
            # Usage errors and exits of click (or of the click that Typer vendors) are theirs to show.
            if state.debug or type(exc).__module__.split(".")[0] in ("click", "typer"):
                raise
            print_error(
                f"unexpected {type(exc).__name__}: {_first_line(exc)}. "
                "Run again with --debug for the traceback, and report it if it is a bug."
            )
            ctx.exit(EXIT_RUNTIME)

    def list_commands(self, ctx) -> list[str]:
        return list(self.commands)  # keep registration order, not alphabetical


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0].rstrip(".") if text else "no message"


app = typer.Typer(
    cls=_LeakAuditGroup,
    name="leakaudit",
    help="Audit how much a split neural network leaks through its activations, and harden it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    rich_markup_mode=None,  # plain `Error: …` lines for usage errors too, like ours
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"leakaudit {__version__}")
        raise typer.Exit()


@app.callback()
def _global_options(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only results and errors; no progress bars."),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    state.debug = debug
    state.quiet = quiet


for _name in COMMAND_MODULES:
    importlib.import_module(f"leakaudit.cli.{_name}").register(app)


def main() -> None:
    """Console-script entry point.

    A rank of a ``torchrun`` group leaves without the interpreter's teardown once its command
    is done (see :func:`leakaudit.distributed.exit_without_teardown`): gloo's threads can
    abort the process in it after every output was written, and torchrun then reports the
    whole run as failed.
    """
    try:
        app(prog_name="leakaudit")
    except SystemExit as exc:
        code = exc.code
    else:  # pragma: no cover - typer always ends with SystemExit
        code = 0
    dist = sys.modules.get("torch.distributed")  # never imported by this check: torch is slow to load
    if dist is not None and dist.is_available() and dist.is_initialized():
        from leakaudit.distributed import exit_without_teardown

        exit_without_teardown(code if isinstance(code, int) else (0 if code is None else 1))
    sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
