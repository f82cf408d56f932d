"""The classifier attack: neither under-reports (trained LeNet-5) nor over-reports (noise Z)."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch

from leakaudit.attacks import ClassifierConfig, run_classifier
from leakaudit.attacks.classifier import HEAD_CHOICES, continuation_head, raw_cnn
from leakaudit.config import from_mapping
from leakaudit.errors import ConfigError, DataError, NonFiniteError, UnknownNameError, UsageError
from leakaudit.models import ModelSpec
from leakaudit.registry import ATTACKS
from leakaudit.store import open_store
from tests.attacks import balanced_split, single_thread, synthetic_store, train_lenet_on_digits

pytestmark = pytest.mark.usefixtures("one_torch_thread")
# The defaults (200 epochs, patience 20) train longer and only get stronger.
FAST = {"epochs": 30, "patience": 8}


@pytest.fixture(scope="module")
def trained_result(trained_digits_store):
    with single_thread(), open_store(trained_digits_store) as store:
        return run_classifier(store, ClassifierConfig(task="private", **FAST))


def test_trained_lenet_private_accuracy_is_within_5_points_of_raw_x(trained_result):
    result = trained_result
    assert [h.name for h in result.heads] == ["linear", "svm", "mlp", "conv", "continuation"]
    assert all(h.ok for h in result.heads), [h.reason for h in result.heads]
    assert [h.name for h in result.raw_heads] == ["raw-linear", "raw-cnn"]
    assert result.private_accuracy_raw is not None and result.private_accuracy_raw > 0.9
    assert abs(result.private_accuracy - result.private_accuracy_raw) <= 0.05
    assert result.private_accuracy_drop == pytest.approx(1 - result.private_accuracy / result.private_accuracy_raw)
    assert result.chance == pytest.approx(0.1, abs=0.02)


def test_the_strongest_head_is_chosen_on_validation_not_test(trained_result):
    best = max(trained_result.heads, key=lambda h: h.val_accuracy)
    assert trained_result.best_head == best.name
    # The headline is the chosen head's stronger protocol: fitted on attacker-train, or refitted with validation too.
    assert trained_result.accuracy == max(best.accuracy, best.refit_accuracy)
    assert trained_result.protocol == ("refit" if best.refit_accuracy > best.accuracy else "selection")
    raw_best = max(trained_result.raw_heads, key=lambda h: h.val_accuracy)
    assert trained_result.raw_best_head == raw_best.name


def test_result_serialises_to_json_with_report_names(trained_result):
    data = json.loads(json.dumps(trained_result.to_dict()))
    assert data["attack"] == "classifier" and data["task"] == "private"
    assert data["private_accuracy"] == trained_result.accuracy
    assert {h["name"] for h in data["heads"]} == {"linear", "svm", "mlp", "conv", "continuation"}
    metrics = trained_result.report_metrics()
    names = set(metrics)
    assert {"private_accuracy", "private_accuracy_raw", "private_chance"} <= names
    points = {"private_accuracy", "private_balanced_accuracy", "private_accuracy_raw", "private_chance", "private_accuracy_continuation"}
    assert {n for n in names if not n.endswith("_ci95")} <= points
    # Every accuracy has its interval, around it; so do the drops, which the report derives.
    with_interval = {"private_accuracy", "private_balanced_accuracy", "private_accuracy_raw", "private_accuracy_continuation",
                     "private_accuracy_drop", "private_accuracy_drop_continuation"}  # fmt: skip
    assert {n[: -len("_ci95")] for n in names if n.endswith("_ci95")} == with_interval
    for name in with_interval & names:
        lo, hi = metrics[name + "_ci95"]
        assert lo <= metrics[name] <= hi and hi - lo < 0.2, name
    assert data["private_accuracy_ci95"] == metrics["private_accuracy_ci95"]
    for head in data["heads"] + data["raw_heads"]:
        assert head["accuracy_ci95"][0] <= head["accuracy"] <= head["accuracy_ci95"][1], head["name"]
        assert head["balanced_accuracy_ci95"][0] <= head["balanced_accuracy"] <= head["balanced_accuracy_ci95"][1]
    # The drop is derived by the report (leakaudit.glossary), like every drop, and agrees with the result's own.
    from leakaudit.report import Report

    report = Report({})
    report.add("attack:classifier", trained_result)
    assert report.metrics["private_accuracy_drop"] == trained_result.private_accuracy_drop
    lo, hi = report.metrics["private_accuracy_drop_ci95"]
    assert lo <= report.metrics["private_accuracy_drop"] <= hi
    continuation = next(h for h in trained_result.heads if h.name == "continuation")
    if continuation.ok:
        assert report.metrics["private_accuracy_drop_continuation"] == 1.0 - continuation.accuracy / trained_result.private_accuracy_raw
    assert data["config"]["epochs"] == FAST["epochs"]


def test_noise_z_gives_chance_accuracy(noise_store):
    with open_store(noise_store) as store:
        result = run_classifier(store, ClassifierConfig(raw_reference=False, epochs=30, patience=5))
    assert all(h.ok for h in result.heads)
    assert abs(result.private_accuracy - result.chance) <= 0.05
    assert result.private_accuracy_raw is None and "private_accuracy_raw" not in result.report_metrics()


def test_same_seed_same_result_other_seed_other_model(small_digits_store):
    def run(seed: int) -> dict:
        with open_store(small_digits_store) as store:
            result = run_classifier(store, ClassifierConfig(head="mlp", raw_reference=False, epochs=4, seed=seed))
        head = dataclasses.asdict(result.heads[0])
        return {k: v for k, v in head.items() if not k.startswith("seconds")}

    first, second = run(0), run(0)
    assert first == second
    # The intervals too, to the byte: the bootstrap's resampling is seeded.
    assert json.dumps(first["accuracy_ci95"]) == json.dumps(second["accuracy_ci95"])
    assert first["accuracy_ci95"][0] < first["accuracy"] < first["accuracy_ci95"][1]
    assert run(1)["val_accuracy"] != first["val_accuracy"] or run(1)["accuracy"] != first["accuracy"]


def test_one_feature_z_works_and_inapplicable_heads_say_why(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 100)
    z = (labels + 0.3 * rng.standard_normal(200)).astype(np.float32)[:, None]
    path = synthetic_store(tmp_path / "one.h5", z=z, labels={"private": labels}, split=balanced_split(labels))
    with open_store(path) as store:
        result = run_classifier(store, ClassifierConfig(raw_reference=False, epochs=20, patience=5))
        by_name = {h.name: h for h in result.heads}
        assert by_name["linear"].ok and by_name["linear"].accuracy > 0.85
        assert by_name["mlp"].ok
        assert by_name["conv"].status == "skipped" and "not spatial" in by_name["conv"].reason
        assert by_name["continuation"].status == "skipped" and "no model spec" in by_name["continuation"].reason
        assert any("'conv' skipped" in w for w in result.warnings)
        with pytest.raises(UsageError, match=r"the conv head cannot be used on .*: Z \(1\) is not spatial"):
            run_classifier(store, ClassifierConfig(head="conv", raw_reference=False))


def test_unknown_task_lists_the_tasks(small_digits_store):
    with open_store(small_digits_store) as store, pytest.raises(UnknownNameError) as info:
        run_classifier(store, ClassifierConfig(task="privat"))
    assert str(info.value).startswith("unknown task 'privat'. Closest: private.")
    assert "The store has: private, public." in str(info.value)


def test_unknown_head_lists_the_closest():
    with pytest.raises(UnknownNameError, match=r"unknown classifier head 'mpl'\. Closest: mlp\."):
        from_mapping(ClassifierConfig, {"head": "mpl"})
    assert set(HEAD_CHOICES) == {"linear", "svm", "mlp", "conv", "continuation", "best", "fresh"}


def test_config_rejects_unknown_keys_and_bad_values():
    with pytest.raises(ConfigError, match=r"epoch: unknown key\. Did you mean 'epochs'\?"):
        from_mapping(ClassifierConfig, {"epoch": 3})
    with pytest.raises(ConfigError, match=r"lr: expected a positive number, got 0"):
        from_mapping(ClassifierConfig, {"lr": 0})
    assert from_mapping(ClassifierConfig, {"epochs": 5, "batch-size": 32}) == ClassifierConfig(epochs=5, batch_size=32)


def test_a_class_with_too_few_rows_is_refused(tmp_path):
    labels = np.repeat([0, 1, 2], 20)
    split = np.tile(np.array([0, 0, 1, 2], dtype=np.uint8), 15)
    # Class 2 keeps a single attacker-train row.
    (c2,) = np.nonzero(labels == 2)
    train_rows_of_c2 = c2[split[c2] == 0]
    split[train_rows_of_c2[1:]] = 1
    z = np.random.default_rng(0).standard_normal((60, 4)).astype(np.float32)
    path = synthetic_store(tmp_path / "thin.h5", z=z, labels={"private": labels}, split=split)
    with open_store(path) as store, pytest.raises(DataError) as info:
        run_classifier(store, ClassifierConfig())
    assert str(info.value).startswith("task 'private' has too few rows of class '2' in attacker-train: 1;")


def test_non_finite_z_is_refused(tmp_path):
    labels = np.repeat([0, 1], 30)
    z = np.ones((60, 3), dtype=np.float32)
    z[5, 1] = np.nan
    z[7, 0] = np.inf
    path = synthetic_store(tmp_path / "nonfinite.h5", z=z, labels={"private": labels}, split=balanced_split(labels))
    with open_store(path) as store, pytest.raises(NonFiniteError) as info:
        run_classifier(store, ClassifierConfig())
    message = str(info.value)
    assert "contain 1 NaN and 1 infinite values in" in message and "nan" not in message.replace("NaN", "")


def test_continuation_head_is_the_reinitialised_rest_of_lenet(small_digits_store):
    with open_store(small_digits_store) as store:
        z = torch.from_numpy(store.activations(np.arange(4)))
        head = continuation_head(store, 2, z)
    assert head(z).shape == (4, 2)
    names = [type(m).__name__ for m in head.modules()]
    assert names.count("Linear") == 2 and "Conv2d" not in names  # conv3 is the split: fc1, fc2 remain


def test_continuation_is_skipped_when_the_checkpoint_changed(tmp_path, small_digits_store):
    from leakaudit.dump import DumpSettings, dump

    weights = train_lenet_on_digits(small_digits_store, tmp_path / "w.safetensors", epochs=1)
    store_path = tmp_path / "w.h5"
    dump(DumpSettings(model=ModelSpec("lenet5", weights=str(weights)), layer="pool2", data="digits", output=store_path,
                      tasks=(("private", "label"),), limit=300))  # fmt: skip
    shutil.copyfile(tmp_path / "w.safetensors", tmp_path / "backup.safetensors")
    train_lenet_on_digits(small_digits_store, weights, epochs=1, seed=1)  # overwrite: other bytes
    with open_store(store_path) as store:
        result = run_classifier(store, ClassifierConfig(raw_reference=False, epochs=2))
        skipped = {h.name: h for h in result.heads}["continuation"]
        assert skipped.status == "skipped" and "changed since the dump" in skipped.reason
        shutil.copyfile(tmp_path / "backup.safetensors", weights)
        result = run_classifier(store, ClassifierConfig(head="continuation", raw_reference=False, epochs=2))
        assert result.heads[0].ok and result.best_head == "continuation"


def test_raw_cnn_fits_large_and_small_images():
    for shape in ((1, 32, 32), (3, 128, 96), (1, 8, 8), (3, 11, 11)):
        model = raw_cnn(shape, 5).eval()
        assert model(torch.rand(2, *shape)).shape == (2, 5)


def test_registered_as_a_plugin():
    plugin = ATTACKS.get("classifier")
    assert plugin.target is run_classifier and plugin.config_cls is ClassifierConfig
    assert {"classifier", "decoder"} <= set(ATTACKS.names())
    with pytest.raises(UnknownNameError, match=r"unknown attack 'clasifier'\. Closest: classifier\."):
        ATTACKS.get("clasifier")
