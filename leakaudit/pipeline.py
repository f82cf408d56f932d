"""The one path from a store to numbers: plugins run as steps into a :class:`~leakaudit.report.Report`.

``leakaudit attack``, ``leakaudit metrics``, ``leakaudit audit`` (and so the demo) and the
privacy table of ``leakaudit harden --evaluate`` all come here. A :class:`Step` is a
registered plugin with its config; :func:`run` runs steps on an open store, skips those a
store cannot serve (only where the user did not ask for them by name), writes the artifacts
asked for, hears each result's warnings and records it in the report. The core never looks
behind a plugin's name: what a plugin needs, returns and writes is what it declared when it
registered (:mod:`leakaudit.registry`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from leakaudit.errors import ConfigError, DataError, UsageError
from leakaudit.registry import ATTACKS, METRICS, Plugin, Registry
from leakaudit.report import Report, load_report, subject_of
from leakaudit.store import ActivationStore, open_store
from leakaudit.threat import Scope

Progress = Callable[[str, float, "float | None"], None]
Warn = Callable[[str], None]


@dataclass(frozen=True)
class Step:
    """One plugin to run with one config; ``explicit`` when the user named it."""

    plugin: Plugin
    config: Any
    explicit: bool = True

    @property
    def key(self) -> str:
        """Where its result goes in a report: ``attack:NAME`` or ``metric:NAME``."""
        return f"{self.plugin.family}:{self.plugin.name}"


def step(registry: Registry, name: str, settings: Mapping[str, Any] | None = None, where: str = "", *, explicit: bool = True) -> Step:
    """The step running ``name`` of ``registry`` with ``settings`` (validated now; unknown keys refused)."""
    plugin = registry.get(name)
    return Step(plugin, plugin.configure(settings, where or name), explicit)


def parse_list(registry: Registry, items: Any, where: str) -> list[Step]:
    """An audit file's list of plugins: ``NAME``, ``{NAME: {settings}}`` or ``{name: NAME, settings...}``."""
    if not isinstance(items, list):
        raise ConfigError(f"{where}: expected a list of {registry.family} names or {{NAME: {{settings}}}} mappings.")
    steps = []
    for i, item in enumerate(items):
        path = f"{where}[{i}]"
        if isinstance(item, str):
            name, settings = item, {}
        elif isinstance(item, Mapping) and "name" in item:
            name, settings = item["name"], {k: v for k, v in item.items() if k != "name"}
        elif isinstance(item, Mapping) and len(item) == 1:
            name, settings = next(iter(item.items()))
            settings = settings or {}
        else:
            raise ConfigError(f"{path}: expected a {registry.family} name, or {{NAME: {{settings}}}}.")
        if not isinstance(settings, Mapping):
            raise ConfigError(f"{path}.{name}: expected a mapping of settings, got {settings!r}.")
        steps.append(step(registry, str(name), settings, f"{path}.{name}"))
    return steps


def audit_defaults(registry: Registry, tasks: Sequence[str]) -> list[Step]:
    """What an audit runs of ``registry`` when its file lists none: each plugin's ``audit_default``.

    Not ``explicit``: a default the store cannot serve, or outside the audit's threat scope, is
    left out with the reason rather than failing the audit.
    """
    return [
        Step(p, p.configure(p.audit_default(list(tasks)), p.name), explicit=False)
        for p in registry
        if p.audit_default is not None
    ]


def metric_steps(names: Sequence[str] | None, settings: Mapping[str, Mapping[str, Any]]) -> list[Step]:
    """``names`` (every registered metric, not explicit, when ``None``) with their settings."""
    explicit = names is not None
    return [step(METRICS, n, settings.get(n), n, explicit=explicit) for n in (names if names is not None else METRICS.names())]


def parse_settings(items: Sequence[str], registry: Registry | None = None) -> dict[str, Any] | dict[str, dict[str, Any]]:
    """``--set`` options: ``KEY=VALUE`` for one plugin, or ``NAME.KEY=VALUE`` given ``registry``."""
    from leakaudit.config import parse_cli_value

    flat: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if registry is None:
            if not sep or not key:
                raise ConfigError(f"--set expects KEY=VALUE, got {item!r}.")
            flat[key.replace("-", "_")] = parse_cli_value(value)
            continue
        name, dot, option = key.partition(".")
        if not sep or not dot or not option:
            raise ConfigError(f"--set expects {registry.family.upper()}.KEY=VALUE, got {item!r}.")
        registry.get(name)  # unknown names list the closest
        nested.setdefault(name, {})[option.replace("-", "_")] = parse_cli_value(value)
    return flat if registry is None else nested


