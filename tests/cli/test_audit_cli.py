"""`leakaudit audit`: one YAML file to a report, a cache that is never stale, strict YAML."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from leakaudit.models import LeNet5
from tests.conftest import error_line

ROOT = Path(__file__).resolve().parents[2]

AUDIT = """
model: lenet5
weights: {weights}
layer: conv3
data: digits
tasks: {{public: parity, private: label}}
dump: {{limit: 300}}
attacks:
  - classifier: {{task: private, head: linear, epochs: 15, patience: 5}}
metrics:
  dcor: {{pvalue: none}}
  intra-class-distance: {{}}
policy:
  thresholds:
    private_accuracy: {{max: {max_accuracy}}}
    dcor: {{max: 1.0}}
"""


def _weights(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    save_file(LeNet5().state_dict(), str(path))
    return path


def _audit(tmp_path: Path, weights: Path, max_accuracy: float = 1.0, name: str = "audit.yaml") -> Path:
    path = tmp_path / name
    path.write_text(AUDIT.format(weights=weights.name, max_accuracy=max_accuracy))
    return path


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LEAKAUDIT_CACHE", str(tmp_path / "cache"))


def test_audit_runs_to_a_report_and_reuses_only_an_unchanged_dump(cli, tmp_path):
    weights = _weights(tmp_path / "model.safetensors", 0)
    audit = _audit(tmp_path, weights)
    out = tmp_path / "out"
    result = cli("audit", audit, "-o", out)
    assert result.exit_code == 0, result.stderr
    assert "gate passed" in result.stdout and "subject dumped" in result.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["subject"]["checkpoint_sha256"] and report["subject"]["layer"] == "conv3"
    assert {"private_accuracy", "dcor", "intra_class_distance"} <= set(report["metrics"])
    assert report["gate"]["passed"] is True
    assert (out / "report.html").read_text().count("<svg") >= 2  # t-SNE panels
    first_store = report["audit"]["subject_store"]
    # Same checkpoint: the dump is reused.
    result = cli("audit", audit, "-o", out, "--force")
    assert result.exit_code == 0 and "subject reused" in result.stdout
    assert json.loads((out / "report.json").read_text())["audit"]["subject_store"] == first_store
    # Changed checkpoint (same file name): the cached dump is not used.
    _weights(weights, 1)
    result = cli("audit", audit, "-o", out, "--force")
    assert result.exit_code == 0 and "subject dumped" in result.stdout
    changed = json.loads((out / "report.json").read_text())
    assert changed["audit"]["subject_store"] != first_store
    assert changed["metrics"]["dcor"] != report["metrics"]["dcor"]


def test_audit_exit_code_follows_the_gate_in_a_real_process(tmp_path):
    weights = _weights(tmp_path / "model.safetensors", 0)
    audit = _audit(tmp_path, weights, max_accuracy=0.05)  # any attack beats 5 %
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LEAKAUDIT_CACHE": str(tmp_path / "cache")}
    done = subprocess.run(
        [sys.executable, "-m", "leakaudit", "--quiet", "audit", str(audit), "-o", str(tmp_path / "out")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert "gate failed: private_accuracy above 0.05" in done.stdout
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["gate"]["passed"] is False


def test_existing_output_needs_force(cli, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = cli("audit", _audit(tmp_path, _weights(tmp_path / "model.safetensors", 0)), "-o", out)
    assert result.exit_code == 2
    assert error_line(result) == f"Error: '{out}' exists and is not empty. Pass --force to replace its results."
    assert (out / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize(
    "text, message",
    [
        ("layer: conv3\ndata: digits\ntasks: {public: parity}\n", "Error: audit: missing required key 'model'."),
        ("model: lenet5\nlayer: conv3\ndata: digits\ntasks: {public: parity}\nattack: []\n",
         "Error: attack: unknown key. Did you mean 'attacks'? Allowed: model, weights, layer, data, tasks, dump, attacks, metrics, baseline, harden, policy, cache, threat, memory_budget, seeds."),
        ("model: lenet5\nlayer: conv3\ndata: digits\ntasks: {public: parity}\nattacks:\n  - classifier: {task: public}\n  - decoder: {epochs: ten}\n",
         "Error: attacks[1].decoder.epochs: expected an integer, got 'ten'."),
        ("model: lenet5\nlayer: conv3\ndata: digits\ntasks: {public: parity}\nattacks: [{decodr: {}}]\n",
         "Error: unknown attack 'decodr'. Closest: decoder. See them all with `leakaudit list attacks`."),
        ("model: lenet5\nlayer: conv3\ndata: digits\ntasks: {public: parity}\ndump: {batch_size: -3}\n",
         "Error: dump: batch_size: expected a positive number, got -3."),
        ("model: {spec: lenet5, num_clases: 3}\nlayer: conv3\ndata: digits\ntasks: {public: parity}\n",
         "Error: model.num_clases: unknown key. Did you mean 'num_classes'? Allowed: args, in_chans, num_classes, spec, trust_checkpoint, weights."),
        ("model: lenet5\nlayer: conv3\ndata: digits\ntasks: {public: parity}\npolicy: {thresholds: {dcor: {min: 2, max: 1}}}\n",
         "Error: policy.thresholds.dcor: min 2 is greater than max 1."),
        ("model: lenet5\nlayer: conv3\ndata: digits\ntasks: {public: parity}\nmetrics: {mi: {dims: many}}\n",
         "Error: metrics.mi.dims: expected an integer, got 'many'."),
        ("model: lenet5\nlayer: [conv3\n", "is not valid YAML at line 3, column 1: expected ',' or ']'"),
    ],
    ids=["missing", "unknown-key", "wrong-type", "unknown-attack", "bad-dump", "nested-unknown", "min>max", "metric-setting", "not-yaml"],
)
def test_bad_audit_files(cli, tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    result = cli("audit", path, "-o", tmp_path / "out")
    assert result.exit_code == 2
    assert message in error_line(result)
    assert not (tmp_path / "out").exists()


def test_audit_says_which_rows_were_subsampled_under_a_tiny_budget(cli, tmp_path):
    weights = _weights(tmp_path / "model.safetensors", 0)
    audit = tmp_path / "audit.yaml"
    audit.write_text(AUDIT.format(weights=weights.name, max_accuracy=1.0) + "memory_budget: 1K\n")
    out = tmp_path / "out"
    result = cli("audit", audit, "-o", out)
    assert result.exit_code == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("data: ")]
    assert any(line.startswith("data: attack:classifier") and " subsample (" in line for line in lines), lines
    assert any(line.startswith("data: metric:dcor") and " stream (" in line for line in lines), lines
    assert "How the rows were read" in (out / "report.html").read_text()
