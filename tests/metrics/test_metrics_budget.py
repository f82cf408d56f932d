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


def test_dcor_tiles_of_wide_rows_are_bounded(tmp_path, monkeypatch):
    """A dCor tile's row blocks hold at most TILE_BLOCK_BYTES of float64 whatever the rows' width; the value is the same."""
    import numpy as np

    from leakaudit.metrics import plugins
    from leakaudit.metrics.dcor import distance_correlation_stats
    from leakaudit.store import open_store
    from tests.attacks import synthetic_store

    rng = np.random.default_rng(0)
    n = 60
    x = rng.random((n, 1, 64, 64), dtype=np.float32)  # 4,096 values a row
    z = (x.reshape(n, -1)[:, :512] + 0.1 * rng.standard_normal((n, 512))).astype(np.float32)
    path = synthetic_store(tmp_path / "w.h5", z=z, x=x, labels={"t": np.arange(n) % 2}, split=(np.arange(n) % 3).astype(np.uint8))
    with open_store(path) as store:
        assert plugins._tile_rows(store, 1024) == 1024  # 2,048 rows of 4,096 float64 fit 64 MiB
        monkeypatch.setattr(plugins, "TILE_BLOCK_BYTES", 8 * 4096 * 20)
        result = plugins.dcor_metric(store, plugins.DcorConfig(pvalue="none"))
    assert result.details["tile_rows"] == 20  # blocks of 20 rows: three tiles a side over 60 rows
    expected = distance_correlation_stats(x.reshape(n, -1), z, pvalue="none", block_size=1024)
    assert result.values["dcor"] == pytest.approx(expected.dcor, rel=1e-10)
