"""The privacy–utility table of a hardening sweep, measured with the tool's own commands.

For the unhardened model and every trained value, the model is dumped over the same rows
and roles (:func:`leakaudit.dump.dump`), the private task is attacked with the classifier
attack (every head, the strongest chosen on attacker-validation rows; the ``continuation``
head — the rest of the model, retrained — is the Scrunch paper's own attacker and is
reported beside it), and on the test rows dCor(X, Z) and the intra-class distance of Z
(public classes) are measured with :mod:`leakaudit.metrics`. Optionally the decoder
attack adds the SSIM p95 of reconstructions.

``private_accuracy_drop`` = 1 − private_accuracy / private_accuracy_raw, where the raw
reference (the same task trained on raw X) is trained once, on the unhardened store: every
store has the same inputs, rows and roles.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from leakaudit.dump import DumpSettings, dump
from leakaudit.export import save_weights
from leakaudit.models.spec import ModelSpec
from leakaudit.pipeline import Step, step
from leakaudit.pipeline import run as run_steps
from leakaudit.registry import ATTACKS, METRICS
from leakaudit.report import Report, subject_of
from leakaudit.store import open_store
from leakaudit.training.objective import Progress
from leakaudit.training.prepared import PreparedData

#: The columns of the table, in order: ``label`` and ``private_head``, then report numbers
#: under their glossary names (:mod:`leakaudit.glossary` says what each means).
COLUMNS: tuple[str, ...] = (
    "label", "public_accuracy", "public_accuracy_normalized", "private_accuracy", "private_head",
    "private_accuracy_drop", "private_accuracy_continuation", "private_accuracy_drop_continuation",
    "private_accuracy_raw", "dcor", "intra_class_distance", "intra_class_scatter_ratio", "ssim_p95",
)  # fmt: skip


def privacy_table(
    settings,
    loaded,
    layer: str,
    data: PreparedData,
    private: str,
    initial: Mapping[str, torch.Tensor],
    runs: Sequence,
    stage: Path,
    output: Path,
    baseline_public_accuracy: float,
    progress: Progress | None = None,
) -> list[dict[str, Any]]:
    """Dump, attack and measure the unhardened model and every run (see the module docstring).

    Stores go to ``stage/stores`` (kept with ``settings.keep_stores``, else removed).
    """
    stores = stage / "stores"
    stores.mkdir(exist_ok=True)
    common = dict(
        data=settings.data,
        tasks=tuple(settings.tasks),
        input_size=data.prep.input_size,
        normalize=settings.normalize,
        split=settings.split,
        seed=settings.seed,
        device=settings.device,
        limit=settings.limit,
        force=True,
    )
    trust = settings.model.trust_checkpoint

    def architecture(weights: str) -> ModelSpec:
        """The pre-trained architecture, as loaded, with ``weights``."""
        return ModelSpec.from_options(settings.model.spec, loaded.options, weights=weights, trust_checkpoint=trust)

    weights = settings.model.weights
    if weights is None:  # a randomly initialised model: its weights must be a file to dump it again
        weights = str(stores / "unhardened.safetensors")
        save_weights(dict(initial), Path(weights))
    plans: list[tuple[str, DumpSettings, float]] = [
        ("unhardened", DumpSettings(architecture(weights), layer, output=stores / "unhardened.h5", **common), baseline_public_accuracy)
    ]
    for run in runs:
        folder = stage / run.folder.relative_to(output) if run.folder != output else stage
        name = run.label.replace("=", "-")
        if "noise.safetensors" in run.files:
            # The noise is part of the encoder, not of the architecture's weights.
            encoder = ModelSpec(str(folder / "encoder.pt2"), trust_checkpoint=trust)
            plan = DumpSettings(encoder, "output", output=stores / f"{name}.h5", **common)
        else:
            plan = DumpSettings(architecture(str(folder / "model.safetensors")), layer, output=stores / f"{name}.h5", **common)
        plans.append((run.label, plan, run.public_accuracy))

    rows: list[dict[str, Any]] = []
    raw_accuracy: float | None = None
    for index, (label, plan, public_accuracy) in enumerate(plans):
        if progress is not None:
            progress("evaluate", index, len(plans))
        torch.manual_seed(settings.seed)
        dump(plan)
        with open_store(plan.output) as store:
            report = _measure(store, settings, private, raw_reference=index == 0, progress=progress)
        if index == 0:
            raw_accuracy = report.measured.get("private_accuracy_raw")
        # The raw-X reference is trained once, on the unhardened store: every store has the
        # same inputs, rows and roles. Public accuracy is the one harden evaluated.
        report.measure({"private_accuracy_raw": raw_accuracy, "public_accuracy": public_accuracy})
        report.set_baseline({"store": str(plans[0][1].output)}, {"public_accuracy": baseline_public_accuracy})
        numbers = report.metrics
        row: dict[str, Any] = {key: numbers.get(key) for key in COLUMNS}
        row["label"] = label
        row["private_head"] = report.results["attack:classifier"]["best_head"]
        row["private_chance"] = numbers.get("private_chance")
        row.update({k: v for k, v in numbers.items() if k.startswith("ssim")})
        rows.append(row)
        if index > 0:
            runs[index - 1].privacy = row
    if progress is not None:
        progress("evaluate", len(plans), len(plans))
    if settings.keep_stores:
        for row, (_, plan, _) in zip(rows, plans):
            row["store"] = str(output / "stores" / plan.output.name)
    else:
        shutil.rmtree(stores, ignore_errors=True)
    return [{key: row.get(key) for key in (*COLUMNS, *(k for k in row if k not in COLUMNS))} for row in rows]


def measurement_steps(settings, private: str, *, raw_reference: bool) -> list[Step]:
    """What the table measures on each store, as pipeline steps (the same plugins an audit runs)."""
    common: dict[str, Any] = {"seed": settings.seed, "device": settings.device}
    if settings.attack_epochs is not None:
        common["epochs"] = settings.attack_epochs
    steps = [
        step(ATTACKS, "classifier", {"task": private, "head": "best", "raw_reference": raw_reference, **common}),
        step(METRICS, "dcor", {"rows": "test"}),
        step(METRICS, "intra-class-distance", {"task": "public", "rows": "test"}),
    ]
    if settings.decoder:
        steps.append(step(ATTACKS, "decoder", {"arch": settings.decoder_arch, **common}))
    return steps


def _measure(store, settings, private: str, *, raw_reference: bool, progress: Progress | None) -> Report:
    """The store's report: the classifier attack on ``private``, dCor and intra-class distance on test rows, the decoder optionally."""
    report = Report(subject_of(store))
    run_steps(store, measurement_steps(settings, private, raw_reference=raw_reference), report, progress=progress)
    return report


def retarget_stores(output: Path, table: Sequence[Mapping[str, Any]], stage_name: str) -> None:
    """Point kept stores' recorded model paths from the staging folder ``stage_name`` to ``output``.

    The stores were dumped while the output was still being written (so a failed run
    leaves nothing); see :meth:`leakaudit.staging.Stage.rebase_store`.
    """
    from leakaudit.staging import Stage

    stage = Stage(output, output.with_name(stage_name))
    for row in table:
        if row.get("store"):
            stage.rebase_store(row["store"])


def best_under(table: Sequence[Mapping[str, Any]], floor: float = 0.95) -> Mapping[str, Any] | None:
    """The hardened row with the largest private-accuracy drop among those keeping
    ``public_accuracy_normalized ≥ floor``.
    """
    kept = [
        r for r in table[1:]
        if r.get("public_accuracy_normalized") is not None and r["public_accuracy_normalized"] >= floor
        and r.get("private_accuracy_drop") is not None
    ]
    return max(kept, key=lambda r: r["private_accuracy_drop"]) if kept else None
