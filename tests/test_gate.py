"""The gate: policies validated strictly, verdicts fail closed, JUnit and Markdown outputs."""

from __future__ import annotations

import json
from xml.etree import ElementTree

import pytest

from leakaudit.errors import ConfigError
from leakaudit.gate import Threshold, evaluate, junit_xml, markdown_summary, parse_policy
from leakaudit.report import new_report
from tests.conftest import error_line


def _report(tmp_path, metrics, name="report.json"):
    report = new_report({"store": "acts.h5", "model_spec": "lenet5", "layer": "conv3", "data_spec": "digits"})
    report["metrics"] = metrics
    path = tmp_path / name
    path.write_text(json.dumps(report))
    return path


def _policy(tmp_path, text):
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    return path


POLICY = """
thresholds:
  private_accuracy_drop: {min: 0.15}
  dcor: {max: 0.5}
  public_accuracy_normalized: {min: 0.95, max: 1.05}
"""


def test_evaluate_bounds_and_fail_closed():
    thresholds = parse_policy({"thresholds": {"dcor": {"max": 0.5}, "private_accuracy_drop": {"min": 0.15}}})
    assert thresholds == [Threshold("dcor", None, 0.5), Threshold("private_accuracy_drop", 0.15, None)]
    verdict = evaluate({"dcor": 0.5, "private_accuracy_drop": 0.2}, thresholds)
    assert verdict.passed  # bounds are inclusive
    verdict = evaluate({"dcor": 0.51, "private_accuracy_drop": 0.2}, thresholds)
    assert not verdict.passed and verdict.checks[0].reason == "above 0.5"
    verdict = evaluate({"dcor": 0.1}, thresholds)
    assert not verdict.passed and verdict.checks[1].reason == "missing from the report"
    verdict = evaluate({"dcor": float("nan"), "private_accuracy_drop": 0.2}, thresholds)
    assert not verdict.passed and verdict.checks[0].reason == "not a finite number"


@pytest.mark.parametrize(
    "policy, message",
    [
        ({"thresholds": {"dcorr": {"max": 1}}}, "policy.thresholds.dcorr: unknown metric 'dcorr'. Closest: dcor"),
        ({"thresholds": {"dcor": {"max": "high"}}}, "policy.thresholds.dcor.max: expected a number, got 'high'."),
        ({"thresholds": {"dcor": {"min": 0.6, "max": 0.5}}}, "policy.thresholds.dcor: min 0.6 is greater than max 0.5."),
        ({"thresholds": {"dcor": {"maximum": 0.5}}}, "policy.thresholds.dcor.maximum: unknown key. Allowed: min, max."),
        ({"limits": {}}, "policy.limits: unknown key. Allowed: thresholds."),
        ({"thresholds": {}}, "policy.thresholds: expected a mapping"),
    ],
)
def test_bad_policies(policy, message):
    with pytest.raises(ConfigError) as info:
        parse_policy(policy)
    assert str(info.value).startswith(message)


def test_junit_has_one_case_per_threshold_and_failures():
    thresholds = parse_policy({"thresholds": {"dcor": {"max": 0.5}, "ssim_p95": {"max": 0.4}, "mi_drop": {"min": 0.1}}})
    verdict = evaluate({"dcor": 0.7, "ssim_p95": 0.3}, thresholds)
    suite = ElementTree.fromstring(junit_xml(verdict))
    cases = suite.findall("testcase")
    assert suite.get("tests") == "3" and suite.get("failures") == "2" and len(cases) == 3
    failed = {c.get("name"): c.find("failure") for c in cases}
    assert failed["ssim_p95 ≤ 0.4"] is None
    assert "above 0.5" in failed["dcor ≤ 0.5"].get("message")
    assert "missing" in failed["mi_drop ≥ 0.1"].get("message")
    summary = markdown_summary(verdict)
    assert summary.startswith("### ❌ leakaudit gate failed") and summary.count("\n| `") == 3


def test_gate_cli_exit_codes_and_outputs(cli, tmp_path):
    policy = _policy(tmp_path, POLICY)
    good = _report(tmp_path, {"private_accuracy_drop": 0.4, "dcor": 0.2, "public_accuracy_normalized": 0.99})
    result = cli("gate", good, "--policy", policy, "--junit", tmp_path / "g.xml", "--summary", tmp_path / "g.md")
    assert result.exit_code == 0, result.stderr
    assert "passed" in result.stdout
    assert ElementTree.parse(tmp_path / "g.xml").getroot().get("failures") == "0"
    bad = _report(tmp_path, {"private_accuracy_drop": 0.4, "dcor": 0.7}, name="bad.json")
    result = cli("gate", bad, "--policy", policy, "--json", "-")
    assert result.exit_code == 1
    verdict = json.loads(result.stdout)
    assert verdict["passed"] is False
    assert [c["reason"] for c in verdict["checks"]] == ["", "above 0.5", "missing from the report"]
    # Existing outputs are not overwritten without --force.
    result = cli("gate", good, "--policy", policy, "--junit", tmp_path / "g.xml")
    assert result.exit_code == 2
    assert error_line(result) == f"Error: '{tmp_path / 'g.xml'}' exists. Pass --force to overwrite it."


def test_gate_cli_bad_inputs(cli, tmp_path):
    good = _report(tmp_path, {"dcor": 0.2})
    result = cli("gate", good, "--policy", _policy(tmp_path, "thresholds: {dcor: {max: [1]}}"))
    assert result.exit_code == 2
    assert error_line(result) == "Error: policy.yaml.thresholds.dcor.max: expected a number, got [1]."
    result = cli("gate", good, "--policy", _policy(tmp_path, "thresholds: {dcor: {max: 1}"))
    assert result.exit_code == 2
    assert "is not valid YAML at line 1" in error_line(result)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    result = cli("gate", broken, "--policy", _policy(tmp_path, "thresholds: {dcor: {max: 1}}"))
    assert result.exit_code == 2
    assert error_line(result) == f"Error: report '{broken}' is not valid JSON (line 1: Expecting property name enclosed in double quotes)."
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"schema": "leakaudit.report", "schema_version": 0, "metrics": {}}))
    result = cli("gate", old, "--policy", _policy(tmp_path, "thresholds: {dcor: {max: 1}}"))
    assert result.exit_code == 2
    assert "has schema version 0; this leakaudit reads version 1" in error_line(result)
