"""`leakaudit demo` end to end: the main job `make demo` runs, on built-in data, offline."""

from __future__ import annotations

import json

from leakaudit.errors import EXIT_USAGE
from tests.conftest import error_line


def test_demo_trains_hardens_audits_and_compares(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("LEAKAUDIT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo-out"
    result = cli("demo", "-o", out)
    assert result.exit_code == 0, result.stderr
    for name in ("none", "Shredder", "Scrunch λ .9", "NoPeek α 1"):
        assert f"│ {name}" in result.stdout
    assert "gate on the Scrunch model" in result.stdout and "passed" in result.stdout
    assert not list(tmp_path.glob(".demo-out.tmp-*"))  # the staging folder became the output

    report = json.loads((out / "report.json").read_text())
    rows = {row["name"]: row for row in report["comparison"]["rows"]}
    none, scrunch, nopeek = rows["none"], rows["Scrunch λ .9"], rows["NoPeek α 1"]
    assert none["public_accuracy_normalized"] == 1.0
    # Every recipe keeps the public task and hides more of the private one than no hardening.
    for row in (rows["Shredder"], scrunch, nopeek):
        assert row["public_accuracy_normalized"] >= 0.95
        assert row["private_accuracy_drop"] > none["private_accuracy_drop"] + 0.05
    assert scrunch["private_accuracy_drop"] >= 0.15  # the policy the demo gates on
    assert nopeek["dcor"] < none["dcor"] - 0.1  # NoPeek's purpose: dCor(X, Z) cut
    assert report["gate"]["passed"] is True
    html = (out / "report.html").read_text()
    assert "Scrunch λ .9" in html and "data:image/png;base64," in html
    # Recorded paths point at the final folder, never at the staging one: reports and the
    # hardened models' records alike.
    records = sorted(out.rglob("*.json"))
    assert any(p.name == "harden.json" for p in records) and any(p.name == "model.json" for p in records)
    for record in records:
        assert ".tmp-" not in record.read_text(), record
    # Every audit's page shows its decoder's scores (once read from a key runs do not have) and its grid.
    for folder in ("baseline", "shredder", "scrunch", "nopeek"):
        page = (out / folder / "report.html").read_text()
        assert "data:image/png;base64," in page
        recon = page[page.index("Reconstruction attack"):]
        assert "<td>upsample</td><td class=\"num\"><span>0." in recon  # the value, its interval beside it
    # Every number of the comparison can be gated by the name it is shown under.
    from leakaudit.glossary import names

    assert set(report["comparison"]["columns"]) <= set(names())
    assert report["metrics"]["private_accuracy_drop_continuation"] == rows["Scrunch λ .9"]["private_accuracy_drop_continuation"]
    assert (out / "policy.yaml").read_text().startswith("thresholds:")

    # A second run refuses to replace the results without --force, and leaves them as they were.
    before = (out / "report.json").read_bytes()
    again = cli("demo", "-o", out)
    assert again.exit_code == EXIT_USAGE
    assert "--force" in error_line(again)
    assert (out / "report.json").read_bytes() == before
