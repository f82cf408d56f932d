"""Metrics under a memory budget: each says which path ran; a subsample estimate records its rows and seed."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize(("only", "budget"), [("dcor,intra-class-distance,bayes-risk", "200K"), ("mi", "2M")])
def test_metrics_subsample_within_a_small_budget(cli, small_digits_store, tmp_path, only, budget):
    args = ("metrics", small_digits_store, "--only", only, "--set", "dcor.pvalue=none", "--set", "dcor.rows=test")
    limit = int(budget[:-1]) * (1024 if budget.endswith("K") else 1024**2)
    small = json.loads(cli(*args, "--memory-budget", budget, "--json", "-", "--report", tmp_path / "a.json").stdout)["results"]
    whole = json.loads(cli(*args, "--json", "-", "--report", tmp_path / "b.json").stdout)["results"]
    for name in only.split(","):
        details = small[name]["details"]["data_path"]
        record = details.get("fit", details)
        assert record["data_path"] == "subsample" and record["memory_budget"] == limit, name
        assert 2 <= record["rows"] < record["rows_all"] and f"subsample estimate on {record['rows']:,}" in record["reason"]
        full = whole[name]["details"]["data_path"]
        assert full.get("fit", full)["data_path"] == "memory" and full.get("fit", full)["rows"] == record["rows_all"]
    if "dcor" in small:
        assert small["dcor"]["details"]["n"] == small["dcor"]["details"]["data_path"]["rows"]
    # the same seed draws the same subsample, and so the same numbers
    again = json.loads(cli(*args, "--memory-budget", budget, "--json", "-", "--report", tmp_path / "c.json").stdout)["results"]
    assert json.dumps(again, sort_keys=True) == json.dumps(small, sort_keys=True)


def test_exact_dcor_over_all_rows_streams(cli, small_digits_store, tmp_path):
    out = json.loads(cli("metrics", small_digits_store, "--only", "dcor", "--set", "dcor.pvalue=none", "--memory-budget", "1K",
                         "--json", "-", "--report", tmp_path / "r.json").stdout)["results"]["dcor"]
    assert out["details"]["data_path"]["data_path"] == "stream" and out["details"]["n"] == 300
