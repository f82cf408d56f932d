"""``leakaudit demo``: the main job on built-in data, offline.

LeNet-5 is trained on scikit-learn's digits for the public task (parity), audited at its
``conv3`` split (the Scrunch paper's), hardened with Shredder, Scrunch's centre loss and
NoPeek, and each hardened model is audited against the baseline. The numbers land in a
Scrunch-Table-1-style comparison, ``report.html`` and a gate verdict against an example
policy. Everything runs on the CPU from data scikit-learn ships.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from leakaudit.errors import OutputExistsError

Progress = Callable[[str, float, "float | None"], None]

TASKS = {"public": "parity", "private": "label"}
LAYER = "conv3"
# The gate the demo applies to the Scrunch-hardened model (also written to OUTDIR/policy.yaml).
POLICY = {
    "thresholds": {
        "public_accuracy_normalized": {"min": 0.95},
        "private_accuracy_drop": {"min": 0.15},
    }
}
# Rows of the comparison: (label, harden settings or None for the unhardened model).
# Learning rates and budgets are those of benchmarks/RESULTS-recipes.md's digits runs.
RECIPES: list[tuple[str, str, dict[str, Any] | None]] = [
    ("none", "baseline", None),
    ("Shredder", "shredder", {"method": "shredder", "lr": 1e-3}),
    ("Scrunch λ .9", "scrunch", {"method": "center-loss", "lambda": 0.9, "lr": 3e-3, "patience": 10}),
    ("NoPeek α 1", "nopeek", {"method": "nopeek", "alpha": 1.0, "lr": 1e-3, "patience": 10}),
]
DEMO_ATTACK_EPOCHS = 40
DEMO_DECODER_EPOCHS = 15
DEMO_DECODER_WIDTH = 16  # a quarter of the default width's work per step (baseline SSIM p95 0.93 vs 0.95 at width 32)
# (report key, column header, what it is); the headers fit an 80-column terminal.
COLUMNS = [
    ("public_accuracy_normalized", "public\nnorm.", "public accuracy / the unhardened model's"),
    ("private_accuracy_drop", "private\ndrop", "1 − private accuracy of the strongest attacker / on raw X"),
    ("private_accuracy_drop_continuation", "paper's\ndrop", "the same against the paper's attacker (retrained rest of LeNet-5)"),
    ("mi_drop", "MI\ndrop", "1 − I(X;Z) / the unhardened model's"),
    ("ssim_p95", "SSIM\np95", "95th percentile SSIM of the decoder's reconstructions"),
    ("ssim_p95_drop", "SSIM\ndrop", "1 − SSIM p95 / the unhardened model's"),
    ("dcor", "dCor", "distance correlation of X and Z"),
]


@dataclass
class DemoResult:
    output: Path
    rows: list[dict[str, Any]]
    verdict: dict[str, Any]
    report: Path
    html: Path


def run_demo(output: Path, *, force: bool = False, progress: Progress | None = None, epochs: int = 40) -> DemoResult:
    """Run the demo into ``output`` (replaced only when everything succeeded)."""
    from leakaudit._io import atomic_write_text
    from leakaudit.audit import AuditConfig, BaselineSection, ModelSection, run_audit
    from leakaudit.gate import evaluate, parse_policy
    from leakaudit.html_report import render, tsne_embedding
    from leakaudit.models import ModelSpec
    from leakaudit.pipeline import step
    from leakaudit.registry import ATTACKS
    from leakaudit.report import Report, load_report
    from leakaudit.staging import staged
    from leakaudit.train import TrainSettings, train

    output = Path(output)
    if output.exists() and any(output.iterdir()) and not force:
        raise OutputExistsError(f"{str(output)!r} exists and is not empty. Pass --force to replace it.")
    with staged(output) as stage:
        staging = stage.path
        weights = staging / "lenet5.safetensors"
        trained = train(
            TrainSettings(model=ModelSpec("lenet5"), data="digits", output=weights, task=("public", TASKS["public"]), epochs=epochs, lr=3e-3, patience=8),
            progress,
        )
        # Every head and the raw-X references, with the budgets cut to fit a demo (the
        # attack's own defaults, 200 and 100 epochs, are for audits that count).
        attacks = (
            step(ATTACKS, "classifier", {"task": "private", "head": "best", "epochs": DEMO_ATTACK_EPOCHS, "patience": 8}),
            step(ATTACKS, "decoder", {"arch": "upsample", "width": DEMO_DECODER_WIDTH, "epochs": DEMO_DECODER_EPOCHS, "patience": 4}),
        )
        model = ModelSection(spec="lenet5", weights=str(weights), num_classes=trained.num_classes)
        reports: dict[str, dict[str, Any]] = {}
        for _, folder, harden in RECIPES:
            config = AuditConfig(
                model=model,
                layer=LAYER,
                data="digits",
                tasks=dict(TASKS),
                attacks=attacks,
                baseline=None if harden is None else BaselineSection(report=str(staging / "baseline" / "report.json")),
                harden=None if harden is None else {**harden, "epochs": epochs},
                policy=POLICY if folder == "scrunch" else None,
            )
            result = run_audit(config, staging / folder, force=True, progress=progress)
            reports[folder] = load_report(result.report)
        rows = []
        for label, folder, _ in RECIPES:
            metrics = dict(reports[folder]["metrics"])
            if folder == "baseline":
                metrics.setdefault("public_accuracy_normalized", 1.0)
            rows.append({"name": label, **{key: metrics.get(key) for key, *_ in COLUMNS}})
        main = Report.from_dict(reports["scrunch"])
        verdict = evaluate(main.metrics, parse_policy(POLICY)).to_dict()
        main.sections["gate"] = verdict
        main.sections["comparison"] = {
            "columns": [key for key, *_ in COLUMNS],
            "labels": {key: " ".join(header.split()) for key, header, _ in COLUMNS},
            "rows": rows,
        }
        main.sections["demo"] = {"trained": trained.to_dict(), "folders": {label: folder for label, folder, _ in RECIPES}}
        (staging / "policy.yaml").write_text(yaml.safe_dump(POLICY, sort_keys=False))
        embedding = tsne_embedding(main.sections["audit"]["subject_store"], seed=0)
        # Rendered from the staged paths, which exist now (the page embeds the files they name).
        atomic_write_text(staging / "report.html", render(main.to_dict(), verdict=verdict, embedding=embedding))
        main.save(staging / "report.json")
        stage.rebase_records()  # every audit's records name files in this folder
    return DemoResult(output, rows, verdict, output / "report.json", output / "report.html")
