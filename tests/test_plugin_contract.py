"""The plugin contract, checked for every registered attack, metric and recipe.

Parametrised over the registries themselves, so a new built-in plugin, or a third-party one
installed through the ``leakaudit.plugins`` entry-point group, is held to the contract
without a test of its own: what the core relies on when it runs a plugin it has never heard
of (:mod:`leakaudit.registry`, :mod:`leakaudit.pipeline`).

* Its config is a frozen dataclass whose defaults survive ``configure(asdict(default))``
  (what a report's ``config`` section and ``--config`` files feed back), and an unknown key
  is refused with a message naming it.
* What it declares holds together: its metric names are in the glossary the gate checks
  policies against, ``needs.task`` and ``comparable`` name settings it has, its artifacts
  have a file name and a writer.
* Attacks and metrics run on a tiny real store, with the settings of :data:`FAST`, and
  return a result whose ``to_dict()`` is JSON (holding the ``comparable`` settings, where a
  baseline comparison reads them) and whose ``report_metrics()`` uses only the names they
  declared.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import re
from pathlib import Path
from typing import Any

import pytest

from leakaudit import pipeline
from leakaudit.errors import ConfigError
from leakaudit.glossary import names
from leakaudit.registry import ATTACKS, METRICS, RECIPES, Plugin

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PLUGINS = [*ATTACKS, *METRICS, *RECIPES]
RUNNABLE = [p for p in PLUGINS if p.family in ("attack", "metric")]


def _id(plugin: Plugin) -> str:
    return f"{plugin.family}:{plugin.name}"


#: Settings that make a plugin cheap on a tiny store, keyed by the config field they set, so that
#: any plugin with such a field gets them. ``head`` and ``arch`` pick one of the built-in
#: attacks' several models (their own tests cover the others).
FAST: dict[str, Any] = {
    "epochs": 1,
    "patience": 1,
    "batch_size": 16,
    "head": "linear",
    "arch": "upsample",
    "width": 8,
    "device": "cpu",
    "pvalue": "none",
    "num_permutations": 9,
    "block_size": 64,
    "dims": 4,
    "k": 3,
}


def _fields(plugin: Plugin) -> set[str]:
    return {f.name for f in dataclasses.fields(plugin.config_cls) if f.init} if plugin.config_cls is not None else set()


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory) -> Path:
    """100 digits rows through random-init LeNet-5 at ``conv3``, with inputs, outputs and provenance.

    The public task is the digit label, so that the model's 10 outputs are the public task's
    classes (``public-accuracy``); the private task is parity.
    """
    from leakaudit.dump import DumpSettings, dump
    from tests.attacks import single_thread
    path = tmp_path_factory.mktemp("contract") / "tiny.h5"
    with single_thread():
        dump(DumpSettings(model="lenet5", layer="conv3", data="digits", output=path, limit=100,
                          tasks=(("public", "label"), ("private", "parity")), with_outputs=True))  # fmt: skip
    return path


# ----------------------------------------------------------------------------- declarations


@pytest.mark.parametrize("plugin", PLUGINS, ids=_id)
def test_config_is_a_frozen_dataclass_whose_defaults_round_trip(plugin):
    if plugin.config_cls is None:
        assert plugin.configure({}) is None
        return
    cls = plugin.config_cls
    assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen, f"{cls.__qualname__} is not a frozen dataclass"
    default = plugin.configure({})
    assert default == cls()
    assert plugin.configure(dataclasses.asdict(default)) == default
    for name in sorted(_fields(plugin))[:1]:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(default, name, None)


@pytest.mark.parametrize("plugin", PLUGINS, ids=_id)
def test_an_unknown_setting_is_refused_by_name(plugin):
    with pytest.raises(ConfigError) as refused:
        plugin.configure({"no_such_setting": 1}, where=f"{plugin.family}s[0].{plugin.name}")
    message = str(refused.value)
    if plugin.config_cls is None:
        assert message == f"{plugin.family}s[0].{plugin.name}: {plugin.family} {plugin.name!r} takes no settings."
        return
    assert message.startswith(f"{plugin.family}s[0].{plugin.name}.no_such_setting: unknown key."), message
    assert message.endswith(f"Allowed: {', '.join(sorted(_fields(plugin)))}."), message


@pytest.mark.parametrize("plugin", PLUGINS, ids=_id)
def test_names_and_summary(plugin):
    assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", plugin.name), f"{plugin.name!r} is not kebab-case as the CLI spells it"
    assert plugin.summary, f"{_id(plugin)} has no one-line summary (the first line of its docstring)"


@pytest.mark.parametrize("plugin", RUNNABLE, ids=_id)
def test_declared_metrics_are_in_the_glossary(plugin):
    glossary = names()
    assert plugin.metrics, f"{_id(plugin)} declares no metrics: its results would never reach a report"
    for metric, meaning in plugin.metrics.items():
        assert re.fullmatch(r"[a-z][a-z0-9_]*", metric), metric
        assert metric in glossary and glossary[metric], metric
        assert isinstance(meaning, str) and meaning.strip(), f"{metric} has no meaning"


@pytest.mark.parametrize("plugin", RUNNABLE, ids=_id)
def test_needs_comparable_and_artifacts_refer_to_what_the_plugin_has(plugin):
    fields = _fields(plugin)
    if plugin.needs.task is not None:
        assert plugin.needs.task in fields, f"needs.task names {plugin.needs.task!r}, which is no setting of {_id(plugin)}"
    assert set(plugin.comparable) <= fields, f"comparable names settings {_id(plugin)} does not have"
    for name, artifact in plugin.artifacts.items():
        assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", name), name
        assert artifact.filename and Path(artifact.filename).name == artifact.filename, artifact.filename
        assert callable(artifact.write) and artifact.meaning.strip()
    if plugin.audit_default is not None:
        for tasks in (["public", "private"], ["only"]):
            plugin.configure(plugin.audit_default(tasks), plugin.name)  # valid settings for any task list


# ----------------------------------------------------------------------------- running


def _fast_config(plugin: Plugin) -> Any:
    fields = _fields(plugin)
    return plugin.configure({key: value for key, value in FAST.items() if key in fields}, plugin.name)


@pytest.mark.parametrize("plugin", RUNNABLE, ids=_id)
def test_runs_on_a_tiny_store_and_returns_what_it_declared(plugin, tiny_store, tmp_path):
    from rich.console import Console

    from leakaudit.report import Report, subject_of
    from leakaudit.store import open_store

    step = pipeline.Step(plugin, _fast_config(plugin))
    with open_store(tiny_store) as store:
        assert pipeline.applies(step, store) is None, "the tiny store should serve every plugin"
        result = pipeline.run_step(step, store, lambda *progress: None, baseline=store)
        for name, artifact in plugin.artifacts.items():
            path = tmp_path / artifact.filename
            pipeline.write_artifacts(step, result, store, {name: path})
            assert path.is_file() and path.stat().st_size > 0, f"artifact {name!r} wrote nothing"
        report = Report(subject_of(store))
        report.add(step.key, result)

    data = result.to_dict()
    assert isinstance(data, dict)
    json.loads(json.dumps(data))  # plain JSON: no arrays, paths or other objects
    # A drop against a baseline is refused when these settings differ; they are read from here.
    recorded = {**(data.get("config") or {}), **(data.get("details") or {})}
    assert set(plugin.comparable) <= set(recorded), f"comparable settings missing from to_dict()['config']: {data.keys()}"
    numbers = result.report_metrics()
    assert numbers and set(numbers) <= set(plugin.metrics), f"undeclared: {sorted(set(numbers) - set(plugin.metrics))}"
    from leakaudit.intervals import interval_problem, is_interval_name

    for metric, value in numbers.items():
        if is_interval_name(metric):  # an interval [lo, hi] of finite numbers
            assert value is None or interval_problem(value) is None, (metric, value)
            continue
        assert value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)), (metric, value)
    recorded = {k for k, v in numbers.items() if v is not None and (is_interval_name(k) or math.isfinite(v))}
    assert recorded <= set(report.metrics)
    warnings = getattr(result, "warnings", None) or []
    assert all(isinstance(w, str) and w for w in warnings)
    render = getattr(result, "render", None)
    if callable(render):
        out = Console(file=io.StringIO(), width=120)
        for item in render():
            out.print(item)
        assert out.file.getvalue().strip()
