"""The HTML report: self-contained, every section from its data, and rendered by a real browser."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from leakaudit.report import Report, load_report, subject_of
from leakaudit.store import open_store
from tests.conftest import error_line


@pytest.fixture
def report_file(tmp_path, digits_store):
    grid = tmp_path / "grid.png"
    Image.fromarray((np.random.default_rng(0).random((40, 120)) * 255).astype(np.uint8)).save(grid)
    with open_store(digits_store) as store:
        subject = subject_of(store)
    path = tmp_path / "report.json"
    report = Report(subject)
    report.results["attack:decoder"] = {
        "runs": [{"arch": "upsample", "test": {"ssim_mean": 0.9, "ssim_p95": 0.97, "psnr": 22.0}, "epochs": 5}],
        "mean_image": {"ssim_mean": 0.3, "ssim_p95": 0.5, "psnr": 11.0}, "grid": str(grid),
    }  # fmt: skip
    report.measure({"ssim_p95": 0.97, "ssim_mean": 0.9})
    report.set_baseline({}, {"ssim_p95": 0.99})
    report.save(path)
    report = json.loads(path.read_text())
    report["sweep"] = {
        "parameter": "lambda",
        "columns": ["lambda", "public_accuracy", "private_accuracy", "intra_class_distance"],
        "rows": [{"lambda": lam, "public_accuracy": 0.98 - lam / 20, "private_accuracy": 1 - lam / 2, "intra_class_distance": 4 * (1 - lam)}
                 for lam in (0.5, 0.7, 0.9)],
    }  # fmt: skip
    path.write_text(json.dumps(report))
    return path


def test_report_html_is_self_contained_with_every_section(cli, tmp_path, report_file):
    policy = tmp_path / "policy.yaml"
    policy.write_text("thresholds: {ssim_p95: {max: 0.5}}\n")
    out = tmp_path / "report.html"
    result = cli("report", report_file, "-o", out, "--policy", policy)
    assert result.exit_code == 0, result.stderr
    page = out.read_text()
    assert "Gate failed" in page and "above 0.5" in page
    assert page.count("data:image/png;base64,") == 1  # the reconstruction grid, embedded
    assert "t-SNE of Z — public labels" in page and "t-SNE of Z — private labels" in page
    assert "Privacy–utility sweep over lambda" in page and "<polyline" in page
    assert "ssim_p95" in page and "0.99" in page  # value and baseline
    # Nothing is fetched from anywhere: no external URLs in src/href attributes.
    assert not re.search(r"""(src|href)=['"](https?:)?//""", page)
    # An existing page is not overwritten without --force.
    result = cli("report", report_file, "-o", out, "--no-tsne")
    assert result.exit_code == 2
    assert error_line(result) == f"Error: '{out}' exists. Pass --force to overwrite it."


def test_report_rejects_bad_reports(cli, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"schema": "something.else"}))
    result = cli("report", bad, "-o", tmp_path / "r.html")
    assert result.exit_code == 2
    assert error_line(result) == f"Error: '{bad}' is not a leakaudit report (no schema 'leakaudit.report')."
    assert not (tmp_path / "r.html").exists()


def test_report_round_trip_keeps_metrics(report_file):
    data = load_report(report_file)
    assert data["metrics"]["ssim_p95"] == 0.97 and data["baseline"]["metrics"]["ssim_p95"] == 0.99


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed")
def test_report_renders_in_headless_chromium(cli, tmp_path, report_file):
    out = tmp_path / "report.html"
    assert cli("report", report_file, "-o", out).exit_code == 0
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=3000"]  # fmt: skip
    shot = tmp_path / "shot.png"
    done = subprocess.run(
        ["chromium", *flags, "--window-size=1200,1600", f"--screenshot={shot}", "--enable-logging=stderr", "--v=0", out.as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert shot.exists(), done.stderr[-2000:]
    console_errors = [line for line in done.stderr.splitlines() if "CONSOLE" in line and "error" in line.lower()]
    assert not console_errors, console_errors
    pixels = np.asarray(Image.open(shot).convert("L"))
    assert pixels.std() > 10 and len(np.unique(pixels)) > 50, "the page rendered blank"
    dom = subprocess.run(["chromium", *flags, "--dump-dom", out.as_uri()], capture_output=True, text=True, timeout=120).stdout
    assert 'data-images="1"' in dom and 'data-images-ok="true"' in dom
