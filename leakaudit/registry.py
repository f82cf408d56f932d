"""Plugin registries: one per family (attacks, metrics, recipes).

Built-in plugins register themselves with a decorator when their family package
(``leakaudit.attacks``, ``leakaudit.metrics``, ``leakaudit.recipes``) is imported.
Third-party packages add plugins through the entry-point group ``leakaudit.plugins``:
each entry point names a module (or callable) whose import registers its plugins.
Both are loaded lazily, on the first lookup, so ``leakaudit --help`` stays fast and a
broken third-party plugin is a warning naming its package, never a crash.

The core never looks behind a plugin's name. What it needs to run one is declared here:

* ``config`` — a frozen dataclass of settings (the YAML, ``--set`` and ``--config`` keys);
* ``needs`` — what the store must hold (inputs, outputs, the labels of the task its config
  names, the model it was dumped from, a baseline), checked before the plugin runs;
* ``metrics`` — the report numbers it returns, with their meaning (they join the glossary
  the gate checks policies against);
* ``artifacts`` — the files it can write besides numbers (a PNG, an HDF5), each with a writer;
* ``comparable`` — the settings that must match for its numbers to be compared with a baseline's;
* ``audit_default`` — whether (and with which settings) an audit runs it when the audit file
  lists none;
* ``html`` — its section of the HTML report, rendered from its result's JSON form (optional:
  every plugin's numbers appear in the report's metrics table regardless);
* ``threat`` — for an attack, the attacker it plays (:class:`leakaudit.threat.Threat`: what it
  knows of the encoder and what data it holds), or a function of its config giving it; an audit
  skips attacks outside its threat scope, or first asks ``narrow(config, scope)`` for a config
  within it (``None``: there is none). Its result's JSON form carries the same ``threat``, with
  the rows it held.

An attack or metric is called as ``target(store, config, progress)`` (``baseline=`` too when it
needs one) and returns a result with ``to_dict()`` (its JSON form, whose ``config`` or
``details`` section holds the ``comparable`` settings: a baseline comparison reads them
there), ``report_metrics()`` (names of ``metrics`` → numbers) and optionally ``warnings``
(sentences for the user) and ``render()`` (rich renderables for the terminal).
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from leakaudit.errors import ConfigError, UnknownNameError

ENTRY_POINT_GROUP = "leakaudit.plugins"


@dataclass(frozen=True)
class Needs:
    """What a plugin needs from a store (and beyond it) to run.

    ``task`` names the config field holding the task whose labels it reads (``None``: none).
    ``model``: it rebuilds the model the store was dumped from (from the recorded spec).
    ``baseline``: it is given the baseline store as ``baseline=`` and cannot run without one.
    """

    inputs: bool = False
    outputs: bool = False
    task: str | None = "task"
    model: bool = False
    baseline: bool = False


@dataclass(frozen=True)
class Artifact:
    """A file a plugin's result can be written to: ``write(result, store, path)``."""

    meaning: str
    filename: str
    write: Callable[[Any, Any, Path], Any]
    in_audit: bool = True


@dataclass(frozen=True)
class Plugin:
    """A registered plugin: its name, its callable, its frozen dataclass config and declarations."""

    family: str
    name: str
    target: Callable[..., Any]
    config_cls: type | None
    summary: str
    needs: Needs = Needs()
    metrics: Mapping[str, str] = field(default_factory=dict)
    artifacts: Mapping[str, Artifact] = field(default_factory=dict)
    comparable: tuple[str, ...] = ()
    audit_default: Callable[[Sequence[str]], Mapping[str, Any]] | None = None
    check: Callable[[Any, Any], str | None] | None = None
    html: Callable[[Mapping[str, Any]], str] | None = None
    threat: Any = None
    narrow: Callable[[Any, Any], Any] | None = None

    def threat_for(self, config: Any) -> Any:
        """The :class:`~leakaudit.threat.Threat` this plugin plays with ``config`` (``None`` for metrics)."""
        return self.threat(config) if callable(self.threat) else self.threat

    def configure(self, settings: Mapping[str, Any] | None = None, where: str = "") -> Any:
        """The plugin's config from ``settings`` (unknown keys refused, YAML path in errors)."""
        from leakaudit.config import from_mapping

        if self.config_cls is None:
            if settings:
                raise ConfigError(f"{where or self.name}: {self.family} {self.name!r} takes no settings.")
            return None
        return from_mapping(self.config_cls, dict(settings or {}), where)


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

    def register(
        self,
        name: str,
        *,
        config: type | None = None,
        needs: Needs = Needs(),
        metrics: Mapping[str, str] | None = None,
        artifacts: Mapping[str, Artifact] | None = None,
        comparable: Sequence[str] = (),
        audit_default: Callable[[Sequence[str]], Mapping[str, Any]] | None = None,
        check: Callable[[Any, Any], str | None] | None = None,
        html: Callable[[Mapping[str, Any]], str] | None = None,
        threat: Any = None,
        narrow: Callable[[Any, Any], Any] | None = None,
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator registering ``target`` under ``name`` (kebab-case, as the CLI spells it).

        See the module docstring for what each declaration means.
        """

        def decorator(target: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._plugins:
                existing = self._plugins[name].target
                raise ValueError(
                    f"{self.family} {name!r} is already registered by "
                    f"{existing.__module__}.{existing.__qualname__}"
                )
            doc = (target.__doc__ or "").strip().splitlines()
            self._plugins[name] = Plugin(
                self.family, name, target, config, doc[0] if doc else "", needs, dict(metrics or {}),
                dict(artifacts or {}), tuple(comparable), audit_default, check, html, threat, narrow,
            )  # fmt: skip
            return target

        return decorator

    def _ensure_loaded(self) -> None:
        if self._loaded:
            return
        # Every family's built-ins first: a third-party plugin that reuses a built-in name in
        # another family is then refused (a warning) when it loads, never the built-in after it.
        for registry in FAMILIES.values():
            if not registry._loaded:
                registry._loaded = True
                importlib.import_module(registry._builtin_module)
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
