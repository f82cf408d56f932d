"""Bad inputs to ``dump`` and ``layers``: each ends in one ``Error:`` line, the right exit code,
and no store (nor a ``.partial`` file or journal) that could pass for a finished one.

Forward failures that are the user's settings (wrong channels, an input smaller than a kernel,
a fully connected layer that does not fit) must not read as crashes ("unexpected …, report
it"); each names the option that fixes it.
"""

from __future__ import annotations

import hashlib
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from leakaudit.errors import ConfigError, UsageError
from leakaudit.store import journal_path, partial_path
from tests.conftest import error_line

# Small models a user might write, as the file specs `leakaudit dump file.py:build` loads.
MODELS = textwrap.dedent(
    '''
    import torch
    from torch import nn


    class RGBOnly(nn.Module):
        """Expects 3 channels and declares no input shape, so gray data is not converted."""

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return self.conv(x).mean((2, 3))


    class Unused(nn.Module):
        input_size = (1, 8, 8)

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)
            self.spare = nn.Conv2d(4, 4, 1)  # never called in forward

        def forward(self, x):
            return self.conv(x).mean((2, 3))


    class Pair(nn.Module):
        def forward(self, x):
            return x, x


    class TupleOut(nn.Module):
        input_size = (1, 8, 8)

        def __init__(self):
            super().__init__()
            self.pair = Pair()

        def forward(self, x):
            a, b = self.pair(x)
            return (a + b).flatten(1)


    class Broken(nn.Module):
        input_size = (1, 8, 8)

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)

        def forward(self, x):
            if x.shape[0] > 0:  # before the split layer runs, as a bug in user code would
                raise ValueError("this model's forward is broken")
            return self.conv(x)


    def rgb_only():
        return RGBOnly()


    def unused():
        return Unused()


    def tuple_out():
        return TupleOut()


    def broken():
        return Broken()
    '''
)


@pytest.fixture
def models_file(tmp_path) -> Path:
    path = tmp_path / "user_models.py"
    path.write_text(MODELS)
    return path


def assert_nothing_left(out: Path, before: set[Path]) -> None:
    """No store, no partial file, no journal, and nothing new in the folder."""
    assert not out.exists()
    assert not partial_path(out).exists()
    assert not journal_path(out).exists()
    assert set(out.parent.iterdir()) == before


def _dump_fails(cli, tmp_path, *args, code: int = 2, out_name: str = "acts.h5") -> str:
    out = tmp_path / out_name
    before = set(tmp_path.iterdir())
    result = cli("dump", *args, "--data", "digits", "--limit", "64", "-o", out)
    assert result.exit_code == code, result.stderr
    line = error_line(result)
    assert "unexpected" not in line and "report it" not in line
    assert_nothing_left(out, before)
    return line


# --------------------------------------------------------------------------- layer names


def test_empty_layer_is_an_error(cli, tmp_path):
    line = _dump_fails(cli, tmp_path, "lenet5", "--layer", "")
    assert line == (
        "Error: --layer is empty (''). Give a layer from `leakaudit layers MODEL`, or 'output' for the whole model."
    )


def test_blank_layer_is_an_error(cli, tmp_path):
    assert "Error: --layer is empty (" in _dump_fails(cli, tmp_path, "lenet5", "--layer", "  ")


def test_missing_layer_is_an_error_for_a_model_that_is_not_an_exported_encoder(cli, tmp_path):
    line = _dump_fails(cli, tmp_path, "lenet5")
    assert line.startswith("Error: --layer is missing: name the split layer")


def test_unknown_layer_lists_the_closest(cli, tmp_path):
    line = _dump_fails(cli, tmp_path, "lenet5", "--layer", "conv9")
    assert line.startswith("Error: unknown layer 'conv9'. Closest: conv3, conv2, conv1") and line.endswith("`leakaudit layers MODEL`.")


def test_empty_layer_in_the_library_api():
    from leakaudit.dump import DumpSettings
    from leakaudit.layers import resolve_layer, truncate
    from leakaudit.models import LeNet5

    with pytest.raises(ConfigError, match="--layer is empty"):
        DumpSettings(model="lenet5", layer="", data="digits", output=Path("x.h5"))
    # "" is the root's name in named_modules(): without the check it would cut nothing.
    with pytest.raises(UsageError, match="layer name is empty"):
        resolve_layer(LeNet5(), "")
    with pytest.raises(UsageError, match="layer name is empty"):
        truncate(LeNet5(), "", torch.zeros(1, 1, 32, 32))


