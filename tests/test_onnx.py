"""ONNX encoders: `harden` exports encoder.onnx, `dump model.onnx` runs it with onnxruntime.

The exported encoder is checked against the PyTorch encoder it came from (within the stated
tolerance), a BatchNorm + Dropout model in eval semantics, and the files that must be refused
with one line: truncated, a fixed or dynamic shape the data does not fit, a custom-op domain,
external data outside the model's folder, and the white-box inversion, which needs gradients.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")

from onnx import TensorProto, helper  # noqa: E402

from leakaudit.dump import DumpSettings, dump  # noqa: E402
from leakaudit.models import LeNet5, load_model  # noqa: E402
from leakaudit.models.onnx import ATOL, ONNX_EXTRA, RTOL, MissingExtraError, OnnxExportSkipped, export_encoder  # noqa: E402
from leakaudit.store import open_store  # noqa: E402
from tests.conftest import error_line  # noqa: E402
from tests.recipes.test_recipes import one_thread  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def hardened(tmp_path_factory) -> tuple[Path, object]:
    """The smallest `harden` run through the command line: 300 digits, one epoch, no evaluation."""
    from typer.testing import CliRunner

    from leakaudit.cli import app

    out = tmp_path_factory.mktemp("onnx-harden") / "h"
    result = CliRunner().invoke(app, [
        "harden", "lenet5", "--num-classes", "2", "--layer", "conv3", "--data", "digits", "--limit", "300",
        "--task", "public=parity", "--task", "private=label", "--method", "center-loss", "--epochs", "1",
        "--batch-size", "64", "--no-evaluate", "-o", str(out),
    ], catch_exceptions=False)  # fmt: skip
    return out, result


def _dump(model: str | Path, out: Path, *extra: str) -> list[str]:
    return ["dump", str(model), "--data", "digits", "--limit", "120", "-o", str(out), *extra]


def test_harden_writes_a_verified_encoder_onnx_with_its_record(hardened):
    folder, result = hardened
    assert result.exit_code == 0, result.stderr
    assert (folder / "encoder.onnx").is_file()
    assert f"wrote {folder / 'encoder.onnx'} (ONNX opset 18, dynamic batch; onnxruntime matches" in result.stdout
    model = onnx.load(str(folder / "encoder.onnx"))
    record = json.loads({p.key: p.value for p in model.metadata_props}["leakaudit"])
    assert record["role"] == "encoder" and record["split_layer"] == "conv3"
    assert record["input_shape"] == [1, 32, 32] and record["layer_shape"] == [120, 1, 1]
    assert record["opset"] == 18 == next(o.version for o in model.opset_import if o.domain == "")
    first = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert first.dim_param and not first.HasField("dim_value")  # a dynamic batch
    saved = json.loads((folder / "model.json").read_text())
    assert saved["onnx"]["opset"] == 18 and saved["onnx"]["max_abs_difference"] <= ATOL
    assert "encoder.onnx" in saved["files"]


def test_dump_of_encoder_onnx_equals_the_pytorch_encoder(cli, hardened, tmp_path):
    folder, _ = hardened
    for name, extra in (("onnx", ()), ("onnx-named", ("--layer", "conv3")), ("pt2", ())):
        spec = folder / ("encoder.pt2" if name == "pt2" else "encoder.onnx")
        result = cli(*_dump(spec, tmp_path / f"{name}.h5", *extra))
        assert result.exit_code == 0, result.stderr
    with open_store(tmp_path / "onnx.h5") as a, open_store(tmp_path / "pt2.h5") as b, open_store(tmp_path / "onnx-named.h5") as c:
        assert a.attrs["model_kind"] == "onnx" and a.layer_shape == b.layer_shape == (120, 1, 1)
        np.testing.assert_allclose(a.activations(), b.activations(), rtol=RTOL, atol=ATOL)
        assert not np.array_equal(a.activations(), np.zeros_like(a.activations()))
        np.testing.assert_array_equal(a.activations(), c.activations())  # the split's name means the output
        np.testing.assert_array_equal(a.inputs(np.arange(len(a))), b.inputs(np.arange(len(b))))


def test_inversion_on_an_onnx_store_is_refused_with_the_reason(cli, hardened, tmp_path):
    from leakaudit.attacks.inversion import InversionConfig, _check

    folder, _ = hardened
    store = tmp_path / "onnx.h5"
    assert cli(*_dump(folder / "encoder.onnx", store)).exit_code == 0
    result = cli("attack", store, "--attack", "inversion")
    assert result.exit_code == 2
    line = error_line(result)
    assert "the inversion needs gradients through the encoder" in line and "onnxruntime, which gives none" in line
    with open_store(store) as opened:  # in an audit the same reason marks it skipped
        reason = _check(opened, InversionConfig())
    assert reason is not None and "gives none" in reason


class BatchNormDropout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return self.drop(torch.relu(self.bn(self.conv(x))))


def test_batchnorm_and_dropout_export_and_dump_in_eval_semantics(tmp_path):
    torch.manual_seed(0)
    model = BatchNormDropout()
    with torch.no_grad():  # statistics a training mode forward would not reproduce
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
    model.eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    example = torch.rand(8, 1, 8, 8)
    info = export_encoder(model, example, tmp_path / "bn.onnx", split_layer="drop", layer_shape=[4, 8, 8])
    assert info["max_abs_difference"] <= ATOL
    assert not model.training and all(not m.training for m in model.modules())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    out = tmp_path / "bn.h5"
    dump(DumpSettings(model=str(tmp_path / "bn.onnx"), layer="output", data="digits", output=out, limit=100))
    with open_store(out) as store:
        x = torch.from_numpy(store.inputs(np.arange(len(store))))
        z = store.activations()
    with torch.no_grad():
        expected = model(x).numpy()
        trained = model.train()(x).numpy()
    model.eval()
    np.testing.assert_allclose(z, expected, rtol=RTOL, atol=ATOL)
    assert np.abs(z - trained).max() > 0.1  # training semantics (batch statistics, dropout) differ


def test_a_noisy_encoder_is_verified_with_its_own_draws_and_dumps_repeatably(tmp_path):
    from leakaudit.recipes.shredder import LaplaceNoise, NoisyEncoder

    torch.manual_seed(0)
    encoder = NoisyEncoder(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU()), LaplaceNoise((2, 6, 6), 0.5)).eval()
    export_encoder(encoder, torch.rand(4, 1, 8, 8), tmp_path / "noisy.onnx", split_layer="x", layer_shape=[2, 6, 6])
    x = torch.rand(4, 1, 8, 8)
    runs = []
    for _ in range(2):
        torch.manual_seed(7)  # what `dump --seed 7` does before it loads the model
        module = load_model(str(tmp_path / "noisy.onnx")).module
        runs.append((module(x), module(x)))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert not torch.equal(runs[0][0], runs[0][1])  # fresh noise for every batch


def test_a_truncated_onnx_file_is_one_line(cli, hardened, tmp_path):
    folder, _ = hardened
    data = (folder / "encoder.onnx").read_bytes()
    for cut in (len(data) // 2, 17):
        path = tmp_path / "cut.onnx"
        path.write_bytes(data[:cut])
        result = cli(*_dump(path, tmp_path / "cut.h5", "--layer", "output"))
        assert result.exit_code == 3, result.stderr
        line = error_line(result)
        assert line.startswith(f"Error: cannot read ONNX model {str(path)!r}") or "onnxruntime cannot load" in line


def _graph_model(path: Path, input_dims: list, weight_rows: int, *, domain: str = "", external: str | None = None) -> Path:
    """Flatten → MatMul: it runs only on images of ``weight_rows`` pixels."""
    weight = helper.make_tensor("w", TensorProto.FLOAT, [weight_rows, 3], np.ones(weight_rows * 3, np.float32).tolist())
    nodes = [helper.make_node("Flatten", ["x"], ["f"]), helper.make_node("MatMul", ["f", "w"], ["z"])]
    opsets = [helper.make_opsetid("", 18)]
    if domain:
        nodes.append(helper.make_node("Secret", ["z"], ["z2"], domain=domain))
        opsets.append(helper.make_opsetid(domain, 1))
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, input_dims)],
        [helper.make_tensor_value_info("z2" if domain else "z", TensorProto.FLOAT, None)], [weight],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=opsets)
    if external is not None:
        weight = model.graph.initializer[0]
        weight.ClearField("float_data")
        weight.data_location = TensorProto.EXTERNAL
        weight.external_data.add(key="location", value=external)
    path.write_bytes(model.SerializeToString())
    return path


def test_shapes_the_data_does_not_fit_are_one_line(cli, tmp_path):
    # A dynamic shape: any H, W are accepted by the graph's input, but its MatMul needs 10×10.
    dynamic = _graph_model(tmp_path / "dynamic.onnx", ["n", 1, "h", "w"], 100)
    result = cli(*_dump(dynamic, tmp_path / "d.h5", "--layer", "output"))
    assert result.exit_code == 2, result.stderr
    line = error_line(result)
    assert line.startswith(f"Error: onnxruntime cannot run {str(dynamic)!r} on input of shape (120, 1, 8, 8): ")
    assert "The graph takes (n, 1, h, w)" in line and "--input-size" in line
    assert cli(*_dump(dynamic, tmp_path / "ok.h5", "--layer", "output", "--input-size", "10")).exit_code == 0
    # A fixed shape: 8×8 data resized to 12×12 by --input-size.
    fixed = _graph_model(tmp_path / "fixed.onnx", ["n", 1, 8, 8], 64)
    assert cli(*_dump(fixed, tmp_path / "f-ok.h5", "--layer", "output")).exit_code == 0
    result = cli(*_dump(fixed, tmp_path / "f.h5", "--layer", "output", "--input-size", "12"))
    assert result.exit_code == 2, result.stderr
    assert error_line(result) == (
        f"Error: {str(fixed)!r} takes input of shape (n, 1, 8, 8), got (120, 1, 12, 12). "
        "Give data of that size, or resize it with --input-size H,W."
    )


def test_custom_op_domains_and_outside_external_data_are_refused(cli, tmp_path):
    custom = _graph_model(tmp_path / "custom.onnx", ["n", 1, 8, 8], 64, domain="com.example.secret")
    result = cli(*_dump(custom, tmp_path / "c.h5", "--layer", "output"))
    assert result.exit_code == 2
    assert error_line(result).startswith(
        f"Error: {str(custom)!r} uses operators of the custom domain 'com.example.secret', which need a native custom-op library"
    )
    (tmp_path / "inside").mkdir()
    (tmp_path / "w.bin").write_bytes(np.ones(64 * 3, np.float32).tobytes())
    outside = _graph_model(tmp_path / "inside" / "outside.onnx", ["n", 1, 8, 8], 64, external="../w.bin")
    result = cli(*_dump(outside, tmp_path / "e.h5", "--layer", "output"))
    assert result.exit_code == 2
    assert error_line(result) == (
        f"Error: {str(outside)!r} reads external tensor data from '../w.bin', outside the model's folder; "
        "leakaudit reads external data only from files beside the model."
    )
    # Beside the model, the same external data loads and runs.
    (tmp_path / "inside" / "w.bin").write_bytes(np.ones(64 * 3, np.float32).tobytes())
    beside = _graph_model(tmp_path / "inside" / "beside.onnx", ["n", 1, 8, 8], 64, external="w.bin")
    assert cli(*_dump(beside, tmp_path / "b.h5", "--layer", "output")).exit_code == 0
    with open_store(tmp_path / "b.h5") as store:
        x = store.inputs(np.arange(len(store))).reshape(len(store), -1)
        np.testing.assert_allclose(store.activations(), x.sum(1, keepdims=True).repeat(3, 1), rtol=1e-5)


def test_without_onnxruntime_dump_names_the_extra_and_export_is_skipped(cli, monkeypatch, tmp_path):
    model = _graph_model(tmp_path / "m.onnx", ["n", 1, 8, 8], 64)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now raises ImportError
    result = cli(*_dump(model, tmp_path / "m.h5", "--layer", "output"))
    assert result.exit_code == 2
    assert error_line(result) == (
        f"Error: an ONNX model needs the optional package onnxruntime: {ONNX_EXTRA}."
    )
    assert issubclass(MissingExtraError, Exception)
    with pytest.raises(OnnxExportSkipped, match=r"onnxruntime is not installed \(pip install 'leakaudit\[onnx\]' gives them\)"):
        export_encoder(LeNet5().eval(), torch.rand(2, 1, 32, 32), tmp_path / "x.onnx", split_layer="output", layer_shape=[10])
    assert not (tmp_path / "x.onnx").exists()
    # What harden calls: the .pt2 programs are written, encoder.onnx is not, and the reason is returned.
    from leakaudit.export import export_split

    folder = tmp_path / "export"
    folder.mkdir()
    exported = export_split(LeNet5(num_classes=2).eval(), "conv3", lambda e: e, torch.rand(4, 1, 32, 32), folder)
    assert sorted(exported["files"]) == ["classifier.pt2", "encoder.pt2"]
    assert "pip install 'leakaudit[onnx]'" in exported["onnx"]["skipped"]
    assert sorted(p.name for p in folder.iterdir()) == ["classifier.pt2", "encoder.pt2"]
