"""The example third-party plugin (``examples/plugin``), installed for real and run through the CLI.

The package is installed with pip into a throwaway target folder (no network, no build
isolation: it builds with this environment's setuptools), and every command runs in a fresh
``leakaudit`` process with that folder on ``PYTHONPATH``. Nothing is imported or registered
in this test process: the attack reaches leakaudit only through the entry point of the
installed distribution, as it would for a user who ran ``pip install leakaudit-knn``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import error_line

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = ROOT / "examples" / "plugin"


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """A folder holding the installed example plugin (its package and its dist-info)."""
    work = tmp_path_factory.mktemp("knn-plugin")
    source = work / "source"  # a copy: building writes build/ and *.egg-info beside the sources
    shutil.copytree(PLUGIN, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    target = work / "site"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", str(target), str(source)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (target / "leakaudit_knn" / "__init__.py").is_file()
    return target


def leakaudit(site: Path, cwd: Path, *args: str | os.PathLike) -> subprocess.CompletedProcess:
    """``leakaudit ARGS`` in a fresh process that sees the plugin only through ``site``."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)]), "LEAKAUDIT_CACHE": str(cwd / "cache"),
           "OMP_NUM_THREADS": "1", "COLUMNS": "200"}  # fmt: skip
    return subprocess.run(
        [sys.executable, "-m", "leakaudit", *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def _policy(path: Path, threshold: str) -> Path:
    path.write_text(f"thresholds:\n  knn_private_accuracy: {threshold}\n")
    return path


AUDIT = """
model: lenet5
layer: conv3
data: digits
tasks: {public: parity, private: label}
dump: {limit: 300}
attacks:
  - knn: {task: private, k: 3}
metrics: []
policy:
  thresholds:
    knn_private_accuracy: {min: 0.3}
"""


@pytest.fixture
def store(tmp_path, small_digits_store) -> Path:
    """A private copy of 300 digits rows at LeNet-5's ``conv3``, so that its report lands in this test's folder."""
    path = tmp_path / "acts.h5"
    shutil.copyfile(small_digits_store, path)
    return path


def test_installed_plugin_runs_through_attack_gate_and_report(site, store, tmp_path):
    attacked = leakaudit(
        site, tmp_path, "attack", store, "--attack", "knn", "--task", "private", "--set", "k=3",
        "--artifact", f"per-class={tmp_path / 'per-class.json'}", "--json", tmp_path / "knn.json",
    )  # fmt: skip
    assert attacked.returncode == 0, attacked.stderr
    assert "knn_private_accuracy" in attacked.stdout
    result = json.loads((tmp_path / "knn.json").read_text())
    assert result["attack"] == "knn" and result["k"] == 3 and result["config"]["task"] == "private"
    assert result["rows"]["test"] == sum(c["rows"] for c in result["per_class"].values())
    report = json.loads((tmp_path / "acts.report.json").read_text())
    accuracy = report["metrics"]["knn_private_accuracy"]
    # Random-init LeNet-5 keeps digits apart in Z: a 3-neighbour vote beats chance (10 classes) by far.
    assert accuracy == result["accuracy"] and accuracy > 0.5 > report["metrics"]["knn_private_chance"]
    assert json.loads((tmp_path / "per-class.json").read_text())["per_class"] == result["per_class"]

    passed = leakaudit(site, tmp_path, "gate", "acts.report.json", "--policy", _policy(tmp_path / "pass.yaml", "{min: 0.5}"))
    assert passed.returncode == 0, passed.stderr
    assert "knn_private_accuracy" in passed.stdout and "passed" in passed.stdout
    failed = leakaudit(site, tmp_path, "gate", "acts.report.json", "--policy", _policy(tmp_path / "fail.yaml", "{max: 0.5}"))
    assert failed.returncode == 1, failed.stderr
    assert "knn_private_accuracy" in failed.stdout and "failed" in failed.stdout

    rendered = leakaudit(site, tmp_path, "report", "acts.report.json", "-o", "page.html", "--no-tsne")
    assert rendered.returncode == 0, rendered.stderr
    page = (tmp_path / "page.html").read_text()
    assert "<code>knn_private_accuracy</code>" in page and "k-nearest-neighbour vote" in page


# The next two repeat, through heavier paths, what the test above already shows (the plugin is
# found and runs); each costs a full leakaudit process or two, so they run with the slow tests.
@pytest.mark.slow
def test_installed_plugin_runs_in_an_audit(site, tmp_path):
    audit = tmp_path / "audit.yaml"
    audit.write_text(AUDIT)
    audited = leakaudit(site, tmp_path, "--quiet", "audit", audit, "-o", tmp_path / "out")
    assert audited.returncode == 0, audited.stderr
    assert "gate passed" in audited.stdout
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert set(report["results"]) == {"attack:knn"}  # `metrics: []`: nothing else ran
    assert report["gate"]["passed"] is True and report["metrics"]["knn_private_accuracy"] > 0.3
    assert (tmp_path / "out" / "knn-per-class.json").is_file()  # its artifact, declared in_audit
    assert "knn_private_accuracy" in (tmp_path / "out" / "report.html").read_text()


@pytest.mark.slow
def test_installed_plugin_meets_the_plugin_contract(site, tmp_path):
    """The contract suite, run where the plugin is installed, picks it up from the registry."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)]), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "knn", "tests/test_plugin_contract.py"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:]
    assert re.search(r"\b6 passed\b", done.stdout), done.stdout[-2000:]


def test_without_the_plugin_a_policy_naming_its_metric_is_refused(cli, tmp_path):
    """The gate knows the plugin's metric from the plugin alone: this process has not installed it."""
    from leakaudit.registry import ATTACKS

    if "knn" in ATTACKS:
        pytest.skip("the example plugin is installed in this environment")
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"schema": "leakaudit.report", "schema_version": 1, "subject": {}, "metrics": {}}))
    result = cli("gate", report, "--policy", _policy(tmp_path / "policy.yaml", "{min: 0.5}"))
    assert result.exit_code == 2
    assert error_line(result).startswith(
        "Error: policy.yaml.thresholds.knn_private_accuracy: unknown metric 'knn_private_accuracy'."
    )
