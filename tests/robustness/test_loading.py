"""Checkpoints that are hostile, damaged or not checkpoints at all.

Every refusal is one ``Error:`` line with its exit code (2: the user must decide or fix
the command line; 3: the file cannot be read), and a refused ``dump`` leaves no store and
no ``.partial`` file behind. A hostile file's code must not have run: each evil archive
writes a marker file when its code runs, and the marker must not exist after a refusal.
"""

from __future__ import annotations

import io
import json
import pickle
import random
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from leakaudit.models import LeNet5
from tests.conftest import error_line

# --------------------------------------------------------------------------- builders


class _TinyNet(nn.Module):
    """Conv → ReLU → linear on 1×8×8 inputs: small enough to export in well under a second."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.act = nn.ReLU()
        self.head = nn.Linear(2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.conv(x)).mean((2, 3)))


class _WritesMarker:
    """Unpickles by touching ``marker`` and then returning ``value`` (valid inputs, weights …)."""

    def __init__(self, marker: Path, value_expr: str) -> None:
        self.marker = str(marker)
        self.value_expr = value_expr

    def __reduce__(self):
        expr = f"(__import__('pathlib').Path({self.marker!r}).touch(), {self.value_expr})[1]"
        return (eval, (expr,))


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory) -> Path:
    """A real ``torch.export.save`` archive with a dynamic batch dimension."""
    path = tmp_path_factory.mktemp("export") / "tiny.pt2"
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(_TinyNet().eval(), (torch.rand(2, 1, 8, 8),), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(path))
    return path


def _rewrite_zip(src: Path, dst: Path, replace: dict[str, bytes | None], add: dict[str, bytes] | None = None) -> Path:
    """Copy the zip ``src`` to ``dst`` with members whose names end in a key replaced (None: dropped)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        root = zin.namelist()[0].split("/")[0]
        for info in zin.infolist():
            data = zin.read(info.filename)
            for suffix, new in replace.items():
                if info.filename.endswith(suffix):
                    data = new
            if data is not None:
                zout.writestr(info.filename, data)
        for name, data in (add or {}).items():
            zout.writestr(f"{root}/{name}", data)
    return dst


def _torch_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _member(path: Path, suffix: str) -> bytes:
    with zipfile.ZipFile(path) as archive:
        return archive.read(next(n for n in archive.namelist() if n.endswith(suffix)))


def _evil_sample_inputs(tiny_export: Path, tmp_path: Path, marker: Path) -> Path:
    payload = _torch_bytes(_WritesMarker(marker, "((__import__('torch').rand(2, 1, 8, 8),), {})"))
    return _rewrite_zip(tiny_export, tmp_path / "evil.pt2", {"data/sample_inputs/model.pt": payload})


def _evil_pickled_weight(tiny_export: Path, tmp_path: Path, marker: Path) -> Path:
    """A weight stored the way torch stores tensors it cannot write raw: as a pickle."""
    config = json.loads(_member(tiny_export, "data/weights/model_weights_config.json"))
    fqn, entry = next(iter(config["config"].items()))
    entry["use_pickle"] = True
    shape = entry["tensor_meta"]["sizes"]
    sizes = ", ".join(str(s["as_int"]) for s in shape)
    payload = _torch_bytes(_WritesMarker(marker, f"__import__('torch').zeros({sizes})"))
    return _rewrite_zip(
        tiny_export,
        tmp_path / "evil.pt2",
        {"model_weights_config.json": json.dumps(config).encode(), f"data/weights/{entry['path_name']}": payload},
    )


def _evil_shape_expression(tiny_export: Path, tmp_path: Path, marker: Path) -> Path:
    """sympy evaluates shape expressions with eval; this one would touch the marker."""
    program = _member(tiny_export, "models/model.json").decode()
    code = f"__import__('pathlib').Path({str(marker)!r}).touch()"
    start = program.index('"expr_str": ') + len('"expr_str": ')
    end = program.index('"', start + 1) + 1
    program = program[:start] + json.dumps(code) + program[end:]
    return _rewrite_zip(tiny_export, tmp_path / "evil.pt2", {"models/model.json": program.encode()})


