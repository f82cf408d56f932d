"""Configuration that fails closed, and tasks that cannot produce meaningless numbers.

Each case runs the real command (or the real function) on real files in ``tmp_path`` and
checks the exit code, the one ``Error:`` line, and that a failed command left nothing behind
that could pass for a result.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from leakaudit.attacks.classifier import below_chance_warnings
from leakaudit.config import parse_cli_value
from leakaudit.errors import ConfigError
from leakaudit.html_report import render, tsne_embedding
from tests.attacks import balanced_split, synthetic_store
from tests.conftest import error_line


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _report(path: Path, metrics: dict, *, store: Path | None = None, results: dict | None = None) -> Path:
    """A report.json as the commands write it (schema, subject, flat metrics, results)."""
    subject = {"store": str(store) if store else None, "model_spec": "lenet5", "layer": "conv3", "data_spec": "digits", "seed": 0}
    data = {
        "schema": "leakaudit.report",
        "schema_version": 1,
        "tool_version": "test",
        "updated": "2024-01-01T00:00:00+00:00",
        "subject": subject,
        "metrics": metrics,
        "results": results or {},
    }
    path.write_text(json.dumps(data))  # json writes NaN as the bare token NaN, as update_report does
    return path


def _dump(cli, tmp_path: Path, *args: str):
    """A dump that should fail: returns the result after checking it wrote nothing."""
    before = _files(tmp_path)
    result = cli("dump", "lenet5", "--layer", "conv3", "-o", tmp_path / "acts.h5", *args)
    assert _files(tmp_path) == before, "a failed dump left files behind"
    return result


# ----------------------------------------------------------------------- duplicate YAML keys


def test_policy_with_a_threshold_given_twice_is_refused_naming_both_lines(cli, tmp_path):
    report = _report(tmp_path / "report.json", {"private_accuracy_drop": 0.4})
    policy = tmp_path / "policy.yaml"
    policy.write_text("thresholds:\n  private_accuracy_drop: {min: 0.99}\n  private_accuracy_drop: {min: 0.1}\n")
    before = _files(tmp_path)
    result = cli("gate", report, "--policy", policy, "--junit", tmp_path / "gate.xml")
    assert result.exit_code == 2
    assert error_line(result) == (
        f"Error: {policy}: duplicate key 'private_accuracy_drop' at line 3 (first at line 2). "
        "YAML would silently keep only the last one; remove one of them."
    )
    assert _files(tmp_path) == before  # no JUnit file claiming a verdict


def test_a_bound_given_twice_inside_one_threshold_is_refused(cli, tmp_path):
    report = _report(tmp_path / "report.json", {"dcor_u2": 0.2})
    policy = tmp_path / "policy.yaml"
    policy.write_text("thresholds:\n  dcor_u2:\n    max: 0.05\n    max: 0.9\n")
    result = cli("gate", report, "--policy", policy)
    assert result.exit_code == 2
    assert "duplicate key 'max' at line 4 (first at line 3)" in error_line(result)


def test_merge_keys_override_without_being_duplicates(cli, tmp_path):
    # A key written beside `<<: *strict` overrides the merged one (the YAML spec): not a duplicate.
    report = _report(tmp_path / "report.json", {"dcor_u2": 0.01, "ssim_p95": 0.4})
    policy = tmp_path / "policy.yaml"
    policy.write_text("thresholds:\n  dcor_u2: &strict {max: 0.05}\n  ssim_p95:\n    <<: *strict\n    max: 0.5\n")
    result = cli("gate", report, "--policy", policy)
    assert result.exit_code == 0, result.stderr  # ssim_p95 0.4 passes only under the overriding max 0.5
    policy.write_text("thresholds:\n  dcor_u2: &strict {max: 0.05}\n  ssim_p95:\n    <<: *strict\n    <<: *strict\n")
    result = cli("gate", report, "--policy", policy)
    assert result.exit_code == 2
    assert "duplicate key '<<' at line 5 (first at line 4)" in error_line(result)


def test_audit_file_naming_the_layer_twice_is_refused_before_any_work(cli, tmp_path):
    audit = tmp_path / "audit.yaml"
    audit.write_text("model: lenet5\nlayer: conv3\ndata: digits\nlayer: conv1\ntasks: {public: parity, private: label}\n")
    before = _files(tmp_path)
    result = cli("audit", audit, "-o", tmp_path / "out")
    assert result.exit_code == 2
    assert error_line(result) == (
        f"Error: {audit}: duplicate key 'layer' at line 4 (first at line 2). "
        "YAML would silently keep only the last one; remove one of them."
    )
    assert _files(tmp_path) == before


def test_task_map_with_a_label_given_twice_is_refused(cli, tmp_path):
    groups = tmp_path / "groups.yaml"
    groups.write_text("".join(f"{i}: {'low' if i < 5 else 'high'}\n" for i in range(10)) + "3: high\n")
    result = _dump(cli, tmp_path, "--data", "digits", "--task", f"private=map:{groups}")
    assert result.exit_code == 2
    assert "duplicate key 3 at line 11 (first at line 4)" in error_line(result)


def test_set_values_are_parsed_with_the_same_strict_loader():
    assert parse_cli_value("{a: 1, b: 2}") == {"a": 1, "b": 2}
    assert parse_cli_value("3") == 3 and parse_cli_value("not: [yaml") == "not: [yaml"
    with pytest.raises(ConfigError, match=r"repeats the key 'a'"):
        parse_cli_value("{a: 1, a: 2}")


# ----------------------------------------------------------------------- non-numbers in the gate


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (True, "a boolean (true), not a number"),
        (float("nan"), "not a finite number"),
        (float("inf"), "not a finite number"),
        ("0.5", "a string, not a number"),
    ],
)
def test_a_value_that_is_not_a_finite_number_fails_the_gate(cli, tmp_path, value, reason):
    report = _report(tmp_path / "report.json", {"private_accuracy_drop": value, "dcor_u2": 0.01})
    policy = tmp_path / "policy.yaml"
    policy.write_text("thresholds:\n  private_accuracy_drop: {min: 0.15}\n  dcor_u2: {max: 0.05}\n")
    result = cli("gate", report, "--policy", policy, "--junit", tmp_path / "gate.xml", "--json", tmp_path / "verdict.json")
    assert result.exit_code == 1  # a failed gate, not an error: the verdict is written and says why
    verdict = json.loads((tmp_path / "verdict.json").read_text())
    check = verdict["checks"][0]
    assert verdict["passed"] is False and check == {
        "metric": "private_accuracy_drop", "value": None, "threshold": "≥ 0.15", "passed": False, "reason": reason,
        "use": "point", "interval": None, "compared": None,
    }  # fmt: skip
    assert verdict["checks"][1]["passed"] is True
    junit = (tmp_path / "gate.xml").read_text()
    assert f'message="private_accuracy_drop = not a number: {reason}"' in junit
    assert "not a number" in result.stdout


def test_a_report_giving_a_metric_twice_is_refused(cli, tmp_path):
    report = _report(tmp_path / "report.json", {"private_accuracy_drop": 0.01})
    # The second value would pass the policy; json.loads keeps the last one silently.
    text = report.read_text().replace('"private_accuracy_drop": 0.01', '"private_accuracy_drop": 0.01, "private_accuracy_drop": 0.5')
    report.write_text(text)
    policy = tmp_path / "policy.yaml"
    policy.write_text("thresholds:\n  private_accuracy_drop: {min: 0.15}\n")
    before = _files(tmp_path)
    result = cli("gate", report, "--policy", policy, "--junit", tmp_path / "gate.xml")
    assert result.exit_code == 2
    assert error_line(result) == (
        f"Error: report '{report}' gives the key 'private_accuracy_drop' twice in one object; a report that "
        "leakaudit wrote never does. Regenerate it rather than edit it."
    )
    assert _files(tmp_path) == before  # no gate.xml


# ----------------------------------------------------------------------- degenerate tasks


def test_a_task_with_one_class_is_not_dumped(cli, tmp_path):
    result = _dump(cli, tmp_path, "--data", "digits", "--task", "public=parity", "--task", "private=threshold:99")
    assert result.exit_code == 2
    assert error_line(result) == (
        "Error: task 'private' (threshold:99) has 1 class in the attacker-train rows; every role needs at "
        "least 2 classes, or its accuracy means nothing. Choose a task source that divides the rows into "
        "classes (e.g. a smaller K in threshold:K), or dump more rows."
    )


def test_a_store_with_a_one_class_task_is_not_attacked(cli, tmp_path):
    # A store written before the dump refused such tasks: the attack refuses it too.
    labels = np.zeros(60, dtype=np.int64)
    split = np.tile(np.array([0, 0, 1, 1, 2], dtype=np.uint8), 12)
    z = np.random.default_rng(0).standard_normal((60, 8)).astype(np.float32)
    store = synthetic_store(tmp_path / "acts.h5", z=z, labels={"private": labels}, split=split, class_names={"private": ["<99", ">=99"]})
    before = _files(tmp_path)
    result = cli("attack", store, "--classifier", "--task", "private", "--json", tmp_path / "result.json")
    assert result.exit_code == 2
    assert error_line(result).startswith("Error: task 'private' has 1 class in the attacker-train rows; every role needs")
    assert _files(tmp_path) == before  # no result.json, no acts.report.json


def _below_chance_store(tmp_path: Path) -> Path:
    """Z carries the label in attacker-train/validation rows and its opposite in test rows."""
    labels = np.repeat([0, 1], 100)
    split = balanced_split(labels)
    z = labels.astype(np.float32).copy()
    z[split == 2] = 1 - z[split == 2]
    z = (z + 0.05 * np.random.default_rng(0).standard_normal(200)).astype(np.float32)[:, None]
    return synthetic_store(tmp_path / "acts.h5", z=z, labels={"private": labels}, split=split)


def test_an_attack_below_chance_carries_a_warning(cli, tmp_path):
    # The head learns perfectly, selects on validation, and then scores 0 against chance 0.5.
    store = _below_chance_store(tmp_path)
    out = tmp_path / "result.json"
    result = cli("attack", store, "--classifier", "--head", "linear", "--epochs", "30", "--patience", "5", "--json", out)
    assert result.exit_code == 0, result.stderr
    data = json.loads(out.read_text())
    assert data["private_accuracy"] < 0.1 and data["private_chance"] == 0.5
    expected = (
        f"private: accuracy {data['private_accuracy']:.2f} is below chance 0.50; the attack failed to learn, "
        "the drop is not evidence of privacy."
    )
    assert expected in data["warnings"]
    assert f"Warning: {expected}" in result.stderr.splitlines()
    report = json.loads((tmp_path / "acts.report.json").read_text())
    assert expected in report["results"]["attack:classifier"]["warnings"]
    page = render(report)
    assert "<h2>Warnings</h2>" in page and "is below chance 0.50; the attack failed to learn" in page


def test_an_audit_passes_the_attacks_warnings_on(tmp_path):
    from leakaudit.audit import AuditConfig, ModelSection, audit_store
    from leakaudit.pipeline import step
    from leakaudit.registry import ATTACKS

    store = _below_chance_store(tmp_path)
    attack = step(ATTACKS, "classifier", {"task": "private", "head": "linear", "epochs": 30, "patience": 5})
    config = AuditConfig(model=ModelSection(spec="lenet5"), layer="conv3", data="digits", tasks={}, attacks=(attack,), metrics=())
    heard: list[str] = []
    report = audit_store(store, config, None, on_warning=heard.append)
    kept = report.results["attack:classifier"]["warnings"]
    assert any("is below chance 0.50" in w for w in kept)
    assert heard == [f"acts.h5, attack classifier: {w}" for w in kept]


def test_below_chance_warnings_cover_the_attack_and_its_raw_reference():
    assert below_chance_warnings("private", 0.5, 0.9, 0.5) == []  # at chance is not below it
    attack, = below_chance_warnings("private", 0.42, 0.9, 0.5)
    assert attack == "private: accuracy 0.42 is below chance 0.50; the attack failed to learn, the drop is not evidence of privacy."
    assert any("raw-X reference accuracy 0.30" in w for w in below_chance_warnings("private", 0.6, 0.3, 0.5))
    close, = below_chance_warnings("private", 0.499, None, 0.5)
    assert "accuracy 0.499 is below chance 0.500" in close  # never "0.50 is below chance 0.50"


# ----------------------------------------------------------------------- t-SNE on small splits


def _small_store(tmp_path: Path, n: int, test_rows: int) -> Path:
    rng = np.random.default_rng(0)
    labels = np.tile([0, 1], n // 2)
    split = np.zeros(n, dtype=np.uint8)
    split[n // 2 :] = 1
    split[n - test_rows :] = 2
    z = rng.standard_normal((n, 16, 2, 2)).astype(np.float32)  # 64 features: more than PCA's 50
    return synthetic_store(tmp_path / "acts.h5", z=z, labels={"public": labels, "private": labels}, split=split)


def test_report_draws_the_tsne_of_a_20_row_test_split(cli, tmp_path):
    store = _small_store(tmp_path, 80, 20)
    embedding = tsne_embedding(store)
    assert embedding is not None and np.asarray(embedding["points"]).shape == (20, 2)
    assert np.isfinite(embedding["points"]).all() and set(embedding["labels"]) == {"public", "private"}
    report = _report(tmp_path / "report.json", {"dcor_u2": 0.01}, store=store)
    result = cli("report", report, "-o", tmp_path / "report.html")
    assert result.exit_code == 0, result.stderr
    page = (tmp_path / "report.html").read_text()
    assert "t-SNE of Z — public labels" in page and "t-SNE of Z — private labels" in page


def test_too_few_test_rows_skip_the_tsne_with_a_note(cli, tmp_path):
    store = _small_store(tmp_path, 40, 3)
    embedding = tsne_embedding(store)
    assert embedding == {"points": None, "labels": {}, "note": "t-SNE skipped: the store has 3 test rows, fewer than 5."}
    report = _report(tmp_path / "report.json", {"dcor_u2": 0.01}, store=store)
    result = cli("report", report, "-o", tmp_path / "report.html")
    assert result.exit_code == 0, result.stderr
    assert "t-SNE skipped: the store has 3 test rows" in result.stderr
    page = (tmp_path / "report.html").read_text()
    assert "t-SNE skipped: the store has 3 test rows, fewer than 5." in page and "<circle" not in page


# ----------------------------------------------------------------------- labels out of range


def _npz(path: Path, y: np.ndarray, **arrays: np.ndarray) -> Path:
    x = np.random.default_rng(0).integers(0, 256, size=(len(y), 12, 12), dtype=np.uint8)
    np.savez(path, x=x, y=y, **arrays)
    return path


def test_a_label_beyond_the_declared_class_names_is_refused(cli, tmp_path):
    y = np.repeat(np.arange(3), 20)
    y[5] = 7
    data = _npz(tmp_path / "data.npz", y, class_names=np.array(["cat", "dog", "owl"]))
    result = _dump(cli, tmp_path, "--data", f"npz:{data}", "--task", "private=label")
    assert result.exit_code == 2
    assert error_line(result) == (
        f"Error: {data}:y: label value 7 is outside the valid range 0..2 of its 3 class names. "
        "Fix or drop those rows (labels are integers 0..K-1, or strings)."
    )


def test_a_negative_label_is_refused_not_renumbered(cli, tmp_path):
    y = np.repeat(np.arange(3), 20)
    y[[5, 6]] = -1
    data = _npz(tmp_path / "data.npz", y)
    result = _dump(cli, tmp_path, "--data", f"npz:{data}", "--task", "private=label")
    assert result.exit_code == 2
    assert error_line(result) == (
        f"Error: {data}:y: label value -1 (and 1 more rows) is outside valid labels 0..K-1. "
        "Fix or drop those rows (labels are integers 0..K-1, or strings)."
    )


def test_a_map_naming_a_label_the_data_does_not_have_is_refused(cli, tmp_path):
    groups = tmp_path / "groups.yaml"
    groups.write_text("".join(f"{i}: g{i % 3}\n" for i in range(10)) + "12: g0\n")
    result = _dump(cli, tmp_path, "--data", "digits", "--task", f"private=map:{groups}")
    assert result.exit_code == 2
    assert error_line(result) == (
        f"Error: task 'private': map '{groups}' maps label 12, outside the valid range 0..9 of the data's "
        "10 classes. Remove it or fix the label."
    )


def test_a_map_to_no_group_is_refused(cli, tmp_path):
    groups = tmp_path / "groups.yaml"
    groups.write_text("".join(f"{i}: g{i % 3}\n" for i in range(9)) + "9:\n")
    result = _dump(cli, tmp_path, "--data", "digits", "--task", f"private=map:{groups}")
    assert result.exit_code == 2
    assert error_line(result) == (
        f"Error: task 'private': map '{groups}' maps 9 to None, which is not a group name. "
        "Give every label a group name (a string or an integer)."
    )


# ----------------------------------------------------------------------- missing data


def test_idx_directory_that_does_not_exist(cli, tmp_path):
    result = _dump(cli, tmp_path, "--data", f"idx:{tmp_path / 'mnist'}", "--task", "private=label")
    assert result.exit_code == 2
    assert error_line(result) == f"Error: idx directory '{tmp_path / 'mnist'}' does not exist."


def test_idx_directory_without_idx_files(cli, tmp_path):
    (tmp_path / "mnist").mkdir()
    (tmp_path / "mnist" / "README").write_text("images go here\n")
    result = _dump(cli, tmp_path, "--data", f"idx:{tmp_path / 'mnist'}", "--task", "private=label")
    assert result.exit_code == 2
    assert error_line(result) == (
        f"Error: no train images idx file (train-images-idx3-ubyte[.gz]) in '{tmp_path / 'mnist'}'."
    )


def test_npz_without_the_task_array(cli, tmp_path):
    data = _npz(tmp_path / "data.npz", np.repeat(np.arange(3), 20), smiling=np.tile([0, 1], 30))
    result = _dump(cli, tmp_path, "--data", f"npz:{data}", "--task", "private=glasses")
    assert result.exit_code == 2
    assert error_line(result).startswith("Error: unknown task source for 'private' 'glasses'.")
    assert "smiling" in error_line(result)


def test_folder_without_images(cli, tmp_path):
    for name in ("cat", "dog"):
        (tmp_path / "images" / name).mkdir(parents=True)
    (tmp_path / "images" / "cat" / "notes.txt").write_text("not an image\n")
    result = _dump(cli, tmp_path, "--data", f"folder:{tmp_path / 'images'}", "--task", "private=label")
    assert result.exit_code == 2
    assert error_line(result) == f"Error: image folder '{tmp_path / 'images'}' has no images in class sub-folders."


def test_hdf5_without_an_image_array(cli, tmp_path):
    path = tmp_path / "data.h5"
    with h5py.File(path, "w") as f:
        f["pixels"] = np.zeros((30, 8, 8), dtype=np.uint8)
        f["y"] = np.repeat(np.arange(3), 10)
    result = _dump(cli, tmp_path, "--data", f"hdf5:{path}", "--task", "private=label")
    assert result.exit_code == 2
    assert error_line(result) == (
        f"Error: {path} has no image array; expected one named x, X, images, inputs, data (found: pixels, y)."
    )


def test_a_corrupt_image_in_a_folder_is_one_line(cli, tmp_path):
    for name in ("cat", "dog"):
        (tmp_path / "images" / name).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(np.full((8, 8), 40 * i, dtype=np.uint8)).save(tmp_path / "images" / name / f"{i}.png")
    (tmp_path / "images" / "dog" / "5.png").write_bytes(b"\x89PNG not really")
    result = _dump(cli, tmp_path, "--data", f"folder:{tmp_path / 'images'}", "--task", "private=label", "--input-size", "32")
    assert result.exit_code == 2
    assert error_line(result).startswith(f"Error: cannot read image '{tmp_path / 'images' / 'dog' / '5.png'}'")


def _idx_images(path: Path, n: int, *, truncate: int = 0) -> Path:
    header = bytes([0, 0, 0x08, 3]) + b"".join(d.to_bytes(4, "big") for d in (n, 8, 8))
    body = np.random.default_rng(0).integers(0, 256, size=n * 64, dtype=np.uint8).tobytes()
    path.write_bytes(header + body[: len(body) - truncate])
    return path


def test_idx_images_without_a_labels_file_cannot_give_a_label_task(cli, tmp_path):
    (tmp_path / "mnist").mkdir()
    _idx_images(tmp_path / "mnist" / "train-images-idx3-ubyte", 30)
    result = _dump(cli, tmp_path, "--data", f"idx:{tmp_path / 'mnist'}", "--task", "private=label")
    assert result.exit_code == 2
    assert error_line(result) == (
        f"Error: task 'private' needs labels, but data source 'idx:{tmp_path / 'mnist'}' has none."
    )


def test_truncated_idx_images_file(cli, tmp_path):
    (tmp_path / "mnist").mkdir()
    images = _idx_images(tmp_path / "mnist" / "train-images-idx3-ubyte", 30, truncate=100)
    result = _dump(cli, tmp_path, "--data", f"idx:{tmp_path / 'mnist'}", "--task", "private=label")
    assert result.exit_code == 2
    assert error_line(result) == f"Error: idx file '{images}' is truncated: expected {16 + 30 * 64} bytes, got {16 + 30 * 64 - 100}."
