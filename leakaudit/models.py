"""Any checkpoint: model specs, built-in architectures and safe weight loading.

A model is a *spec* plus optional *weights* (DESIGN.md):

========================================  =============================================
spec                                      meaning
========================================  =============================================
``timm:resnet18``                         a timm architecture
``torchvision:resnet18``                  a torchvision architecture
``lenet5``                                a built-in architecture (:data:`BUILTIN_MODELS`)
``path/file.py:Factory``                  user code building the module
``pkg.module:Factory``                    the same, from an importable module
``model.ts`` / ``model.pt`` (TorchScript)  loaded with :func:`torch.jit.load`
``model.pt2``                             a :func:`torch.export.save` program
``model.pt`` (a pickled ``nn.Module``)     only with ``trust_checkpoint=True``
========================================  =============================================

Weights come from ``.safetensors`` or from ``torch.save`` files read with
``weights_only=True``; the wrappers real training code produces are unwrapped. Nothing
is ever unpickled unless the caller passed ``trust_checkpoint=True``: unpickling runs
arbitrary code from the file.

Weights written by ``leakaudit train`` and ``leakaudit harden`` come with a model record
beside them (``W.safetensors`` → ``W.json``, schema ``leakaudit.model``) that holds the
architecture options they were trained with (``num_classes``, …): those options are the
defaults for that file, so ``--num-classes`` need not be repeated. An option given
explicitly always wins.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import pickle
import re
import sys
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from leakaudit._io import sha256_file
from leakaudit.errors import (
    CheckpointError,
    ConfigError,
    UnknownNameError,
    UntrustedCheckpointError,
    UsageError,
)

# --------------------------------------------------------------------------- built-ins


class LeNet5(nn.Sequential):
    """LeNet-5 as in the Scrunch paper: 32×32×1 input, conv 6/16/120 (5×5), max-pools after
    the first two convolutions, then fully connected 84 and ``num_classes``.

    Each convolution block includes its ReLU, as a Keras ``Conv2D(activation=...)`` does, so
    ``conv3`` is the paper's split point (120 features) and ``pool2`` is "after the second
    conv block" (16×5×5).
    """

    default_input_size = (32, 32)
    default_in_chans = 1

    def __init__(self, num_classes: int = 10, in_chans: int = 1) -> None:
        super().__init__(
            OrderedDict(
                conv1=nn.Sequential(nn.Conv2d(in_chans, 6, 5), nn.ReLU()),
                pool1=nn.MaxPool2d(2),
                conv2=nn.Sequential(nn.Conv2d(6, 16, 5), nn.ReLU()),
                pool2=nn.MaxPool2d(2),
                conv3=nn.Sequential(nn.Conv2d(16, 120, 5), nn.ReLU()),
                flatten=nn.Flatten(),
                fc1=nn.Sequential(nn.Linear(120, 84), nn.ReLU()),
                fc2=nn.Linear(84, num_classes),
            )
        )


BUILTIN_MODELS: dict[str, Callable[..., nn.Module]] = {"lenet5": LeNet5}


# --------------------------------------------------------------------------- results


@dataclass
class LoadedModel:
    """A model ready to run, with what is known about where it came from.

    Attributes:
        module: the model in eval mode, on the CPU.
        spec: the spec as the user gave it.
        kind: ``builtin``, ``timm``, ``torchvision``, ``python``, ``torchscript``,
            ``export`` or ``pickle``.
        checkpoint_sha256: SHA-256 of the weights file, or of the archive for
            TorchScript/export/pickle specs; ``None`` for randomly initialised models.
        input_size: the (H, W) the model declares, if any.
        in_chans: the number of input channels the model declares, if any.
        fixed_batch: batch size an exported program was traced with, if static.
        options: the architecture options used (``num_classes``, ``in_chans``, …).
    """

    module: nn.Module
    spec: str
    kind: str
    weights: str | None = None
    checkpoint_sha256: str | None = None
    input_size: tuple[int, int] | None = None
    in_chans: int | None = None
    fixed_batch: int | None = None
    options: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- entry point

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
        spec: a model spec (see the module docstring).
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
    kwargs: dict[str, Any] = dict(model_args or {})
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if in_chans is not None:
        kwargs["in_chans"] = in_chans
    if weights is not None:
        for key, value in recorded_options(weights).items():
            kwargs.setdefault(key, value)

    loaded = _build(spec, kwargs, trust_checkpoint)
    if weights is not None:
        if loaded.kind in ("torchscript", "export", "pickle"):
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
    import json

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
    path = Path(spec)
    if path.suffix == ".pt2":
        return _load_export(spec, path, kwargs)
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
        "TorchScript/.pt2 archive for other models.",
    )


def _build_timm(spec: str, name: str, kwargs: dict[str, Any]) -> LoadedModel:
    import timm

    if not timm.is_model(name):
        raise UnknownNameError("timm model", name, timm.list_models(), hint="See `timm.list_models()`.")
    if kwargs.pop("pretrained", False):
        raise UsageError("leakaudit never downloads weights; pass them with --weights instead of pretrained=true.")
    try:
        module = timm.create_model(name, pretrained=False, **kwargs)
    except TypeError as exc:
        raise ConfigError(f"timm model {name!r} rejects its options: {exc}.") from None
    cfg = getattr(module, "pretrained_cfg", None) or {}
    size = cfg.get("input_size")
    return LoadedModel(
        module,
        spec,
        "timm",
        input_size=tuple(size[1:]) if size else None,
        in_chans=kwargs.get("in_chans", size[0] if size else None),
        options=kwargs,
    )


def _build_torchvision(spec: str, name: str, kwargs: dict[str, Any]) -> LoadedModel:
    import torchvision

    names = torchvision.models.list_models()
    if name not in names:
        raise UnknownNameError("torchvision model", name, names, hint="See `torchvision.models.list_models()`.")
    if kwargs.get("weights") not in (None, "none"):
        raise UsageError("leakaudit never downloads weights; pass them with --weights.")
    kwargs.pop("weights", None)
    in_chans = kwargs.pop("in_chans", None)
    try:
        module = torchvision.models.get_model(name, weights=None, **kwargs)
    except TypeError as exc:
        raise ConfigError(f"torchvision model {name!r} rejects its options: {exc}.") from None
    if in_chans not in (None, 3):
        raise ConfigError(
            f"torchvision models take 3 input channels; in_chans={in_chans} is not supported "
            "(leakaudit converts gray inputs to RGB for them)."
        )
    if in_chans is not None:
        kwargs["in_chans"] = in_chans
    return LoadedModel(module, spec, "torchvision", input_size=None, in_chans=3, options=kwargs)


def _build_python(spec: str, where: str, factory_name: str, kwargs: dict[str, Any]) -> LoadedModel:
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise UsageError(f"model file {where!r} does not exist.")
        module_name = f"leakaudit_user_{re.sub(r'[^0-9a-zA-Z_]', '_', path.stem)}"
        import_spec = importlib.util.spec_from_file_location(module_name, path)
        if import_spec is None or import_spec.loader is None:
            raise UsageError(f"cannot import {where!r} as Python code.")
        code = importlib.util.module_from_spec(import_spec)
        sys.modules[module_name] = code  # dataclasses and pickling look modules up here
        try:
            import_spec.loader.exec_module(code)
        except Exception as exc:
            sys.modules.pop(module_name, None)
            raise UsageError(f"importing {where!r} failed: {type(exc).__name__}: {exc}.") from None
    else:
        try:
            code = importlib.import_module(where)
        except ImportError as exc:
            raise UsageError(f"cannot import module {where!r}: {exc}.") from None
    factory = getattr(code, factory_name, None)
    if factory is None:
        public = [n for n in vars(code) if not n.startswith("_") and callable(getattr(code, n))]
        raise UnknownNameError(f"factory in {where!r}", factory_name, public)
    module = _call_factory(factory, kwargs, spec)
    declared = getattr(module, "input_size", None) or getattr(factory, "input_size", None)
    input_size = in_chans = None
    if declared is not None and len(declared) == 3:
        in_chans, input_size = int(declared[0]), (int(declared[1]), int(declared[2]))
    return LoadedModel(
        module,
        spec,
        "python",
        input_size=input_size or getattr(module, "default_input_size", None),
        in_chans=kwargs.get("in_chans", in_chans or getattr(module, "default_in_chans", None)),
        options=kwargs,
    )


def _call_factory(factory: Callable[..., Any], kwargs: dict[str, Any], spec: str) -> nn.Module:
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    unknown = [k for k in kwargs if k not in params and not accepts_any]
    if unknown:
        allowed = ", ".join(p for p in params if p not in ("self", "args", "kwargs")) or "none"
        raise ConfigError(f"model {spec!r} does not accept option {unknown[0]!r}; it accepts: {allowed}.")
    try:
        module = factory(**kwargs)
    except Exception as exc:
        raise UsageError(f"building model {spec!r} failed: {type(exc).__name__}: {exc}.") from None
    if not isinstance(module, nn.Module):
        raise UsageError(f"{spec!r} returned a {type(module).__name__}, not a torch.nn.Module.")
    return module


def _load_export(spec: str, path: Path, kwargs: dict[str, Any]) -> LoadedModel:
    if kwargs:
        raise UsageError(f"{spec!r} is an exported program; architecture options do not apply to it.")
    if not path.is_file():
        raise UsageError(f"model file {spec!r} does not exist.")
    try:
        program = torch.export.load(str(path))
    except Exception as exc:
        raise CheckpointError(
            f"cannot read exported program {spec!r} ({type(exc).__name__}); is it a corrupt or "
            "truncated torch.export.save file?"
        ) from None
    module = torch.export.unflatten(program)
    fixed_batch = in_chans = input_size = None
    example = program.example_inputs[0] if program.example_inputs else ()
    if example and isinstance(example[0], torch.Tensor) and example[0].dim() == 4:
        in_chans, input_size = int(example[0].shape[1]), (int(example[0].shape[2]), int(example[0].shape[3]))
    placeholders = [n for n in program.graph.nodes if n.op == "placeholder" and "val" in n.meta]
    user_inputs = program.graph_signature.user_inputs
    for node in placeholders:
        if node.name in user_inputs:
            first = node.meta["val"].shape[0]
            if isinstance(first, int):
                fixed_batch = first
            break
    return LoadedModel(
        module,
        spec,
        "export",
        checkpoint_sha256=sha256_file(path),
        input_size=input_size,
        in_chans=in_chans,
        fixed_batch=fixed_batch,
    )


def _is_torchscript(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as archive:
            return any("/code/" in n or n.endswith("constants.pkl") for n in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _load_archive(spec: str, path: Path, kwargs: dict[str, Any], trust_checkpoint: bool) -> LoadedModel:
    if not path.is_file():
        raise UsageError(f"model file {spec!r} does not exist.")
    if kwargs:
        raise UsageError(f"{spec!r} is a saved model; architecture options do not apply to it.")
    digest = sha256_file(path)
    if _is_torchscript(path):
        import warnings

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                module = torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:
            raise CheckpointError(
                f"cannot read TorchScript archive {spec!r} ({type(exc).__name__}); corrupt or truncated?"
            ) from None
        return LoadedModel(module, spec, "torchscript", checkpoint_sha256=digest)
    content = _torch_load(path, trust_checkpoint=trust_checkpoint)
    if isinstance(content, nn.Module):
        return LoadedModel(content, spec, "pickle", checkpoint_sha256=digest)
    raise UsageError(
        f"{spec!r} holds weights, not a model. Give the architecture as MODEL "
        f"(e.g. lenet5, timm:resnet18, file.py:Factory) and pass this file with --weights."
    )


# --------------------------------------------------------------------------- weights

_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network", "weights")
_PREFIXES = ("module.", "model.", "_orig_mod.")


def _torch_load(path: Path, *, trust_checkpoint: bool) -> Any:
    """``torch.load`` with ``weights_only=True``; full unpickling only when trusted."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" not in str(exc) and "Unsupported global" not in str(exc):
            raise CheckpointError(
                f"cannot read {str(path)!r}: it is not a valid torch.save file (corrupt or truncated?)."
            ) from None
        if not trust_checkpoint:
            found = re.search(r"GLOBAL ([\w.]+)", str(exc))
            what = f" ({found.group(1)})" if found else ""
            raise UntrustedCheckpointError(
                f"{str(path)!r} contains pickled Python objects{what}, and unpickling runs arbitrary "
                "code from the file. Pass --trust-checkpoint only if you trust its source, or re-save "
                "its state_dict with safetensors."
            ) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        raise CheckpointError(
            f"cannot read {str(path)!r} ({type(exc).__name__}): corrupt or truncated checkpoint?"
        ) from None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)  # trusted: --trust-checkpoint
    except Exception as exc:
        raise CheckpointError(f"cannot unpickle {str(path)!r}: {type(exc).__name__}: {exc}.") from None