def applies(step: Step, store: ActivationStore) -> str | None:
    """Why ``step`` cannot run on ``store``, from what its plugin declared; ``None`` if it can."""
    needs = step.plugin.needs
    task = getattr(step.config, needs.task, None) if needs.task else None
    if task is not None and task not in store.tasks:
        return f"the store has no task {task!r}"
    if needs.outputs and not store.has_outputs:
        return "the store has no /outputs (dump with --with-outputs)"
    if needs.inputs and not store.has_inputs:
        return "the store has no /inputs (dumped with --no-inputs)"
    if needs.model and not store.attrs.get("model_spec"):
        return "the store does not record the model it was dumped from"
    if step.plugin.check is not None:
        return step.plugin.check(store, step.config)
    return None


def scoped(steps: Sequence[Step], scope: Scope) -> tuple[list[Step], dict[str, str]]:
    """The ``steps`` an audit with threat ``scope`` runs, and those it leaves out with why.

    An attack whose attacker is outside the scope is narrowed to a config within it where its
    plugin offers one (``narrow``), else left out; one the user named (``explicit``) is an error.
    """
    kept: list[Step] = []
    left_out: dict[str, str] = {}
    for s in steps:
        threat = s.plugin.threat_for(s.config)
        reason = scope.why_not(threat) if threat is not None else None
        if reason is None:
            kept.append(s)
            continue
        narrowed = s.plugin.narrow(s.config, scope) if s.plugin.narrow is not None else None
        if narrowed is not None and scope.allows(s.plugin.threat_for(narrowed)):
            kept.append(Step(s.plugin, narrowed, s.explicit))
        elif s.explicit:
            raise ConfigError(f"{s.plugin.family} {s.plugin.name!r} is outside the threat scope: {reason}. Remove it or widen the scope.")
        else:
            left_out[s.plugin.name] = reason
    return kept, left_out


def run_step(
    step: Step, store: ActivationStore, progress: Progress | None = None, *, baseline: ActivationStore | None = None,
    seeds: int = 1,
) -> Any:  # fmt: skip
    """Run one step and return the plugin's result (attacks get ``progress(label, done, total)``,
    metrics ``progress(done, total)``).

    With ``seeds`` > 1 a step whose config has a ``seed`` setting runs once per seed and its
    result is their :class:`SeededResult`; a step without one runs once.
    """
    check_seeds(seeds)
    if seeds > 1 and has_seed(step):
        return run_seeds(step, store, seeds, progress, baseline=baseline)
    plugin = step.plugin
    if plugin.family == "metric":
        name = plugin.name
        call_progress: Any = (lambda done, total: progress(name, done, total)) if progress else None
    else:
        call_progress = progress
    if plugin.needs.baseline:
        if baseline is None:
            raise UsageError(f"{plugin.family} {plugin.name!r} compares with a baseline; give one (--baseline).")
        return plugin.target(store, step.config, call_progress, baseline=baseline)
    return plugin.target(store, step.config, call_progress)


@dataclass
class Outcome:
    """What :func:`run` did: each step's result by report key, and steps skipped with why."""

    results: dict[str, Any] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


def write_artifacts(step: Step, result: Any, store: ActivationStore, paths: Mapping[str, Path]) -> dict[str, str]:
    """Write ``result``'s artifacts named in ``paths``; return name → path written."""
    written = {}
    for name, path in paths.items():
        artifact = step.plugin.artifacts.get(name)
        if artifact is None:
            raise UsageError(f"{step.plugin.family} {step.plugin.name!r} writes no artifact {name!r}.")
        artifact.write(result, store, Path(path))
        written[name] = str(path)
    return written


def audit_artifacts(step: Step, folder: Path) -> dict[str, Path]:
    """The artifacts an audit writes for ``step`` into ``folder``: those declared ``in_audit``."""
    return {name: folder / a.filename for name, a in step.plugin.artifacts.items() if a.in_audit}


