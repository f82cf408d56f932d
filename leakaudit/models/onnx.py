"""ONNX client encoders: exported by ``harden`` with ``torch.onnx``, run by ``dump`` with onnxruntime.

The encoder that runs on a client device is usually an ONNX file, so an audit should be able
to measure that very artifact. ``harden`` writes ``encoder.onnx`` beside ``encoder.pt2``
(:func:`export_encoder`) and ``leakaudit dump encoder.onnx --data …`` runs it on the CPU
(:func:`load_onnx`): the graph is the encoder, so its output is the split layer.

Both directions need the optional ``onnx`` and ``onnxruntime`` packages (the ``onnx`` extra);
without them :func:`require` raises :class:`MissingExtraError`, and ``harden`` still succeeds
and says the ONNX export was skipped.

An ONNX file is a protobuf message, not a pickle: loading it runs no Python code, so it needs
no ``--trust-checkpoint``. What a graph could still reach outside itself is refused before
onnxruntime sees it: operators from domains onnxruntime does not define (custom-op libraries)
and external-data files outside the model's own folder.

Export and check: the dynamo-based exporter (deterministic: the same encoder gives the same
bytes) with a dynamic batch dimension; the file is written only after onnxruntime reproduces
the PyTorch encoder on the example batch within :data:`RTOL`/:data:`ATOL` (ONNX kernels are
not bit-identical to PyTorch's). An encoder that draws noise (Shredder) is checked with the
PyTorch encoder's own draws fed in place of the graph's random operators.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from leakaudit import __version__, _optional
from leakaudit._optional import MissingExtraError
from leakaudit.errors import CheckpointError, UsageError
from leakaudit.models.builders import LoadedModel

#: How to get the optional packages (named in every message about their absence).
ONNX_EXTRA = "pip install 'leakaudit[onnx]'"
#: The ``metadata_props`` key of the record ``harden`` writes into ``encoder.onnx``.
METADATA_KEY = "leakaudit"
PROGRAM_SCHEMA = "leakaudit.program"  # the schema of the .pt2 programs' record, shared with them
#: The default ONNX opset of the exporter in torch 2.x; onnxruntime 1.17+ runs it.
OPSET = 18
#: How close onnxruntime must come to the PyTorch encoder for the export to count as verified.
RTOL, ATOL = 1e-4, 1e-5

# Operator domains that onnxruntime defines itself; any other needs a custom-op library.
_BUILTIN_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft", "com.microsoft.nchwc"})
_RANDOM_OPS = {"RandomUniformLike": "uniform", "RandomNormalLike": "normal", "RandomUniform": "uniform", "RandomNormal": "normal"}
_ONNX_TO_NUMPY = {1: np.float32, 10: np.float16, 11: np.float64}


def require() -> tuple[Any, Any]:
    """``(onnx, onnxruntime)``, imported.

    Raises:
        MissingExtraError: either is missing; the message names the extra that installs both.
    """
    return (_optional.require("onnx", "onnx", purpose="an ONNX model"),
            _optional.require("onnxruntime", "onnx", purpose="an ONNX model"))  # fmt: skip


# --------------------------------------------------------------------------- export


class OnnxExportSkipped(Exception):
    """The encoder was not exported to ONNX; ``str()`` says why (harden reports it and goes on)."""


def export_encoder(
    encoder: nn.Module,
    example: torch.Tensor,
    path: Path,
    *,
    split_layer: str,
    layer_shape: list[int],
    normalize: str | None = None,
) -> dict[str, Any]:
    """Export ``encoder`` (eval mode, CPU) to ``path`` as ONNX, verified with onnxruntime on ``example``.

    Args:
        encoder: the deployed encoder, input → split activations.
        example: a model input batch; its rows are checked, its batch dimension stays dynamic.
        path: the ``.onnx`` file to write (atomically, only once verified).
        split_layer: the layer the encoder was cut at (recorded in the file).
        layer_shape: the split activations' shape without the batch (recorded).
        normalize: the ``--normalize`` the model was trained with (recorded), or ``None``.

    Returns:
        ``opset``, ``input_shape``, the tolerance and the largest difference measured.

    Raises:
        OnnxExportSkipped: the packages are missing, the exporter cannot export this encoder,
            or onnxruntime does not reproduce it within the tolerance.
    """
    from leakaudit._io import atomic_write_bytes

    try:
        onnx, ort = require()
        import onnxscript  # noqa: F401 - the dynamo exporter's dependency; a clear skip beats its ImportError
    except (MissingExtraError, ImportError):
        raise OnnxExportSkipped(f"onnx, onnxscript or onnxruntime is not installed ({ONNX_EXTRA} gives them)") from None
    example = example.detach().cpu()
    batch = torch.export.Dim("batch", min=1)
    try:
        with _exporter_quiet():
            program = torch.onnx.export(
                encoder, (example,), dynamo=True, verbose=False, opset_version=OPSET,
                input_names=["input"], output_names=["z"], dynamic_shapes=({0: batch},),
            )  # fmt: skip
        if program is None:
            raise RuntimeError("the exporter returned no program")
        model = program.model_proto
    except Exception as exc:  # noqa: BLE001 - any exporter failure means: no ONNX file, the .pt2 files stand
        raise OnnxExportSkipped(f"torch.onnx could not export the encoder ({type(exc).__name__})") from None
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), OPSET)
    record = {
        "schema": PROGRAM_SCHEMA, "schema_version": 1, "tool_version": __version__, "role": "encoder",
        "split_layer": split_layer, "layer_shape": list(layer_shape), "input_shape": list(example.shape[1:]),
        "input_dtype": "float32", "normalize": normalize, "opset": opset, "rtol": RTOL, "atol": ATOL,
    }  # fmt: skip
    del model.metadata_props[:]
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(record, sort_keys=True)
    data = model.SerializeToString()
    difference = _verify(onnx, ort, model, encoder, example)
    if not math.isfinite(difference):
        raise OnnxExportSkipped(f"onnxruntime does not reproduce the PyTorch encoder within rtol={RTOL:g}, atol={ATOL:g}")
    atomic_write_bytes(Path(path), data)
    return {"opset": opset, "input_shape": record["input_shape"], "rtol": RTOL, "atol": ATOL, "max_abs_difference": difference}


@contextlib.contextmanager
def _exporter_quiet():
    # The exporter prints its progress on stdout and warns about its own internals; the
    # command's output is its table and its one-line notes.
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def _verify(onnx: Any, ort: Any, model: Any, encoder: nn.Module, example: torch.Tensor) -> float:
    """The largest |onnxruntime − PyTorch| on ``example``, or ``inf`` where not within RTOL/ATOL.

    Random operators are replaced by graph inputs fed with what the PyTorch encoder draws
    right after ``torch.manual_seed(0)`` (in graph order, which is the order of the forward),
    so a noisy encoder is checked value for value.
    """
    check = onnx.ModelProto()
    check.CopyFrom(model)
    random_nodes = [n for n in check.graph.node if n.op_type in _RANDOM_OPS]
    shapes = _value_shapes(onnx, check, int(example.shape[0]))
    feeds: dict[str, np.ndarray] = {"input": example.numpy()}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for node in random_nodes:
            shape = shapes.get(node.output[0])
            if shape is None:
                return math.inf
            draw = torch.rand(shape) if _RANDOM_OPS[node.op_type] == "uniform" else torch.randn(shape)
            feeds[node.output[0]] = draw.numpy()
        for node in random_nodes:
            check.graph.node.remove(node)
            check.graph.input.append(onnx.helper.make_tensor_value_info(node.output[0], onnx.TensorProto.FLOAT, shapes[node.output[0]]))
        torch.manual_seed(0)
        with torch.no_grad():
            expected = encoder(example).numpy()
    try:
        got = _session(ort, check.SerializeToString(), 1).run(None, feeds)[0]
    except Exception:  # noqa: BLE001 - a graph onnxruntime cannot run is not verified
        return math.inf
    if got.shape != expected.shape:
        return math.inf
    if not np.allclose(got, expected, rtol=RTOL, atol=ATOL):
        return math.inf
    return float(np.abs(got - expected).max())


def _value_shapes(onnx: Any, model: Any, batch: int) -> dict[str, list[int]]:
    """Static shapes of the graph's values at batch size ``batch`` (from ONNX shape inference)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes: dict[str, list[int]] = {}
    for info in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        dims = info.type.tensor_type.shape.dim
        shape = [d.dim_value if d.HasField("dim_value") else batch for d in dims]
        shapes[info.name] = shape
    return shapes


