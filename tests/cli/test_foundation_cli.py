"""`layers`, `dump` and `info` through the command line: output, exit codes, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from leakaudit.store import partial_path
from tests.conftest import error_line
from tests.models_for_tests import NestedNet

ROOT = Path(__file__).resolve().parents[2]


def _dump_args(out: Path, *extra: str) -> list[str]:
    return ["dump", "lenet5", "--layer", "conv3", "--data", "digits", "--limit", "100", "-o", str(out), *extra]


def test_layers_table_and_json(cli):
    result = cli("layers", "lenet5")
    assert result.exit_code == 0
    assert "conv3" in result.stdout and "120×1×1" in result.stdout and "48,120" in result.stdout
    result = cli("layers", "timm:resnet18", "--input-shape", "3,32,32", "--json")
    data = json.loads(result.stdout)
    by_name = {layer["name"]: layer for layer in data["layers"]}
    assert by_name["layer2.0.conv1"]["output_shape"] == [128, 4, 4]
    assert by_name["layer2"]["params"] == sum(
        p.numel() for p in __import__("timm").create_model("resnet18").layer2.parameters()
    )
    assert "layer1.0.add" in data["graph_nodes"]


def test_layers_needs_an_input_shape_when_the_model_declares_none(cli):
    result = cli("layers", "torchvision:resnet18")
    assert result.exit_code == 2
    assert error_line(result) == "Error: model 'torchvision:resnet18' declares no input shape; pass --input-shape C,H,W."


def test_dump_and_info(cli, tmp_path):
    out = tmp_path / "acts.h5"
    result = cli(*_dump_args(out, "--task", "public=parity", "--task", "private=label"))
    assert result.exit_code == 0, result.stderr
    assert f"wrote {out} — 100 rows, Z 120×1×1" in result.stdout
    result = cli("info", out, "--json")
    summary = json.loads(result.stdout)
    assert summary["rows"] == 100 and summary["layer_shape"] == [120, 1, 1]
    assert summary["tasks"]["public"]["class_names"] == ["even", "odd"]
    assert sum(summary["split"].values()) == 100
    assert summary["provenance"]["checkpoint_sha256"] == ""
    result = cli("info", out)
    assert result.exit_code == 0 and "attacker-validation" in result.stdout


def test_python_m_leakaudit_runs_as_a_subprocess(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "leakaudit", "--version"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0 and done.stdout.startswith("leakaudit ")


def test_unknown_model_and_layer(cli, tmp_path):
    result = cli("dump", "lenet55", "--layer", "conv3", "--data", "digits", "-o", tmp_path / "a.h5")
    assert result.exit_code == 2
    assert error_line(result).startswith("Error: unknown model 'lenet55'. Closest: lenet5.")
    result = cli("dump", "lenet5", "--layer", "conv4", "--data", "digits", "-o", tmp_path / "a.h5")
    assert result.exit_code == 2
    assert error_line(result) == (
        "Error: unknown layer 'conv4'. Closest: conv3, conv2, conv1, conv3.1, conv3.0. "
        "List them all with `leakaudit layers MODEL`."
    )
    assert not (tmp_path / "a.h5").exists()


def test_weights_that_do_not_fit(cli, tmp_path):
    weights = tmp_path / "w.safetensors"
    save_file(NestedNet(num_classes=3).state_dict(), str(weights))
    result = cli("dump", "tests.models_for_tests:build", "--weights", weights, "--layer", "features", "--data", "digits", "-o", tmp_path / "a.h5")
    assert result.exit_code == 3
    assert "shape mismatch 2: head.weight (3, 8) vs (4, 8), head.bias (3,) vs (4,)" in error_line(result)
    result = cli("dump", "tests.models_for_tests:build", "--num-classes", "3", "--weights", weights, "--layer", "features", "--data", "digits", "--limit", "60", "-o", tmp_path / "a.h5")
    assert result.exit_code == 0, result.stderr


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickled_weights_refused_without_trust(cli, tmp_path):
    marker = tmp_path / "pwned"
    weights = tmp_path / "evil.pt"
    torch.save({"state_dict": NestedNet().state_dict(), "hook": _Evil(marker)}, weights)
    result = cli("dump", "tests.models_for_tests:build", "--weights", weights, "--layer", "features", "--data", "digits", "-o", tmp_path / "a.h5")
    assert result.exit_code == 2
    line = error_line(result)
    assert "contains pickled Python objects" in line and "--trust-checkpoint" in line
    assert not marker.exists()


def test_corrupt_checkpoint(cli, tmp_path):
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"PK\x03\x04 this is not a checkpoint")
    result = cli("dump", "lenet5", "--weights", weights, "--layer", "conv3", "--data", "digits", "-o", tmp_path / "a.h5")
    assert result.exit_code == 3
    assert error_line(result).startswith(f"Error: cannot read '{weights}'")


def test_empty_source_and_missing_labels(cli, tmp_path):
    empty = tmp_path / "empty.npz"
    np.savez(empty, x=np.zeros((0, 8, 8), dtype=np.uint8))
    result = cli("dump", "lenet5", "--layer", "conv3", "--data", f"npz:{empty}", "-o", tmp_path / "a.h5")
    assert result.exit_code == 2
    assert error_line(result) == f"Error: data source 'npz:{empty}' is empty."
    unlabeled = tmp_path / "unlabeled.npz"
    np.savez(unlabeled, x=np.zeros((30, 8, 8), dtype=np.uint8))
    result = cli("dump", "lenet5", "--layer", "conv3", "--data", f"npz:{unlabeled}", "--task", "private=label", "-o", tmp_path / "a.h5")
    assert result.exit_code == 2
    assert error_line(result) == f"Error: task 'private' needs labels, but data source 'npz:{unlabeled}' has none."
    assert not (tmp_path / "a.h5").exists()


def test_npz_source_with_attribute_task(cli, tmp_path, npz_source):
    out = tmp_path / "a.h5"
    result = cli("dump", "lenet5", "--layer", "pool2", "--data", f"npz:{npz_source}", "--task", "public=label", "--task", "private=smiling", "-o", out)
    assert result.exit_code == 0, result.stderr
    with h5py.File(out) as f:
        assert f["inputs"].shape == (60, 1, 32, 32)  # RGB 12×12 → the model's gray 32×32
        np.testing.assert_array_equal(f["labels/private"][()], np.tile([0, 1], 30))


def test_existing_output_is_kept_without_force(cli, tmp_path):
    out = tmp_path / "a.h5"
    assert cli(*_dump_args(out)).exit_code == 0
    before = out.read_bytes()
    result = cli(*_dump_args(out, "--seed", "3"))
    assert result.exit_code == 2
    assert error_line(result) == f"Error: '{out}' exists. Pass --force to overwrite it."
    assert out.read_bytes() == before
    assert cli(*_dump_args(out, "--seed", "3", "--force")).exit_code == 0
    assert out.read_bytes() != before


def test_info_refuses_incomplete_and_foreign_files(cli, tmp_path):
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = np.zeros(3)
    result = cli("info", foreign)
    assert result.exit_code == 3
    assert error_line(result) == f"Error: '{foreign}' is not a leakaudit activation store (schema attribute None)."
    out = tmp_path / "a.h5"
    cli(*_dump_args(out))
    with h5py.File(out, "r+") as f:
        f.attrs["complete"] = False
    result = cli("info", out)
    assert result.exit_code == 3
    assert "is incomplete" in error_line(result)


def test_non_finite_activations(cli, tmp_path):
    out = tmp_path / "a.h5"
    result = cli("dump", "tests.models_for_tests:exploding", "--layer", "features", "--data", "digits", "--limit", "50", "-o", out)
    assert result.exit_code == 3
    line = error_line(result)
    assert "NaN" in line and "infinite values in rows 0–49" in line and "nothing was stored" in line
    assert not out.exists() and not partial_path(out).exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error when CUDA is absent")
def test_cuda_without_cuda_is_a_usage_error(cli, tmp_path):
    result = cli(*_dump_args(tmp_path / "a.h5", "--device", "cuda"))
    assert result.exit_code == 2
    assert error_line(result) == "Error: --device cuda was given but CUDA is not available here; use --device cpu or auto."


def test_bad_option_values(cli, tmp_path):
    result = cli(*_dump_args(tmp_path / "a.h5", "--split", "0.5,0.5"))
    assert result.exit_code == 2
    assert error_line(result) == "Error: --split expects three fractions TRAIN,VAL,TEST, got '0.5,0.5'."
    result = cli(*_dump_args(tmp_path / "a.h5", "--dtype", "int8"))
    assert result.exit_code == 2
    assert error_line(result) == "Error: --dtype must be float32 or float16, got 'int8'."
