"""The error hierarchy of leakaudit.

Domain code raises these; the command line converts them in one place
(:mod:`leakaudit.cli`) into a single ``Error: …`` line on stderr and an exit code.
Messages say what went wrong, why, and how to fix it. They never contain tensors,
array contents or local variables: those may hold private data.

Exit codes (DESIGN.md): 0 success / gate passed, 1 gate failed, 2 usage or
configuration error, 3 runtime failure.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

EXIT_OK = 0
EXIT_GATE_FAILED = 1
EXIT_USAGE = 2
EXIT_RUNTIME = 3


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
