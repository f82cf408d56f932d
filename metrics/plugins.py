"""Metric plugins over an activation store: the registry entries behind `leakaudit metrics`.

Each plugin reads what it needs from the store, calls the pure function of its module
(:mod:`.dcor`, :mod:`.mi`, :mod:`.distance`) and returns a :class:`MetricResult` whose
``values`` use the names each registration declares. Numbers that compare with a baseline
(``mi_drop``, ``public_accuracy_normalized``, ``ssim_p95_drop``) are derived afterwards by
:func:`leakaudit.glossary.derive`, from two results computed with the settings each plugin
declares ``comparable``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

from leakaudit.errors import ConfigError, DataError, StoreError
from leakaudit.registry import METRICS, Needs
from leakaudit.store import ActivationStore

Progress = Callable[[int, int], None]
Rows = Literal["all", "test"]


@dataclass
class MetricResult:
    """One metric's numbers (``values``, DESIGN.md names) and the details behind them."""

    metric: str
    values: dict[str, float | None]
    details: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, **self.values, "details": self.details, "config": self.config}

    def report_metrics(self) -> dict[str, Any]:
        """The values, each with the 95 % interval its details give it (``NAME_ci95``), so a gate can use it."""
        from leakaudit.intervals import interval_name, interval_problem

        out: dict[str, Any] = dict(self.values)
        for name in self.values:
            interval = self.details.get(interval_name(name))
            if interval is not None and interval_problem(interval) is None:
                out[interval_name(name)] = [float(v) for v in interval]
        return out


def _rows(store: ActivationStore, which: str) -> np.ndarray | None:
    if which == "all":
        return None
    if which == "test":
        return store.rows("test")
    raise ConfigError(f"rows: expected 'all' or 'test', got {which!r}.")


def within_budget(store: ActivationStore, rows: np.ndarray, names: tuple[str, ...], seed: int, copies: int,
                  what: str) -> tuple[np.ndarray, dict[str, Any]]:
    """``rows`` when ``copies`` float64 copies of them fit in the memory budget; a seeded subsample that fits otherwise.

    Metrics that need their rows at once call this; the record (for ``details.data_path``)
    says which path ran, the budget, the bytes, the rows kept, the seed and why. A subsample
    estimate is the metric on fewer rows: where the metric has a bootstrap interval it is
    computed over those rows, so it widens with the smaller sample.
    """
    from leakaudit.store.stream import budget_record, float32_bytes, format_bytes, memory_budget

    limit = memory_budget()
    needed = 2 * copies * float32_bytes(store, names, len(rows))  # float64
    recorded, named = budget_record(limit, "memory" if needed <= limit else "subsample")
    record: dict[str, Any] = {"memory_budget": recorded, "role_bytes": needed, "rows_all": int(len(rows))}
    if needed <= limit:
        reason = f"{what} holds {format_bytes(needed)}, within {named}"
        return rows, {"data_path": "memory", **record, "rows": int(len(rows)), "reason": reason}
    keep = max(2, int(len(rows) * limit / needed))
    kept = np.sort(np.random.default_rng(seed).choice(rows, size=min(keep, len(rows)), replace=False))
    reason = (f"{what} would hold {format_bytes(needed)}, more than the memory budget of {format_bytes(limit)}: "
              f"a subsample estimate on {len(kept):,} of {len(rows):,} rows (seed {seed})")
    return kept, {"data_path": "subsample", **record, "rows": int(len(kept)), "seed": seed, "reason": reason}


def _flat(array: np.ndarray) -> np.ndarray:
    return array.reshape(len(array), -1)


def _xz(store: ActivationStore, rows: np.ndarray | None, what: str):
    """X and Z for the chosen rows: h5py datasets for all rows (read block by block), arrays otherwise."""
    if not store.has_inputs:
        raise StoreError(
            f"{what} needs the raw inputs, but {str(store.path)!r} was dumped with --no-inputs. "
            "Dump it again without --no-inputs."
        )
    if rows is None:
        return store.file["inputs"], store.file["activations"]
    return store.inputs(rows), store.activations(rows)


# --------------------------------------------------------------------------- dCor


@dataclass(frozen=True)
class DcorConfig:
    """Settings of the distance-correlation metric."""

    rows: Rows = "all"
    precision: Literal["float64", "float32"] = "float64"
    pvalue: Literal["auto", "t-test", "permutation", "none"] = "auto"
    num_permutations: int = 999
    block_size: int = 1024
    seed: int = 0
    device: str = "cpu"


