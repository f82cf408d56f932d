"""``leakaudit audit AUDIT.yaml``: the whole chain from one file.

An audit file names the model, the layer, the data and tasks, the attacks and metrics,
an optional baseline and hardening, and the policy::

    model: lenet5                          # or {spec: ..., weights: ..., num_classes: ...}
    weights: model.safetensors             # shorthand for model.weights
    layer: conv3
    data: digits
    tasks: {public: parity, private: label}
    dump: {batch_size: 256, seed: 0}       # dump settings (optional)
    attacks:                               # optional; default: classifier on `private`, decoder
      - classifier: {task: private, head: best}
      - decoder: {arch: upsample}
    metrics: [dcor, mi, intra-class-distance, public-accuracy]   # or {name: {settings}}
    baseline: {weights: baseline.safetensors}   # or {report: baseline/report.json}
    harden: {method: center-loss, lambda: 0.9}  # optional: harden, then audit the result
    policy: policy.yaml                    # or an inline {thresholds: ...}
    threat: {knows: weights, holds: pairs} # optional: the attackers in scope (default: all)
    seeds: 3                               # optional: train each attack with 3 seeds (default 1)

``threat`` bounds the attackers the audit takes into account (:mod:`leakaudit.threat`): at most
what an attacker ``knows`` of the encoder (``nothing``, ``architecture``, ``weights``) and at
most what it ``holds`` (``none``, ``unpaired``, ``pairs``). Attacks outside it are left out (or
narrowed: the classifier without its continuation head when the attacker knows nothing); the
headline numbers are the strongest in-scope attack's, with the attack named beside them.

A checkpoint that needs unpickling (a pickled module, or weights saved with pickled
objects) is refused unless the audit file allows it with ``model: {spec: ..., trust_checkpoint:
true}``: unpickling runs code from the file.

Relative paths are relative to the audit file. Dumps are cached in ``cache`` (default
``$LEAKAUDIT_CACHE`` or ``~/.cache/leakaudit``), reused only when everything that decides
their content matches and every dataset passes its checksum (see :mod:`leakaudit.dump_cache`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from leakaudit._io import atomic_write_text
from leakaudit.config import from_mapping, load_yaml, positive, seeds_setting
from leakaudit.dump_cache import cache_dir, cached_dump
from leakaudit.errors import ConfigError, UntrustedCheckpointError
from leakaudit.models.spec import ModelSpec
from leakaudit.pipeline import Step, audit_defaults, metric_steps, parse_list, scoped
from leakaudit.registry import ATTACKS, METRICS
from leakaudit.threat import Scope

if TYPE_CHECKING:
    from leakaudit.report import Report

Progress = Callable[[str, float, "float | None"], None]
Warn = Callable[[str], None]

# ----------------------------------------------------------------------------- configuration


#: The audit file's ``model:`` section is a :class:`~leakaudit.models.ModelSpec` as it stands:
#: ``trust_checkpoint: true`` allows unpickling the checkpoint (a pickled module, or weights
#: holding pickled objects), which runs code from the file — set it only for files from a
#: source you trust; it is what ``--trust-checkpoint`` is to the other commands.
ModelSection = ModelSpec


@dataclass(frozen=True)
class DumpSection:
    """How stores are dumped (the options of ``leakaudit dump``)."""

    input_size: tuple[int, int] | None = None
    normalize: str | None = None
    batch_size: int = 256
    dtype: Literal["float32", "float16"] = "float32"
    split: tuple[float, float, float] = (0.4, 0.4, 0.2)
    seed: int = 0
    limit: int | None = None
    device: str = "auto"

    def __post_init__(self) -> None:
        positive("batch_size", self.batch_size)
        if self.limit is not None:
            positive("limit", self.limit)
        if any(f <= 0 for f in self.split) or abs(sum(self.split) - 1.0) > 1e-6:
            raise ValueError(f"split: expected three positive fractions summing to 1, got {list(self.split)}.")


@dataclass(frozen=True)
class BaselineSection:
    """What the subject is compared with: another checkpoint (audited the same way) or a report."""

    model: str | None = None
    weights: str | None = None
    report: str | None = None

    def __post_init__(self) -> None:
        if self.report is not None and (self.model is not None or self.weights is not None):
            raise ValueError("give either report, or model/weights, not both.")
        if self.report is None and self.model is None and self.weights is None:
            raise ValueError("give report, or model and/or weights.")


@dataclass(frozen=True)
class AuditConfig:
    """A parsed, validated audit file."""

    model: ModelSection
    layer: str
    data: str
    tasks: dict[str, str]
    dump: DumpSection = DumpSection()
    attacks: tuple[Step, ...] = ()
    metrics: tuple[Step, ...] | None = None
    baseline: BaselineSection | None = None
    harden: dict[str, Any] | None = None
    policy: Any = None
    cache: str | None = None
    base_dir: Path = Path(".")
    threat: Scope = Scope()
    out_of_scope: dict[str, str] = dataclasses.field(default_factory=dict)
    memory_budget: int | None = None  # bytes; None: leakaudit.store.stream's default
    seeds: int = 1


_TOP_KEYS = ("model", "weights", "layer", "data", "tasks", "dump", "attacks", "metrics", "baseline", "harden", "policy", "cache", "threat", "memory_budget", "seeds")


def _resolve_path(value: str | None, base: Path) -> str | None:
    if value is None:
        return None
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else base / path)


def _resolve_data(spec: str, base: Path) -> str:
    kind, sep, rest = spec.partition(":")
    if sep and kind in ("idx", "folder", "npz", "hdf5", "h5"):
        part = ""
        if kind == "idx" and rest.rsplit(":", 1)[-1] in ("train", "test") and ":" in rest:
            rest, part = rest.rsplit(":", 1)
            part = ":" + part
        return f"{kind}:{_resolve_path(rest, base)}{part}"
    return spec


def _resolve_model_spec(spec: str, base: Path) -> str:
    where, sep, factory = spec.partition(":")
    if sep and where.endswith(".py"):
        return f"{_resolve_path(where, base)}:{factory}"
    if Path(spec).suffix in (".ts", ".pt", ".pth", ".pt2", ".jit"):
        return _resolve_path(spec, base) or spec
    return spec


def parse_audit(data: Any, base_dir: Path, where: str = "audit") -> AuditConfig:
    """Map a parsed audit YAML onto :class:`AuditConfig`; errors carry the YAML path."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping of settings, got {type(data).__name__}.")
    unknown = [k for k in data if k not in _TOP_KEYS]
    if unknown:
        from leakaudit.errors import closest

        near = closest(str(unknown[0]), _TOP_KEYS)
        hint = f" Did you mean {near[0]!r}?" if near else ""
        raise ConfigError(f"{unknown[0]}: unknown key.{hint} Allowed: {', '.join(_TOP_KEYS)}.")
    for key in ("model", "layer", "data", "tasks"):
        if key not in data:
            raise ConfigError(f"{where}: missing required key {key!r}.")
    model_data = data["model"]
    if isinstance(model_data, str):
        model_data = {"spec": model_data}
    model = ModelSpec.from_mapping(model_data, "model")
    if "weights" in data:
        if model.weights is not None:
            raise ConfigError("weights: given twice (also as model.weights).")
        if not isinstance(data["weights"], str):
            raise ConfigError(f"weights: expected a path, got {data['weights']!r}.")
        model = dataclasses.replace(model, weights=data["weights"])
    model = dataclasses.replace(
        model, spec=_resolve_model_spec(model.spec, base_dir), weights=_resolve_path(model.weights, base_dir)
    )
    for key in ("layer", "data"):
        if not isinstance(data[key], str) or not data[key]:
            raise ConfigError(f"{key}: expected a string, got {data[key]!r}.")
    tasks = data["tasks"]
    if not isinstance(tasks, Mapping) or not tasks or not all(isinstance(v, str) for v in tasks.values()):
        raise ConfigError("tasks: expected a mapping of task names to sources, e.g. {public: parity, private: label}.")
    tasks = {
        str(name): (f"map:{_resolve_path(src[4:], base_dir)}" if src.startswith("map:") else src) for name, src in tasks.items()
    }
    dump = from_mapping(DumpSection, data.get("dump"), "dump")
    scope = Scope.parse(data.get("threat"), "threat")
    attacks = _parse_attacks(data.get("attacks"), tasks)
    attacks_in_scope, out_of_scope = scoped(attacks, scope)
    metrics = _parse_metrics(data.get("metrics"))
    baseline = None
    if data.get("baseline") is not None:
        baseline = from_mapping(BaselineSection, data["baseline"], "baseline")
        baseline = BaselineSection(
            _resolve_model_spec(baseline.model, base_dir) if baseline.model else None,
            _resolve_path(baseline.weights, base_dir),
            _resolve_path(baseline.report, base_dir),
        )
    harden = data.get("harden")
    if harden is not None:
        if not isinstance(harden, Mapping) or "method" not in harden:
            raise ConfigError("harden: expected a mapping with a 'method' (see `leakaudit list recipes`).")
        harden = dict(harden)
    policy = data.get("policy")
    if policy is not None:
        from leakaudit.gate import parse_policy

        if isinstance(policy, str):
            policy = _resolve_path(policy, base_dir)
        elif isinstance(policy, Mapping):
            parse_policy(policy, where="policy")
        else:
            raise ConfigError(f"policy: expected a file name or a mapping with thresholds, got {policy!r}.")
    cache = data.get("cache")
    if cache is not None and not isinstance(cache, str):
        raise ConfigError(f"cache: expected a folder name, got {cache!r}.")
    from leakaudit.store.stream import parse_budget

    budget = parse_budget(data["memory_budget"], "memory_budget") if data.get("memory_budget") is not None else None
    return AuditConfig(
        model, data["layer"], _resolve_data(data["data"], base_dir), tasks, dump, tuple(attacks_in_scope), metrics,
        baseline, harden, policy, _resolve_path(cache, base_dir), base_dir, scope, out_of_scope, memory_budget=budget, seeds=seeds_setting(data.get("seeds", 1)),
    )  # fmt: skip