def test_empty_layer_in_an_audit_file(cli, tmp_path):
    config = tmp_path / "audit.yaml"
    config.write_text("model: lenet5\nlayer: ''\ndata: digits\ntasks: {private: label}\n")
    result = cli("audit", config, "-o", tmp_path / "out")
    assert result.exit_code == 2
    assert error_line(result) == "Error: layer: expected a string, got ''."
    assert not (tmp_path / "out").exists()


def test_layer_never_called_in_the_forward_pass(cli, tmp_path, models_file):
    line = _dump_fails(cli, tmp_path, f"{models_file}:unused", "--layer", "spare")
    assert line.startswith("Error: layer 'spare' was not called during the forward pass")


def test_layer_whose_output_is_not_a_tensor(cli, tmp_path, models_file):
    line = _dump_fails(cli, tmp_path, f"{models_file}:tuple_out", "--layer", "pair")
    assert line == (
        "Error: layer 'pair' outputs a tuple of 2 (Tensor, Tensor), not a tensor; choose one element with --layer pair[0]."
    )


# --------------------------------------------------------------------------- forward failures


def test_input_smaller_than_a_kernel(cli, tmp_path):
    line = _dump_fails(cli, tmp_path, "lenet5", "--layer", "conv3", "--input-size", "8")
    assert line.startswith("Error: the input (1×8×8) is too small for the model: it shrinks below the size of a kernel")
    assert line.endswith("Pass a larger --input-size, such as the size the model was built for.")


def test_input_that_does_not_fit_the_fully_connected_layers(cli, tmp_path):
    line = _dump_fails(cli, tmp_path, "lenet5", "--layer", "fc1", "--input-size", "40")
    assert line.startswith("Error: the input (1×40×40) does not fit the model's fully connected layers")
    assert line.endswith("Pass the --input-size the model was built for.")


def test_model_expecting_three_channels_on_gray_data(cli, tmp_path, models_file):
    line = _dump_fails(cli, tmp_path, f"{models_file}:rgb_only", "--layer", "conv")
    assert line.startswith("Error: the model expects 3 input channels but its input (1×8×8) has 1.")
    assert "--in-chans 1" in line and "input_size = (3, H, W)" in line


def test_a_model_whose_forward_raises_is_a_runtime_error_in_one_line(cli, tmp_path, models_file):
    line = _dump_fails(cli, tmp_path, f"{models_file}:broken", "--layer", "conv", code=3)
    assert line.startswith("Error: the model's forward pass failed on an input of shape 1×8×8: ValueError: this model's forward is broken.")


def test_failed_dump_over_an_existing_store_leaves_it_untouched(cli, tmp_path):
    out = tmp_path / "acts.h5"
    out.write_bytes(b"an earlier store")
    result = cli("dump", "lenet5", "--layer", "conv3", "--input-size", "8", "--data", "digits", "--limit", "64",
                 "-o", out, "--force")  # fmt: skip
    assert result.exit_code == 2
    assert "too small for the model" in error_line(result)
    assert out.read_bytes() == b"an earlier store"
    assert not partial_path(out).exists() and not journal_path(out).exists()


def test_layers_with_gray_input_for_an_rgb_model(cli):
    result = cli("layers", "timm:resnet18", "--input-shape", "1,32,32")
    assert result.exit_code == 2
    assert error_line(result) == (
        "Error: the model expects 3 input channels but its input (1×32×32) has 1. Pass --input-shape 3,H,W, "
        "or build the model for 1-channel input with --in-chans 1 where its factory takes in_chans."
    )
    assert result.stdout == ""


def test_layers_with_an_input_smaller_than_a_kernel(cli):
    result = cli("layers", "lenet5", "--input-shape", "1,8,8")
    assert result.exit_code == 2
    line = error_line(result)
    assert line.startswith("Error: the input (1×8×8) is too small for the model")
    assert line.endswith("Pass a larger --input-shape C,H,W, such as the size the model was built for.")