def run(
    store: ActivationStore,
    steps: Sequence[Step],
    report: Report,
    *,
    progress: Progress | None = None,
    on_warning: Warn | None = None,
    artifacts: Callable[[Step], Mapping[str, Path]] | None = None,
    baseline: ActivationStore | None = None,
    extra: Mapping[str, Any] | None = None,
    seeds: int = 1,
) -> Outcome:
    """Run ``steps`` on ``store``, recording each result in ``report`` (which is not written here).

    A step that is not ``explicit`` and cannot run on this store is skipped, with the reason.
    ``artifacts(step)`` names the files to write for each result; their paths are recorded in
    its result (``grid`` → ``results["attack:decoder"]["grid"]``). ``extra`` is recorded in every result.
    ``seeds``: see :func:`run_step`.
    """
    outcome = Outcome()
    for s in steps:
        if not s.explicit:
            reason = applies(s, store)
            if reason is not None:
                outcome.skipped[s.plugin.name] = reason
                continue
        result = run_step(s, store, progress, baseline=baseline, seeds=seeds)
        if on_warning is not None:
            for message in getattr(result, "warnings", None) or ():
                on_warning(f"{Path(store.path).name}, {s.plugin.family} {s.plugin.name}: {message}")
        written = write_artifacts(s, result, store, artifacts(s)) if artifacts is not None else {}
        report.add(s.key, result, **written, **(extra or {}))
        outcome.results[s.key] = result
    return outcome


# ----------------------------------------------------------------------------- training seeds


def check_seeds(seeds: Any, where: str = "--seeds") -> int:
    """``seeds`` if it is a positive integer.

    Raises:
        UsageError: it is not (a bool, a float, zero, negative).
    """
    if isinstance(seeds, bool) or not isinstance(seeds, int):
        raise UsageError(f"{where}: expected a positive integer (training seeds per attack), got {seeds!r}.")
    if seeds < 1:
        raise UsageError(f"{where}: expected a positive integer (training seeds per attack), got {seeds}.")
    return seeds


def has_seed(step: Step) -> bool:
    """Whether ``step`` is an attack whose plugin declares an integer ``seed`` setting (it trains, and can be retrained).

    Metrics run once: their seeds (a subsample, an estimator's) are not an attacker's training.
    """
    import dataclasses

    config = step.config
    if step.plugin.family != "attack" or config is None or not dataclasses.is_dataclass(config):
        return False
    return any(f.name == "seed" for f in dataclasses.fields(config)) and isinstance(getattr(config, "seed", None), int)


def run_seeds(step: Step, store: ActivationStore, seeds: int, progress: Progress | None = None, *,
              baseline: ActivationStore | None = None) -> SeededResult:  # fmt: skip
    """Run ``step`` with seeds s, s+1, …, s+N−1 (s its configured seed), each a full retrain."""
    import dataclasses

    first = int(step.config.seed)
    results = []
    for k in range(seeds):
        seeded = Step(step.plugin, dataclasses.replace(step.config, seed=first + k), step.explicit)
        results.append(run_step(seeded, store, _labelled(progress, f"seed {first + k}"), baseline=baseline))
    return SeededResult([first + k for k in range(seeds)], results)


def _labelled(progress: Progress | None, prefix: str) -> Progress | None:
    if progress is None:
        return None
    call = progress

    def labelled(label: str, done: float, total: float | None) -> None:
        call(f"{prefix}: {label}", done, total)

    return labelled


