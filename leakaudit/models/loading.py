"""The entry point: a spec, options and weights to a :class:`LoadedModel`."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from leakaudit._io import sha256_file
from leakaudit.errors import UnknownNameError, UsageError
from leakaudit.models.archives import _load_archive, _load_export
from leakaudit.models.builders import (
    BUILTIN_MODELS,
    LoadedModel,
    _build_python,
    _build_timm,
    _build_torchvision,
    _call_factory,
)
from leakaudit.models.hf import build_hf
from leakaudit.models.spec import architecture_options
from leakaudit.models.weights import assign_state_dict, load_state_dict

_ARCHIVE_SUFFIXES = (".ts", ".pt", ".pth", ".pt2", ".jit", ".bin", ".ckpt")


def load_model(
    spec: str,
    *,
    weights: str | Path | None = None,
    num_classes: int | None = None,
    in_chans: int | None = None,
    model_args: Mapping[str, Any] | None = None,
    trust_checkpoint: bool = False,
) -> LoadedModel:
    """Build the model ``spec`` names and load ``weights`` into it.

    Args:
        spec: a model spec (see :mod:`leakaudit.models`).
        weights: a ``.safetensors`` or ``torch.save`` file of weights for the architecture.
        num_classes: architecture option passed to the factory where it accepts it.
        in_chans: architecture option passed to the factory where it accepts it.
        model_args: further keyword arguments for the factory (``--model-arg KEY=VALUE``).
        trust_checkpoint: allow unpickling (runs code from the file).

    Raises:
        UnknownNameError: the spec names no known architecture.
        UntrustedCheckpointError: the file needs unpickling and ``trust_checkpoint`` is off.
        CheckpointError: the file is unreadable or the weights do not fit.
    """
    kwargs = architecture_options(num_classes=num_classes, in_chans=in_chans, model_args=model_args)
    if weights is not None:
        for key, value in recorded_options(weights).items():
            kwargs.setdefault(key, value)

    loaded = _build(spec, kwargs, trust_checkpoint)
    if weights is not None:
        if loaded.kind in ("torchscript", "export", "onnx", "pickle"):
            raise UsageError(
                f"{spec!r} is a complete archive with its own weights; --weights applies to "
                "architecture specs (lenet5, timm:…, torchvision:…, file.py:Factory)."
            )
        state = load_state_dict(weights, trust_checkpoint=trust_checkpoint)
        assign_state_dict(loaded.module, state, source=str(weights))
        loaded.weights = str(weights)
        loaded.checkpoint_sha256 = sha256_file(weights)
    loaded.module.eval()
    return loaded


def recorded_options(weights: str | Path) -> dict[str, Any]:
    """The architecture options in the ``leakaudit.model`` record beside ``weights``, if any.

    The record is ``weights`` with the suffix ``.json``, written by ``leakaudit train`` and
    ``harden``; it counts only when it names this very file. Anything else (no record, an
    unrelated JSON file, a malformed one) gives no defaults: the weights then load with the
    options given, and a mismatch is reported by the shapes.
    """
    record_path = Path(weights).with_suffix(".json")
    if Path(weights).suffix == ".json" or not record_path.is_file():
        return {}
    try:
        record = json.loads(record_path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    if not isinstance(record, dict) or record.get("schema") != "leakaudit.model":
        return {}
    if record.get("weights") != Path(weights).name:
        return {}
    options = record.get("options")
    if not isinstance(options, dict):
        return {}
    scalar = (bool, int, float, str)
    return {k: v for k, v in options.items() if isinstance(k, str) and (v is None or isinstance(v, scalar))}


def _build(spec: str, kwargs: dict[str, Any], trust_checkpoint: bool) -> LoadedModel:
    prefix, sep, rest = spec.partition(":")
    if sep and prefix == "timm":
        return _build_timm(spec, rest, kwargs)
    if sep and prefix == "torchvision":
        return _build_torchvision(spec, rest, kwargs)
    if sep and prefix == "hf":
        return build_hf(spec, rest, kwargs, trust_checkpoint)
    path = Path(spec)
    if path.suffix == ".pt2":
        return _load_export(spec, path, kwargs, trust_checkpoint)
    if path.suffix == ".onnx":
        from leakaudit.models.onnx import load_onnx  # onnx and onnxruntime are optional

        return load_onnx(spec, path, kwargs)
    if path.suffix in _ARCHIVE_SUFFIXES or (not sep and path.is_file()):
        return _load_archive(spec, path, kwargs, trust_checkpoint)
    if sep and rest:
        return _build_python(spec, prefix, rest, kwargs)
    if spec in BUILTIN_MODELS:
        module = _call_factory(BUILTIN_MODELS[spec], kwargs, spec)
        return LoadedModel(
            module,
            spec,
            "builtin",
            input_size=getattr(module, "default_input_size", None),
            in_chans=kwargs.get("in_chans", getattr(module, "default_in_chans", None)),
            options=kwargs,
        )
    raise UnknownNameError(
        "model",
        spec,
        BUILTIN_MODELS,
        hint="Use timm:NAME, torchvision:NAME, file.py:Factory, pkg.module:Factory or a "
        "TorchScript/.pt2/.onnx file for other models.",
    )