def with_scope(config: AuditConfig, knows: str | None = None, holds: str | None = None) -> AuditConfig:
    """``config`` with its threat scope changed (the CLI's ``--knows`` / ``--holds``), attacks re-scoped."""
    if knows is None and holds is None:
        return config
    scope = Scope.parse({"knows": knows or config.threat.knows, "holds": holds or config.threat.holds}, "threat")
    attacks, left_out = scoped(config.attacks, scope)
    return dataclasses.replace(config, attacks=tuple(attacks), threat=scope, out_of_scope={**config.out_of_scope, **left_out})


def _parse_attacks(items: Any, tasks: Mapping[str, str]) -> tuple[Step, ...]:
    if items is None:
        return tuple(audit_defaults(ATTACKS, list(tasks)))
    return tuple(parse_list(ATTACKS, items, "attacks"))


def _parse_metrics(items: Any) -> tuple[Step, ...] | None:
    """``[name, ...]``, ``[{name: {settings}}, ...]`` or ``{name: {settings}, ...}``; ``None``: all that apply."""
    if items is None:
        return None
    if isinstance(items, Mapping):
        from leakaudit.pipeline import step

        for name, settings in items.items():
            if settings is not None and not isinstance(settings, Mapping):
                raise ConfigError(f"metrics.{name}: expected a mapping of settings, got {settings!r}.")
        return tuple(step(METRICS, str(name), settings, f"metrics.{name}") for name, settings in items.items())
    if not isinstance(items, list):
        raise ConfigError("metrics: expected a list of names or a mapping of names to settings.")
    return tuple(parse_list(METRICS, items, "metrics"))