@dataclass
class SeededResult:
    """One step's results over several training seeds, combined.

    Each number is the mean over seeds. Its ``_ci95`` is :func:`leakaudit.intervals.seed_bootstrap`'s
    (seeds and test rows resampled together) where every seed's result exposes the per-row values
    behind it (``row_statistics()``); a number whose interval cannot be combined that way is
    reported without one (listed under ``no_combined_interval``), never with one seed's interval.
    A drop the report derives from two such numbers (:data:`leakaudit.glossary.DERIVED`, within
    the report) gets the interval of the drop of the two means, from the same resamples.

    Everything that is not a number (the chosen head, the runs, artifacts) is the first seed's —
    the configured seed, so what ``--seeds 1`` shows — and ``per_seed`` lists each seed's numbers
    and choices (its result's text fields: the head or decoder it chose).
    """

    seeds: list[int]
    results: list[Any]

    def __post_init__(self) -> None:
        self._metrics, self._uncombined = _combine(self.results)

    def __getattr__(self, name: str) -> Any:
        # Artifacts and renderers read the configured seed's result (images, reconstructions).
        if name.startswith("_") or name in ("seeds", "results"):
            raise AttributeError(name)
        return getattr(self.results[0], name)

    @property
    def warnings(self) -> list[str]:
        out: list[str] = []
        for seed, result in zip(self.seeds, self.results):
            for message in getattr(result, "warnings", None) or ():
                line = message if len(self.seeds) == 1 else f"seed {seed}: {message}"
                if line not in out:
                    out.append(line)
        return out

    def report_metrics(self) -> dict[str, Any]:
        return dict(self._metrics)

    def per_seed(self) -> list[dict[str, Any]]:
        rows = []
        for seed, result in zip(self.seeds, self.results):
            data = result.to_dict()
            choices = {k: v for k, v in data.items() if isinstance(v, str) and k != "attack"}
            rows.append({"seed": seed, "metrics": result.report_metrics(), **({"choices": choices} if choices else {})})
        return rows

    def to_dict(self) -> dict[str, Any]:
        data = self.results[0].to_dict()
        for name, value in self._metrics.items():
            data[name] = value
        for name in self._uncombined:
            data.pop(name, None)
        threats = [t for t in (r.to_dict().get("threat") for r in self.results) if isinstance(t, Mapping)]
        if threats:
            data["threat"] = _strongest(threats)
        data["seeds"] = len(self.seeds)
        data["seed_values"] = list(self.seeds)
        data["per_seed"] = self.per_seed()
        if self._uncombined:
            data["no_combined_interval"] = sorted(self._uncombined)
        data["warnings"] = self.warnings
        return data

    def render(self) -> list[Any]:
        """The configured seed's view, then the numbers over seeds."""
        from rich.table import Table

        from leakaudit.intervals import format_interval, interval_name, is_interval_name

        first = getattr(self.results[0], "render", None)
        items = list(first()) if callable(first) else []
        table = Table(title=f"over {len(self.seeds)} training seeds ({', '.join(map(str, self.seeds))}): mean, "
                            "95 % interval over seeds and test rows; the tables above are seed "
                            f"{self.seeds[0]}'s")  # fmt: skip
        for column in ("metric", "mean", "95 % interval", *(f"seed {s}" for s in self.seeds)):
            table.add_column(column)
        per_seed = [r.report_metrics() for r in self.results]
        for name, value in self._metrics.items():
            if is_interval_name(name) or not isinstance(value, (int, float)):
                continue
            cells = [f"{m[name]:.4g}" if isinstance(m.get(name), (int, float)) else "—" for m in per_seed]
            table.add_row(name, f"{value:.4g}", format_interval(self._metrics.get(interval_name(name)), ".4g"), *cells)
        return [*items, table]


