"""The ``leakaudit`` command line: one module per command, errors converted in one place.

Domain code raises :class:`leakaudit.errors.LeakAuditError`; :class:`_LeakAuditGroup`
turns it into one ``Error: …`` line on stderr and the error's exit code. An ``OSError``
that names a file-system condition (permission denied, disk full, a file where a folder
should be) is an ordinary condition too, reported as :class:`leakaudit.errors.FileSystemError`
would be. Ctrl-C is one line and exit code 130. Any other exception is a bug: one line,
exit code 3, and a request to report it. ``--debug`` prints the traceback before that line
and changes nothing else, the exit code included. Tensors and locals are never printed.

With ``--json -`` (or a ``--json`` flag) a command's JSON is all of its stdout: tables and
"wrote …" lines go to stderr (see :func:`leakaudit.cli._common.console`).
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
import traceback
from typing import Any, NoReturn

import typer
from typer.core import TyperGroup

from leakaudit import __version__
from leakaudit.cli._common import print_error, state
from leakaudit.errors import EXIT_INTERRUPTED, EXIT_RUNTIME, FileSystemError, LeakAuditError

# Each module defines ``register(app)``; the order is the order of `leakaudit --help`.
COMMAND_MODULES = (
    "demo", "audit", "layers", "dump", "scan", "info", "train", "attack", "metrics", "harden", "decorrelate", "gate",
    "report", "list_plugins",
)  # fmt: skip


class _LeakAuditGroup(TyperGroup):
    # The base class is typed with typer's vendored (private) click Context; typer.Context subclasses it.
    def get_command(self, ctx: typer.Context, cmd_name: str) -> Any | None:  # type: ignore[override]
        command = super().get_command(ctx, cmd_name)
        if command is not None:
            _note_json_on_stdout(command)
        return command

    def invoke(self, ctx: typer.Context):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except LeakAuditError as exc:
            _fail(ctx, str(exc), exc.exit_code)
        except BrokenPipeError:
            _stdout_closed(ctx)
        except OSError as exc:
            error = FileSystemError.from_os_error(exc)
            if error is None:
                _fail(ctx, _unexpected(exc), EXIT_RUNTIME)
            _fail(ctx, str(error), error.exit_code)
        except KeyboardInterrupt:
            _fail(ctx, "interrupted.", EXIT_INTERRUPTED)
        except Exception as exc:  # noqa: BLE001 - the one place that turns crashes into a line
            # Usage errors and exits of click (or of the click that Typer vendors) are theirs to show.
            if type(exc).__module__.split(".")[0] in ("click", "typer"):
                raise
            _fail(ctx, _unexpected(exc), EXIT_RUNTIME)

    def list_commands(self, ctx) -> list[str]:
        return list(self.commands)  # keep registration order, not alphabetical


def _fail(ctx: typer.Context, message: str, code: int) -> NoReturn:
    """Print the traceback (with ``--debug``), then the one ``Error:`` line, and exit with ``code``.

    The traceback comes first so that the ``Error:`` line stays the last thing on stderr,
    where a user (and a CI log) looks; ``--debug`` must never change the exit code, which
    scripts and CI act on.
    """
    if state.debug:
        traceback.print_exc(file=sys.stderr)
    print_error(message)
    ctx.exit(code)


def _stdout_closed(ctx: typer.Context) -> NoReturn:
    """The reader of stdout left (``leakaudit list attacks | head -1``): no error, exit quietly.

    Python would otherwise complain again when it flushes stdout at exit, so stdout is
    pointed at the null device first.
    """
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # stdout without a file descriptor (a test runner)
        pass
    ctx.exit(128 + 13 if os.name == "posix" else EXIT_RUNTIME)  # 128 + SIGPIPE, as a shell reports it


def _unexpected(exc: BaseException) -> str:
    return (
        f"unexpected {type(exc).__name__}: {_first_line(exc)}. "
        "Run again with --debug for the traceback, and report it if it is a bug."
    )


def _note_json_on_stdout(command: Any) -> None:
    """Make ``command`` record whether its ``--json`` goes to stdout, before it runs.

    ``--json -`` (an output option) or ``--json`` (a flag) means stdout must be JSON alone,
    so :func:`leakaudit.cli._common.console` sends tables and notes to stderr then. Done
    here, for every command that has ``--json``, rather than in each command.
    """
    names = [p.name for p in command.params if "--json" in getattr(p, "opts", ())]
    callback = command.callback
    if not names or callback is None or getattr(callback, "_notes_json_on_stdout", False):
        return
    name = names[0]

    @functools.wraps(callback)
    def run(*args, **kwargs):
        value = kwargs.get(name)
        state.json_on_stdout = value is True or value == "-"
        return callback(*args, **kwargs)

    run._notes_json_on_stdout = True  # type: ignore[attr-defined]
    command.callback = run


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
    state.json_on_stdout = False


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
    main()
