"""The error hierarchy of leakaudit.

Domain code raises these; the command line converts them in one place
(:mod:`leakaudit.cli`) into a single ``Error: …`` line on stderr and an exit code.
Messages say what went wrong, why, and how to fix it. They never contain tensors,
array contents or local variables: those may hold private data.

Exit codes (DESIGN.md): 0 success / gate passed, 1 gate failed, 2 usage or
configuration error, 3 runtime failure, 130 interrupted (Ctrl-C). ``--debug`` adds the
traceback before the ``Error:`` line and never changes the exit code.

A file or folder the operating system refuses (:class:`FileSystemError`, and any
``OSError`` that reaches the command line) follows one rule: a path that cannot be used
*as given* — it does not exist, a part of it is a file where a folder is needed, it is a
folder where a file is needed, its name is too long — is a usage error (2): the user fixes
the command line. A usable path the system refuses — permission denied, read-only file
system, disk full or over quota, an I/O error — is a runtime failure (3): the user fixes
the environment, and the same command then works.
"""

from __future__ import annotations

import difflib
import errno
import os
import re
from collections.abc import Iterable

EXIT_OK = 0
EXIT_GATE_FAILED = 1
EXIT_USAGE = 2
EXIT_RUNTIME = 3
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C


class LeakAuditError(Exception):
    """Base class of every error leakaudit reports to a user."""

    exit_code: int = EXIT_RUNTIME


class UsageError(LeakAuditError):
    """The user asked for something that cannot be done as asked (exit code 2)."""

    exit_code = EXIT_USAGE


class ConfigError(UsageError):
    """A configuration value (CLI option, YAML key, policy) is invalid."""


class UnknownNameError(UsageError):
    """A name (model, layer, plugin, task, metric) is not known; lists the closest ones."""

    def __init__(self, kind: str, name: str, known: Iterable[str], *, hint: str = "") -> None:
        self.kind = kind
        self.name = name
        self.known = sorted(set(known))
        message = f"unknown {kind} {name!r}."
        close = closest(name, self.known)
        if close:
            message += " Closest: " + ", ".join(close) + "."
        elif self.known and len(self.known) <= 12:
            message += " Known: " + ", ".join(self.known) + "."
        if hint:
            message += " " + hint
        super().__init__(message)


class DataError(UsageError):
    """A data source or task is missing, empty or malformed."""


class UntrustedCheckpointError(UsageError):
    """A checkpoint needs unpickling, which the user has not allowed."""


class CheckpointError(LeakAuditError):
    """A checkpoint cannot be read or does not fit the architecture (exit code 3)."""


class StoreError(LeakAuditError):
    """An activation store is incomplete, foreign, corrupt or inconsistent (exit code 3)."""


class NonFiniteError(LeakAuditError):
    """NaN or infinite values where finite numbers are required (exit code 3)."""


class OutputExistsError(UsageError):
    """An output path exists and ``--force`` was not given."""


# errno → (exit code, how to fix). Codes outside this table are runtime failures.
_PATH_AS_GIVEN = EXIT_USAGE
_OS_ERRORS: dict[int, tuple[int, str]] = {
    errno.ENOENT: (_PATH_AS_GIVEN, "Check the path."),
    errno.ENOTDIR: (_PATH_AS_GIVEN, "A part of the path is a file where a folder is needed: choose another path."),
    errno.EISDIR: (_PATH_AS_GIVEN, "The path is a folder: give a file path."),
    # What os.makedirs(exist_ok=True) raises when a file stands where a folder is needed.
    errno.EEXIST: (_PATH_AS_GIVEN, "It is in the way of a folder that must be made there: choose another path."),
    errno.ENAMETOOLONG: (_PATH_AS_GIVEN, "Choose a shorter path."),
    errno.ELOOP: (_PATH_AS_GIVEN, "The path has a symbolic-link loop: choose another path."),
    errno.EACCES: (EXIT_RUNTIME, "Check its permissions, or choose another location."),
    errno.EPERM: (EXIT_RUNTIME, "Check its permissions, or choose another location."),
    errno.EROFS: (EXIT_RUNTIME, "Choose a location on a writable file system."),
    errno.ENOSPC: (EXIT_RUNTIME, "Free some space there or choose another location."),
    errno.EDQUOT: (EXIT_RUNTIME, "Free some space there or choose another location."),
    errno.EFBIG: (EXIT_RUNTIME, "Choose a file system that allows larger files."),
    errno.EIO: (EXIT_RUNTIME, "Check the disk or the network file system, then run again."),
}

# h5py raises OSError with the errno set but the path only inside its own message.
_H5PY_NAME = re.compile(r"name = '([^']*)'")


class FileSystemError(LeakAuditError):
    """The operating system refused a file or folder (exit code 2 or 3, see the module docstring).

    Args:
        path: the path the user gave (or the one refused, when that is all that is known).
        exc: the ``OSError`` that the operating system raised.
        action: what was being done ("write", "read", "create"), for the message.
    """

    def __init__(self, path: str | os.PathLike | None, exc: OSError, *, action: str | None = None) -> None:
        code = exc.errno if isinstance(exc.errno, int) else None
        self.errno = code
        unknown = (EXIT_RUNTIME, "Check the path and the file system.")
        self.exit_code, fix = _OS_ERRORS.get(code, unknown) if code is not None else unknown
        reason = os.strerror(code) if code is not None else "the operating system refused it"
        if path is None:
            what = f"file system error{f' on {action}' if action else ''}"
        elif action:
            what = f"cannot {action} {os.fspath(path)!r}"
        else:
            what = repr(os.fspath(path))
        super().__init__(f"{what}: {reason}. {fix}")

    @classmethod
    def from_os_error(cls, exc: OSError) -> FileSystemError | None:
        """The error for an ``OSError`` that names a file-system condition, else ``None``.

        An ``OSError`` without an errno (a library's own failure dressed as one) is not a
        condition of the file system, so it stays an unexpected error.
        """
        if not isinstance(exc.errno, int):
            return None
        path = exc.filename
        if path is None:
            found = _H5PY_NAME.search(str(exc))
            path = found.group(1) if found else None
        return cls(path, exc)


def closest(name: str, candidates: Iterable[str], n: int = 5) -> list[str]:
    """Return up to ``n`` candidates closest to ``name``, best first.

    Combines difflib's ratio with substring matches, so ``layer2.0`` finds
    ``layer2.0.conv1`` even though the ratio alone would rank it low.
    """
    candidates = list(dict.fromkeys(candidates))
    matches = difflib.get_close_matches(name, candidates, n=n, cutoff=0.6)
    if len(matches) < n and name:
        lowered = name.lower()
        for candidate in candidates:
            if candidate not in matches and (lowered in candidate.lower() or candidate.lower() in lowered):
                matches.append(candidate)
                if len(matches) == n:
                    break
    return matches
