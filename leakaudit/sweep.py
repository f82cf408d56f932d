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

from leakaudit.config import from_mapping
from leakaudit.dump import DumpSettings, dump
from leakaudit.registry import ATTACKS
from leakaudit.store import open_store

from leakaudit.metrics.distance import intra_class_distance_stats
from leakaudit.training.objective import Progress
from leakaudit.training.prepared import PreparedData
from leakaudit.export import save_weights

#: dCor on at most this many test rows (the exact pass is O(n²·d)).
DCOR_MAX_ROWS = 4_000

#: The columns of the table, in order, with what they mean.
COLUMNS: dict[str, str] = {
    "label": "what was trained (unhardened = the pre-trained model)",
    "public_accuracy": "public-task accuracy on the test rows",
    "public_accuracy_normalized": "public_accuracy / the unhardened model's",
    "private_accuracy": "test accuracy of the strongest classifier retrained on Z (chosen on validation)",
    "private_head": "which head that was",
    "private_accuracy_drop": "1 − private_accuracy / private_accuracy_raw",
    "private_accuracy_continuation": "test accuracy of the paper's attacker: the rest of the model, retrained",
    "private_accuracy_drop_continuation": "1 − private_accuracy_continuation / private_accuracy_raw",
    "private_accuracy_raw": "the private task trained on raw X (the drop's reference)",
    "dcor": "dCor(X, Z) on test rows (V-statistic, exponent 1)",
    "intra_class_distance": "mean distance of test Z to its public-class centre",
    "intra_class_scatter_ratio": "within-class over total scatter of test Z (scale-free: rescaling Z does not change it)",
    "ssim_p95": "95th-percentile SSIM of the strongest decoder (with decoder evaluation)",
}


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
    options = dict(loaded.options)
    common = dict(
        data=settings.data,
        tasks=tuple(settings.tasks),
        input_size=data.prep.input_size,
        normalize=settings.normalize,
        split=settings.split,
        seed=settings.seed,
        device=settings.device,
        limit=settings.limit,
        trust_checkpoint=settings.trust_checkpoint,
        force=True,
    )
    arch = dict(
        model=settings.model,
        layer=layer,
        num_classes=options.pop("num_classes", None),
        in_chans=options.pop("in_chans", None),
        model_args=options,
    )
    weights = settings.weights
    if weights is None:  # a randomly initialised model: its weights must be a file to dump it again
        weights = str(stores / "unhardened.safetensors")
        save_weights(dict(initial), Path(weights))
    plans: list[tuple[str, DumpSettings, float]] = [
        ("unhardened", DumpSettings(output=stores / "unhardened.h5", weights=weights, **arch, **common), baseline_public_accuracy)
    ]
    for run in runs:
        folder = stage / run.folder.relative_to(output) if run.folder != output else stage
        name = run.label.replace("=", "-")
        if "noise.safetensors" in run.files:
            # The noise is part of the encoder, not of the architecture's weights.
            plan = DumpSettings(model=str(folder / "encoder.pt2"), layer="output", output=stores / f"{name}.h5", **common)
        else:
            plan = DumpSettings(output=stores / f"{name}.h5", weights=str(folder / "model.safetensors"), **arch, **common)
        plans.append((run.label, plan, run.public_accuracy))

    rows: list[dict[str, Any]] = []
    raw_accuracy: float | None = None
    for index, (label, plan, public_accuracy) in enumerate(plans):
        if progress is not None:
            progress("evaluate", index, len(plans))
        torch.manual_seed(settings.seed)
        dump(plan)
        with open_store(plan.output) as store:
            row = _measure(store, settings, private, raw_reference=index == 0, progress=progress)
        if index == 0:
            raw_accuracy = row.pop("private_accuracy_raw", None)
        else:
            row.pop("private_accuracy_raw", None)
        row = {
            "label": label,
            "public_accuracy": public_accuracy,
            "public_accuracy_normalized": public_accuracy / baseline_public_accuracy if baseline_public_accuracy else None,
            **row,
            "private_accuracy_raw": raw_accuracy,
        }
        for key, source in (("private_accuracy_drop", "private_accuracy"),
                            ("private_accuracy_drop_continuation", "private_accuracy_continuation")):
            value = row.get(source)
            row[key] = 1.0 - value / raw_accuracy if value is not None and raw_accuracy else None
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


