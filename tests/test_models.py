"""Model specs and weight loading: every spec kind, wrappers, and every refusal."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from leakaudit.errors import CheckpointError, UnknownNameError, UntrustedCheckpointError, UsageError
from leakaudit.models import LeNet5, load_model, load_state_dict
from tests.models_for_tests import NestedNet

TESTS = Path(__file__).parent


def test_lenet5_matches_the_paper():
    model = LeNet5()
    x = torch.zeros(2, 1, 32, 32)
    shapes = []
    for name, child in model.named_children():
        x = child(x)
        shapes.append((name, tuple(x.shape[1:])))
    assert shapes == [
        ("conv1", (6, 28, 28)),
        ("pool1", (6, 14, 14)),
        ("conv2", (16, 10, 10)),
        ("pool2", (16, 5, 5)),
        ("conv3", (120, 1, 1)),
        ("flatten", (120,)),
        ("fc1", (84,)),
        ("fc2", (10,)),
    ]
    loaded = load_model("lenet5")
    assert loaded.input_size == (32, 32) and loaded.in_chans == 1


@pytest.mark.parametrize(
    "spec, kind",
    [
        ("lenet5", "builtin"),
        ("timm:resnet18", "timm"),
        ("torchvision:resnet18", "torchvision"),
        (f"{TESTS / 'models_for_tests.py'}:build", "python"),
        ("tests.models_for_tests:build", "python"),
    ],
)
def test_architecture_specs_build_modules_and_take_safetensors_weights(tmp_path, spec, kind):
    first = load_model(spec, num_classes=3)
    assert first.kind == kind
    state = {k: v.clone() for k, v in first.module.state_dict().items()}
    for value in state.values():
        if value.is_floating_point():
            value.uniform_(-0.5, 0.5)
    weights = tmp_path / "w.safetensors"
    save_file(state, str(weights))
    second = load_model(spec, num_classes=3, weights=weights)
    for key, value in second.module.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert second.checkpoint_sha256 and len(second.checkpoint_sha256) == 64


def test_file_spec_reads_declared_input_shape():
    loaded = load_model(f"{TESTS / 'models_for_tests.py'}:build")
    assert loaded.in_chans == 1 and loaded.input_size == (12, 12)


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: sd,
        lambda sd: {"state_dict": sd, "epoch": 3},
        lambda sd: {"model_state_dict": sd, "optimizer": {"lr": torch.tensor(0.1)}},
        lambda sd: {"model": {f"module.{k}": v for k, v in sd.items()}},
        lambda sd: {f"model.{k}": v for k, v in sd.items()},
    ],
    ids=["plain", "state_dict", "model_state_dict", "model+module.", "model."],
)
def test_torch_save_wrappers_are_unwrapped(tmp_path, wrap):
    reference = NestedNet()
    path = tmp_path / "ckpt.pt"
    torch.save(wrap(reference.state_dict()), path)
    loaded = load_model("tests.models_for_tests:build", weights=path)
    for key, value in loaded.module.state_dict().items():
        assert torch.equal(value, reference.state_dict()[key])


def test_weights_that_do_not_fit_list_missing_unexpected_and_shapes(tmp_path):
    state = NestedNet(num_classes=7).state_dict()
    state.pop("blocks.a.bias")
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "w.safetensors"
    save_file(state, str(path))
    with pytest.raises(CheckpointError) as info:
        load_model("tests.models_for_tests:build", weights=path)
    message = str(info.value)
    assert "missing 1: blocks.a.bias" in message
    assert "unexpected 1: extra.weight" in message
    assert "head.weight (7, 8) vs (4, 8)" in message


class _Evil:
    """Unpickling this creates the file it names — the attack a checkpoint can carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickled_weights_are_refused_without_trust_and_run_no_code(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": NestedNet().state_dict(), "payload": _Evil(marker)}, path)
    with pytest.raises(UntrustedCheckpointError, match="--trust-checkpoint"):
        load_model("tests.models_for_tests:build", weights=path)
    assert not marker.exists()


def test_pickled_module_needs_trust(tmp_path):
    path = tmp_path / "full.pt"
    torch.save(NestedNet(), path)
    with pytest.raises(UntrustedCheckpointError, match="arbitrary code"):
        load_model(str(path))
    loaded = load_model(str(path), trust_checkpoint=True)
    assert loaded.kind == "pickle" and isinstance(loaded.module, NestedNet)


def test_state_dict_file_as_model_is_explained(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(NestedNet().state_dict(), path)
    with pytest.raises(UsageError, match="holds weights, not a model"):
        load_model(str(path))


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_truncated_checkpoints_are_runtime_errors(tmp_path, suffix):
    path = tmp_path / f"w{suffix}"
    state = NestedNet().state_dict()
    if suffix == ".pt":
        torch.save(state, path)
    else:
        save_file(state, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_state_dict(path)


def test_torchscript_and_export_archives(tmp_path):
    model = NestedNet().eval()
    x = torch.rand(2, 1, 12, 12)
    ts = tmp_path / "model.ts"
    torch.jit.save(torch.jit.trace(model, x), str(ts))
    pt2 = tmp_path / "model.pt2"
    torch.export.save(torch.export.export(model, (x,)), str(pt2))
    for path, kind in ((ts, "torchscript"), (pt2, "export")):
        loaded = load_model(str(path))
        assert loaded.kind == kind
        torch.testing.assert_close(loaded.module(x), model(x))
    assert load_model(str(pt2)).fixed_batch == 2


def test_unknown_names_list_the_closest():
    with pytest.raises(UnknownNameError, match="Closest: lenet5"):
        load_model("lenet55")
    with pytest.raises(UnknownNameError, match="resnet18"):
        load_model("timm:resnet1")
    with pytest.raises(UnknownNameError, match="build"):
        load_model("tests.models_for_tests:buidl")


def test_pickle_module_not_loaded_by_plain_pickle_either(tmp_path):
    # A raw pickle file (not torch.save) is not a zip: weights_only loading must refuse it.
    marker = tmp_path / "pwned"
    path = tmp_path / "raw.pkl"
    path.write_bytes(pickle.dumps(_Evil(marker)))
    with pytest.raises((UntrustedCheckpointError, CheckpointError)):
        load_state_dict(path)
    assert not marker.exists()


def test_the_model_record_beside_trained_weights_supplies_their_options(tmp_path):
    import json

    weights = tmp_path / "parity.safetensors"
    save_file(LeNet5(num_classes=2).state_dict(), str(weights))
    # Without a record the architecture's default (10 classes) does not fit the file.
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_model("lenet5", weights=weights)
    record = {"schema": "leakaudit.model", "schema_version": 1, "spec": "lenet5", "options": {"num_classes": 2}}
    (tmp_path / "parity.json").write_text(json.dumps({**record, "weights": "parity.safetensors"}))
    loaded = load_model("lenet5", weights=weights)
    assert loaded.module.fc2.out_features == 2 and loaded.options == {"num_classes": 2}
    # An option given explicitly wins over the record.
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_model("lenet5", weights=weights, num_classes=10)
    # A record of another file, another schema or malformed JSON gives no defaults.
    for text in (
        json.dumps({**record, "weights": "other.safetensors"}),
        json.dumps({**record, "schema": "something.else", "weights": "parity.safetensors"}),
        "{not json",
    ):
        (tmp_path / "parity.json").write_text(text)
        with pytest.raises(CheckpointError, match="shape mismatch"):
            load_model("lenet5", weights=weights)


def test_saved_weights_are_the_same_bytes_every_time(tmp_path):
    """safetensors writes metadata in hash-map order; the tool's writer must not let that vary."""
    import hashlib

    from safetensors import safe_open

    from leakaudit.export import save_weights

    state = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2)}
    metadata = {"leakaudit": "harden", "method": "nopeek", "spec": "lenet5"}
    digests = set()
    for i in range(24):
        path = tmp_path / f"w{i}.safetensors"
        save_weights(state, path, metadata=metadata)
        digests.add(hashlib.sha256(path.read_bytes()).hexdigest())
    assert len(digests) == 1
    with safe_open(str(tmp_path / "w0.safetensors"), "pt") as f:
        assert f.metadata() == metadata
        assert torch.equal(f.get_tensor("w"), state["w"]) and torch.equal(f.get_tensor("b"), state["b"])
