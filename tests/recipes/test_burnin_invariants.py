"""NoPeek's burn-in on a model with BatchNorm and Dropout on both sides of the split.

The burn-in fits the encoder on the client alone: nothing after the split may change (the
head's parameters and its BatchNorm statistics included), every module's train/eval flag
must come back as it was, and ``harden`` must leave the input checkpoint as it found it.
"""

from __future__ import annotations

import hashlib

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from typer.testing import CliRunner

from leakaudit.cli import app
from leakaudit.config import from_mapping
from leakaudit.export import save_weights
from leakaudit.models import load_model
from leakaudit.recipes.base import Objective, RecipeContext
from leakaudit.registry import RECIPES
from leakaudit.training.objective import evaluate
from leakaudit.training.prepared import ROLE_VAL, prepare_data


class BatchNormDropoutNet(nn.Module):
    """Conv-BN-ReLU-Dropout before the split (``encoder``), Conv-BN-ReLU and Dropout-Linear after it."""

    input_size = (1, 8, 8)

    def __init__(self, num_classes: int = 2) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(1, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Dropout(0.3))
        self.head = nn.Sequential(
            nn.Conv2d(6, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Dropout(0.5), nn.Linear(8 * 4 * 4, num_classes),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


def build(num_classes: int = 2) -> BatchNormDropoutNet:
    torch.manual_seed(3)
    model = BatchNormDropoutNet(num_classes)
    g = torch.Generator().manual_seed(1)
    for m in model.modules():  # running statistics far from 0/1, as a trained network has
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) * 3 + 0.5)
            m.num_batches_tracked.fill_(100)
    return model


#: The model object ``harden`` is handed (by the factory ``held``), kept so the test can look at it after.
_HELD: dict[str, nn.Module] = {}


def held() -> nn.Module:
    return _HELD["model"]


def _modes(model: nn.Module) -> dict[str, bool]:
    return {name: m.training for name, m in model.named_modules()}


def _encoder_key(key: str) -> bool:
    return key.startswith("encoder.")


COMMON = [
    "--layer", "encoder", "--data", "digits", "--task", "public=parity", "--task",
    "private=label", "--method", "nopeek", "--limit", "200", "--batch-size", "50", "--epochs", "1", "--seed", "0",
]  # fmt: skip


@pytest.fixture
def checkpoint(tmp_path):
    path = tmp_path / "pretrained.safetensors"
    save_weights(build(), path)
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def _harden(tmp_path, weights, name: str, *extra: str):
    _HELD["model"] = build()
    out = tmp_path / name
    result = CliRunner().invoke(app, ["harden", f"{__name__}:held", "--weights", str(weights), *COMMON, *extra, "-o", str(out)])
    assert result.exit_code == 0, result.output
    return out, _HELD.pop("model")


def test_harden_burn_in_changes_only_the_encoder_and_leaves_the_checkpoint_and_modes(tmp_path, checkpoint):
    torch.set_num_threads(1)
    weights, digest = checkpoint
    pretrained = load_file(str(weights))
    out, model = _harden(tmp_path, weights, "burn", "--burn-in", "6", "--option", "burn_in_rows=60",
                         "--option", "burn_in_iterations=2", "--record-sent", "0,1")
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == digest  # the input checkpoint is untouched
    assert set(_modes(model).values()) == {False}  # handed back in eval mode, as the loader gave it

    # sent/epoch-0 holds the weights after the burn-in and before any NoPeek step.
    burnt = load_file(str(out / "sent" / "epoch-0.safetensors"))
    assert burnt.keys() == pretrained.keys()
    head = [k for k in pretrained if not _encoder_key(k)]
    assert any("running_mean" in k for k in head) and any("weight" in k for k in head)
    for key in head:
        assert torch.equal(burnt[key], pretrained[key]), key  # nothing after the split moved
    moved = {k for k in pretrained if _encoder_key(k) and not torch.equal(burnt[k], pretrained[k])}
    assert {"encoder.0.weight", "encoder.1.weight", "encoder.1.running_mean"} <= moved

    # Without the burn-in the epoch-0 weights are the pre-trained ones: the difference above is the burn-in's.
    out_plain, _ = _harden(tmp_path, weights, "plain", "--record-sent", "0")
    plain = load_file(str(out_plain / "sent" / "epoch-0.safetensors"))
    assert all(torch.equal(plain[k], pretrained[k]) for k in pretrained)


def test_before_training_hands_back_mixed_modes_and_touches_no_head_state():
    torch.set_num_threads(1)
    loaded = load_model(f"{__name__}:build", num_classes=2)
    data = prepare_data("digits", [("public", "parity")], "public", loaded, input_size=None, normalize=None,
                        split=(0.4, 0.4, 0.2), seed=0, limit=160)
    model = loaded.module
    device = torch.device("cpu")
    baseline = evaluate(model, Objective(), data, data.rows(ROLE_VAL), batch_size=40, device=device)
    plugin = RECIPES.get("nopeek")
    config = from_mapping(plugin.config_cls, {"burn_in": 4, "burn_in_rows": 40, "burn_in_iterations": 2})
    objective = plugin.target(config, RecipeContext(model, "encoder", data, device, 40, baseline, (6, 6, 6), None))
    # A mode train(was_training) could not restore: training, with one BatchNorm and one Dropout in eval.
    model.train()
    model.encoder[1].eval()
    model.head[4].eval()
    modes = _modes(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    record = objective.before_training(model, data, device, 40, 0)
    assert _modes(model) == modes
    after = model.state_dict()
    for key, value in before.items():
        if not _encoder_key(key):
            assert torch.equal(after[key], value), key
    assert not torch.equal(after["encoder.0.weight"], before["encoder.0.weight"])
    assert record["steps"] == 4 and record["rows"] == 40
