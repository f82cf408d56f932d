"""The files under examples/ work as their comments say."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from leakaudit.audit import load_audit
from leakaudit.gate import load_policy

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def test_example_policy_and_audit_file_parse():
    policy = load_policy(EXAMPLES / "policy.yaml")
    assert {t.metric for t in policy} >= {"private_accuracy_drop", "public_accuracy_normalized"}
    uses = {t.metric: t.use for t in policy}
    assert uses["private_accuracy_drop"] == "lower95" and uses["ssim_p95"] == "upper95"
    config = load_audit(EXAMPLES / "custom-model" / "audit.yaml")
    assert config.layer == "encoder" and config.harden["method"] == "center-loss"
    assert config.model.spec.endswith("model.py:build")


def test_github_workflow_audits_gates_and_uploads():
    workflow = yaml.safe_load((EXAMPLES / "ci" / "leakaudit.yml").read_text())
    steps = workflow["jobs"]["audit"]["steps"]
    commands = "\n".join(step.get("run", "") for step in steps)
    assert "leakaudit audit examples/custom-model/audit.yaml" in commands
    assert "leakaudit gate" in commands and "--junit" in commands and "GITHUB_STEP_SUMMARY" in commands
    assert "--policy examples/policy.yaml" in commands  # the policy that gates on lower95
    assert any(step.get("uses", "").startswith("actions/upload-artifact") for step in steps)


@pytest.mark.slow
def test_custom_model_example_trains_and_audits_as_its_comments_say(tmp_path):
    examples = tmp_path / "examples"
    shutil.copytree(EXAMPLES, examples, ignore=shutil.ignore_patterns("weights.*"))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LEAKAUDIT_CACHE": str(tmp_path / "cache")}

    def leakaudit(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "leakaudit", "--quiet", *args], cwd=tmp_path, env=env, capture_output=True, text=True)

    trained = leakaudit(
        "train", "examples/custom-model/model.py:build", "--data", "digits", "--task", "public=parity",
        "-o", "examples/custom-model/weights.safetensors",
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr
    audited = leakaudit("audit", "examples/custom-model/audit.yaml", "-o", "custom-audit")
    assert audited.returncode in (0, 1), audited.stderr
    report = json.loads((tmp_path / "custom-audit" / "report.json").read_text())
    assert audited.returncode == (0 if report["gate"]["passed"] else 1)
    for key in ("private_accuracy_drop", "public_accuracy_normalized", "ssim_p95", "dcor", "mi_drop"):
        assert report["metrics"].get(key) is not None, key
    assert (tmp_path / "custom-audit" / "report.html").stat().st_size > 10_000
