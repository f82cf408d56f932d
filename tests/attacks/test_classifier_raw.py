"""The raw-X reference is trained once per content and shared between stores of the same data."""

from __future__ import annotations

import json

import pytest

from leakaudit.attacks import classifier_raw
from leakaudit.attacks.classifier import ClassifierConfig, run_classifier
from leakaudit.store import open_store

FAST = {"task": "private", "head": "linear", "epochs": 3, "patience": 3, "device": "cpu"}


def _run(path, **settings):
    with open_store(path) as store:
        return run_classifier(store, ClassifierConfig(**{**FAST, **settings}))


def _raw(result) -> str:
    """The raw-X part of a result, without wall times (another training of the same heads takes other seconds)."""
    data = result.to_dict()
    data["raw_heads"] = [{k: v for k, v in head.items() if not k.startswith("seconds")} for head in data["raw_heads"]]
    return json.dumps({k: data[k] for k in ("raw_heads", "raw_best_head", "private_accuracy_raw", "private_accuracy_raw_ci95",
                                            "raw_protocol")}, sort_keys=True)  # fmt: skip


def test_a_store_of_the_same_data_gets_the_reference_an_earlier_one_trained(trained_digits_store, noise_store):
    first = _run(trained_digits_store)
    # The noise store holds the same inputs, labels and split, and other Z.
    second = _run(noise_store)
    assert not first.raw_reference_shared and second.raw_reference_shared
    assert _raw(second) == _raw(first)
    assert second.to_dict()["heads"] != first.to_dict()["heads"]  # the Z heads were trained on its own Z
    # What it was given is what training again with the same seed gives.
    classifier_raw.clear()
    again = _run(noise_store)
    assert not again.raw_reference_shared and _raw(again) == _raw(first)
    # The drop of each store is computed against the shared reference.
    assert second.private_accuracy_drop == pytest.approx(1 - second.accuracy / first.private_accuracy_raw)


def test_other_settings_or_rows_train_their_own_reference(trained_digits_store, small_digits_store):
    _run(trained_digits_store)
    assert not _run(trained_digits_store, epochs=2).raw_reference_shared  # another budget
    assert not _run(trained_digits_store, seed=1).raw_reference_shared
    assert not _run(small_digits_store).raw_reference_shared  # other rows
    assert _run(trained_digits_store, head="mlp").raw_reference_shared  # the Z heads do not matter
