"""Deployable outputs of a hardened model, and writing them without half-written folders.

A hardening run leaves in its output folder:

==================  ==============================================================
``model.safetensors``  the hardened full model's weights (the architecture's state dict)
``model.json``         the spec to rebuild it: model spec, options, split layer, input
                       size, normalisation (:func:`load_hardened` reads it)
``noise.safetensors``  Shredder only: the learned noise at the split
``encoder.pt2``        the client's encoder, input → split activations (``torch.export``,
                       dynamic batch), noise sampling included for Shredder
``classifier.pt2``     the server's classifier, split activations → logits
``encoder.onnx``       the client's encoder as ONNX (dynamic batch, opset and input shape
                       recorded), when the ``onnx`` extra is installed and onnxruntime
                       reproduces ``encoder.pt2`` (:mod:`leakaudit.models.onnx`)
``harden.json``        settings, seed, data spec, per-epoch history, test accuracy
==================  ==============================================================

Both programs load with ``torch.export.load(path).module()`` in plain torch, and with
``leakaudit dump encoder.pt2 --data …`` (its output; ``--layer output`` or the split's name
say the same). Each program holds a record of its role and split layer (extra file
``leakaudit.json``); ``encoder.onnx`` holds the same record in its ``metadata_props``, with
the input shape, opset and ``--normalize``, and dumps the same way. Inputs are what the model sees
after ``--normalize`` (when the model was trained with it, pass the same to ``dump``).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from leakaudit import __version__
from leakaudit._io import atomic_write_bytes, atomic_write_text, sha256_file
from leakaudit.errors import LeakAuditError, OutputExistsError, UsageError
from leakaudit.layers import PROGRAM_RECORD, PROGRAM_SCHEMA
from leakaudit.models import LoadedModel, ModelSpec
from leakaudit.split import split_model

MODEL_SCHEMA = "leakaudit.model"
MODEL_SCHEMA_VERSION = 1


# --------------------------------------------------------------------------- folders


def check_output_dir(path: Path, force: bool) -> None:
    """Refuse an existing output folder without ``force`` (checked before any training)."""
    if path.exists() and not force:
        raise OutputExistsError(f"{str(path)!r} exists. Pass --force to replace it.")
    if path.exists() and not path.is_dir():
        raise UsageError(f"{str(path)!r} exists and is not a folder; -o names the output folder.")


@contextlib.contextmanager
def staged_dir(path: Path, force: bool) -> Iterator[Path]:
    """Yield a temporary folder beside ``path`` that replaces ``path`` only when the block succeeds.

    ``path`` is refused first when it exists (without ``force``); see :func:`leakaudit.staging.staged`.
    """
    from leakaudit.staging import staged

    check_output_dir(Path(path), force)
    with staged(path) as stage:
        yield stage.path


def save_weights(module: nn.Module | Mapping[str, torch.Tensor], path: Path, metadata: Mapping[str, str] | None = None) -> None:
    """Save a state dict as safetensors atomically (tied tensors are stored as copies)."""
    from safetensors.torch import save

    state = module.state_dict() if isinstance(module, nn.Module) else module
    # Clones: safetensors refuses tensors that share memory (tied weights), and the
    # loader restores every key strictly anyway.
    tensors = {k: v.detach().to("cpu").clone().contiguous() for k, v in state.items()}
    # Serialised in memory, then written by the one atomic writer, whose errors name ``path``.
    atomic_write_bytes(Path(path), canonical_metadata(save(tensors, metadata=dict(metadata or {}))))


def canonical_metadata(data: bytes) -> bytes:
    """``data`` (a serialised safetensors file) with its metadata keys in sorted order.

    safetensors writes the metadata mapping in hash-map order, which varies from call to call,
    so two saves of the same tensors and metadata could differ in bytes; the same settings must
    give the same bytes. Only the order inside ``__metadata__`` changes: the header keeps its
    length (padding included) and every tensor's offsets, so the file reads back the same.
    """
    import struct

    (size,) = struct.unpack("<Q", data[:8])
    header = data[8 : 8 + size]
    parsed = json.loads(header)
    if "__metadata__" not in parsed:
        return data
    parsed["__metadata__"] = dict(sorted(parsed["__metadata__"].items()))
    text = json.dumps(parsed, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    if len(text) != len(header.rstrip(b" ")):  # written differently than safetensors does: leave it
        return data
    return data[:8] + text.ljust(size, b" ") + data[8 + size :]


def write_json(path: Path, data: Any) -> None:
    atomic_write_text(Path(path), json.dumps(data, indent=2, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "to_dict"):
        return value.to_dict()
    raise TypeError(f"cannot serialise {type(value).__name__} to JSON")


# --------------------------------------------------------------------------- model records


def model_record(
    loaded: LoadedModel,
    *,
    weights_file: str,
    layer: str | None,
    input_size: tuple[int, int],
    in_chans: int,
    normalize: str | None,
    public: Mapping[str, Any],
) -> dict[str, Any]:
    """What ``model.json`` holds: enough to rebuild the model with :func:`load_model`."""
    return {
        "schema": MODEL_SCHEMA,
        "schema_version": MODEL_SCHEMA_VERSION,
        "tool_version": __version__,
        "spec": loaded.spec,
        "options": dict(loaded.options),
        "weights": weights_file,
        "started_from": loaded.weights,
        "started_from_sha256": loaded.checkpoint_sha256,
        "layer": layer,
        "input_size": list(input_size),
        "in_chans": in_chans,
        "normalize": normalize,
        "public_task": dict(public),
    }


def load_hardened(folder: str | Path, *, trust_checkpoint: bool = False) -> tuple[LoadedModel, dict[str, Any]]:
    """Rebuild the hardened full model from an output folder's ``model.json``.

    Returns:
        The loaded model (eval mode, CPU) and the record. Shredder's noise is not part of
        the full model's weights: it lives in ``noise.safetensors`` and ``encoder.pt2``.
    """
    folder = Path(folder)
    path = folder / "model.json"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{str(folder)!r} has no model.json; is it a `leakaudit harden` output folder?") from None
    except (OSError, ValueError) as exc:
        raise LeakAuditError(f"cannot read {str(path)!r}: {exc}.") from None
    if record.get("schema") != MODEL_SCHEMA:
        raise UsageError(f"{str(path)!r} is not a leakaudit model record.")
    spec = ModelSpec.from_options(
        record["spec"], record.get("options") or {}, weights=str(folder / record["weights"]), trust_checkpoint=trust_checkpoint
    )
    loaded = spec.load()
    return loaded, record


# --------------------------------------------------------------------------- programs


def export_split(
    model: nn.Module,
    layer: str,
    wrap_encoder,
    example: torch.Tensor,
    folder: Path,
    reference: torch.Tensor | None = None,
    normalize: str | None = None,
) -> dict[str, Any]:
    """Cut ``model`` at ``layer`` and save ``encoder.pt2``, ``classifier.pt2`` and ``encoder.onnx`` in ``folder``.

    Args:
        model: the hardened model (eval mode).
        layer: the split module.
        wrap_encoder: turns the FX encoder into the deployed one (Shredder adds its noise).
        example: a model input batch (at least 2 rows) used to trace and to check.
        folder: where to write.
        reference: Z of ``example`` as the training hook saw it, drawn right after
            ``torch.manual_seed(0)``; the exported encoder must reproduce it.
        normalize: the ``--normalize`` the model was trained with, recorded in ``encoder.onnx``.

    Returns:
        File names and SHA-256 of the files written (``files``), the split's ``layer_shape``,
        and ``onnx``: the ONNX export's opset, input shape and tolerance, or why it was skipped
        (``{"skipped": reason}``; the ``.pt2`` programs are written either way).

    Raises:
        UsageError: the model cannot be split at ``layer`` (from :func:`split_model`, with
            the layers that can).
        LeakAuditError: the exported encoder does not reproduce ``reference``.
    """
    model = model.eval().cpu()
    example = example.cpu()
    split = split_model(model, layer)
    encoder = wrap_encoder(split.encoder).eval()
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad():
        encoder_program = torch.export.export(encoder, (example,), dynamic_shapes=({0: batch},))
        torch.manual_seed(0)
        z = encoder_program.module()(example)
        classifier_program = torch.export.export(split.head.eval(), (z,), dynamic_shapes=({0: batch},))
    if reference is not None:
        reference = reference.cpu()
        if z.shape != reference.shape or not torch.allclose(z, reference, rtol=1e-4, atol=1e-5):
            raise LeakAuditError(
                f"the exported encoder does not reproduce the model's activations at {layer!r} "
                f"(largest difference {float((z - reference).abs().max()) if z.shape == reference.shape else 'shape'}); "
                "this is a bug in the export, please report it."
            )
    files = {}
    for name, program in (("encoder.pt2", encoder_program), ("classifier.pt2", classifier_program)):
        # Inside the archive, so that the encoder names its split wherever it is copied:
        # `leakaudit dump encoder.pt2` then needs no --layer and accepts this one.
        record = {"schema": PROGRAM_SCHEMA, "schema_version": 1, "tool_version": __version__,
                  "role": name.removesuffix(".pt2"), "split_layer": layer, "layer_shape": list(z.shape[1:])}  # fmt: skip
        torch.export.save(program, str(folder / name), extra_files={PROGRAM_RECORD: json.dumps(record)})
        files[name] = sha256_file(folder / name)
    from leakaudit.models.onnx import OnnxExportSkipped, export_encoder

    try:
        # The .pt2 program, not the FX encoder: it is what the ONNX file must reproduce.
        onnx = export_encoder(encoder_program.module(), example, folder / "encoder.onnx", split_layer=layer,
                              layer_shape=list(z.shape[1:]), normalize=normalize)  # fmt: skip
        files["encoder.onnx"] = sha256_file(folder / "encoder.onnx")
    except OnnxExportSkipped as skipped:
        onnx = {"skipped": str(skipped)}
    return {"files": files, "layer_shape": list(z.shape[1:]), "onnx": onnx}