def _measure(store, settings, private: str, *, raw_reference: bool, progress: Progress | None) -> dict[str, Any]:
    """Classifier attack on ``private``; dCor and intra-class distance on test rows; decoder optionally."""
    plugin = ATTACKS.get("classifier")
    values: dict[str, Any] = {"task": private, "head": "best", "raw_reference": raw_reference,
                              "seed": settings.seed, "device": settings.device}
    if settings.attack_epochs is not None:
        values["epochs"] = settings.attack_epochs
    result = plugin.target(store, from_mapping(plugin.config_cls, values), progress)
    continuation = next((h for h in result.heads if h.name == "continuation" and h.ok), None)
    row: dict[str, Any] = {
        "private_accuracy": result.accuracy,
        "private_head": result.best_head,
        "private_accuracy_continuation": continuation.accuracy if continuation is not None else None,
        "private_accuracy_raw": result.private_accuracy_raw,
        "private_chance": result.chance,
    }
    test = store.rows("test")
    x = store.inputs(test[:DCOR_MAX_ROWS])
    z = store.activations(test)
    from leakaudit.metrics.dcor import distance_correlation

    row["dcor"] = distance_correlation(x, z[:DCOR_MAX_ROWS])
    public = torch.from_numpy(store.labels("public")[test])
    stats = intra_class_distance_stats(z.reshape(len(z), -1), public)
    row["intra_class_distance"] = stats.value
    row["intra_class_scatter_ratio"] = stats.scatter_ratio
    if settings.decoder:
        decoder = ATTACKS.get("decoder")
        dvalues: dict[str, Any] = {"arch": settings.decoder_arch, "seed": settings.seed, "device": settings.device}
        if settings.attack_epochs is not None:
            dvalues["epochs"] = settings.attack_epochs
        decoded = decoder.target(store, from_mapping(decoder.config_cls, dvalues), progress)
        row.update({k: v for k, v in decoded.report_metrics().items() if k.startswith("ssim")})
    return row


def retarget_stores(output: Path, table: Sequence[Mapping[str, Any]], stage_name: str) -> None:
    """Point kept stores' recorded weights from the staging folder to the final one.

    The stores were dumped while the output was still being written (so a failed run
    leaves nothing); the continuation attack rebuilds the model from the recorded path.
    """
    import h5py

    from leakaudit.store import seal_attributes

    for row in table:
        path = row.get("store")
        if not path:
            continue
        with h5py.File(path, "r+") as handle:
            weights = handle.attrs.get("weights")
            if isinstance(weights, bytes):
                weights = weights.decode()
            if weights and stage_name in str(weights):
                handle.attrs["weights"] = str(weights).replace(stage_name, output.name)
            model_spec = handle.attrs.get("model_spec")
            if isinstance(model_spec, bytes):
                model_spec = model_spec.decode()
            if model_spec and stage_name in str(model_spec):
                handle.attrs["model_spec"] = str(model_spec).replace(stage_name, output.name)
            seal_attributes(handle)  # the attributes' checksum must cover the new paths


def best_under(table: Sequence[Mapping[str, Any]], floor: float = 0.95) -> Mapping[str, Any] | None:
    """The hardened row with the largest private-accuracy drop among those keeping
    ``public_accuracy_normalized ≥ floor``."""
    kept = [
        r for r in table[1:]
        if r.get("public_accuracy_normalized") is not None and r["public_accuracy_normalized"] >= floor
        and r.get("private_accuracy_drop") is not None
    ]
    return max(kept, key=lambda r: r["private_accuracy_drop"]) if kept else None
