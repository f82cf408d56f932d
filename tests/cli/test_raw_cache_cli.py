"""The raw-X reference's cache end to end: separate commands on stores of the same data train it once."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np

from leakaudit.attacks import classifier_raw
from leakaudit.store import record_checksums
from tests.cli.test_audit_cli import _audit, _weights

FAST = ("--classifier", "--head", "linear", "--epochs", "2")


def test_a_second_attack_command_reuses_the_reference_and_says_so(cli, tmp_path, small_digits_store):
    first, second = tmp_path / "a.h5", tmp_path / "b.h5"
    shutil.copyfile(small_digits_store, first)
    shutil.copyfile(small_digits_store, second)
    with h5py.File(second, "r+") as f:  # another model's Z on the same rows
        f["activations"][...] = np.random.default_rng(0).standard_normal(f["activations"].shape).astype(f["activations"].dtype)
    record_checksums(second)
    one = cli("attack", first, *FAST, "--json", tmp_path / "a.json")
    assert one.exit_code == 0, one.output
    assert "not trained again" not in one.stdout
    classifier_raw.clear()  # a new process
    two = cli("attack", second, *FAST, "--json", tmp_path / "b.json")
    assert two.exit_code == 0, two.output
    assert "raw-X heads: not trained again" in " ".join(two.stdout.split())
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in "ab")
    assert b["raw_reference_shared"] and not a["raw_reference_shared"]
    assert b["raw_reference_entry"] == a["raw_reference_entry"] and Path(a["raw_reference_entry"]).is_file()
    assert b["private_accuracy_raw"] == a["private_accuracy_raw"]
    assert b["private_accuracy_raw_ci95"] == a["private_accuracy_raw_ci95"]
    # --set cache=false trains it again, to the same number.
    classifier_raw.clear()
    three = cli("attack", second, *FAST, "--set", "cache=false", "--json", tmp_path / "c.json", "--force")
    assert three.exit_code == 0, three.output
    c = json.loads((tmp_path / "c.json").read_text())
    assert not c["raw_reference_shared"] and c["private_accuracy_raw"] == a["private_accuracy_raw"]


def test_an_audit_keeps_the_reference_in_its_configured_cache(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("LEAKAUDIT_CACHE", str(tmp_path / "env-cache"))
    audit = _audit(tmp_path, _weights(tmp_path / "model.safetensors", 0))
    audit.write_text(audit.read_text() + "cache: own-cache\n")
    result = cli("audit", audit, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "own-cache" / "raw-x").glob("*.json"))) == 1
    assert not (tmp_path / "env-cache" / "raw-x").exists()


def test_a_reference_turned_off_is_not_called_missing_inputs(cli, small_digits_store):
    result = cli("attack", small_digits_store, *FAST, "--set", "raw_reference=false")
    assert result.exit_code == 0, result.output
    shown = " ".join(result.stdout.split())
    assert "private_accuracy_raw — (not run: raw_reference=false)" in shown and "no /inputs" not in shown
