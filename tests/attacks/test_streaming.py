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
from leakaudit.attacks.classifier import ClassifierConfig
from leakaudit.attacks.classifier_data import classifier_data
from leakaudit.attacks.classifier_train import HeadData, build_head, train_head
from leakaudit.errors import EXIT_RUNTIME
from leakaudit.store import ROLES, open_store
from leakaudit.store.stream import Blocks, budget, format_bytes
from tests.attacks import _build as attacks_build
from tests.attacks import _dump as attacks_dump
from tests.attacks import balanced_split, synthetic_store
from tests.conftest import error_line

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
    networks = data["data_path"]["attacker-train"]["networks_bytes"]
    assert networks > 1024  # the decoder's weights and activations alone take more than the budget
    assert ("data: attacker-train stream (attacker-train rows take 536.2 KiB as float32, which exceed the memory budget of "
            f"1.0 KiB, all of it taken by the networks trained beside them ({format_bytes(networks)}))") in result.stdout.splitlines()
    assert any("the budget was not held" in w for w in data["warnings"])
    assert "Warning: the decoders take about" in result.stderr
    assert np.isfinite(data["ssim_mean"]) and data["runs"][0]["epochs"] == 2
    # the default budget reads this small store into memory
    again = cli("attack", small_digits_store, "--decoder", "upsample", "--epochs", "1", "--set", "width=4", "--json", "-",
                "--report", tmp_path / "r2.json")
    assert {p["data_path"] for p in json.loads(again.stdout)["data_path"].values()} == {"memory"}


