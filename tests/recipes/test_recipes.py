"""The recipes on real small training runs: LeNet-5 on scikit-learn's digits (parity public).

One pre-trained model (a few epochs of `train`) is shared; each recipe fine-tunes it for a
few epochs and must move its own number the right way while the public task holds.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from leakaudit.dump import DumpSettings, dump
from leakaudit.errors import NonFiniteError
from leakaudit.export import load_hardened
from leakaudit.harden import HardenSettings, harden
from leakaudit.models import ModelSpec, load_model
from leakaudit.recipes import CenterLoss, CenterLossConfig
from leakaudit.registry import RECIPES
from leakaudit.split import split_model
from leakaudit.store import open_store
from leakaudit.train import TrainSettings, train

TASKS = (("public", "parity"), ("private", "label"))

NAN_MODEL = '''
import torch
from torch import nn
from leakaudit.models import LeNet5


class Diverging(LeNet5):
    """LeNet-5 whose output turns NaN from the {after}th training forward pass on."""

    def __init__(self, num_classes: int = 2) -> None:
        super().__init__(num_classes=num_classes)
        self.calls = 0

    def forward(self, x):
        out = super().forward(x)
        # Count real training steps only: torch.fx traces call forward with proxies.
        if self.training and not isinstance(x, torch.fx.Proxy):
            self.calls += 1
            if self.calls >= {after}:
                out = out * float("nan")
        return out


def build(num_classes: int = 2) -> Diverging:
    return Diverging(num_classes)
'''


@contextlib.contextmanager
def one_thread():
    """LeNet-5 on 64-row batches gains nothing from a second thread, and on this shared 2-core
    machine a 2-thread OpenMP team waiting on a busy core was measured at 395 ms per training
    step against 7 ms with one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory) -> Path:
    """LeNet-5 trained on digits parity (attacker-train rows), selected on validation."""
    out = tmp_path_factory.mktemp("pretrained") / "lenet5-parity.safetensors"
    with one_thread():
        train(TrainSettings(model="lenet5", data="digits", output=out, task=("public", "parity"),
                            epochs=12, lr=3e-3, batch_size=64, patience=4))
    return out


def _harden(pretrained: Path, out: Path, method: str, **kwargs) -> object:
    defaults = dict(
        model=ModelSpec("lenet5", weights=str(pretrained), num_classes=2), data="digits", layer="conv3",
        output=out, method=method, tasks=TASKS, epochs=4, batch_size=64, patience=4,
    )
    defaults.update(kwargs)
    return harden(HardenSettings(**defaults))


@pytest.fixture(scope="session")
def center_loss_run(pretrained, tmp_path_factory):
    out = tmp_path_factory.mktemp("hardened") / "center-loss"
    with one_thread():
        return _harden(pretrained, out, "center-loss", options={"lambda": 0.9}, lr=1e-3)


def test_recipes_are_registered_with_frozen_configs():
    assert RECIPES.names() == ["center-loss", "gaussian-noise", "nopeek", "shredder"]
    for plugin in RECIPES:
        config = plugin.config_cls()
        with pytest.raises(Exception):
            setattr(config, next(iter(config.__dataclass_fields__)), 0)


def test_train_reaches_the_public_task_and_records_how(pretrained):
    record = json.loads(pretrained.with_suffix(".json").read_text())
    assert record["spec"] == "lenet5" and record["options"] == {"num_classes": 2}
    trained = record["trained"]
    assert trained["public_accuracy"] > 0.85
    assert trained["history"][0]["epoch"] == 0 and trained["best_epoch"] >= 1
    assert trained["settings"]["split"] == [0.4, 0.4, 0.2] and trained["settings"]["stratified_by"] == "label"
    # The weights load as `dump` loads them, and score the recorded accuracy on the test rows.
    loaded = load_model("lenet5", weights=pretrained, num_classes=2)
    store = pretrained.parent / "check.h5"
    dump(DumpSettings(model=ModelSpec("lenet5", weights=str(pretrained), num_classes=2), layer="conv3", data="digits",
                      output=store, tasks=(("public", "parity"),), with_outputs=True))
    with open_store(store) as s:
        test = s.rows("test")
        predicted = s.read("outputs", test).argmax(1)
        accuracy = float(np.mean(predicted == s.labels("public")[test]))
        assert s.attrs["checkpoint_sha256"] == loaded.checkpoint_sha256
    assert accuracy == pytest.approx(trained["public_accuracy"], abs=1e-9)