def _evil_graph_target(tiny_export: Path, tmp_path: Path, marker: Path) -> Path:
    """A node whose target resolves, under ``torch``, to ``os.system``."""
    program = _member(tiny_export, "models/model.json").decode()
    program = program.replace('"torch.ops.aten.relu.default"', '"torch.os.system"', 1)
    return _rewrite_zip(tiny_export, tmp_path / "evil.pt2", {"models/model.json": program.encode()})


def _evil_native_code(tiny_export: Path, tmp_path: Path, marker: Path) -> Path:
    """AOTInductor packages are shared libraries that torch.export.load dlopens."""
    return _rewrite_zip(tiny_export, tmp_path / "evil.pt2", {}, add={"data/aotinductor/model/model.so": b"\x7fELF"})


def _evil_legacy_format(tiny_export: Path, tmp_path: Path, marker: Path) -> Path:
    """The pre-2.8 layout, which torch reads with zipfile and torch.load."""
    path = tmp_path / "evil.pt2"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("version", "8.13")
        archive.writestr("serialized_exported_program.json", "{}")
        archive.writestr("serialized_state_dict.pt", _torch_bytes(_WritesMarker(marker, "{}")))
        archive.writestr("serialized_constants.pt", _torch_bytes({}))
        archive.writestr("serialized_example_inputs.pt", _torch_bytes(((), {})))
    return path


# --------------------------------------------------------------------------- hostile .pt2

EVIL_ARCHIVES = {
    "sample-inputs-pickle": (_evil_sample_inputs, "a pickled Python object"),
    "pickled-weight": (_evil_pickled_weight, "a pickled Python object"),
    "shape-expression": (_evil_shape_expression, "a shape expression that is not plain arithmetic"),
    "graph-target": (_evil_graph_target, "calls 'torch.os.system', which is not a tensor operator"),
    "native-code": (_evil_native_code, "AOTInductor-compiled native code"),
    "legacy-format": (_evil_legacy_format, "a pickled Python object"),
}


@pytest.mark.parametrize("kind", list(EVIL_ARCHIVES))
@pytest.mark.parametrize("command", ["layers", "dump"])
def test_hostile_export_is_refused_without_running_it(cli, tiny_export, tmp_path, kind, command):
    build, fragment = EVIL_ARCHIVES[kind]
    marker = tmp_path / "MARKER"
    archive = build(tiny_export, tmp_path, marker)
    (tmp_path / "out").mkdir()
    out = tmp_path / "out" / "acts.h5"
    if command == "layers":
        result = cli("layers", archive)
    else:
        result = cli("dump", archive, "--layer", "output", "--data", "digits", "--limit", "20", "-o", out)
    assert result.exit_code == 2, result.stderr
    line = error_line(result)
    assert "would run code from the file when loaded" in line and fragment in line
    assert "--trust-checkpoint" in line
    assert not marker.exists()
    assert list((tmp_path / "out").iterdir()) == []


def test_hostile_export_loads_with_trust_checkpoint(cli, tiny_export, tmp_path):
    marker = tmp_path / "MARKER"
    archive = _evil_sample_inputs(tiny_export, tmp_path, marker)
    result = cli("layers", archive, "--trust-checkpoint")
    assert result.exit_code == 0, result.stderr
    assert marker.exists()  # the user's decision: the file's code ran


def test_refused_dump_leaves_an_existing_store_untouched(cli, tiny_export, tmp_path, digits_store):
    marker = tmp_path / "MARKER"
    archive = _evil_sample_inputs(tiny_export, tmp_path, marker)
    out = tmp_path / "acts.h5"
    out.write_bytes(digits_store.read_bytes())
    before = out.read_bytes()
    result = cli("dump", archive, "--layer", "output", "--data", "digits", "--limit", "20", "-o", out, "--force")
    assert result.exit_code == 2
    assert "would run code" in error_line(result)
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["acts.h5", "evil.pt2"]


