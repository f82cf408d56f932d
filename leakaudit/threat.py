"""Threat models: what an attacker knows and holds, and which attackers an audit takes into account.

Every attack declares the attacker it plays, on two ordered axes:

* ``knows`` — what it knows about the client's encoder: ``nothing`` < ``architecture`` (the
  layers, not their weights) < ``weights`` (white-box);
* ``holds`` — the data it holds: ``none`` < ``unpaired`` (auxiliary rows of the same
  distribution, never a row's X together with its Z) < ``pairs`` (leaked (X, Z) or
  (Z, label) pairs).

An attack's *result* carries its :class:`Threat` with how many rows it held and where in the
store's split they came from. An audit's :class:`Scope` bounds both axes (the most an attacker
in scope may know and hold); the report's headline numbers are the strongest in-scope attack's,
with the attack recorded beside each (:mod:`leakaudit.report`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from leakaudit.errors import ConfigError

KNOWS = ("nothing", "architecture", "weights")
HOLDS = ("none", "unpaired", "pairs")


def _check(axis: str, value: str, choices: tuple[str, ...], where: str) -> None:
    if value not in choices:
        raise ConfigError(f"{where}: {axis} must be one of {', '.join(choices)}; got {value!r}.")


@dataclass(frozen=True)
class Threat:
    """The attacker an attack plays: what it ``knows``, what it ``holds``, how many ``rows``, from where."""

    knows: str
    holds: str
    rows: int | None = None
    source: str = ""

    def __post_init__(self) -> None:
        _check("knows", self.knows, KNOWS, "threat")
        _check("holds", self.holds, HOLDS, "threat")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Threat:
        return cls(str(data.get("knows")), str(data.get("holds")), data.get("rows"), str(data.get("source") or ""))

    def label(self) -> str:
        """Short words for tables: ``knows weights · holds none``."""
        return f"knows {self.knows} · holds {self.holds}"


@dataclass(frozen=True)
class Scope:
    """The attackers an audit takes into account: at most ``knows`` and at most ``holds``."""

    knows: str = KNOWS[-1]
    holds: str = HOLDS[-1]

    def __post_init__(self) -> None:
        _check("knows", self.knows, KNOWS, "threat")
        _check("holds", self.holds, HOLDS, "threat")

    @property
    def everything(self) -> bool:
        return self.knows == KNOWS[-1] and self.holds == HOLDS[-1]

    def allows(self, threat: Threat) -> bool:
        return KNOWS.index(threat.knows) <= KNOWS.index(self.knows) and HOLDS.index(threat.holds) <= HOLDS.index(self.holds)

    def why_not(self, threat: Threat) -> str | None:
        """Why an attacker playing ``threat`` is outside this scope; ``None`` when it is inside."""
        if self.allows(threat):
            return None
        return f"its attacker {threat.label()}; the threat scope allows at most: {self.label()}"

    def label(self) -> str:
        return f"knows {self.knows} · holds {self.holds}"

    def to_dict(self) -> dict[str, str]:
        return {"knows": self.knows, "holds": self.holds}

    @classmethod
    def parse(cls, data: Any, where: str = "threat") -> Scope:
        """An audit file's ``threat: {knows: ..., holds: ...}`` (both optional)."""
        if data is None:
            return cls()
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where}: expected a mapping {{knows: {'|'.join(KNOWS)}, holds: {'|'.join(HOLDS)}}}.")
        unknown = [k for k in data if k not in ("knows", "holds")]
        if unknown:
            raise ConfigError(f"{where}.{unknown[0]}: unknown key. Allowed: knows, holds.")
        knows, holds = str(data.get("knows", KNOWS[-1])), str(data.get("holds", HOLDS[-1]))
        _check("knows", knows, KNOWS, where)
        _check("holds", holds, HOLDS, where)
        return cls(knows, holds)


def result_threat(result: Mapping[str, Any]) -> Threat | None:
    """The threat a result's JSON form declares (``None`` for results without one: metrics)."""
    data = result.get("threat")
    if not isinstance(data, Mapping):
        return None
    try:
        return Threat.from_dict(data)
    except ConfigError:
        return None


def leaked_pairs(what: str, train: int, val: int, *, knows: str = "nothing", of: str = "") -> Threat:
    """The attacker of an attack trained on leaked ``what`` pairs: ``train`` attacker-train rows
    to fit, ``val`` attacker-validation rows to choose its model and epoch (``of``: e.g. "1 % of").
    """
    share = f"{of} " if of else ""
    return Threat(
        knows, "pairs", train + val,
        f"{what} pairs: {share}attacker-train ({train:,} rows) to fit, attacker-validation ({val:,} rows) to select",
    )  # fmt: skip