# --------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--split", "0.5,0.5", "Error: --split expects three fractions TRAIN,VAL,TEST, got '0.5,0.5'."),
        ("--dtype", "float64", "Error: --dtype must be float32 or float16, got 'float64'."),
        ("--batch-size", "0", "Error: --batch-size must be positive, got 0."),
        ("--memory-format", "nhwc", "Error: --memory-format must be auto, contiguous or channels_last, got 'nhwc'."),
    ],
)
def test_invalid_dump_options(cli, tmp_path, option, value, message):
    assert _dump_fails(cli, tmp_path, "lenet5", "--layer", "conv3", option, value) == message


# --------------------------------------------------------------------------- exported encoders


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """A client encoder and server classifier exported by the library's own export code."""
    from leakaudit.export import export_split
    from leakaudit.models import LeNet5

    folder = tmp_path_factory.mktemp("exported")
    torch.manual_seed(0)
    export_split(LeNet5().eval(), "conv3", lambda encoder: encoder, torch.rand(4, 1, 32, 32), folder)
    return folder


def _activations(path: Path) -> np.ndarray:
    with h5py.File(path, "r") as f:
        return f["activations"][:]


def test_exported_encoder_dumps_without_a_layer_and_under_its_split_name(cli, tmp_path, exported):
    stores = {}
    for name, layer in (("none", ()), ("output", ("--layer", "output")), ("split", ("--layer", "conv3"))):
        stores[name] = tmp_path / f"{name}.h5"
        result = cli("dump", exported / "encoder.pt2", *layer, "--data", "digits", "--limit", "64", "-o", stores[name])
        assert result.exit_code == 0, result.stderr
    reference = _activations(stores["output"])
    assert reference.shape == (64, 120, 1, 1)
    assert np.array_equal(_activations(stores["none"]), reference)
    assert np.array_equal(_activations(stores["split"]), reference)
    with h5py.File(stores["split"], "r") as f:
        assert f.attrs["layer"] == "output" and f.attrs["encoder_split_layer"] == "conv3"


def test_exported_encoder_record_and_layers_hint(cli, exported):
    from leakaudit.layers import exported_split

    assert exported_split(str(exported / "encoder.pt2")) == "conv3"
    assert exported_split(str(exported / "classifier.pt2")) is None  # its input is the split
    result = cli("layers", exported / "encoder.pt2")
    assert result.exit_code == 0, result.stderr
    assert "This is a client encoder exported at 'conv3'" in result.stdout


def test_exported_classifier_still_needs_a_layer(cli, tmp_path, exported):
    line = _dump_fails(cli, tmp_path, exported / "classifier.pt2")
    assert line.startswith("Error: --layer is missing")


def test_exported_encoder_at_a_layer_it_does_not_run(cli, tmp_path, exported):
    line = _dump_fails(cli, tmp_path, exported / "encoder.pt2", "--layer", "fc1")
    assert line.startswith("Error: unknown layer 'fc1'") or "was not called during the forward pass" in line


# --------------------------------------------------------------------------- reproducible bytes


@pytest.mark.parametrize(
    "model",
    [
        ("lenet5", "conv3"),
        ("timm:resnet10t", "layer1", "--in-chans", "1", "--input-size", "32", "--num-classes", "10"),
    ],
    ids=["lenet5", "timm-resnet10t"],
)
def test_two_dumps_with_the_same_settings_store_the_same_bits(cli, tmp_path, model):
    spec, layer, *options = model
    digests = []
    arrays = []
    for run in range(2):
        out = tmp_path / f"run{run}.h5"
        # Enough batches for the timing trial to run: it must not change the numbers.
        result = cli("dump", spec, "--layer", layer, *options, "--data", "digits", "--limit", "320",
                     "--batch-size", "32", "-o", out)  # fmt: skip
        assert result.exit_code == 0, result.stderr
        with h5py.File(out, "r") as f:
            z = f["activations"]
            arrays.append(z[:])
            digests.append((z.attrs["sha256"], f.attrs["memory_format"], f.attrs["threads"]))
    assert np.array_equal(arrays[0], arrays[1])
    assert hashlib.sha256(arrays[0].tobytes()).digest() == hashlib.sha256(arrays[1].tobytes()).digest()
    assert digests[0] == digests[1]