def test_exports_written_by_harden_load_without_trust(cli, tmp_path):
    from leakaudit.export import export_split

    model = LeNet5().eval()
    export_split(model, "conv3", lambda encoder: encoder, torch.rand(2, 1, 32, 32), tmp_path)
    for name in ("encoder.pt2", "classifier.pt2"):
        result = cli("layers", tmp_path / name)
        assert result.exit_code == 0, result.stderr
    out = tmp_path / "acts.h5"
    result = cli("dump", tmp_path / "encoder.pt2", "--layer", "output", "--data", "digits", "--limit", "90", "-o", out)
    assert result.exit_code == 0, result.stderr
    assert out.is_file()


# --------------------------------------------------------------------------- damaged files


def _weights_file(tmp_path: Path, kind: str) -> Path:
    """A file given as ``--weights``; each kind is one way a checkpoint can be wrong."""
    state = LeNet5().state_dict()
    path = tmp_path / "w.pt"
    if kind == "text":
        path = tmp_path / "notes.txt"
        path.write_text("accuracy 0.98 after 10 epochs\n")
    elif kind == "random-bytes":
        path = tmp_path / "junk.bin"
        path.write_bytes(bytes(range(7, 256)) * 20)
    elif kind == "random-pickle-bytes":
        # Starts like a pickle, then garbage: torch's weights-only reader refuses it too,
        # but it is broken, not something to trust. Seeded: the bytes decide which of the
        # unpickler's errors comes out (tested one by one in test_random_pickle_bytes).
        path.write_bytes(b"\x80\x02" + random.Random(0).randbytes(4000))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated-zip":
        torch.save(state, path)
        path.write_bytes(path.read_bytes()[:3000])
    elif kind == "truncated-safetensors":
        path = tmp_path / "w.safetensors"
        save_file(state, str(path))
        path.write_bytes(path.read_bytes()[:-1000])
    elif kind == "truncated-safetensors-header":
        path = tmp_path / "w.safetensors"
        save_file(state, str(path))
        path.write_bytes(path.read_bytes()[:200])
    elif kind == "text-as-safetensors":
        path = tmp_path / "w.safetensors"
        path.write_text("not weights\n")
    elif kind == "folder":
        path = tmp_path / "weights"
        path.mkdir()
        save_file(state, str(path / "model.safetensors"))
    elif kind == "missing":
        path = tmp_path / "missing.pt"
    elif kind == "pickled-object":
        path.write_bytes(pickle.dumps({"state_dict": _WritesMarker(tmp_path / "MARKER", "{}")}, protocol=2))
    return path


WEIGHTS_CASES = [
    ("text", 3, "is a text file, not a checkpoint"),
    ("random-bytes", 3, "is of unknown format (neither safetensors nor torch.save), not a checkpoint"),
    ("random-pickle-bytes", 3, "its pickle is corrupt or truncated"),
    ("empty", 3, "is empty (0 bytes), not a checkpoint"),
    ("truncated-zip", 3, "is a corrupt or truncated zip archive"),
    ("truncated-safetensors", 3, "as safetensors (SafetensorError): the file is corrupt or truncated"),
    ("truncated-safetensors-header", 3, "it is a truncated safetensors file; its header alone needs"),
    ("text-as-safetensors", 3, "is a text file, not a safetensors file"),
    ("folder", 2, "is a folder, not a file. Give the checkpoint file inside it"),
    ("missing", 2, "does not exist"),
    ("pickled-object", 2, "contains pickled Python objects (eval)"),
]


