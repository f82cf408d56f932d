"""``harden --method nopeek --burn-in`` and ``--record-sent``, end to end on digits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from leakaudit._io import sha256_file
from leakaudit.cli import app
from leakaudit.provenance import rebuild_split
from leakaudit.store import open_store
from tests.attacks import single_thread

COMMON = [
    "harden", "lenet5", "--num-classes", "2", "--layer", "conv3", "--data", "digits", "--task", "public=parity",
    "--task", "private=label", "--method", "nopeek", "--limit", "240", "--batch-size", "64", "--epochs", "1",
    "--seed", "0",
]  # fmt: skip


@pytest.fixture(scope="module")
def burnin_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("burnin") / "out"
    args = [*COMMON, "--burn-in", "8", "--option", "burn_in_rows=60", "--option", "burn_in_iterations=3",
            "--record-sent", "0,1", "-o", str(out)]
    with single_thread():
        result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return out, json.loads((out / "harden.json").read_text())


def test_burn_in_history_is_recorded(burnin_run):
    _, record = burnin_run
    burn = record["runs"][0]["burn_in"]
    history = burn["decorrelation"]["history"]
    assert [h["iteration"] for h in history] == [0, 1, 2, 3]
    assert history[-1]["dcor_x"] < history[0]["dcor_x"]  # the targets are decorrelated from X
    assert burn["rows"] == 60 and burn["steps"] == 8
    assert len(burn["regression_loss"]["values"]) == 8
    assert burn["regression_loss"]["last"] < burn["regression_loss"]["first"]  # the encoder moved towards them
    assert record["runs"][0]["config"]["burn_in"] == 8


def test_recorded_stores_verify_and_match_the_dumped_model(burnin_run):
    out, record = burnin_run
    sent = record["runs"][0]["sent"]
    assert set(sent) == {"epoch-0", "epoch-1", "end"}
    for name in sent.values():
        with open_store(out / name, verify="all") as store:
            assert len(store) == 240
            z = store.activations()
            assert z.shape[0] == 240 and np.isfinite(z).all()
    with open_store(out / sent["epoch-0"]) as first, open_store(out / sent["end"]) as last:
        assert not np.allclose(first.activations(), last.activations())  # an epoch of training moved the encoder


def test_recorded_stores_name_weights_that_exist_after_the_swap(burnin_run):
    out, record = burnin_run
    for name in record["runs"][0]["sent"].values():
        with open_store(out / name, verify="all") as store:  # the re-sealed attributes still verify
            weights = Path(store.attrs["weights"])
            assert weights.parent == (out / name).parent  # not the staging folder, which is gone
            assert weights.is_file()
            assert sha256_file(weights) == store.attrs["checkpoint_sha256"]
            split = rebuild_split(store)  # what the continuation head and white-box attacks do
            rows = store.rows("test")[:8]
            x = torch.from_numpy(store.inputs(rows)).float()
            with torch.no_grad():
                z = split.encoder(x).flatten(1).numpy()
            np.testing.assert_allclose(z, store.activations(rows).reshape(len(rows), -1), rtol=1e-4, atol=1e-5)


def test_recording_does_not_change_the_training_run(burnin_run, tmp_path):
    _, record = burnin_run
    args = [*COMMON, "--burn-in", "8", "--option", "burn_in_rows=60", "--option", "burn_in_iterations=3",
            "-o", str(tmp_path / "plain")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    plain = json.loads((tmp_path / "plain" / "harden.json").read_text())["runs"][0]
    recorded = record["runs"][0]
    assert plain["public_accuracy"] == recorded["public_accuracy"]
    assert [h["val_loss"] for h in plain["history"]] == [h["val_loss"] for h in recorded["history"]]


def test_burn_in_is_refused_for_another_recipe_and_bad_epochs(tmp_path):
    bad = CliRunner().invoke(app, [*COMMON, "--method", "center-loss", "--burn-in", "3", "-o", str(tmp_path / "a")])
    assert bad.exit_code == 2
    assert "--burn-in does not apply to center-loss" in bad.output
    late = CliRunner().invoke(app, [*COMMON, "--record-sent", "5", "-o", str(tmp_path / "b")])
    assert late.exit_code == 2
    assert "--record-sent epochs must lie in 0..1 (--epochs), got [5]." in late.output
    text = CliRunner().invoke(app, [*COMMON, "--record-sent", "one", "-o", str(tmp_path / "c")])
    assert text.exit_code == 2
    assert "--record-sent expects epochs" in text.output