def load_audit(path: str | Path) -> AuditConfig:
    path = Path(path)
    return parse_audit(load_yaml(path, what="audit file"), path.parent.resolve())


@contextmanager
def _trust_in_audit_terms() -> Iterator[None]:
    """Say how an audit file allows unpickling: the audit command has no --trust-checkpoint."""
    try:
        yield
    except UntrustedCheckpointError as exc:
        message = str(exc)
        cut = message.find("Pass --trust-checkpoint")
        why = message[:cut].rstrip() if cut >= 0 else message
        raise UntrustedCheckpointError(
            f"{why} Set `trust_checkpoint: true` under `model:` in the audit file (model: {{spec: ..., "
            "trust_checkpoint: true}) only if you trust its source, or re-save its state_dict with safetensors."
        ) from None


# ----------------------------------------------------------------------------- running


@dataclass
class AuditResult:
    """Where an audit wrote its outputs, and the gate's verdict (``None`` without a policy)."""

    output: Path
    report: Path
    html: Path
    verdict: dict[str, Any] | None
    reused: dict[str, bool]
    metrics: dict[str, float]


def _dump_kwargs(config: AuditConfig, model: ModelSection, layer: str) -> dict[str, Any]:
    d = config.dump
    return {
        "model": model.spec,
        "weights": model.weights,
        "layer": layer,
        "data": config.data,
        "tasks": tuple(config.tasks.items()),
        "num_classes": model.num_classes,
        "in_chans": model.in_chans,
        "model_args": dict(model.args),
        "trust_checkpoint": model.trust_checkpoint,
        "input_size": tuple(d.input_size) if d.input_size else None,
        "normalize": d.normalize,
        "batch_size": d.batch_size,
        "dtype": d.dtype,
        "split": tuple(d.split),
        "seed": d.seed,
        "limit": d.limit,
        "device": d.device,
        "with_outputs": layer != "output",
        "memory_format": "contiguous",  # cached content must not depend on a timing trial
    }