def test_streamed_mlp_head_trains_as_in_memory_with_the_same_blocks(small_digits_store):
    """The mlp head from streams of every row equals the in-memory head given the same blocks and seed."""
    config = ClassifierConfig(head="mlp", epochs=3, patience=5, raw_reference=False, refit="none", device="cpu")
    cpu = torch.device("cpu")
    with open_store(small_digits_store) as store, budget("1K"):
        rows = attack_rows(store)
        labels = store.labels("private")
        data = classifier_data(store, rows, labels, ("activations",), 0, ["mlp"])
        assert data.path == "stream" and data.sizes("mlp") == rows.sizes()
        streamed = data.inputs("mlp", "activations")
        torch.manual_seed(1)
        model, inputs = build_head("mlp", store, (120, 1, 1), 10, streamed)
        stream_head, stream_correct = train_head("mlp", "Z", model, inputs, data.head_labels("mlp"), 10, config, cpu, None)
        fitted = Standardizer.fit_source(streamed.train.mapped(lambda x: x.flatten(1)))
        # in memory: the same rows, standardised by Standardizer.fit, trained in the stream's block order
        z = [as_tensor(read_activations(store, r, role)).flatten(1) for r, role in
             ((rows.train, "attacker-train"), (rows.val, "attacker-validation"), (rows.test, "test"))]
    expected = Standardizer.fit(z[0])
    torch.testing.assert_close(fitted.mean, expected.mean, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(fitted.std, expected.std, rtol=1e-6, atol=1e-7)
    y = [torch.from_numpy(labels[r]).long() for r in (rows.train, rows.val, rows.test)]
    blocks = streamed.train.blocks
    assert blocks.window_rows < len(rows.train)  # a shuffled-slice order, not one permutation
    memory = HeadData(*(TensorSource(expected(x), t, blocks=blocks) for x, t in zip(z, y)))
    torch.manual_seed(1)
    model, _ = build_head("mlp", store, (120, 1, 1), 10, HeadData(*z))
    memory_head, memory_correct = train_head("mlp", "Z", model, memory, (y[0], y[1], y[2].numpy()), 10, config, cpu, None)
    assert stream_head.val_accuracy == pytest.approx(memory_head.val_accuracy, abs=1e-12)
    assert stream_head.accuracy == pytest.approx(memory_head.accuracy, abs=1e-12)
    np.testing.assert_array_equal(stream_correct, memory_correct)
    assert stream_head.epochs == memory_head.epochs == 3


def test_classifier_streams_every_row_within_a_tiny_budget(cli, small_digits_store, tmp_path):
    args = ("attack", small_digits_store, "--classifier", "--task", "private", "--head", "mlp", "--epochs", "2",
            "--set", "raw_reference=false")
    out = tmp_path / "c.json"
    result = cli(*args, "--memory-budget", "1K", "--json", out, "--report", tmp_path / "r.json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(out.read_text())
    record = data["data_path"]["mlp"]
    assert record["data_path"] == "stream" and record["memory_budget"] == 1024 and record["heads"] == ["mlp"]
    assert record["role_bytes"] == 3 * 300 * 120 * 4
    assert data["rows"] == record["rows"] and sum(data["rows"].values()) == 300
    assert data["heads"][0]["train_rows"] is None and data["heads"][0]["refit_rows"] == sum(data["rows"].values()) - data["rows"]["test"]
    assert "subsample" not in result.stderr and np.isfinite(data["private_accuracy"])
    assert any(line.startswith("data: mlp stream (3 float32 copies of every row would take") for line in result.stdout.splitlines())
    # the default budget keeps today's in-memory path and its record
    whole = json.loads(cli(*args, "--json", "-", "--report", tmp_path / "r3.json").stdout)
    assert list(whole["data_path"]) == ["attacker roles"] and whole["data_path"]["attacker roles"]["data_path"] == "memory"
    assert whole["rows"] == data["rows"]


def test_streamed_network_heads_read_no_role_into_memory(cli, small_digits_store, tmp_path, monkeypatch):
    """Without a whole-row head nothing of attacker-train or attacker-validation is read into memory (it was all of it)."""
    from leakaudit.attacks import classifier_data

    read: list[int] = []
    real = classifier_data.read_activations
    monkeypatch.setattr(classifier_data, "read_activations", lambda store, rows, role: read.append(len(rows)) or real(store, rows, role))
    result = cli("attack", small_digits_store, "--classifier", "--task", "private", "--head", "mlp", "--epochs", "1",
                 "--set", "raw_reference=false", "--set", "refit=none", "--memory-budget", "1K", "--json", tmp_path / "c.json",
                 "--report", tmp_path / "r.json")
    assert result.exit_code == 0, result.stderr
    assert read and max(read) == 0, read
    monkeypatch.setattr(classifier_data, "read_activations", lambda store, rows, role: read.append(len(rows)) or real(store, rows, role))
    result = cli("attack", small_digits_store, "--classifier", "--task", "private", "--head", "linear", "--epochs", "1",
                 "--set", "raw_reference=false", "--set", "refit=none", "--memory-budget", "1K", "--json", tmp_path / "l.json",
                 "--report", tmp_path / "r2.json")
    assert result.exit_code == 0, result.stderr
    assert max(read) > 0  # a whole-row head does read its subsample: the count above can fail


@pytest.fixture(scope="module")
def small_spatial_store(tmp_path_factory):
    """300 digits rows through random-init LeNet-5 at ``pool2`` (16×5×5): every head applies."""
    return attacks_build("small-pool2", lambda: attacks_dump(tmp_path_factory.mktemp("small-pool2") / "small-pool2.h5",
                                                             "pool2", limit=300))


def test_every_head_within_a_tiny_budget_end_to_end(cli, small_spatial_store, tmp_path):
    """Linear probes and the SVM on a recorded subsample; the networks (and their refit) stream every row."""
    report = tmp_path / "r.json"
    result = cli("attack", small_spatial_store, "--classifier", "--task", "private", "--epochs", "2", "--set", "patience=2",
                 "--set", "refit=all", "--memory-budget", "1K", "--json", tmp_path / "c.json", "--report", report)
    assert result.exit_code == 0, result.stderr
    data = json.loads((tmp_path / "c.json").read_text())
    paths = data["data_path"]
    sub, stream = paths["linear, svm, raw-linear"], paths["mlp, conv, continuation, raw-cnn"]
    assert sub["data_path"] == "subsample" and sub["memory_budget"] == 1024 and sub["heads"] == ["linear", "svm", "raw-linear"]
    kept, full = sub["rows_kept"], sub["rows_all"]
    assert kept["attacker-train"] < full["attacker-train"] and kept["attacker-validation"] < full["attacker-validation"]
    # The network heads take the whole kilobyte, so the subsample keeps each class's minimum rows.
    assert kept["test"] == full["test"] and isinstance(sub["seed"], int) and sub["share"] == 0
    assert stream["data_path"] == "stream" and stream["rows"] == full
    assert sub["networks_bytes"] == stream["networks_bytes"] > 1024
    assert any(w.startswith("the classifier's network heads take about") for w in data["warnings"])
    heads = {h["name"]: h for h in data["heads"] + data["raw_heads"]}
    assert all(heads[name]["status"] == "ok" for name in heads), heads
    for name in ("linear", "raw-linear"):
        assert heads[name]["train_rows"] == kept["attacker-train"]
        assert heads[name]["refit_rows"] == kept["attacker-train"] + kept["attacker-validation"]
    for name in ("mlp", "conv", "continuation", "raw-cnn"):
        assert heads[name]["train_rows"] is None
        assert heads[name]["refit_rows"] == full["attacker-train"] + full["attacker-validation"]
    best = data["best_head"]
    assert data["rows"] == (kept if best in ("linear", "svm") else full)
    warnings = [w for w in data["warnings"] if "subsample" in w]
    assert warnings == [f"classifier ran on a subsample for linear, svm, raw-linear: {sub['reason']}."]
    assert "classifier ran on a subsample for linear, svm, raw-linear" in result.stderr
    assert np.isfinite(data["private_accuracy"]) and data["private_accuracy_drop_ci95"] is not None
    assert json.loads(report.read_text())["results"]["attack:classifier"]["data_path"] == paths
    lines = result.stdout.splitlines()
    assert any(line.startswith("data: linear, svm, raw-linear subsample (") for line in lines)
    assert any(line.startswith("data: mlp, conv, continuation, raw-cnn stream (") for line in lines)


def test_a_nan_in_a_later_block_is_refused_on_the_streamed_path(cli, tmp_path):
    labels = np.repeat(np.arange(2), 60)
    split = balanced_split(labels)
    z = np.random.default_rng(0).normal(size=(120, 3)).astype(np.float32)
    train_rows = np.flatnonzero(split == ROLES.index("attacker-train"))
    z[train_rows[-1], 2] = np.nan  # the role's last row: read in its last block
    path = synthetic_store(tmp_path / "late-nan.h5", z=z, labels={"private": labels}, split=split)
    result = cli("attack", path, "--classifier", "--task", "private", "--head", "mlp", "--epochs", "1",
                 "--set", "raw_reference=false", "--memory-budget", "1K", "--report", tmp_path / "r.json")
    assert result.exit_code == EXIT_RUNTIME
    assert error_line(result).startswith(
        f"Error: the activations (/activations, attacker-train rows) of {str(path)!r} contain 1 NaN and 0 infinite "
        "values in 1 rows; attacks need finite numbers."
    )
