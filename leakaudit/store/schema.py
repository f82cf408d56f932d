"""Names and paths of the store's layout, shared by its writer, locks and reader."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from leakaudit import roles

SCHEMA = "leakaudit.activations"
SCHEMA_VERSION = 1
ROLES = roles.ROLES
ROLE_CODES = roles.ROLE_CODES


def partial_path(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def journal_path(path: Path) -> Path:
    return path.with_name(path.name + ".partial.json")


def lock_path(path: Path) -> Path:
    return path.with_name(path.name + ".partial.lock")


def _json_attr(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)

