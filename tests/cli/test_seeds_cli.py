"""`--seeds N` end to end: each seed retrains the attack; numbers are means, intervals cover seeds and rows."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from leakaudit.attacks import classifier_raw
from leakaudit.html_report import render
from tests.cli.test_audit_cli import AUDIT, _weights
from tests.conftest import error_line

pytestmark = pytest.mark.usefixtures("one_torch_thread")

_TIMES = re.compile(r'"(updated|seconds|seconds_per_epoch)": [^,\n]+')


@pytest.fixture
def store(tmp_path, small_digits_store) -> Path:
    path = tmp_path / "acts.h5"
    shutil.copyfile(small_digits_store, path)
    return path


def _without_times(path: Path) -> str:
    return _TIMES.sub(r'"\1": T', path.read_text())


def test_one_seed_writes_the_same_report_as_no_option(cli, tmp_path, store):
    # Without the disk's cache: else the second run reuses the raw-X reference and says so.
    args = ("attack", store, "--classifier", "--head", "linear", "--epochs", "2", "--set", "cache=false")
    plain, seeded = tmp_path / "plain.json", tmp_path / "seeded.json"
    assert cli(*args, "--report", plain).exit_code == 0
    classifier_raw.clear()  # and the process's
    assert cli(*args, "--report", seeded, "--seeds", "1").exit_code == 0
    assert _without_times(plain) == _without_times(seeded)  # the same bytes but for wall-clock times
    assert "per_seed" not in plain.read_text()


def test_three_seeds_of_the_classifier(cli, tmp_path, store):
    out, report = tmp_path / "c.json", tmp_path / "r.json"
    result = cli("attack", store, "--classifier", "--head", "mlp", "--epochs", "3", "--seed", "7", "--seeds", "3",
                 "--json", out, "--report", report)  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["seeds"] == 3 and data["seed_values"] == [7, 8, 9]
    per_seed = [row["metrics"]["private_accuracy"] for row in data["per_seed"]]
    assert len(set(per_seed)) > 1  # each seed retrained
    assert data["private_accuracy"] == pytest.approx(sum(per_seed) / 3)
    assert [row["seed"] for row in data["per_seed"]] == [7, 8, 9]
    assert all(row["choices"]["best_head"] == "mlp" for row in data["per_seed"])
    lo, hi = data["private_accuracy_ci95"]
    assert lo < data["private_accuracy"] < hi
    # Wider than one seed's rows-only interval where the seeds disagree by more than it allows.
    first = data["per_seed"][0]["metrics"]["private_accuracy_ci95"]
    assert hi - lo > 0 and (lo, hi) != tuple(first)
    metrics = json.loads(report.read_text())["metrics"]
    assert metrics["private_accuracy"] == pytest.approx(data["private_accuracy"])
    assert metrics["private_accuracy_ci95"] == data["private_accuracy_ci95"]
    drop_lo, drop_hi = metrics["private_accuracy_drop_ci95"]
    assert drop_lo <= metrics["private_accuracy_drop"] <= drop_hi
    assert "over 3 training seeds" in result.stdout
    # The HTML report lists each seed's number beside the mean and its interval.
    page = render(json.loads(report.read_text()))
    section = page.split("Training seeds of <code>attack:classifier</code>", 1)[1].split("</section>", 1)[0]
    assert all(f"seed {s}" in section for s in (7, 8, 9))
    assert all(f">{v:.4g}<" in section for v in per_seed)
    assert f"{data['private_accuracy']:.4g}" in section


def test_three_seeds_of_a_decoder(cli, tmp_path, store):
    out = tmp_path / "d.json"
    result = cli("attack", store, "--decoder", "upsample", "--epochs", "1", "--seeds", "3", "--json", out)
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["seeds"] == 3 and len(data["per_seed"]) == 3
    for name in ("ssim_mean", "ssim_p95", "psnr", "mse"):
        values = [row["metrics"][name] for row in data["per_seed"]]
        assert data[name] == pytest.approx(sum(values) / 3)
        lo, hi = data[name + "_ci95"]
        assert lo <= data[name] <= hi
    # The mean image does not depend on the seed: the seeds agree, and its interval is the rows' alone.
    assert len({row["metrics"]["ssim_p95_mean_image"] for row in data["per_seed"]}) == 1


def test_audit_seeds_from_the_file_and_the_option(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("LEAKAUDIT_CACHE", str(tmp_path / "cache"))
    _weights(tmp_path / "model.safetensors", 0)
    audit = tmp_path / "audit.yaml"
    text = AUDIT.format(weights="model.safetensors", max_accuracy=1.0).replace("epochs: 15, patience: 5", "epochs: 2")
    audit.write_text(text + "seeds: 2\n")
    result = cli("audit", audit, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["results"]["attack:classifier"]["seeds"] == 2
    assert "seeds" not in report["results"]["metric:dcor"]  # metrics run once
    lo, hi = report["metrics"]["private_accuracy_ci95"]
    assert lo <= report["metrics"]["private_accuracy"] <= hi
    result = cli("audit", audit, "-o", tmp_path / "out", "--force", "--seeds", "1")
    assert result.exit_code == 0, result.output
    assert "seeds" not in json.loads((tmp_path / "out" / "report.json").read_text())["results"]["attack:classifier"]


@pytest.mark.parametrize(
    "value, line",
    [
        ("0", "Error: --seeds: expected a positive integer (training seeds per attack), got 0."),
        ("-1", "Error: --seeds: expected a positive integer (training seeds per attack), got -1."),
    ],
)
def test_bad_seed_counts(cli, store, value, line):
    result = cli("attack", store, "--classifier", "--seeds", value)
    assert result.exit_code == 2 and error_line(result) == line


def test_a_non_integer_seed_count_is_a_usage_error(cli, store):
    result = cli("attack", store, "--classifier", "--seeds", "three")
    assert result.exit_code == 2 and error_line(result).startswith("Error: Invalid value for '--seeds'")


@pytest.mark.parametrize("value", ["0", "2.5", "three", "[2]", "true"])
def test_bad_seeds_in_the_audit_file(cli, tmp_path, value):
    path = tmp_path / "bad.yaml"
    path.write_text(f"model: lenet5\nlayer: conv3\ndata: digits\ntasks: {{public: parity}}\nseeds: {value}\n")
    result = cli("audit", path, "-o", tmp_path / "out")
    assert result.exit_code == 2
    assert error_line(result).startswith("Error: seeds: expected a positive integer (training seeds per attack), got ")
    assert not (tmp_path / "out").exists()
