"""Attacks on stores that exceed the memory budget: the streamed path runs end to end and trains as in memory."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from leakaudit.attacks._data import attack_rows, read_activations
from leakaudit.attacks._sources import StreamSource, TensorSource
from leakaudit.attacks._training import Standardizer, as_tensor, fit
from leakaudit.store import open_store
from leakaudit.store.stream import Blocks

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(120, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 10))


def _train(train, val) -> tuple[nn.Module, float]:
    model = _net()
    result = fit(model, train, val, loss_fn=nn.functional.cross_entropy,
                 score_fn=lambda out, y: (out.argmax(1) == y).float(), epochs=3, batch_size=16, lr=1e-2,
                 patience=5, seed=7, device=torch.device("cpu"))
    return model, result.val_score


def test_streamed_training_equals_in_memory_training_with_the_same_order(small_digits_store):
    """The same blocks and seed draw the same batches: the weights agree to float32 rounding (rtol 1e-6, atol 1e-7)."""
    blocks = Blocks(block_rows=10, window_blocks=3)  # several windows: a shuffled-slice order, not one permutation
    with open_store(small_digits_store) as store:
        rows = attack_rows(store)
        labels = torch.from_numpy(store.labels("private"))
        z_train, z_val = (as_tensor(read_activations(store, r, role)) for r, role in ((rows.train, "attacker-train"), (rows.val, "attacker-validation")))
        memory, memory_score = _train(TensorSource(z_train, labels[rows.train], blocks=blocks), (z_val, labels[rows.val]))
        streamed = StreamSource(store, rows.train, "attacker-train", blocks, targets=labels[rows.train])
        streamed_val = StreamSource(store, rows.val, "attacker-validation", blocks, targets=labels[rows.val])
        stream, stream_score = _train(streamed, streamed_val)
        fitted = Standardizer.fit_source(streamed)
    assert stream_score == pytest.approx(memory_score, abs=1e-9)
    for (name, a), (_, b) in zip(memory.state_dict().items(), stream.state_dict().items()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7, msg=name)
    expected = Standardizer.fit(z_train)
    torch.testing.assert_close(fitted.mean, expected.mean, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(fitted.std, expected.std, rtol=1e-6, atol=1e-7)
    # and a different seed's order trains other weights (the comparison above can fail)
    other = _net()
    fit(other, TensorSource(z_train, labels[rows.train], blocks=Blocks(10, 1)), (z_val, labels[rows.val]),
        loss_fn=nn.functional.cross_entropy, score_fn=lambda out, y: (out.argmax(1) == y).float(), epochs=3,
        batch_size=16, lr=1e-2, patience=5, seed=7, device=torch.device("cpu"))
    assert not torch.equal(other[1].weight, memory[1].weight)


def test_per_channel_streamed_standardizer_matches(small_digits_store):
    with open_store(small_digits_store) as store:
        rows = attack_rows(store)
        x = as_tensor(store.inputs(rows.train))
        source = StreamSource(store, rows.train, "attacker-train", Blocks(7, 2), x_name="inputs", targets=torch.zeros(len(x)))
        fitted = Standardizer.fit_source(source, per_channel=True)
    expected = Standardizer.fit(x, per_channel=True)
    assert fitted.mean.shape == expected.mean.shape
    torch.testing.assert_close(fitted.mean, expected.mean, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(fitted.std, expected.std, rtol=1e-6, atol=1e-7)


def test_decoder_streams_under_a_tiny_budget(cli, small_digits_store, tmp_path):
    out = tmp_path / "d.json"
    result = cli("attack", small_digits_store, "--decoder", "upsample", "--epochs", "2", "--memory-budget", "1K",
                 "--set", "width=4", "--json", out, "--report", tmp_path / "r.json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(out.read_text())
    assert {p["data_path"] for p in data["data_path"].values()} == {"stream"}
    assert data["data_path"]["attacker-train"]["memory_budget"] == 1024
    assert "data: attacker-train stream (attacker-train rows take 536.2 KiB as float32, which exceed the memory budget of 1.0 KiB)" in result.stdout.splitlines()
    assert np.isfinite(data["ssim_mean"]) and data["runs"][0]["epochs"] == 2
    # the default budget reads this small store into memory
    again = cli("attack", small_digits_store, "--decoder", "upsample", "--epochs", "1", "--set", "width=4", "--json", "-",
                "--report", tmp_path / "r2.json")
    assert {p["data_path"] for p in json.loads(again.stdout)["data_path"].values()} == {"memory"}


def test_classifier_subsamples_within_a_small_budget(cli, small_digits_store, tmp_path):
    args = ("attack", small_digits_store, "--classifier", "--task", "private", "--head", "mlp", "--epochs", "3",
            "--set", "raw_reference=false", "--set", "refit=none")
    out = tmp_path / "c.json"
    result = cli(*args, "--memory-budget", "200K", "--json", out, "--report", tmp_path / "r.json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(out.read_text())
    record = data["data_path"]["attacker roles"]
    assert record["data_path"] == "subsample" and record["memory_budget"] == 200 * 1024
    assert record["role_bytes"] == 3 * 300 * 120 * 4 and record["share"] == pytest.approx(200 * 1024 / record["role_bytes"])
    kept, full = record["rows_kept"], record["rows_all"]
    assert data["rows"] == kept and all(kept[r] < full[r] for r in full)
    assert kept["attacker-train"] >= 0.4 * full["attacker-train"]
    assert "classifier ran on a subsample" in result.stderr and np.isfinite(data["private_accuracy"])
    # the same seed keeps the same rows; the default budget keeps them all
    again = json.loads(cli(*args, "--memory-budget", "200K", "--json", "-", "--report", tmp_path / "r2.json").stdout)
    assert again["data_path"] == data["data_path"] and again["private_accuracy"] == data["private_accuracy"]
    whole = json.loads(cli(*args, "--json", "-", "--report", tmp_path / "r3.json").stdout)
    assert whole["data_path"]["attacker roles"]["data_path"] == "memory" and whole["rows"] == full