#: Bytes of float64 one row block of a dCor tile converts (two blocks of X and two of Z are held at once).
TILE_BLOCK_BYTES = 64 << 20


def _tile_rows(store: ActivationStore, block_size: int) -> int:
    """``block_size``, fewer where rows are so wide that a block's float64 copy would exceed :data:`TILE_BLOCK_BYTES`."""
    width = max(math.prod(store.input_shape or (1,)), math.prod(store.layer_shape))
    return max(16, min(block_size, TILE_BLOCK_BYTES // (8 * width)))


@METRICS.register(
    "dcor",
    config=DcorConfig,
    needs=Needs(inputs=True, task=None),
    metrics={
        "dcor": "distance correlation between X and Z (V-statistic, exponent 1, as in NoPeek)",
        "dcor_u2": "bias-corrected squared distance correlation (≈ 0 for independent X and Z)",
        "dcor_pvalue": "p-value of the test of independence of X and Z",
    },
)
def dcor_metric(store: ActivationStore, config: DcorConfig, progress: Progress | None = None) -> MetricResult:
    """Distance correlation of X and Z: dcor (NoPeek's V-statistic), dcor_u2 and a p-value.

    Under ``torchrun`` the exact pass splits its tiles across the ranks (gloo on CPU, nccl
    when ``device`` is CUDA; bare ``cuda`` is ``cuda:LOCAL_RANK``); every rank gets the same
    numbers and ``details.world_size`` records how many computed them.
    """
    from leakaudit import distributed
    from leakaudit.metrics.dcor import distance_correlation_stats
    from leakaudit.runtime import resolve_device

    rows = _rows(store, config.rows)
    if rows is None:  # h5py datasets, read block by block: memory stays at a few blocks whatever the store's size
        record: dict[str, Any] = {"data_path": "stream", "reason": "exact dCor reads X and Z block by block from the store"}
    else:
        rows, record = within_budget(store, rows, ("inputs", "activations"), config.seed, 1, "distance correlation")
    x, z = _xz(store, rows, "distance correlation")
    tile_rows = _tile_rows(store, config.block_size)
    device = resolve_device(config.device)
    group = distributed.current(device)
    stats = distance_correlation_stats(
        x,
        z,
        pvalue=config.pvalue,
        num_permutations=config.num_permutations,
        seed=config.seed,
        block_size=tile_rows,
        device=distributed.rank_device(device, group),
        precision=config.precision,
        progress=progress,
        group=group,
        constant="error",  # in an audit a constant X or Z means a wrong store or a collapsed layer
    )
    return MetricResult(
        "dcor",
        {"dcor": stats.dcor, "dcor_u2": stats.dcor_u2, "dcor_pvalue": stats.pvalue},
        {**asdict(stats), "world_size": 1 if group is None else group.world_size, "tile_rows": tile_rows, "data_path": record},
        asdict(config),
    )


# --------------------------------------------------------------------------- mutual information


@dataclass(frozen=True)
class MiConfig:
    """Settings of the mutual-information metric (see :mod:`leakaudit.metrics.mi` for the estimators)."""

    estimator: Literal["gaussian", "ksg"] = "gaussian"
    dims: int = 32
    k: int = 3
    rows: Rows = "all"
    max_rows: int = 20000
    seed: int = 0

    def __post_init__(self) -> None:
        if self.dims <= 0 or self.k <= 0 or self.max_rows <= 0:
            raise ValueError("dims, k and max_rows must be positive integers.")


@METRICS.register(
    "mi",
    config=MiConfig,
    needs=Needs(inputs=True, task=None),
    metrics={"mi_xz": "estimated I(X; Z) in nats"},
    comparable=("estimator", "dims", "k", "seed"),
)
def mi_metric(store: ActivationStore, config: MiConfig, progress: Progress | None = None) -> MetricResult:
    """Mutual information I(X; Z) in nats on PCA-reduced X and Z (mi_xz)."""
    from leakaudit.metrics.mi import mutual_information_gaussian, mutual_information_ksg

    rows = _rows(store, config.rows)
    if rows is None:
        rows = np.arange(len(store))
    if len(rows) > config.max_rows:
        # A seeded subsample: the same rows for a baseline and a subject of equal length.
        rows = np.sort(np.random.default_rng(config.seed).choice(rows, size=config.max_rows, replace=False))
    rows, record = within_budget(store, rows, ("inputs", "activations"), config.seed, 2, "mutual information")
    x, z = _xz(store, rows, "mutual information")
    x, z = _flat(np.asarray(x)), _flat(np.asarray(z))
    if progress is not None:
        progress(0, 1)
    if config.estimator == "gaussian":
        estimate = mutual_information_gaussian(x, z, dims=config.dims, seed=config.seed)
    else:
        estimate = mutual_information_ksg(x, z, k=config.k, dims=config.dims, seed=config.seed)
    if progress is not None:
        progress(1, 1)
    return MetricResult("mi", {"mi_xz": estimate.value}, {**asdict(estimate), "data_path": record}, asdict(config))


# --------------------------------------------------------------------------- intra-class distance


@dataclass(frozen=True)
class IntraClassConfig:
    """Settings of the intra-class distance (Scrunch Fig. 4)."""

    task: str = "public"
    rows: Rows = "all"


@METRICS.register(
    "intra-class-distance",
    config=IntraClassConfig,
    metrics={
        "intra_class_distance": "mean distance of Z to its public-class centre",
        "intra_class_scatter_ratio": "within-class over total scatter of Z (scale-free: rescaling Z does not change it)",
    },
)
def intra_class_metric(store: ActivationStore, config: IntraClassConfig, progress: Progress | None = None) -> MetricResult:
    """Mean distance of Z to its public-class centre, and that distance relative to Z's spread."""
    from leakaudit.metrics.distance import intra_class_distance_stats

    rows = _rows(store, config.rows)
    rows, record = within_budget(store, np.arange(len(store)) if rows is None else rows, ("activations",), 0, 2,
                                 "the intra-class distance")
    labels = store.labels(config.task)[rows]
    z = store.activations(rows)
    stats = intra_class_distance_stats(z, labels)
    # The raw distance changes with Z's scale; its ratio to the distance from the global
    # centre does not, so it compares models whose activations have different magnitudes.
    flat = _flat(z).astype(np.float64)
    spread = float(np.linalg.norm(flat - flat.mean(0), axis=1).mean())
    details = {"per_class": stats.per_class, "counts": stats.counts, "spread": spread,
               "relative": stats.value / spread if spread > 0 else None,
               "scatter_ratio": stats.scatter_ratio if np.isfinite(stats.scatter_ratio) else None, "task": config.task,
               "data_path": record}  # fmt: skip
    values = {"intra_class_distance": stats.value, "intra_class_scatter_ratio": details["scatter_ratio"]}
    return MetricResult("intra-class-distance", values, details, asdict(config))


# --------------------------------------------------------------------------- public accuracy


@dataclass(frozen=True)
class PublicAccuracyConfig:
    """Settings of the public-task accuracy, read from the stored model outputs."""

    task: str = "public"
    rows: Rows = "test"


def _outputs_are_classes(store: ActivationStore, config: PublicAccuracyConfig) -> str | None:
    """Why the stored outputs are not the task's class scores, or ``None`` when they are."""
    outputs = store.file["outputs"].shape[1:]
    if len(outputs) != 1 or outputs[0] != len(store.class_names(config.task)):
        return f"the model's {outputs[0] if outputs else '?'} outputs are not the classes of task {config.task!r}"
    return None


@METRICS.register(
    "public-accuracy",
    config=PublicAccuracyConfig,
    needs=Needs(outputs=True),
    metrics={"public_accuracy": "public-task accuracy of the model on the test rows"},
    check=_outputs_are_classes,
)
def public_accuracy_metric(store: ActivationStore, config: PublicAccuracyConfig, progress: Progress | None = None) -> MetricResult:
    """Accuracy of the model's own outputs (/outputs) on the public task, on test rows."""
    if not store.has_outputs:
        raise StoreError(
            f"public accuracy needs the model's outputs, but {str(store.path)!r} has none. "
            "Dump it again with --with-outputs."
        )
    rows = _rows(store, config.rows)
    labels = store.labels(config.task)
    outputs = store.read("outputs", rows)
    if rows is not None:
        labels = labels[rows]
    outputs = outputs.reshape(len(outputs), -1)
    classes = len(store.class_names(config.task))
    if outputs.shape[1] != classes:
        raise DataError(
            f"the model has {outputs.shape[1]} outputs but task {config.task!r} has {classes} classes; "
            "public accuracy needs a model trained for that task."
        )
    accuracy = float((outputs.argmax(1) == labels).mean()) if len(labels) else float("nan")
    return MetricResult("public-accuracy", {"public_accuracy": accuracy}, {"rows": int(len(labels))}, asdict(config))
