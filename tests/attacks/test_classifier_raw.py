"""The raw-X reference is trained once per content and shared between stores of the same data,
in the process and through the on-disk cache between processes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from leakaudit.attacks import classifier_raw
from leakaudit.attacks.classifier import ClassifierConfig, run_classifier
from leakaudit.store import open_store

FAST = {"task": "private", "head": "linear", "epochs": 3, "patience": 3, "device": "cpu", "cache": False}


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


def _entries() -> list[Path]:
    return sorted((Path(os.environ["LEAKAUDIT_CACHE"]) / "raw-x").glob("*.json"))


def test_a_later_process_reads_the_reference_from_the_cache(trained_digits_store, noise_store):
    first = _run(trained_digits_store, cache=True)
    assert not first.raw_reference_shared
    [entry] = _entries()
    assert first.raw_reference_entry == str(entry)
    json.loads(entry.read_text())  # JSON only: nothing in the cache is unpickled
    classifier_raw.clear()  # what a new process starts with
    second = _run(noise_store, cache=True)
    assert second.raw_reference_shared and second.raw_reference_entry == str(entry)
    assert _raw(second) == _raw(first)
    assert second.test_correct["raw"].tolist() == first.test_correct["raw"].tolist()  # the per-row scores too
    # A damaged entry is trained again, to the same numbers, said, and written again whole.
    _damage_bits(entry)
    classifier_raw.clear()
    again = _run(noise_store, cache=True)
    assert not again.raw_reference_shared and _raw(again) == _raw(first)
    assert again.private_accuracy_drop_ci95 == second.private_accuracy_drop_ci95
    [warning] = [w for w in again.warnings if "raw-X reference" in w]
    assert warning == f"the cached raw-X reference {str(entry)!r} is not reused (it fails its checksum); training it again."
    key = json.loads(entry.read_text())["payload"]["content"]
    assert classifier_raw._read_entry(entry, key, None) is not None


def test_another_thread_count_budget_or_library_is_another_entry(monkeypatch):
    x = torch.zeros(4, 3)
    labels = (torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.long), np.zeros(4))
    key = classifier_raw.content_key(_Rows(x), labels, ClassifierConfig(), 2, torch.device("cpu"), 1)
    assert key == classifier_raw.content_key(_Rows(x), labels, ClassifierConfig(head="mlp", cache=False), 2,
                                             torch.device("cpu"), 1)  # fmt: skip
    assert key != classifier_raw.content_key(_Rows(x), labels, ClassifierConfig(epochs=2), 2, torch.device("cpu"), 1)
    path = classifier_raw.entry_path(key)
    assert path.parent == Path(os.environ["LEAKAUDIT_CACHE"]) / "raw-x"
    threads = torch.get_num_threads()
    torch.set_num_threads(1 if threads > 1 else 2)  # the conftest restores the count
    assert classifier_raw.entry_path(key) != path
    torch.set_num_threads(threads)
    monkeypatch.setattr(torch, "__version__", "0.0.0")
    assert classifier_raw.entry_path(key) != path
    monkeypatch.undo()
    with classifier_raw.cache_folder("/elsewhere"):
        assert classifier_raw.entry_path(key) == Path("/elsewhere/raw-x") / path.name


class _Rows:
    def __init__(self, x: torch.Tensor) -> None:
        self.train = self.val = self.test = x


def _damage_bits(entry: Path) -> None:
    data = json.loads(entry.read_text())
    mask = data["payload"]["correct"]["raw-linear"]
    mask["bits"] = ("B" if mask["bits"][0] != "B" else "C") + mask["bits"][1:]  # one test row scored otherwise
    entry.write_text(json.dumps(data))


def _forge(entry: Path) -> None:
    """A consistent entry of other numbers: its checksum recomputed, its content key not."""
    data = json.loads(entry.read_text())
    data["payload"]["content"] = "0" * 64
    data["sha256"] = classifier_raw._digest(data["payload"])
    entry.write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda e: e.write_text(e.read_text()[:-40]), "it is not valid JSON"),  # cut short
        (lambda e: e.write_bytes(b"\x80\x04K\x01."), "it is not UTF-8 text"),  # a pickle is not read as one
        (_damage_bits, "it fails its checksum"),
        (_forge, "it records other content"),
        (lambda e: e.write_text(json.dumps({"format": 99})), "it is not an entry of this version"),
        (lambda e: e.write_text("[]"), "it is not an entry of this version"),
    ],
    ids=["truncated", "pickle", "flipped-bits", "other-content", "other-format", "not-a-mapping"],
)
def test_every_kind_of_damage_is_refused(reference_entry, tmp_path, damage, reason):
    key, original = reference_entry
    entry = tmp_path / original.name
    entry.write_bytes(original.read_bytes())
    assert classifier_raw._read_entry(entry, key, None) is not None  # the copy reads before it is damaged
    damage(entry)
    heard: list[str] = []
    assert classifier_raw._read_entry(entry, key, heard.append) is None
    assert heard == [f"the cached raw-X reference {str(entry)!r} is not reused ({reason}); training it again."]


@pytest.fixture(scope="module")
def reference_entry(trained_digits_store, tmp_path_factory) -> tuple[str, Path]:
    """A genuine entry and its content key, written by one run of the classifier."""
    folder = tmp_path_factory.mktemp("raw-cache")
    with classifier_raw.cache_folder(folder):
        result = _run(trained_digits_store, cache=True)
    entry = Path(result.raw_reference_entry)
    return json.loads(entry.read_text())["payload"]["content"], entry


def test_a_cache_that_cannot_be_written_costs_a_retraining_only(trained_digits_store, tmp_path, monkeypatch):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    monkeypatch.setenv("LEAKAUDIT_CACHE", str(blocked))
    result = _run(trained_digits_store, cache=True)
    assert result.private_accuracy_raw is not None and result.raw_reference_entry is None
    [warning] = [w for w in result.warnings if "raw-X reference" in w]
    assert "could not be kept in the cache" in warning and str(blocked) in warning
    assert not list(tmp_path.glob("**/*.tmp*"))
