"""Mapping YAML/CLI values onto frozen dataclass configs, strictly.

Every plugin has a frozen dataclass config. :func:`from_mapping` builds one from a
mapping (parsed with :func:`load_yaml` or assembled from CLI options), rejecting
unknown keys (listing the allowed ones) and values of the wrong type, with the YAML
path in the message: ``attacks[1].epochs: expected a positive integer, got 'ten'``.

YAML is read with a safe loader that also refuses a key repeated in one mapping: plain
``yaml.safe_load`` keeps the last value silently, so a policy that tightens a threshold and
then loosens it further down would pass on the looser one.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from leakaudit.errors import ConfigError, closest

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A mapping repeats a key; ``line`` and ``first_line`` are 1-based."""

    def __init__(self, key: Any, line: int, first_line: int, mark: yaml.Mark) -> None:
        super().__init__(None, None, f"duplicate key {key!r}", mark)
        self.key, self.line, self.first_line = key, line, first_line


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that raises :class:`DuplicateKeyError` for a key given twice.

    Nested mappings are checked as they are built. Merge keys (``<<: *base``) follow the
    YAML spec: a key written in the mapping overrides the same key merged in, and earlier
    merge sources win over later ones; only keys written twice in one mapping (two ``<<``
    included) are errors.
    """

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._checked: set[int] = set()

    def flatten_mapping(self, node: yaml.MappingNode) -> None:
        # Runs before a mapping's merge keys are expanded, and again for every merge source;
        # a node is checked once, while it still holds only the keys written in it.
        if id(node) not in self._checked:
            self._checked.add(id(node))
            first: dict[Any, int] = {}
            for key_node, _ in node.value:
                key = key_node.value if key_node.tag == "tag:yaml.org,2002:merge" else self.construct_object(key_node, deep=True)
                try:
                    hash(key)
                except TypeError:
                    continue  # an unhashable key is refused by construct_mapping itself
                line = key_node.start_mark.line + 1
                if key in first:
                    raise DuplicateKeyError(key, line, first[key], key_node.start_mark)
                first[key] = line
        super().flatten_mapping(node)


def load_yaml(path: str | Path, what: str = "YAML file") -> Any:
    """Read a YAML (or JSON) file safely; errors name the file and line.

    Raises:
        ConfigError: the file is missing, unreadable, not YAML, or repeats a key in a mapping.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{what} {str(path)!r} does not exist.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {what} {str(path)!r}: {exc}.") from None
    try:
        return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506  # trusted: UniqueKeyLoader is a SafeLoader subclass
    except DuplicateKeyError as exc:
        raise ConfigError(
            f"{path}: duplicate key {exc.key!r} at line {exc.line} (first at line {exc.first_line}). "
            "YAML would silently keep only the last one; remove one of them."
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise ConfigError(f"{what} {str(path)!r} is not valid YAML{where}: {problem}.") from None


def from_mapping(cls: type[T], data: Any, path: str = "") -> T:
    """Build the frozen dataclass ``cls`` from ``data``, checking keys and types.

    Args:
        cls: a dataclass type.
        data: a mapping of field names to values (``None`` means all defaults).
        path: where ``data`` sits in its file, for messages (``attacks[1]``).
    """
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path or 'config'}: expected a mapping of settings, got {_show(data)}.")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for key, value in data.items():
        key_path = f"{path}.{key}" if path else str(key)
        lookup = key.replace("-", "_") if isinstance(key, str) else key
        if lookup not in fields:
            near = closest(str(key), fields)
            suggestion = f" Did you mean {near[0]!r}?" if near else ""
            raise ConfigError(
                f"{key_path}: unknown key.{suggestion} Allowed: {', '.join(sorted(fields))}."
            )
        values[lookup] = coerce(value, hints[lookup], key_path)
    missing = [
        name
        for name, f in fields.items()
        if name not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        where = f"{path}: " if path else ""
        raise ConfigError(f"{where}missing required key {missing[0]!r}.")
    try:
        return cls(**values)
    except (ValueError, TypeError) as exc:  # __post_init__ validation
        prefix = f"{path}: " if path else ""
        raise ConfigError(f"{prefix}{exc}") from None


def coerce(value: Any, annotation: Any, path: str) -> Any:
    """Check ``value`` against ``annotation`` and convert where lossless (int → float, list → tuple)."""
    origin = get_origin(annotation)
    args = get_args(annotation)
    if annotation is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return coerce(value, option, path)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0] if len(errors) == 1 else ConfigError(f"{path}: unexpected value {_show(value)}.")
    if origin is Literal:
        if value in args:
            return value
        choices = ", ".join(repr(a) for a in args)
        raise ConfigError(f"{path}: expected one of {choices}, got {_show(value)}.")
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected true or false, got {_show(value)}.")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected an integer, got {_show(value)}.")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{path}: expected a number, got {_show(value)}.")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{path}: expected a string, got {_show(value)}.")
    if annotation is Path:
        if isinstance(value, str):
            return Path(value)
        raise ConfigError(f"{path}: expected a path, got {_show(value)}.")
    if origin in (tuple, list):
        if isinstance(value, str) and "," in value:
            value = [v.strip() for v in value.split(",")]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {_show(value)}.")
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            item_types = [args[0]] * len(value)
        elif origin is tuple and args:
            if len(args) != len(value):
                raise ConfigError(f"{path}: expected {len(args)} values, got {len(value)}.")
            item_types = list(args)
        else:
            item_types = [args[0] if args else Any] * len(value)
        items = [coerce(v, t, f"{path}[{i}]") for i, (v, t) in enumerate(zip(value, item_types))]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping, got {_show(value)}.")
        key_type, value_type = args if args else (Any, Any)
        return {coerce(k, key_type, path): coerce(v, value_type, f"{path}.{k}") for k, v in value.items()}
    if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
        return from_mapping(annotation, value, path)
    return value


def parse_cli_value(text: str) -> Any:
    """Parse a ``KEY=VALUE`` option's value as YAML scalars are (``3`` → 3, ``true`` → True).

    Raises:
        ConfigError: the value is a YAML mapping that repeats a key.
    """
    try:
        return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506  # trusted: UniqueKeyLoader is a SafeLoader subclass
    except DuplicateKeyError as exc:
        raise ConfigError(f"value {_show(text)} repeats the key {exc.key!r}; give each key once.") from None
    except yaml.YAMLError:
        return text


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def positive(name: str, value: float | int, *, allow_zero: bool = False) -> None:
    """Raise ``ValueError`` unless ``value`` is positive; for dataclass ``__post_init__``."""
    if value < 0 or (value == 0 and not allow_zero):
        kind = "non-negative" if allow_zero else "positive"
        raise ValueError(f"{name}: expected a {kind} number, got {value!r}.")


def seeds_setting(value: Any, path: str = "seeds") -> int:
    """An audit file's ``seeds:`` (training seeds per attack) as a positive integer.

    Raises:
        ConfigError: it is not a positive integer.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{path}: expected a positive integer (training seeds per attack), got {_show(value)}.")
    return value
