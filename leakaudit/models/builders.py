"""Architectures built from a spec: the built-ins, timm, torchvision and user factories."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import re
import sys
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from leakaudit.errors import ConfigError, UnknownNameError, UsageError

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
            ``export``, ``onnx`` or ``pickle``.
        checkpoint_sha256: SHA-256 of the weights file, or of the archive for
            TorchScript/export/pickle specs; ``None`` for randomly initialised models.
        input_size: the (H, W) the model declares, if any.
        in_chans: the number of input channels the model declares, if any.
        fixed_batch: batch size an exported program was traced with, if static.
        normalize: the ``--normalize`` the model's file records it was trained with, if any.
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
    normalize: str | None = None


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
    params: Mapping[str, inspect.Parameter]
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