def test_center_loss_pulls_z_together_and_keeps_the_task(center_loss_run):
    run = center_loss_run.runs[0]
    start = run.history[0].metrics["intra_class_distance"]
    best = next(h for h in run.history if h.epoch == run.best_epoch)
    assert run.best_epoch >= 1
    assert best.metrics["intra_class_distance"] < 0.6 * start
    assert run.public_accuracy_normalized >= 0.95
    assert center_loss_run.to_dict()["runs"][0]["config"] == {"lambda": 0.9, "center_alpha": 0.5, "center_dim": None,
                                                                "center_scale": "absolute"}


def test_center_loss_with_a_fixed_reduction(pretrained, tmp_path):
    result = _harden(pretrained, tmp_path / "reduced", "center-loss", options={"lambda": 0.9, "center_dim": 16},
                     lr=1e-3, epochs=2)
    run = result.runs[0]
    assert run.history[-1].metrics["intra_class_distance"] < run.history[0].metrics["intra_class_distance"]


def test_relative_center_loss_is_scale_free_and_tightens_the_classes(pretrained, tmp_path):
    result = _harden(pretrained, tmp_path / "relative", "center-loss", options={"lambda": 0.9, "center_scale": "relative"},
                     lr=1e-3, epochs=3)
    run = result.runs[0]
    first, last = run.history[0].metrics, run.history[-1].metrics
    assert last["scatter_ratio"] < 0.7 * first["scatter_ratio"]
    assert run.public_accuracy_normalized >= 0.9
    # The loss itself: within-class over total scatter of the batch, whatever Z's scale.
    objective = CenterLoss.__new__(CenterLoss)
    objective.config, objective.components = CenterLossConfig(center_scale="relative"), None
    z = torch.randn(12, 5, dtype=torch.float64)
    target = torch.arange(12) % 3
    objective.centers = torch.stack([z[target == j].mean(0) for j in range(3)])
    within = sum(float(((z[target == j] - z[target == j].mean(0)) ** 2).sum()) for j in range(3))
    total = float(((z - z.mean(0)) ** 2).sum())
    assert float(objective.center_loss(z, target)) == pytest.approx(within / total, rel=1e-12)
    objective.centers = objective.centers * 10
    assert float(objective.center_loss(10 * z, target)) == pytest.approx(within / total, rel=1e-12)
    same = torch.ones(4, 5, dtype=torch.float64, requires_grad=True)
    loss = objective.center_loss(same, torch.zeros(4, dtype=torch.long))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(same.grad).all()
    with pytest.raises(ValueError, match="--center-scale must be one of absolute, relative"):
        CenterLossConfig(center_scale="log")