# --------------------------------------------------------------------------- loading


def read_record(path: str | Path) -> dict[str, Any] | None:
    """The record ``harden`` wrote into an ONNX file's metadata, or ``None`` (no record, unreadable, no onnx)."""
    try:
        import onnx
    except ImportError:
        return None
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - an unreadable file has no record; loading it reports why
        return None
    return _record_of(model)


def _record_of(model: Any) -> dict[str, Any] | None:
    for entry in model.metadata_props:
        if entry.key == METADATA_KEY:
            try:
                record = json.loads(entry.value)
            except ValueError:
                return None
            return record if isinstance(record, dict) and record.get("schema") == PROGRAM_SCHEMA else None
    return None


def load_onnx(spec: str, path: Path, kwargs: dict[str, Any]) -> LoadedModel:
    """An ONNX encoder as a :class:`LoadedModel` whose module runs onnxruntime on the CPU.

    Raises:
        MissingExtraError: onnx or onnxruntime is not installed.
        UsageError: architecture options were given, or the graph needs a custom-op library or
            external data outside its folder, or does not take one image batch to one output.
        CheckpointError: the file is not a readable ONNX model (truncated, corrupt).
    """
    from leakaudit.models.weights import _require_file

    if kwargs:
        raise UsageError(f"{spec!r} is an ONNX model; architecture options do not apply to it.")
    _require_file(path, "model file")
    onnx, ort = require()
    # The file is read once: the bytes that are checked are the bytes that run.
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    try:
        model = onnx.load_model_from_string(data)
        if not model.graph.node and not model.graph.output:
            raise ValueError("no graph")
    except Exception:  # noqa: BLE001 - protobuf reports damage in several ways
        raise CheckpointError(
            f"cannot read ONNX model {spec!r}: it is not a valid ONNX file (corrupt or truncated?). Export it again."
        ) from None
    _check_domains(model, spec)
    if _external_data(onnx, model):
        _check_external_paths(onnx, model, path, spec)
        onnx.load_external_data_for_model(model, str(path.parent))
    record = _record_of(model)
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1 or len(model.graph.output) != 1:
        raise UsageError(
            f"{spec!r} has {len(inputs)} inputs and {len(model.graph.output)} outputs; an ONNX encoder for leakaudit "
            "takes one image batch and returns the split activations."
        )
    tensor_type = inputs[0].type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim]
    names = [str(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor_type.shape.dim]
    dtype = _ONNX_TO_NUMPY.get(tensor_type.elem_type)
    if len(dims) != 4 or dtype is None:
        raise UsageError(
            f"{spec!r} takes a {len(dims)}-D input of ONNX element type {tensor_type.elem_type}; leakaudit feeds "
            "float image batches [N, C, H, W]."
        )
    in_chans, input_size = dims[1], (dims[2], dims[3])
    if record is not None and isinstance(record.get("input_shape"), list) and len(record["input_shape"]) == 3:
        in_chans, input_size = int(record["input_shape"][0]), (int(record["input_shape"][1]), int(record["input_shape"][2]))
    _seed_random_ops(model)
    module = OnnxEncoder(model.SerializeToString(), spec, inputs[0].name, model.graph.output[0].name, dims, names, dtype)
    return LoadedModel(
        module,
        spec,
        "onnx",
        checkpoint_sha256=digest,
        input_size=input_size if input_size[0] is not None and input_size[1] is not None else None,  # type: ignore[arg-type]
        in_chans=in_chans,
        fixed_batch=dims[0],
        normalize=record.get("normalize") if record is not None and isinstance(record.get("normalize"), str) else None,
    )


def _graphs(model: Any) -> list[Any]:
    """The main graph, every subgraph (If/Loop/Scan bodies) and every model-local function."""
    found, stack = [], [model.graph]
    while stack:
        graph = stack.pop()
        found.append(graph)
        for node in graph.node:
            for attribute in node.attribute:
                if attribute.HasField("g"):
                    stack.append(attribute.g)
                stack.extend(attribute.graphs)
    return found + list(model.functions)


def _check_domains(model: Any, spec: str) -> None:
    local = {f.domain for f in model.functions}
    used = {node.domain for graph in _graphs(model) for node in graph.node}
    used |= {o.domain for o in model.opset_import}
    custom = sorted(d for d in used if d not in _BUILTIN_DOMAINS and d not in local)
    if custom:
        raise UsageError(
            f"{spec!r} uses operators of the custom domain {custom[0]!r}"
            f"{f' (and {len(custom) - 1} more)' if len(custom) > 1 else ''}, which need a native custom-op library; "
            "leakaudit runs only onnxruntime's built-in operators. Export the encoder with standard ONNX operators."
        )


def _external_data(onnx: Any, model: Any) -> list[Any]:
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    return [t for t in _get_all_tensors(model) if uses_external_data(t)]


def _check_external_paths(onnx: Any, model: Any, path: Path, spec: str) -> None:
    folder = path.resolve().parent
    for tensor in _external_data(onnx, model):
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        target = (folder / location).resolve()
        if not location or os.path.isabs(location) or not target.is_relative_to(folder):
            raise UsageError(
                f"{spec!r} reads external tensor data from {location!r}, outside the model's folder; "
                "leakaudit reads external data only from files beside the model."
            )
        if not target.is_file():
            raise UsageError(f"{spec!r} needs its external data file {location!r} beside it, and it is not there.")


def _seed_random_ops(model: Any) -> None:
    """Give every unseeded random operator a seed taken from torch's, so that dumps repeat.

    Without one onnxruntime seeds them from the clock. ``dump`` seeds torch before it loads the
    model, so the same settings give the same noise; the operators' distributions are unchanged.
    """
    from onnx import helper

    base = torch.initial_seed() % (1 << 24)
    for index, node in enumerate(n for graph in _graphs(model) for n in graph.node if n.op_type in _RANDOM_OPS):
        if not any(a.name == "seed" for a in node.attribute):
            node.attribute.append(helper.make_attribute("seed", float(base + index)))


def _session(ort: Any, data: bytes, threads: int) -> Any:
    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, threads)
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.use_deterministic_compute = True
    options.log_severity_level = 3  # errors reach the user as one line, not onnxruntime's log
    return ort.InferenceSession(data, sess_options=options, providers=["CPUExecutionProvider"])