def audit_store(
    store_path: Path,
    config: AuditConfig,
    artifacts_dir: Path | None,
    progress: Progress | None = None,
    on_warning: Warn | None = None,
) -> Report:
    """Run the configured attacks and metrics on one store: its report, not yet written.

    Artifacts (the decoder's reconstruction grid) go to ``artifacts_dir`` when given.
    ``on_warning`` hears each result's warnings (a head skipped, an accuracy below chance),
    which are also kept in the report.
    """
    from leakaudit import pipeline
    from leakaudit.report import Report, subject_of
    from leakaudit.store import open_store

    with open_store(store_path) as store:
        report = Report(subject_of(store))
        steps = [*config.attacks, *(config.metrics if config.metrics is not None else metric_steps(None, {}))]
        where = (lambda s: pipeline.audit_artifacts(s, artifacts_dir)) if artifacts_dir is not None else None
        report.sections["threat_scope"] = config.threat.to_dict()
        if config.out_of_scope:
            report.sections["out_of_scope"] = dict(config.out_of_scope)
        pipeline.run(store, steps, report, progress=progress, on_warning=on_warning, artifacts=where, seeds=config.seeds)
    return report


def run_audit(
    config: AuditConfig,
    output: Path,
    *,
    force: bool = False,
    progress: Progress | None = None,
    on_warning: Warn | None = None,
) -> AuditResult:
    """Run the audit ``config`` into the folder ``output`` (see the module docstring).

    ``on_warning`` hears of cached dumps that failed their checks and were dumped again, and
    of the attacks' warnings.
    """
    from leakaudit.attacks import classifier_raw
    from leakaudit.errors import OutputExistsError
    from leakaudit.gate import evaluate, load_policy, parse_policy
    from leakaudit.html_report import render, tsne_embedding
    from leakaudit.report import Report, load_report
    from leakaudit.staging import staged

    output = Path(output)
    if output.exists() and any(output.iterdir()) and not force:
        raise OutputExistsError(f"{str(output)!r} exists and is not empty. Pass --force to replace its results.")
    thresholds = None
    if config.policy is not None:
        thresholds = load_policy(config.policy) if isinstance(config.policy, str) else parse_policy(config.policy)
    cache = cache_dir(config.cache)
    reused: dict[str, bool] = {}
    with staged(output) as stage, classifier_raw.cache_folder(cache):
        staging = stage.path
        subject_model = config.model
        subject_layer = config.layer
        harden_record = None
        if config.harden is not None:
            with _trust_in_audit_terms():
                subject_model, subject_layer, harden_record = _harden(config, staging / "hardened", progress)
        on_dump = (lambda done, total: progress("dump", done, total)) if progress else None
        with _trust_in_audit_terms():
            subject_store, reused["subject"] = cached_dump(
                _dump_kwargs(config, subject_model, subject_layer), cache, on_dump, on_warning
            )
        report = audit_store(subject_store, config, staging, progress, on_warning)
        baseline = config.baseline
        if baseline is None and config.harden is not None:
            baseline = BaselineSection(model=config.model.spec, weights=config.model.weights)
        if baseline is not None:
            if baseline.report is not None:
                other = Report.from_dict(load_report(baseline.report))
            else:
                base_model = dataclasses.replace(
                    config.model, spec=baseline.model or config.model.spec, weights=baseline.weights or (None if baseline.model else config.model.weights)
                )
                with _trust_in_audit_terms():
                    base_store, reused["baseline"] = cached_dump(
                        _dump_kwargs(config, base_model, config.layer), cache, on_dump, on_warning
                    )
                (staging / "baseline").mkdir()
                other = audit_store(base_store, config, staging / "baseline", progress, on_warning)
                other.save(staging / "baseline" / "report.json")
            report.set_baseline(other.subject, other.metrics)
        if harden_record is not None:
            report.sections["harden"] = harden_record
            report.carry({k: harden_record.get(k) for k in ("public_accuracy", "public_accuracy_normalized")})
        verdict = None
        if thresholds is not None:
            verdict = evaluate(report.metrics, thresholds).to_dict()
            report.sections["gate"] = verdict
        report.sections["audit"] = {"cache": str(cache), "reused": reused, "subject_store": str(subject_store)}
        embedding = tsne_embedding(subject_store, seed=config.dump.seed)
        # Rendered from the staged paths, which exist now (the page embeds the files they name).
        atomic_write_text(staging / "report.html", render(report.to_dict(), verdict=verdict, embedding=embedding))
        report.save(staging / "report.json")
        stage.rebase_records()  # this report, the baseline's, the hardened model's records
        written = load_report(staging / "report.json")
        if on_warning is not None:
            for check in written.get("checks", []):
                on_warning(check["message"])
    return AuditResult(output, output / "report.json", output / "report.html", verdict, reused, written["metrics"])


