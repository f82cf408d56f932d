"""Attacks checked against the bounds of the same report (leakaudit.consistency)."""

from __future__ import annotations

import json

import numpy as np

from leakaudit.consistency import consistency_checks
from leakaudit.html_report import render
from leakaudit.report import Report, default_report_path, load_report, subject_of
from leakaudit.store import open_store
from tests.attacks import balanced_split, synthetic_store

THREAT = {"knows": "nothing", "holds": "pairs", "rows": 100, "source": "test"}


def _attack(accuracy: float, interval: list[float], task: str = "private", **more) -> dict:
    numbers = {"private_accuracy": accuracy, "private_accuracy_ci95": interval, **more}
    return {"attack": "classifier", "task": task, **numbers, "threat": THREAT, "report_metrics": numbers}


def _bayes(bound: float, interval: list[float], task: str = "private") -> dict:
    return {"metric": "bayes-risk", "private_accuracy_bound": bound,
            "details": {"private_accuracy_bound_ci95": interval, "task": task}, "config": {"task": task}}  # fmt: skip


def _decoder(mse: float, interval: list[float], prior: str | None) -> dict:
    numbers = {"ssim_mean": 0.5, "mse": mse, "mse_ci95": interval}
    result = {"attack": "decoder", **numbers, "threat": THREAT, "report_metrics": numbers}
    if prior is not None:
        result["prior"] = prior
    return result


def _fisher(mse_bound: float) -> dict:
    return {"metric": "fisher-leakage", "dfil": 1 / mse_bound, "mse_bound": mse_bound, "details": {}, "config": {}}


def test_an_attack_above_the_accuracy_bound_beyond_both_intervals_is_flagged():
    results = {"attack:classifier": _attack(0.95, [0.93, 0.97]), "metric:bayes-risk": _bayes(0.80, [0.78, 0.82])}
    (check,) = consistency_checks(results)
    assert check["kind"] == "above-bound" and check["attack"] == "attack:classifier"
    assert check["name"] == "private_accuracy" and check["bound_value"] == 0.80
    assert check["message"].startswith(
        "attack:classifier's private_accuracy 0.95 [0.93, 0.97] is above metric:bayes-risk's private_accuracy_bound "
        "0.8 [0.78, 0.82] beyond both intervals"
    )


def test_overlapping_intervals_other_tasks_and_points_below_are_not_flagged():
    bound = _bayes(0.80, [0.78, 0.82])
    assert consistency_checks({"attack:a": _attack(0.84, [0.81, 0.87]), "metric:b": bound}) == []  # intervals overlap
    assert consistency_checks({"attack:a": _attack(0.70, [0.68, 0.72]), "metric:b": bound}) == []
    assert consistency_checks({"attack:a": _attack(0.95, [0.93, 0.97], task="public"), "metric:b": bound}) == []
    assert consistency_checks({"attack:a": _attack(0.95, [0.93, 0.97])}) == []  # no bound measured
    # Without intervals the point values are compared.
    bare = {"attack": "x", "task": "private", "private_accuracy": 0.9, "threat": THREAT}
    bare_bound = {"metric": "m", "private_accuracy_bound": 0.85, "details": {}, "config": {"task": "private"}}
    assert [c["name"] for c in consistency_checks({"attack:x": bare, "metric:m": bare_bound})] == ["private_accuracy"]
    # The continuation head's accuracy is capped by the same bound.
    cont = _attack(0.5, [0.45, 0.55], private_accuracy_continuation=0.9, private_accuracy_continuation_ci95=[0.88, 0.92])
    assert [c["name"] for c in consistency_checks({"attack:c": cont, "metric:b": bound})] == ["private_accuracy_continuation"]


def test_an_mse_below_the_unbiased_bound_says_whether_the_attack_is_biased():
    results = {"attack:decoder": _decoder(0.01, [0.009, 0.011], "a prior learned from leaked (X, Z) pairs"),
               "attack:other": _decoder(0.01, [0.009, 0.011], None), "metric:fisher-leakage": _fisher(0.05)}  # fmt: skip
    biased, unexplained = consistency_checks(results)
    assert biased["attack"] == "attack:decoder" and biased["biased"] is True
    assert "this one is biased (it reconstructs with a prior learned from leaked (X, Z) pairs)" in biased["message"]
    assert unexplained["attack"] == "attack:other" and unexplained["biased"] is False
    assert "declares no prior" in unexplained["message"] and unexplained["message"].endswith("report it.")
    # An interval reaching the bound is not beyond it.
    assert consistency_checks({"attack:d": _decoder(0.04, [0.03, 0.06], None), "metric:f": _fisher(0.05)}) == []


def test_the_mse_headline_is_the_smallest_and_checks_survive_the_json_round_trip():
    report = Report({"store": "s.h5"})
    report.results = {"attack:decoder": _decoder(0.02, [0.018, 0.022], "p"), "attack:inversion": _decoder(0.01, [0.009, 0.011], "q"),
                      "attack:classifier": _attack(0.95, [0.93, 0.97]), "metric:bayes-risk": _bayes(0.8, [0.78, 0.82]),
                      "metric:fisher-leakage": _fisher(0.05)}  # fmt: skip
    data = report.to_dict()
    assert data["headline"]["mse"]["attack"] == "attack:inversion" and data["metrics"]["mse"] == 0.01
    assert data["headline"]["ssim_mean"]["attack"] == "attack:decoder"  # ties go to the first key
    assert [c["kind"] for c in data["checks"]] == ["above-bound", "below-bound", "below-bound"]
    again = Report.from_dict(json.loads(json.dumps(data))).to_dict()
    assert again["checks"] == data["checks"]  # recomputed from the results, not carried as a stale section
    assert "Attacks against the bounds" in render(data) and "beyond both intervals" in render(data)
    assert "Attacks against the bounds" not in render({**data, "checks": []})


def test_metrics_cli_warns_when_a_recorded_attack_beats_the_bound_it_measures(cli, tmp_path):
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 100)
    path = synthetic_store(tmp_path / "noise.h5", z=rng.standard_normal((300, 4)).astype(np.float32),
                           labels={"private": y}, split=balanced_split(y))  # fmt: skip
    with open_store(path) as store:
        report = Report(subject_of(store))
    # An attack that claims near-perfect accuracy on Z independent of the label: a broken attack.
    report.results["attack:broken"] = _attack(0.99, [0.98, 1.0])
    report.save(default_report_path(path))

    result = cli("metrics", path, "--only", "bayes-risk")
    assert result.exit_code == 0, result.output
    saved = load_report(default_report_path(path))
    (check,) = saved["checks"]
    assert check["attack"] == "attack:broken" and check["bound_from"] == "metric:bayes-risk"
    assert saved["metrics"]["private_accuracy_bound"] < 0.9  # chance is 1/3: the bound is far below the claim
    assert "attack:broken's private_accuracy 0.99 [0.98, 1] is above metric:bayes-risk's" in " ".join(result.stderr.split())