class OnnxEncoder(nn.Module):
    """An ONNX graph as a module: ``forward`` runs it with onnxruntime on the CPU, without gradients.

    The session follows torch's intra-op thread count (what the dump's tuning sets), one
    session per count. The output is on the input's device; no gradient reaches the input,
    so attacks that differentiate through the encoder cannot use it (:attr:`gives_gradients`).
    """

    #: Attacks that optimise through the encoder check this (ONNX graphs give no gradients).
    gives_gradients = False

    def __init__(
        self, data: bytes, spec: str, input_name: str, output_name: str, dims: list[int | None], names: list[str], dtype: Any
    ) -> None:
        super().__init__()
        self.spec, self.input_name, self.output_name = spec, input_name, output_name
        self.dims, self.dtype = list(dims), dtype
        self.shape_text = f"({', '.join(names)})"  # the graph's input shape, symbolic dimensions by name
        self._data = data
        self._sessions: dict[int, Any] = {}
        self._lock = threading.Lock()
        self._runtime_session(torch.get_num_threads())  # a graph onnxruntime refuses fails at load, not mid-dump

    def _runtime_session(self, threads: int) -> Any:
        with self._lock:
            session = self._sessions.get(threads)
            if session is None:
                _, ort = require()
                try:
                    session = _session(ort, self._data, threads)
                except Exception as exc:  # noqa: BLE001 - onnxruntime's own error types vary by version
                    raise CheckpointError(
                        f"onnxruntime cannot load {self.spec!r}: {_first_line(exc)}. Export it again with standard operators."
                    ) from None
                self._sessions[threads] = session
            return session

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        got = tuple(x.shape)
        if len(got) != len(self.dims) or any(d is not None and d != g for d, g in zip(self.dims, got)):
            raise UsageError(
                f"{self.spec!r} takes input of shape {self.shape_text}, got ({', '.join(map(str, got))}). "
                "Give data of that size, or resize it with --input-size H,W."
            )
        session = self._runtime_session(torch.get_num_threads())
        array = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy().astype(self.dtype, copy=False))
        try:
            (out,) = session.run([self.output_name], {self.input_name: array})
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types for shape and type errors
            raise UsageError(
                f"onnxruntime cannot run {self.spec!r} on input of shape ({', '.join(map(str, got))}): {_first_line(exc)}. "
                f"The graph takes {self.shape_text}; give data of the size it was exported for, or set it with --input-size H,W."
            ) from None
        return torch.from_numpy(np.asarray(out, dtype=np.float32)).to(x.device)

    def __deepcopy__(self, memo: dict[int, Any]) -> OnnxEncoder:
        names = self.shape_text[1:-1].split(", ")
        return OnnxEncoder(self._data, self.spec, self.input_name, self.output_name, self.dims, names, self.dtype)

    def extra_repr(self) -> str:
        return f"{self.spec!r}, input={self.input_name!r} {self.dims}, output={self.output_name!r}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    text = text.removeprefix("[ONNXRuntimeError] : ").strip()
    return (text[:240] + "…") if len(text) > 240 else text.rstrip(".")