def test_exported_encoder_equals_the_hardened_model_cut_at_the_layer(center_loss_run, tmp_path):
    folder = center_loss_run.output
    assert sorted(p.name for p in folder.iterdir()) == [
        "classifier.pt2", "encoder.onnx", "encoder.pt2", "harden.json", "model.json", "model.safetensors"
    ]
    # `dump` from the encoder file alone …
    from_encoder = tmp_path / "encoder.h5"
    dump(DumpSettings(model=str(folder / "encoder.pt2"), layer="output", data="digits", output=from_encoder, tasks=TASKS))
    # … and from the hardened full model, rebuilt from model.json and cut at conv3.
    loaded, record = load_hardened(folder)
    from_model = tmp_path / "model.h5"
    dump(DumpSettings(model=ModelSpec(record["spec"], weights=str(folder / record["weights"]), num_classes=2),                       layer=record["layer"], data="digits", output=from_model, tasks=TASKS))
    with open_store(from_encoder) as a, open_store(from_model) as b:
        assert a.layer_shape == b.layer_shape == (120, 1, 1)
        np.testing.assert_allclose(a.activations(), b.activations(), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(a.split(), b.split())
        x = torch.from_numpy(a.inputs(np.arange(5)))
    # Plain torch: encoder then classifier is the full model.
    encoder = torch.export.load(str(folder / "encoder.pt2")).module()
    classifier = torch.export.load(str(folder / "classifier.pt2")).module()
    with torch.no_grad():
        torch.testing.assert_close(classifier(encoder(x)), loaded.module(x), rtol=1e-5, atol=1e-5)
        assert classifier(encoder(x[:1])).shape == (1, 2)  # dynamic batch, down to one row
    split = split_model(loaded.module, "conv3")
    with torch.no_grad():
        torch.testing.assert_close(encoder(x), split.encoder(x))


def test_nopeek_lowers_batch_dcor(pretrained, tmp_path):
    result = _harden(pretrained, tmp_path / "nopeek", "nopeek", options={"alpha": 3.0}, lr=1e-3, epochs=3)
    run = result.runs[0]
    start = run.history[0].metrics["val_dcor"]
    best = next(h for h in run.history if h.epoch == run.best_epoch)
    assert best.metrics["val_dcor"] < 0.8 * start
    assert all("train_dcor" in h.metrics for h in run.history[1:])  # logged per epoch (Fig. 11)
    assert run.public_accuracy_normalized >= 0.9


def test_nopeek_against_an_attribute_with_a_strong_weight_stays_finite(pretrained, tmp_path):
    # dCor's square roots have an infinite derivative at 0; a huge weight drives Z there.
    result = _harden(pretrained, tmp_path / "attr", "nopeek", options={"alpha": 1e4, "against": "private"},
                     lr=1e-2, epochs=2)
    history = result.runs[0].history
    assert len(history) == 3
    assert all(math.isfinite(h.val_loss) and math.isfinite(h.metrics["val_dcor"]) for h in history)
    assert history[-1].metrics["val_dcor"] < history[0].metrics["val_dcor"]


def test_shredder_noise_grows_while_accuracy_holds(pretrained, tmp_path):
    result = _harden(pretrained, tmp_path / "shredder", "shredder", options={"noise_weight": 0.1}, epochs=4,
                      lr=5e-2)
    run = result.runs[0]
    noise = [h.metrics["noise_to_signal"] for h in run.history]
    best = next(h for h in run.history if h.epoch == run.best_epoch)
    assert best.metrics["noise_to_signal"] > 2 * noise[0]
    assert best.val_public_accuracy >= result.baseline["val_public_accuracy"] - 0.01
    assert run.public_accuracy_normalized >= 0.95
    folder = result.output
    assert (folder / "noise.safetensors").is_file()
    # The model itself is untouched: Shredder only adds noise.
    loaded, _ = load_hardened(folder)
    original = load_model("lenet5", weights=pretrained, num_classes=2)
    for key, value in original.module.state_dict().items():
        torch.testing.assert_close(loaded.module.state_dict()[key], value)
    # The exported encoder samples the noise from torch's generator: seeded, it repeats.
    encoder = torch.export.load(str(folder / "encoder.pt2")).module()
    x = torch.rand(4, 1, 32, 32)
    torch.manual_seed(3)
    first = encoder(x)
    torch.manual_seed(3)
    assert torch.equal(first, encoder(x))
    assert not torch.equal(first, encoder(x))


def test_shredder_noise_is_finite_at_the_edge_of_torchs_uniform_draw(monkeypatch):
    """torch.rand returns exactly 0 once in 2²⁴ float32 draws; Shredder's noise must stay finite there.

    On 20,000 Fashion-MNIST rows it did not: the validation loss became NaN at the same step of
    epoch 21 at every learning rate.
    """
    from leakaudit.recipes.shredder import LaplaceNoise

    noise = LaplaceNoise((4,), 0.5)
    z = torch.zeros(3, 4)
    edges = torch.tensor([[0.0, 0.5, 0.25, 0.999999940395]] * 3)  # 0, the middle, inside, the last float below 1
    monkeypatch.setattr(torch, "rand_like", lambda like: edges.clone())
    out = noise(z)
    assert torch.isfinite(out).all()
    # The clamped draw is the farthest the sampler reaches, −b·log(2²⁴); the others are the closed form, unchanged.
    assert out[0, 0].item() == pytest.approx(-0.5 * 24 * math.log(2), rel=1e-6)
    u = edges[0, 1:] - 0.5
    expected = -torch.sign(u) * torch.log1p(-2.0 * u.abs()) * 0.5
    assert torch.equal(out[0, 1:], expected)


def test_a_diverging_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    factory = tmp_path / "diverging.py"
    factory.write_text(NAN_MODEL.replace("{after}", "15"))
    out = tmp_path / "model.safetensors"
    with pytest.raises(NonFiniteError) as caught:
        train(TrainSettings(model=f"{factory}:build", data="digits", output=out, task=("public", "parity"),
                            epochs=5, batch_size=64))
    message = str(caught.value)
    # 719 attacker-train rows in batches of 64: 12 steps per epoch, so step 15 is epoch 2, batch 3.
    assert "became NaN or infinite at step 15 (epoch 2, batch 3)" in message
    kept = tmp_path / "model.last-good.safetensors"
    assert f"The last good checkpoint (epoch 1) is in {str(kept)!r}" in message
    assert not out.exists()
    state = load_model(f"{factory}:build", weights=kept).module.state_dict()
    assert all(torch.isfinite(v).all() for v in state.values())


def test_sweep_writes_one_folder_per_value_and_the_privacy_table(pretrained, tmp_path):
    out = tmp_path / "sweep"
    result = _harden(pretrained, out, "center-loss", sweep=("lambda", (0.5, 0.9)), lr=1e-3, epochs=2,
                     attack_epochs=3, keep_stores=True)
    assert [r.label for r in result.runs] == ["lambda=0.5", "lambda=0.9"]
    for run in result.runs:
        assert (out / run.label / "encoder.pt2").is_file() and run.folder == out / run.label
    table = result.table
    assert [row["label"] for row in table] == ["unhardened", "lambda=0.5", "lambda=0.9"]
    assert table[0]["public_accuracy_normalized"] == 1.0
    for row, run in zip(table[1:], result.runs):
        assert row["public_accuracy"] == run.public_accuracy
        assert 0.0 <= row["private_accuracy"] <= 1.0 and 0.0 < row["dcor"] <= 1.0
        assert row["private_accuracy_drop"] == pytest.approx(1 - row["private_accuracy"] / row["private_accuracy_raw"])
        assert row["private_accuracy_continuation"] is not None
    saved = json.loads((out / "harden.json").read_text())
    assert saved["table"] == json.loads(json.dumps(table)) and saved["seed"] == 0 and saved["data"] == "digits"
    # Kept stores point at the final folder, so the paper's attacker can rebuild the model later.
    with open_store(out / "stores" / "lambda-0.9.h5") as store:
        assert store.attrs["weights"] == str(out / "lambda=0.9" / "model.safetensors")


@pytest.mark.slow
def test_digits_lambda_sweep_trades_intra_class_distance_for_private_accuracy(tmp_path):
    """The issue's acceptance run on digits: LeNet-5 split after conv3, public parity, private label.

    Measured here (benchmarks/RESULTS-recipes.md): the intra-class distance falls at every step
    of λ, but the private-accuracy drop does not rise all the way: it peaks at λ = 0.7 and falls
    again at 0.9 and 0.99 (while staying 27+ points above the unhardened model's). So the test
    asserts the fall of the distance, the rise from the unhardened model to every λ, and the
    λ = 0.9 target; not a monotone drop, which this setting does not show.
    """
    base = tmp_path / "base.safetensors"
    with one_thread():
        train(TrainSettings(model="lenet5", data="digits", output=base, task=("public", "parity"),
                            epochs=30, lr=3e-3, batch_size=64, patience=8))
        result = harden(HardenSettings(
            model=ModelSpec("lenet5", weights=str(base), num_classes=2), data="digits", layer="conv3",
            output=tmp_path / "sweep", method="center-loss", tasks=TASKS,
            sweep=("lambda", (0.5, 0.7, 0.9, 0.99)), epochs=40, lr=3e-3, batch_size=64, patience=10,
        ))
    table = {row["label"]: row for row in result.table}
    lambdas = ["lambda=0.5", "lambda=0.7", "lambda=0.9", "lambda=0.99"]
    intra = [table[k]["intra_class_distance"] for k in ["unhardened", *lambdas]]
    assert intra == sorted(intra, reverse=True), intra
    unhardened = table["unhardened"]["private_accuracy_drop"]
    for label in lambdas:
        assert table[label]["private_accuracy_drop"] >= unhardened + 0.15, (label, table[label])
        # The paper's own attacker (the rest of the model, retrained) is weaker still.
        assert table[label]["private_accuracy_drop_continuation"] >= table[label]["private_accuracy_drop"]
    assert table["lambda=0.9"]["public_accuracy_normalized"] >= 0.95
