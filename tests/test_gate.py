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
        ({"thresholds": {"dcor": {"maximum": 0.5}}}, "policy.thresholds.dcor.maximum: unknown key. Allowed: min, max, use."),
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


# --------------------------------------------------------------------------- gating on an end of the interval

BOUND_POLICY = """
thresholds:
  private_accuracy_drop: {min: 0.15, use: lower95}
  ssim_p95: {max: 0.6, use: upper95}
"""


def test_use_selects_the_end_of_the_interval_that_is_compared():
    thresholds = parse_policy({"thresholds": {"private_accuracy_drop": {"min": 0.15, "use": "lower95"},
                                              "ssim_p95": {"max": 0.6, "use": "upper95"},
                                              "dcor": {"max": 0.5}}})  # fmt: skip
    assert [t.use for t in thresholds] == ["lower95", "upper95", "point"]
    metrics = {"private_accuracy_drop": 0.2, "private_accuracy_drop_ci95": [0.16, 0.24],
               "ssim_p95": 0.5, "ssim_p95_ci95": [0.45, 0.58], "dcor": 0.3}  # fmt: skip
    verdict = evaluate(metrics, thresholds)
    assert verdict.passed
    assert [c.compared for c in verdict.checks] == [0.16, 0.58, 0.3]
    assert verdict.checks[0].interval == [0.16, 0.24] and verdict.checks[2].interval is None
    # The same points with wider intervals: each end that is compared now misses its bound.
    wide = {**metrics, "private_accuracy_drop_ci95": [0.11, 0.29], "ssim_p95_ci95": [0.41, 0.63]}
    verdict = evaluate(wide, thresholds)
    assert [c.passed for c in verdict.checks] == [False, False, True]
    assert [c.reason for c in verdict.checks[:2]] == ["lower95 0.11 below 0.15", "upper95 0.63 above 0.6"]
    assert verdict.checks[0].shown_use() == "lower95 = 0.11" and verdict.checks[0].shown_interval() == "[0.11, 0.29]"


@pytest.mark.parametrize(
    "interval, reason",
    [
        (None, "its 95 % interval is missing from the report"),
        ([0.2], "its 95 % interval is a list of 1, not a pair [lo, hi]"),
        ("[0.2, 0.3]", "its 95 % interval is a str, not a pair [lo, hi]"),
        ([0.2, float("nan")], "its 95 % interval is a pair holding something other than a finite number"),
        ([True, 0.3], "its 95 % interval is a pair holding something other than a finite number"),
        ([0.3, 0.2], "its 95 % interval is a pair whose low end is above its high end"),
    ],
)
def test_a_missing_or_malformed_interval_fails_closed(interval, reason):
    thresholds = parse_policy({"thresholds": {"private_accuracy_drop": {"min": 0.15, "use": "lower95"}}})
    metrics = {"private_accuracy_drop": 0.9}
    if interval is not None:
        metrics["private_accuracy_drop_ci95"] = interval
    verdict = evaluate(metrics, thresholds)
    assert not verdict.passed and verdict.checks[0].reason == reason
    # The point alone would have passed: only the interval's absence fails it.
    assert evaluate(metrics, parse_policy({"thresholds": {"private_accuracy_drop": {"min": 0.15}}})).passed


@pytest.mark.parametrize(
    "bounds, message",
    [
        ({"min": 0.1, "use": "lower90"}, "policy.thresholds.private_accuracy.use: expected one of point, lower95, upper95, got 'lower90'."),
        ({"use": "lower95"}, "policy.thresholds.private_accuracy: expected {min: X}, {max: X} or both beside use"),
    ],
)
def test_bad_use_values_are_config_errors(bounds, message):
    with pytest.raises(ConfigError) as info:
        parse_policy({"thresholds": {"private_accuracy": bounds}})
    assert str(info.value).startswith(message)