def load_state_dict(path: str | Path, *, trust_checkpoint: bool = False) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a ``torch.save`` file, unwrapping wrappers."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"weights file {str(path)!r} does not exist.")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(
                f"cannot read {str(path)!r} as safetensors ({type(exc).__name__}): corrupt or truncated?"
            ) from None
    return unwrap_state_dict(_torch_load(path, trust_checkpoint=trust_checkpoint), str(path))


def unwrap_state_dict(content: Any, source: str) -> dict[str, torch.Tensor]:
    """Find the state dict inside the containers training scripts save."""
    for _ in range(4):
        if isinstance(content, nn.Module):
            return content.state_dict()
        if not isinstance(content, Mapping):
            break
        if content and all(isinstance(v, torch.Tensor) for v in content.values()):
            return dict(content)
        inner = next((content[k] for k in _WRAPPER_KEYS if k in content), None)
        if inner is None:
            break
        content = inner
    kind = type(content).__name__
    keys = ", ".join(list(content)[:6]) if isinstance(content, Mapping) else ""
    raise CheckpointError(
        f"{source!r} holds no state dict ({kind}{': ' + keys if keys else ''}). Expected tensors, "
        f"or one of the keys {', '.join(_WRAPPER_KEYS)} holding them."
    )


def assign_state_dict(module: nn.Module, state: Mapping[str, torch.Tensor], *, source: str) -> None:
    """Load ``state`` into ``module`` strictly, stripping ``module.``/``model.`` prefixes.

    Raises:
        CheckpointError: listing missing and unexpected keys and shape mismatches.
    """
    expected = module.state_dict()
    state = _strip_prefixes(dict(state), expected)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or mismatched:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if items:
                shown = ", ".join(items[:5]) + (f" (+{len(items) - 5} more)" if len(items) > 5 else "")
                parts.append(f"{label} {len(items)}: {shown}")
        raise CheckpointError(
            f"weights in {source!r} do not fit the architecture — " + "; ".join(parts)
            + ". Check the model spec and its options (--num-classes, --in-chans, --model-arg)."
        )
    module.load_state_dict(state, strict=True)


def _strip_prefixes(state: dict[str, torch.Tensor], expected: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    changed = True
    while changed and not set(state) <= set(expected):
        changed = False
        for prefix in _PREFIXES:
            if state and all(k.startswith(prefix) for k in state):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                changed = True
    return state
