"""``--memory-budget`` on attack, metrics and audit: malformed values are one-line usage errors."""

from __future__ import annotations

import pytest

from leakaudit.errors import EXIT_USAGE
from tests.conftest import error_line


@pytest.mark.parametrize("command", ["attack", "metrics"])
def test_malformed_budget_is_a_usage_error(cli, small_digits_store, command, tmp_path):
    extra = ["--classifier"] if command == "attack" else []
    result = cli(command, small_digits_store, *extra, "--memory-budget", "lots", "--report", tmp_path / "r.json")
    assert result.exit_code == EXIT_USAGE
    assert error_line(result) == (
        "Error: --memory-budget: expected bytes with an optional suffix (e.g. 2G, 500M) or a fraction of available "
        "memory in (0, 1] (e.g. 0.5), got 'lots'."
    )


def test_malformed_budget_in_an_audit_file(cli, tmp_path):
    audit = tmp_path / "a.yaml"
    audit.write_text("model: lenet5\nlayer: conv3\ndata: digits\ntasks: {private: label}\nmemory_budget: 2.5\n")
    result = cli("audit", audit, "-o", tmp_path / "out")
    assert result.exit_code == EXIT_USAGE
    assert error_line(result) == "Error: memory_budget: a fraction of available memory must be in (0, 1], got '2.5'."


def test_malformed_budget_option_of_audit(cli, tmp_path):
    result = cli("audit", tmp_path / "missing.yaml", "--memory-budget", "-3M")
    assert result.exit_code == EXIT_USAGE
    assert "--memory-budget: expected bytes" in error_line(result)