def _strongest(threats: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The threat of the most capable attacker among the seeds': the mean mixes them all."""
    from leakaudit.threat import HOLDS, KNOWS

    def rank(t: Any) -> tuple[int, int]:
        return (KNOWS.index(t["knows"]) if t.get("knows") in KNOWS else -1, HOLDS.index(t["holds"]) if t.get("holds") in HOLDS else -1)

    return dict(max(threats, key=rank))


def _combine(results: Sequence[Any]) -> tuple[dict[str, Any], set[str]]:
    """The numbers over seeds (means, combined intervals) and the intervals that could not be combined."""
    from leakaudit.glossary import DERIVED
    from leakaudit.intervals import interval_name, is_interval_name, seed_bootstrap

    numbers = [r.report_metrics() for r in results]
    rows = [dict(r.row_statistics()) if callable(getattr(r, "row_statistics", None)) else {} for r in results]
    combined: dict[str, Any] = {}
    for name in numbers[0]:
        if is_interval_name(name):
            continue
        values = [n.get(name) for n in numbers]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            continue  # a number some seed did not report (a head it skipped) is not averaged
        combined[name] = float(sum(values) / len(values))
        if all(name in r for r in rows):
            combined[interval_name(name)] = seed_bootstrap([[r[name]] for r in rows])
    for d in DERIVED:
        wanted = interval_name(d.name)
        if d.against != "self" or wanted not in numbers[0]:
            continue
        if all(d.value in r and d.reference in r for r in rows):

            def derived(means: Any, kind: str = d.kind) -> Any:
                ratio = means[:, 0] / means[:, 1]
                return ratio if kind == "ratio" else 1.0 - ratio

            combined[wanted] = seed_bootstrap([[r[d.value], r[d.reference]] for r in rows], derived)
    kept = {k: v for k, v in combined.items() if v is not None}
    # Every interval one seed reported that the combination does not give is left out, not kept from one seed.
    uncombined = {k for k in numbers[0] if is_interval_name(k) and k not in kept}
    return kept, uncombined


# ----------------------------------------------------------------------------- baselines


def check_same_rows(subject: ActivationStore, baseline: ActivationStore) -> None:
    """A drop is only meaningful on the same rows of the same data: refuse anything else."""
    a, b = subject.attrs, baseline.attrs
    if a.get("data_spec") != b.get("data_spec"):
        raise DataError(
            f"the baseline was dumped from data {b.get('data_spec')!r}, the subject from {a.get('data_spec')!r}; "
            "a drop is only meaningful on the same rows. Dump both from the same data."
        )
    if len(subject) != len(baseline):
        raise DataError(
            f"the baseline has {len(baseline):,} rows and the subject {len(subject):,}; "
            "a drop is only meaningful on the same rows. Dump both with the same --limit."
        )
    import numpy as np

    if not np.array_equal(subject.file["index"][()], baseline.file["index"][()]):
        raise DataError("the baseline and the subject hold different rows of the data; dump both the same way.")
    if subject.has_inputs and baseline.has_inputs and subject.input_shape != baseline.input_shape:
        raise DataError(
            f"the baseline's inputs are {baseline.input_shape} and the subject's {subject.input_shape}; "
            "a drop is only meaningful on the same inputs."
        )


def baseline_report(subject: ActivationStore, baseline: str | Path, steps: Sequence[Step], progress: Progress | None = None) -> Report:
    """The baseline's numbers as a report: computed on a baseline store with the same ``steps``,
    or read from a baseline report about the same rows.
    """
    path = Path(baseline)
    if path.suffix == ".json":
        other = Report.from_dict(load_report(path))
        info = other.subject
        if info.get("data_spec") != subject.attrs.get("data_spec") or info.get("rows") != len(subject):
            raise DataError(
                f"the baseline report is about {info.get('rows')} rows of {info.get('data_spec')!r}, the subject has "
                f"{len(subject):,} rows of {subject.attrs.get('data_spec')!r}; a drop is only meaningful on the same rows."
            )
        return other
    with open_store(path) as store:
        check_same_rows(subject, store)
        report = Report(subject_of(store))
        labelled = (lambda label, done, total: progress(f"baseline {label}", done, total)) if progress else None
        run(store, steps, report, progress=labelled)
        return report


def check_comparable(subject: Report, baseline: Report) -> None:
    """Numbers measured with different settings are not comparable: refuse a drop between them.

    Each plugin declares the settings that must match (``comparable``); a result on both sides
    whose settings differ there is refused.
    """
    from leakaudit.glossary import DERIVED

    for key, mine in subject.results.items():
        theirs = baseline.results.get(key)
        family, _, name = key.partition(":")
        registry = ATTACKS if family == "attack" else METRICS
        if theirs is None or family not in ("attack", "metric") or name not in registry:
            continue
        plugin = registry.get(name)
        if not plugin.comparable:
            continue
        a = {k: _setting(mine, k) for k in plugin.comparable}
        b = {k: _setting(theirs, k) for k in plugin.comparable}
        if a != b:
            drops = [d.name for d in DERIVED if d.against == "baseline" and d.value in plugin.metrics]
            raise ConfigError(
                f"{plugin.name} of subject {a} and baseline {b} used different settings; "
                f"{', '.join(drops) or 'a comparison'} needs the same."
            )


def _setting(result: Mapping[str, Any], key: str) -> Any:
    for section in ("details", "config"):
        value = (result.get(section) or {}).get(key)
        if value is not None:
            return value
    return None