def _harden(config: AuditConfig, folder: Path, progress: Progress | None) -> tuple[ModelSection, str, dict[str, Any]]:
    """Harden the configured model; return the hardened model to audit and a summary."""
    from leakaudit.harden import HardenSettings, harden

    assert config.harden is not None  # called only for a config with a harden section
    options = {k: v for k, v in config.harden.items() if k not in ("method", "epochs", "lr", "patience", "batch_size")}
    extra = {k: config.harden[k] for k in ("epochs", "lr", "patience", "batch_size") if k in config.harden}
    d = config.dump
    settings = HardenSettings(
        model=config.model, data=config.data, layer=config.layer, output=folder, method=str(config.harden["method"]),
        tasks=tuple(config.tasks.items()), options=options, input_size=d.input_size or None,
        normalize=d.normalize, split=d.split, limit=d.limit, seed=d.seed, device=d.device, **extra,
    )  # fmt: skip
    result = harden(settings, progress)
    run = result.runs[0]
    files = {k: str(folder / Path(v).name) for k, v in run.files.items()}
    if "noise" in files or "noise.safetensors" in {Path(v).name for v in run.files.values()}:
        # Shredder's noise lives in the exported encoder; audit what the client runs.
        model = ModelSection(spec=str(folder / "encoder.pt2"))
        layer = "output"
    else:
        model = dataclasses.replace(config.model, weights=str(folder / "model.safetensors"))
        layer = config.layer
    summary = {
        "method": result.method,
        "folder": str(folder),
        "config": run.config,
        "public_accuracy": run.public_accuracy,
        "public_accuracy_normalized": run.public_accuracy_normalized,
        "best_epoch": run.best_epoch,
    }
    return model, layer, summary
