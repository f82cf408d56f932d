"""Plugin registries: one per family (attacks, metrics, recipes).

Built-in plugins register themselves with a decorator when their family package
(``leakaudit.attacks``, ``leakaudit.metrics``, ``leakaudit.recipes``) is imported.
Third-party packages add plugins through the entry-point group ``leakaudit.plugins``:
each entry point names a module (or callable) whose import registers its plugins.
Both are loaded lazily, on the first lookup, so ``leakaudit --help`` stays fast and a
broken third-party plugin is a warning naming its package, never a crash.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from leakaudit.errors import UnknownNameError

ENTRY_POINT_GROUP = "leakaudit.plugins"


@dataclass(frozen=True)
class Plugin:
    """A registered plugin: its name, its callable and its frozen dataclass config."""

    family: str
    name: str
    target: Callable[..., Any]
    config_cls: type | None
    summary: str


class Registry:
    """A name → plugin mapping that refuses to register a name twice.

    Args:
        family: singular noun used in messages ("attack", "metric", "recipe").
        builtin_module: module whose import registers the built-in plugins.
    """

    def __init__(self, family: str, builtin_module: str) -> None:
        self.family = family
        self._builtin_module = builtin_module
        self._plugins: dict[str, Plugin] = {}
        self._loaded = False

    def register(self, name: str, *, config: type | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator registering ``target`` under ``name`` (kebab-case, as the CLI spells it)."""

        def decorator(target: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._plugins:
                existing = self._plugins[name].target
                raise ValueError(
                    f"{self.family} {name!r} is already registered by "
                    f"{existing.__module__}.{existing.__qualname__}"
                )
            doc = (target.__doc__ or "").strip().splitlines()
            self._plugins[name] = Plugin(self.family, name, target, config, doc[0] if doc else "")
            return target

        return decorator

    def _ensure_loaded(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        importlib.import_module(self._builtin_module)
        _load_entry_points()

    def get(self, name: str) -> Plugin:
        """Return the plugin called ``name``; an unknown name lists the closest ones."""
        self._ensure_loaded()
        try:
            return self._plugins[name]
        except KeyError:
            raise UnknownNameError(
                self.family, name, self._plugins, hint=f"See them all with `leakaudit list {self.family}s`."
            ) from None

    def names(self) -> list[str]:
        self._ensure_loaded()
        return sorted(self._plugins)

    def __iter__(self) -> Iterator[Plugin]:
        self._ensure_loaded()
        return iter([self._plugins[n] for n in sorted(self._plugins)])

    def __contains__(self, name: object) -> bool:
        self._ensure_loaded()
        return name in self._plugins


_entry_points_loaded = False


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for entry_point in metadata.entry_points(group=ENTRY_POINT_GROUP):
        package = entry_point.dist.name if entry_point.dist is not None else entry_point.value
        try:
            loaded = entry_point.load()
            if callable(loaded) and not isinstance(loaded, type):
                loaded()
        except Exception as exc:  # a broken plugin must not take the tool down
            warnings.warn(
                f"leakaudit plugin {entry_point.name!r} from package {package!r} failed to load "
                f"({type(exc).__name__}: {exc}); it is skipped.",
                RuntimeWarning,
                stacklevel=2,
            )


ATTACKS = Registry("attack", "leakaudit.attacks")
METRICS = Registry("metric", "leakaudit.metrics")
RECIPES = Registry("recipe", "leakaudit.recipes")

FAMILIES = {"attacks": ATTACKS, "metrics": METRICS, "recipes": RECIPES}