def test_use_on_a_number_without_an_interval_and_gating_an_interval_itself_are_refused():
    with pytest.raises(ConfigError) as info:
        parse_policy({"thresholds": {"dcor": {"max": 0.5, "use": "upper95"}}})
    assert str(info.value).startswith("policy.thresholds.dcor.use: dcor is reported without a 95 % interval, so upper95 is undefined")
    assert "private_accuracy_drop" in str(info.value)  # it names the numbers that have one
    with pytest.raises(ConfigError) as info:
        parse_policy({"thresholds": {"private_accuracy_ci95": {"min": 0.1}}})
    assert str(info.value) == (
        "policy.thresholds.private_accuracy_ci95: private_accuracy_ci95 is an interval [lo, hi], not a number; "
        "gate private_accuracy with use: lower95 or use: upper95."
    )


def test_gate_cli_passes_on_the_point_but_fails_on_the_bound(cli, tmp_path):
    metrics = {"private_accuracy_drop": 0.2, "private_accuracy_drop_ci95": [0.12, 0.27], "ssim_p95": 0.5, "ssim_p95_ci95": [0.44, 0.57]}
    report = _report(tmp_path, metrics)
    point = _policy(tmp_path, "thresholds: {private_accuracy_drop: {min: 0.15}, ssim_p95: {max: 0.6}}")
    assert cli("gate", report, "--policy", point).exit_code == 0
    bound = _policy(tmp_path, BOUND_POLICY)
    result = cli("gate", report, "--policy", bound, "--junit", tmp_path / "g.xml", "--summary", tmp_path / "g.md", "--json", tmp_path / "g.json")
    assert result.exit_code == 1, result.stderr
    assert "private_accuracy_drop" in result.stdout and "[0.12, 0.27]" in result.stdout
    checks = json.loads((tmp_path / "g.json").read_text())["checks"]
    assert [(c["use"], c["compared"], c["passed"]) for c in checks] == [("lower95", 0.12, False), ("upper95", 0.57, True)]
    assert checks[0]["interval"] == [0.12, 0.27] and checks[0]["value"] == 0.2
    failure = ElementTree.parse(tmp_path / "g.xml").getroot().find("testcase/failure")
    assert failure.get("message") == "private_accuracy_drop = 0.2, 95 % interval [0.12, 0.27]: lower95 0.12 below 0.15"
    summary = (tmp_path / "g.md").read_text()
    assert "| `private_accuracy_drop` | 0.2 | [0.12, 0.27] | lower95 = 0.12 | lower95 ≥ 0.15 | **fail** (lower95 0.12 below 0.15) |" in summary
    assert "| `ssim_p95` | 0.5 | [0.44, 0.57] | upper95 = 0.57 | upper95 ≤ 0.6 | pass |" in summary


def test_gate_cli_fails_closed_on_a_missing_interval_as_on_a_missing_metric(cli, tmp_path):
    policy = _policy(tmp_path, BOUND_POLICY)
    no_interval = _report(tmp_path, {"private_accuracy_drop": 0.9, "ssim_p95": 0.1, "ssim_p95_ci95": [0.05, 0.2]})
    no_metric = _report(tmp_path, {"ssim_p95": 0.1, "ssim_p95_ci95": [0.05, 0.2]}, name="no-metric.json")
    results = [cli("gate", path, "--policy", policy, "--json", "-") for path in (no_interval, no_metric)]
    assert [r.exit_code for r in results] == [1, 1]
    reasons = [json.loads(r.stdout)["checks"][0]["reason"] for r in results]
    assert reasons == ["its 95 % interval is missing from the report", "missing from the report"]
    result = cli("gate", no_interval, "--policy", _policy(tmp_path, "thresholds: {ssim_p95: {max: 0.6, use: upper96}}"))
    assert result.exit_code == 2
    assert error_line(result) == "Error: policy.yaml.thresholds.ssim_p95.use: expected one of point, lower95, upper95, got 'upper96'."
