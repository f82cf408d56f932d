"""ModelSpec: the six model settings as one value, loaded exactly as load_model loads them."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from leakaudit.errors import ConfigError, UnknownNameError, UntrustedCheckpointError
from leakaudit.models import LeNet5, ModelSpec, load_model


def _weights(tmp_path, num_classes: int = 10):
    torch.manual_seed(0)
    path = tmp_path / "w.safetensors"
    save_file(LeNet5(num_classes=num_classes).state_dict(), str(path))
    return path


def test_load_is_load_model_with_the_same_six_settings(tmp_path):
    weights = _weights(tmp_path, num_classes=3)
    spec = ModelSpec("lenet5", weights=str(weights), num_classes=3, in_chans=1, args={}, trust_checkpoint=False)
    got = spec.load()
    want = load_model("lenet5", weights=str(weights), num_classes=3, in_chans=1, model_args={}, trust_checkpoint=False)
    assert (got.kind, got.spec, got.weights, got.options) == (want.kind, want.spec, want.weights, want.options)
    assert got.checkpoint_sha256 == want.checkpoint_sha256 and got.checkpoint_sha256 is not None
    assert got.options == {"num_classes": 3, "in_chans": 1}
    assert not got.module.training
    for key, value in want.module.state_dict().items():
        assert torch.equal(got.module.state_dict()[key], value), key


def test_load_uses_the_record_beside_the_weights_unless_an_option_is_given(tmp_path):
    weights = _weights(tmp_path, num_classes=2)
    record = {"schema": "leakaudit.model", "spec": "lenet5", "options": {"num_classes": 2}, "weights": weights.name}
    weights.with_suffix(".json").write_text(json.dumps(record))
    spec = ModelSpec("lenet5", weights=str(weights))
    assert spec.options() == {}  # what was given; the record's defaults come in at load time
    assert spec.load().options == {"num_classes": 2}
    with pytest.raises(Exception, match="do not fit"):
        dataclasses.replace(spec, num_classes=5).load()


def test_load_raises_what_load_model_raises(tmp_path):
    with pytest.raises(UnknownNameError, match="lenet"):
        ModelSpec("lenet6").load()
    path = tmp_path / "model.pt"
    torch.save(LeNet5(), path)
    with pytest.raises(UntrustedCheckpointError, match="--trust-checkpoint"):
        ModelSpec(str(path)).load()
    assert ModelSpec(str(path), trust_checkpoint=True).load().kind == "pickle"


def test_options_are_the_factory_kwargs_and_named_options_win():
    spec = ModelSpec("timm:resnet18", num_classes=4, args={"num_classes": 7, "drop_rate": 0.1})
    assert spec.options() == {"num_classes": 4, "drop_rate": 0.1}
    assert ModelSpec("lenet5", args={"in_chans": 3}).options() == {"in_chans": 3}
    assert ModelSpec("lenet5").options() == {}


def test_from_options_is_the_inverse_of_options():
    spec = ModelSpec.from_options("lenet5", {"num_classes": 2, "in_chans": 1, "width": 8}, weights="w.safetensors")
    assert spec == ModelSpec("lenet5", weights="w.safetensors", num_classes=2, in_chans=1, args={"width": 8})
    assert spec.options() == {"num_classes": 2, "in_chans": 1, "width": 8}


def test_to_dict_and_from_mapping_round_trip_through_json():
    spec = ModelSpec("lenet5", weights="w.safetensors", num_classes=2, in_chans=1, args={"k": [1, 2]}, trust_checkpoint=True)
    record = json.loads(json.dumps(spec.to_dict()))
    assert record == {
        "spec": "lenet5",
        "weights": "w.safetensors",
        "num_classes": 2,
        "in_chans": 1,
        "args": {"k": [1, 2]},
        "trust_checkpoint": True,
    }
    assert ModelSpec.from_mapping(record) == spec
    assert ModelSpec.from_mapping("timm:resnet18") == ModelSpec("timm:resnet18")


@pytest.mark.parametrize(
    "data, message",
    [
        ({"spec": "lenet5", "num_class": 3}, "model.num_class: unknown key. Did you mean 'num_classes'? Allowed: args, in_chans, num_classes, spec, trust_checkpoint, weights."),
        ({"spec": "lenet5", "num_classes": "ten"}, "model.num_classes: expected an integer, got 'ten'."),
        ({"spec": "lenet5", "trust_checkpoint": "yes"}, "model.trust_checkpoint: expected true or false, got 'yes'."),
        ({"weights": "w.safetensors"}, "model: missing required key 'spec'."),
        (["lenet5"], "model: expected a mapping of settings, got ['lenet5']."),
    ],
)
def test_from_mapping_rejects_with_the_yaml_path(data, message):
    with pytest.raises(ConfigError) as caught:
        ModelSpec.from_mapping(data)
    assert str(caught.value) == message


def test_a_spec_is_a_frozen_value_that_does_not_share_its_args():
    args = {"drop_rate": 0.1}
    spec = ModelSpec("timm:resnet18", args=args)
    args["drop_rate"] = 0.5
    assert spec.args == {"drop_rate": 0.1}
    spec.to_dict()["args"]["drop_rate"] = 0.9
    assert spec.args == {"drop_rate": 0.1}
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.weights = "other.safetensors"  # type: ignore[misc]


def test_the_spec_imports_without_torch():
    code = (
        "import sys; from leakaudit.models import ModelSpec; "
        "ModelSpec.from_mapping({'spec': 'lenet5', 'num_classes': 2}).options(); "
        "print('torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
