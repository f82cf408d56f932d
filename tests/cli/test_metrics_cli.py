"""`leakaudit metrics`: plugins wired to the pure functions, baselines, drops, bad input."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from leakaudit.dump import DumpSettings, dump
from leakaudit.metrics.dcor import distance_correlation_stats
from leakaudit.metrics.distance import intra_class_distance
from leakaudit.metrics.mi import mutual_information_gaussian
from leakaudit.store import open_store, record_checksums
from tests.conftest import error_line


@pytest.fixture
def store_copy(tmp_path, digits_store):
    path = tmp_path / "acts.h5"
    path.write_bytes(digits_store.read_bytes())
    return path


def test_metrics_equal_the_pure_functions_and_land_in_the_report(cli, store_copy):
    result = cli("metrics", store_copy, "--json", "-")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    with open_store(store_copy) as store:
        x, z = store.inputs(), store.activations()
        stats = distance_correlation_stats(x, z)
        expected_mi = mutual_information_gaussian(x.reshape(len(x), -1), z.reshape(len(z), -1), dims=32, seed=0).value
        expected_icd = intra_class_distance(z, store.labels("public"))
    assert data["metrics"]["dcor"] == pytest.approx(stats.dcor, rel=1e-12)
    assert data["metrics"]["dcor_u2"] == pytest.approx(stats.dcor_u2, rel=1e-12)
    assert data["metrics"]["mi_xz"] == pytest.approx(expected_mi, rel=1e-9)
    assert data["metrics"]["intra_class_distance"] == pytest.approx(expected_icd, rel=1e-9)
    # The random-init LeNet-5 has 10 outputs, not the 2 classes of the public task.
    assert "public-accuracy" in data["skipped"]
    report = json.loads(store_copy.with_name("acts.report.json").read_text())
    assert report["metrics"]["dcor"] == data["metrics"]["dcor"]
    assert set(report["results"]) >= {"metric:dcor", "metric:mi", "metric:intra-class-distance"}


def test_baseline_store_gives_drops_and_must_hold_the_same_rows(cli, tmp_path, store_copy):
    other = tmp_path / "other.h5"
    dump(DumpSettings(model="lenet5", layer="pool2", data="digits", output=other, seed=0, tasks=(("public", "parity"), ("private", "label"))))
    result = cli("metrics", other, "--only", "mi", "--baseline", store_copy, "--json", "-")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["derived"]["mi_drop"] == pytest.approx(1 - data["metrics"]["mi_xz"] / data["baseline"]["mi_xz"])
    report = json.loads(other.with_name("other.report.json").read_text())
    assert report["baseline"]["subject"]["layer"] == "conv3" and "mi_drop" in report["metrics"]
    shorter = tmp_path / "short.h5"
    dump(DumpSettings(model="lenet5", layer="conv3", data="digits", output=shorter, limit=500, tasks=(("label", "label"),)))
    result = cli("metrics", shorter, "--only", "dcor", "--baseline", store_copy)
    assert result.exit_code == 2
    assert error_line(result) == (
        "Error: the baseline has 1,797 rows and the subject 500; a drop is only meaningful on the same rows. "
        "Dump both with the same --limit."
    )


def test_baseline_report_with_mismatched_settings_is_refused(cli, tmp_path, store_copy):
    assert cli("metrics", store_copy, "--only", "mi").exit_code == 0
    baseline_report = store_copy.with_name("acts.report.json")
    copy = tmp_path / "subject.h5"
    copy.write_bytes(store_copy.read_bytes())
    result = cli("metrics", copy, "--only", "mi", "--set", "mi.dims=8", "--baseline", baseline_report)
    assert result.exit_code == 2
    assert "used different settings; mi_drop needs the same" in error_line(result)


def test_bad_metric_names_settings_and_stores(cli, tmp_path, store_copy):
    result = cli("metrics", store_copy, "--only", "dcro")
    assert result.exit_code == 2
    assert error_line(result) == "Error: unknown metric 'dcro'. Closest: dcor. See them all with `leakaudit list metrics`."
    result = cli("metrics", store_copy, "--set", "mi.estimatr=ksg")
    assert result.exit_code == 2
    assert error_line(result) == (
        "Error: mi.estimatr: unknown key. Did you mean 'estimator'? Allowed: dims, estimator, k, max_rows, rows, seed."
    )
    result = cli("metrics", store_copy, "--set", "mi.estimator=knn")
    assert result.exit_code == 2
    assert error_line(result) == "Error: mi.estimator: expected one of 'gaussian', 'ksg', got 'knn'."
    constant = tmp_path / "constant.h5"
    constant.write_bytes(store_copy.read_bytes())
    with h5py.File(constant, "r+") as f:
        f["activations"][...] = 1.0
    record_checksums(constant)  # a deliberate edit, not corruption
    result = cli("metrics", constant, "--only", "dcor")
    assert result.exit_code == 2
    assert "Z is constant" in error_line(result)
    no_inputs = tmp_path / "noinputs.h5"
    dump(DumpSettings(model="lenet5", layer="conv3", data="digits", output=no_inputs, limit=200, store_inputs=False, tasks=(("label", "label"),)))
    result = cli("metrics", no_inputs, "--only", "dcor")
    assert result.exit_code == 3
    assert error_line(result) == (
        f"Error: distance correlation needs the raw inputs, but '{no_inputs}' was dumped with --no-inputs. "
        "Dump it again without --no-inputs."
    )


def test_list_metrics_shows_the_registry(cli):
    result = cli("list", "metrics")
    assert result.exit_code == 0
    for name in ("dcor", "mi", "intra-class-distance", "public-accuracy"):
        assert name in result.stdout
    assert np.all([name in result.stdout for name in ("estimator='gaussian'", "precision='float64'")])
