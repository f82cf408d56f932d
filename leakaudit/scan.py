"""``leakaudit scan``: where should the model be split?

Deeper splits usually leak less and cost the client more compute, while what is sent per
sample goes up and down with depth. A scan answers "which layer" in one run:

1. **Candidates.** The layers given, or ``auto``: the model's block boundaries
   (:func:`block_boundaries`), at most ``max_layers`` of them spread evenly over the depth.
   Candidates are ordered by where the forward pass reaches them, shallowest first.
2. **One pass.** One forward pass over the data writes one store per candidate
   (:func:`leakaudit.dump.dump_many`), each exactly what ``leakaudit dump --layer`` writes.
3. **Per layer.** Cost: bytes sent per sample at the stored dtype; client-side parameters
   (those of the modules the truncated forward calls) and multiply-accumulates, counted by
   ``torch.utils.flop_counter.FlopCounterMode`` on the truncated forward of one sample
   (FLOPs / 2; it counts matrix products and convolutions, not element-wise ops or pooling).
   Leakage: :data:`SCAN_STEPS`, cheap but honest attacks run through the plugin pipeline,
   or with ``full`` the steps an audit runs by default.
4. **Recommendation.** With a policy (the gate's format), the shallowest layer whose numbers
   pass, and why each shallower one fails; a policy naming a number the scan does not compute
   is refused up front, since a missing number would fail every layer.

Outputs, in one folder staged like an audit's: ``stores/LAYER.h5`` and
``stores/LAYER.report.json`` for each layer (ordinary stores and reports: every other command
reads them), ``report.json`` (the recommended layer's numbers as its metrics, the whole scan
in its ``scan`` section) and ``report.html``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from leakaudit.errors import ConfigError, LeakAuditError, OutputExistsError, UsageError
from leakaudit.models.spec import ModelSpec

Progress = Callable[[str, float, "float | None"], None]
Warn = Callable[[str], None]

#: What a scan measures at each layer when not ``full``: (family, plugin, settings), run
#: through the plugin pipeline. Short budgets, but each an attack that is trained to its
#: validation optimum within them; a plugin that is not registered is skipped with a note.
SCAN_STEPS: tuple[tuple[str, str, Mapping[str, Any]], ...] = (
    ("metric", "dcor", {}),
    ("metric", "bayes-risk", {"task": "private"}),
    ("attack", "classifier", {"task": "private", "head": "linear", "epochs": 40, "patience": 8}),
    ("attack", "classifier", {"task": "private", "head": "mlp", "raw_reference": False, "epochs": 40, "patience": 8}),
    ("attack", "decoder", {"arch": "upsample", "epochs": 8, "patience": 3}),
)

#: Numbers of the scan table, in its column order (those a scan computed are shown).
COLUMNS = ("dcor_u2", "dcor_pvalue", "bayes_risk_knn", "private_accuracy_bound", "private_accuracy",
           "private_accuracy_drop", "ssim_p95")  # fmt: skip


@dataclass(frozen=True)
class ScanSettings:
    """Everything that defines a scan; mirrors the options of ``leakaudit scan``."""

    model: ModelSpec
    data: str
    tasks: tuple[tuple[str, str], ...]
    output: Path
    layers: tuple[str, ...] | None = None  # None: auto
    max_layers: int = 6
    policy: Path | None = None
    full: bool = False
    #: Settings that override the steps' own, by plugin: {"classifier": {"epochs": 5}} (``--set classifier.epochs=5``).
    overrides: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    force: bool = False
    input_size: tuple[int, int] | None = None
    normalize: str | None = None
    batch_size: int = 256
    dtype: Literal["float32", "float16"] = "float32"
    split: tuple[float, float, float] = (0.4, 0.4, 0.2)
    seed: int = 0
    limit: int | None = None
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.max_layers <= 0:
            raise ConfigError(f"--max-layers must be positive, got {self.max_layers}.")
        if "private" not in dict(self.tasks):
            raise ConfigError("a scan measures leakage of a private task: give --task private=SOURCE (e.g. private=label).")
        if self.layers is not None and not self.layers:
            raise ConfigError("--layers is empty; give layer names separated by commas, or auto.")


# ----------------------------------------------------------------------------- candidates


def block_boundaries(module: nn.Module, example: torch.Tensor) -> list[str]:
    """The split points a user would consider, shallowest first.

    The rule: the modules a model declares as its feature points (timm's
    ``feature_info[i]["module"]``) where it declares them; otherwise its top-level children
    (or, where there is only one, that child's children) that are called on ``example``,
    output a batched tensor, are not the last (whose output is the model's) and change the
    number of values sent (an activation, reshape or dropout after a block sends what the
    block sends).
    """
    from leakaudit.dump import execution_order

    declared = [info.get("module") for info in getattr(module, "feature_info", None) or () if isinstance(info, Mapping)]
    modules = dict(module.named_modules())
    if declared and all(isinstance(name, str) and name in modules for name in declared):
        return execution_order(module, [str(name) for name in declared], example)
    prefix, children = "", list(module.named_children())
    while len(children) == 1:
        prefix += children[0][0] + "."
        children = list(children[0][1].named_children())
    names = [prefix + name for name, _ in children]
    sizes: dict[str, int] = {}
    handles = []
    for name in names:

        def hook(_m, _i, out, name: str = name) -> None:
            if name not in sizes and isinstance(out, torch.Tensor) and out.dim() > 0 and out.shape[0] == example.shape[0]:
                sizes[name] = out[0].numel()

        handles.append(modules[name].register_forward_hook(hook))
    try:
        from leakaudit.layers import eval_mode

        with torch.inference_mode(), eval_mode(module):
            module(example)
    finally:
        for handle in handles:
            handle.remove()
    ordered = [n for n in execution_order(module, list(sizes), example)]
    candidates: list[str] = []
    for name in ordered[:-1]:
        if not candidates or sizes[name] != sizes[candidates[-1]]:
            candidates.append(name)
    return candidates


def spread(names: Sequence[str], k: int) -> list[str]:
    """At most ``k`` of ``names``, evenly spaced over them, the first and last included."""
    if len(names) <= k:
        return list(names)
    picks = sorted({int(round(i)) for i in np.linspace(0, len(names) - 1, k)})
    return [names[i] for i in picks]


# ----------------------------------------------------------------------------- cost


@dataclass(frozen=True)
class LayerCost:
    """What splitting at a layer costs: bytes sent per sample, client parameters and MACs per sample."""

    shape: tuple[int, ...]
    bytes_per_sample: int
    client_params: int
    client_macs: int


def client_cost(module: nn.Module, layer: str, example: torch.Tensor, dtype: str) -> LayerCost:
    """Count the cost of the client's part up to ``layer`` on one sample of ``example``.

    Parameters: those held directly by the modules the truncated forward calls (each counted
    once, however often it is called). MACs: FLOPs / 2 as ``FlopCounterMode`` counts them in the
    executed graph. Both run the model in eval mode and leave its modes as they were.
    """
    from torch.utils.flop_counter import FlopCounterMode

    from leakaudit.layers import eval_mode, truncate

    one = example[:1]
    called: dict[int, nn.Module] = {}

    def note(m: nn.Module, _inputs: object) -> None:  # returns None: a pre-hook's result would replace the input
        called[id(m)] = m

    handles = [m.register_forward_pre_hook(note) for m in module.modules()]
    try:
        with torch.inference_mode(), eval_mode(module):
            truncation = truncate(module, layer, one)
            called.clear()  # truncate's own check ran the model; count the encoder's pass alone
            with FlopCounterMode(display=False) as counter:
                z = truncation.encoder(one)
    finally:
        for handle in handles:
            handle.remove()
    params = {id(p): p.numel() for m in called.values() for p in m.parameters(recurse=False)}
    shape = tuple(int(s) for s in z.shape[1:])
    return LayerCost(shape, math.prod(shape) * np.dtype(dtype).itemsize, sum(params.values()), counter.get_total_flops() // 2)


# ----------------------------------------------------------------------------- leakage


def scan_steps(
    tasks: Sequence[str], full: bool, overrides: Mapping[str, Mapping[str, Any]] | None = None
) -> tuple[list[Any], list[str]]:
    """The steps run at each layer, and a note for each default step whose plugin is missing.

    ``overrides`` replaces settings of the named plugins (a shorter budget, another device);
    naming a plugin the scan does not run is an error.
    """
    from leakaudit.pipeline import audit_defaults, metric_steps, step
    from leakaudit.registry import ATTACKS, METRICS

    overrides = overrides or {}
    plan: list[tuple[str, str, Mapping[str, Any]]]
    if full:
        chosen = [*audit_defaults(ATTACKS, list(tasks)), *metric_steps(None, {})]
        plan = [(s.plugin.family, s.plugin.name, dataclasses.asdict(s.config) if s.config is not None else {}) for s in chosen]
    else:
        plan = list(SCAN_STEPS)
    steps, notes = [], []
    for family, name, settings in plan:
        registry = METRICS if family == "metric" else ATTACKS
        if name not in registry:
            notes.append(f"{family} {name!r} is not installed; the scan goes on without it.")
            continue
        explicit = not full  # as in an audit: a default that cannot apply to a store is skipped
        steps.append(step(registry, name, {**settings, **overrides.get(name, {})}, f"--set {name}", explicit=explicit))
    unknown = sorted(set(overrides) - {s.plugin.name for s in steps})
    if unknown:
        raise ConfigError(f"--set {unknown[0]}.…: the scan runs no {unknown[0]!r}; it runs {', '.join(sorted({s.plugin.name for s in steps}))}.")
    return steps, notes


def computable(steps: Sequence[Any]) -> set[str]:
    """Every number ``steps`` can put in a layer's report, derived ones included."""
    from leakaudit.glossary import DERIVED

    names = {n for s in steps for n in s.plugin.metrics}
    return names | {d.name for d in DERIVED if d.against == "self" and d.value in names and d.reference in names}


def _val(result: Mapping[str, Any]) -> float:
    """The attacker-validation score by which the strongest of repeated results is chosen."""
    heads = [h for h in result.get("heads", ()) if h.get("name") == result.get("best_head")]
    value = heads[0].get("val_accuracy") if heads else None
    return float(value) if value is not None else -math.inf


def measure_layer(store_path: Path, steps: Sequence[Any], progress: Progress | None, on_warning: Warn | None) -> tuple[Any, dict[str, Any]]:
    """Run ``steps`` on one store: its report, and what each repeated step found.

    A plugin listed twice (two probes of the classifier) runs into a report of its own each
    time; the report keeps the one whose strongest head did best on attacker-validation rows,
    as the classifier attack chooses among its heads, so no test score picks the winner.
    """
    from leakaudit import pipeline
    from leakaudit.report import Report, subject_of
    from leakaudit.store import open_store

    with open_store(store_path) as store:
        report = Report(subject_of(store))
        rounds: list[list[Any]] = []
        for s in steps:
            for r in rounds:
                if all(o.key != s.key for o in r):
                    r.append(s)
                    break
            else:
                rounds.append([s])
        probes: dict[str, Any] = {}
        skipped: dict[str, str] = {}
        for i, group in enumerate(rounds):
            part = report if i == 0 else Report(dict(report.subject))
            outcome = pipeline.run(store, group, part, progress=progress, on_warning=on_warning)
            skipped.update(outcome.skipped)
            for s in group:
                head = getattr(s.config, "head", None)
                if s.key in part.results and head is not None:  # a probe: its accuracy is shown beside the others'
                    probes[f"{s.plugin.name}:{head}"] = part.results[s.key]
            if i == 0:
                continue
            for key, result in part.results.items():
                if _val(result) > _val(report.results[key]):
                    report.results[key] = result
                    report.measure({k: v for k, v in part.measured.items()})
    return report, {"skipped": skipped, "probes": {k: v.get("private_accuracy", v.get("accuracy")) for k, v in probes.items()}}


# ----------------------------------------------------------------------------- the scan


@dataclass
class ScanResult:
    """What a scan wrote and found: the ``scan`` section of its report, and the verdict."""

    output: Path
    report: Path
    html: Path
    section: dict[str, Any]

    @property
    def recommended(self) -> str | None:
        return self.section.get("recommended")

    @property
    def failed(self) -> bool:
        """A policy was given and no candidate passes it (the scan's exit code is then 1)."""
        return self.section.get("policy") is not None and self.recommended is None


def store_name(layer: str) -> str:
    """A layer's store file name (a graph node may hold characters a file name should not)."""
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in layer) + ".h5"


def _candidates(settings: ScanSettings) -> tuple[list[str], list[LayerCost], str]:
    """The candidate layers, shallowest first, their costs, and how they were chosen."""
    from leakaudit.data import open_source, preprocess_for
    from leakaudit.dump import execution_order
    from leakaudit.layers import OUTPUT, eval_mode, forward_failure, resolve_layer

    torch.manual_seed(settings.seed)  # as the dump does: a randomly initialised model is the dump's
    loaded = settings.model.load()
    module = loaded.module
    source = open_source(settings.data)
    prep = preprocess_for(source, model_input_size=loaded.input_size, model_in_chans=loaded.in_chans,
                          input_size=settings.input_size, normalize=settings.normalize)  # fmt: skip
    example = prep.model_input(prep.images(source.read(0, min(2, len(source)))))
    with eval_mode(module):  # the checks below must leave the caller's model as it was
        try:
            if settings.layers is None:
                names = spread(block_boundaries(module, example), settings.max_layers)
                how = f"auto: block boundaries, at most {settings.max_layers} spread over the depth"
                if not names:
                    raise UsageError(
                        "found no block boundary to split at; give the candidates with --layers (see `leakaudit layers MODEL`)."
                    )
            else:
                names = execution_order(module, [resolve_layer(module, n) for n in settings.layers], example)
                how = "given with --layers"
            if OUTPUT in names:
                raise UsageError("'output' is the whole model, not a split point; leave it out of --layers.")
            costs = [client_cost(module, name, example, settings.dtype) for name in names]
        except LeakAuditError:
            raise
        except Exception as exc:
            raise forward_failure(exc, tuple(example.shape[1:]), size_option="--input-size") from None
    return names, costs, how


def check_policy(thresholds: Sequence[Any], steps: Sequence[Any]) -> None:
    """Refuse a policy naming numbers the scan does not compute (every layer would fail on them)."""
    known = computable(steps)
    missing = [t.metric for t in thresholds if t.metric not in known]
    if missing:
        raise ConfigError(
            f"the policy names {', '.join(missing)}, which a scan does not compute "
            f"(it computes {', '.join(sorted(known))}); drop {'them' if len(missing) > 1 else 'it'}, "
            "or gate a layer's own report after `leakaudit audit`."
        )


def run_scan(settings: ScanSettings, *, progress: Progress | None = None, on_warning: Warn | None = None) -> ScanResult:
    """Scan ``settings.layers`` (or the automatic candidates) into ``settings.output`` (see the module docstring)."""
    from leakaudit._io import atomic_write_text
    from leakaudit.dump import DumpSettings, dump_many
    from leakaudit.gate import evaluate, load_policy
    from leakaudit.html_report import render_scan
    from leakaudit.report import Report
    from leakaudit.staging import staged

    output = Path(settings.output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())) and not settings.force:
        raise OutputExistsError(f"{str(output)!r} exists and is not empty. Pass --force to replace its results.")
    steps, notes = scan_steps([n for n, _ in settings.tasks], settings.full, settings.overrides)
    thresholds = load_policy(settings.policy) if settings.policy is not None else None
    if thresholds is not None:
        check_policy(thresholds, steps)
    for note in notes:
        if on_warning is not None:
            on_warning(note)
    layers, costs, how = _candidates(settings)
    dump_settings = DumpSettings(
        model=settings.model, layer=None, data=settings.data, output=output / "unused.h5", tasks=settings.tasks,
        input_size=settings.input_size, normalize=settings.normalize, batch_size=settings.batch_size,
        dtype=settings.dtype, split=settings.split, seed=settings.seed, device=settings.device, limit=settings.limit,
    )  # fmt: skip
    with staged(output) as stage:
        stores = stage.path / "stores"
        stores.mkdir(parents=True)
        on_dump = (lambda done, total: progress(f"dump {len(layers)} layers", done, total)) if progress else None
        paths = [stores / store_name(layer) for layer in layers]
        dumps = dump_many(dump_settings, layers, paths, on_dump)
        rows = []
        for layer, cost, path, report_of_dump in zip(layers, costs, paths, dumps):
            labelled = (lambda label, done, total, layer=layer: progress(f"{layer}: {label}", done, total)) if progress else None
            report, extra = measure_layer(path, steps, labelled, on_warning)
            report.save(path.with_name(path.stem + ".report.json"))
            metrics = report.metrics
            row: dict[str, Any] = {
                "layer": layer,
                "store": str(path),
                "report": str(path.with_name(path.stem + ".report.json")),
                "shape": list(cost.shape),
                "truncation": report_of_dump.truncation,
                "bytes_per_sample": cost.bytes_per_sample,
                "client_params": cost.client_params,
                "client_macs": cost.client_macs,
                "metrics": metrics,
                **extra,
            }
            if thresholds is not None:
                row["gate"] = evaluate(metrics, thresholds).to_dict()
            rows.append(row)
        recommended, why = _recommend(rows) if thresholds is not None else (None, [])
        section = {
            "candidates": how,
            "layers": rows,
            "dtype": settings.dtype,
            "rows": dumps[0].rows,
            "capture": {"seconds": round(dumps[0].seconds, 3), "truncation": dumps[0].truncation},
            "steps": [s.key + (f"[{s.config.head}]" if getattr(s.config, "head", None) else "") for s in steps],
            "full": settings.full,
            "columns": list(COLUMNS),
            "notes": notes,
            "policy": None if thresholds is None else {t.metric: {k: v for k, v in (("min", t.min), ("max", t.max)) if v is not None} for t in thresholds},
            "recommended": recommended,
            "why_not_shallower": why,
            "cost_counting": "client_macs = FLOPs / 2 from torch.utils.flop_counter.FlopCounterMode on one sample's truncated forward",
        }
        chosen = next((r for r in rows if r["layer"] == recommended), None)
        top = Report({
            "model_spec": settings.model.spec, "weights": str(settings.model.weights or ""),
            "layer": recommended, "data_spec": settings.data, "rows": dumps[0].rows, "seed": settings.seed,
            "store": chosen["store"] if chosen else None,
        })  # fmt: skip
        if chosen is not None:
            top.measure(chosen["metrics"])
        top.sections["scan"] = section
        top.save(stage.path / "report.json")
        atomic_write_text(stage.path / "report.html", render_scan(top.to_dict()))
        stage.rebase_records()
        section = stage.rebase(section)
    return ScanResult(output, output / "report.json", output / "report.html", section)


def _recommend(rows: Sequence[Mapping[str, Any]]) -> tuple[str | None, list[str]]:
    """The shallowest layer whose gate passed, and why each shallower layer failed."""
    why: list[str] = []
    for row in rows:
        if row["gate"]["passed"]:
            return row["layer"], why
        failed = [c for c in row["gate"]["checks"] if not c["passed"]]
        reasons = "; ".join(
            f"{c['metric']} {'missing' if c['value'] is None else format(c['value'], '.4g')} ({c['reason']}, needs {c['threshold']})"
            for c in failed
        )
        why.append(f"{row['layer']}: {reasons}")
    return None, why