@pytest.mark.parametrize(("kind", "code", "fragment"), WEIGHTS_CASES, ids=[c[0] for c in WEIGHTS_CASES])
def test_bad_weights_file(cli, tmp_path, kind, code, fragment):
    weights = _weights_file(tmp_path, kind)
    (tmp_path / "out").mkdir()
    out = tmp_path / "out" / "acts.h5"
    result = cli("dump", "lenet5", "--weights", weights, "--layer", "conv3", "--data", "digits", "--limit", "20", "-o", out)
    assert result.exit_code == code, result.stderr
    line = error_line(result)
    assert fragment in line
    assert "unexpected" not in line
    if code == 3:  # a broken file is no question of trust
        assert "--trust-checkpoint" not in line
    assert not (tmp_path / "MARKER").exists()
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize("seed", [0, 2, 20, 195], ids=["UnpicklingError", "IndexError", "KeyError", "UnicodeDecodeError"])
def test_random_pickle_bytes(tmp_path, seed):
    """Garbage after a pickle header reads as a broken pickle, whichever error the unpickler raises on it."""
    from leakaudit.errors import CheckpointError
    from leakaudit.models.weights import _torch_load

    path = tmp_path / "w.pt"
    path.write_bytes(b"\x80\x02" + random.Random(seed).randbytes(4000))
    with pytest.raises(CheckpointError, match="its pickle is corrupt or truncated"):
        _torch_load(path, trust_checkpoint=False)


def _model_file(tmp_path: Path, tiny_export: Path, kind: str) -> Path:
    """A file given as the MODEL spec."""
    if kind == "text-pt":
        path = tmp_path / "model.pt"
        path.write_text("see README\n")
    elif kind in ("corrupt-torchscript", "truncated-torchscript"):
        path = tmp_path / "model.ts"
        torch.jit.save(torch.jit.trace(_TinyNet().eval(), torch.rand(2, 1, 8, 8)), str(path))
        if kind == "truncated-torchscript":
            path.write_bytes(path.read_bytes()[:1500])
        else:
            _rewrite_zip(path, tmp_path / "bad.ts", {".py": b"def forward(self x):\n  ((\n"})
            path = tmp_path / "bad.ts"
    elif kind == "text-pt2":
        path = tmp_path / "model.pt2"
        path.write_text("see README\n")
    elif kind == "truncated-pt2":
        path = tmp_path / "model.pt2"
        path.write_bytes(tiny_export.read_bytes()[:2000])
    elif kind == "pt2-missing-record":
        # torch logs a traceback for this one before it raises.
        path = _rewrite_zip(tiny_export, tmp_path / "model.pt2", {"data/weights/weight_0": None})
    elif kind == "pt2-bad-json":
        path = _rewrite_zip(tiny_export, tmp_path / "model.pt2", {"models/model.json": b"{not json"})
    elif kind == "torch-save-as-pt2":
        path = tmp_path / "model.pt2"
        torch.save(LeNet5().state_dict(), path)
    elif kind == "folder-pt":
        path = tmp_path / "model.pt"
        path.mkdir()
    return path


MODEL_CASES = [
    ("text-pt", 3, "is a text file, not a checkpoint"),
    ("corrupt-torchscript", 3, "cannot read TorchScript archive"),
    ("truncated-torchscript", 3, "is a corrupt or truncated zip archive"),
    ("text-pt2", 3, "is a text file, not an exported program"),
    ("truncated-pt2", 3, "it is a corrupt or truncated zip archive, not an exported program"),
    ("pt2-missing-record", 3, "cannot read exported program"),
    ("pt2-bad-json", 3, "'models/model.json' inside"),
    ("torch-save-as-pt2", 3, "is not a torch.export.save archive (it looks like a torch.save or TorchScript file)"),
    ("folder-pt", 2, "is a folder, not a file"),
]


@pytest.mark.parametrize(("kind", "code", "fragment"), MODEL_CASES, ids=[c[0] for c in MODEL_CASES])
def test_bad_model_file(cli, tmp_path, tiny_export, kind, code, fragment):
    model = _model_file(tmp_path, tiny_export, kind)
    result = cli("layers", model)
    assert result.exit_code == code, result.stderr
    line = error_line(result)
    assert fragment in line
    assert "unexpected" not in line
    # One line and nothing else: no log records or tracebacks from torch.
    assert [text for text in result.stderr.splitlines() if text.strip()] == [line]
