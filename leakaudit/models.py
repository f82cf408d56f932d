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
``model.pt2``                             a :func:`torch.export.save` program (checked first)
``model.pt`` (a pickled ``nn.Module``)     only with ``trust_checkpoint=True``
========================================  =============================================

Weights come from ``.safetensors`` or from ``torch.save`` files read with
``weights_only=True``; the wrappers real training code produces are unwrapped. Nothing
is ever unpickled unless the caller passed ``trust_checkpoint=True``: unpickling runs
arbitrary code from the file. A damaged file is reported as damaged and never unpickled,
trusted or not: only an intact pickle that names Python objects is one to trust.

``torch.export.load`` unpickles parts of a ``.pt2`` archive (falling back to full
unpickling when the safe load refuses), evaluates its shape expressions with sympy, and
loads AOTInductor libraries; :func:`export_archive_hazards` checks every such part first,
so an archive that would run code loads only with ``trust_checkpoint=True``.

Weights written by ``leakaudit train`` and ``leakaudit harden`` come with a model record
beside them (``W.safetensors`` → ``W.json``, schema ``leakaudit.model``) that holds the
architecture options they were trained with (``num_classes``, …): those options are the
defaults for that file, so ``--num-classes`` need not be repeated. An option given
explicitly always wins.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import inspect
import io
import json
import logging
import math
import operator
import pickle
import posixpath
import re
import sys
import warnings
import zipfile
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
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
        return _load_export(spec, path, kwargs, trust_checkpoint)
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


def _load_export(spec: str, path: Path, kwargs: dict[str, Any], trust_checkpoint: bool) -> LoadedModel:
    if kwargs:
        raise UsageError(f"{spec!r} is an exported program; architecture options do not apply to it.")
    _require_file(path, "model file")
    # The file is read once: the bytes that are checked are the bytes that are loaded.
    data = path.read_bytes()
    hazards = export_archive_hazards(data, spec)
    if hazards and not trust_checkpoint:
        more = f" (and {len(hazards) - 1} more)" if len(hazards) > 1 else ""
        raise UntrustedCheckpointError(
            f"{spec!r} would run code from the file when loaded: it holds {hazards[0]}{more}. "
            "Pass --trust-checkpoint only if you trust its source, or export the model again with "
            "torch.export.save."
        )
    try:
        with _torch_export_quiet():
            program = torch.export.load(io.BytesIO(data))
    except Exception as exc:
        raise CheckpointError(
            f"cannot read exported program {spec!r} ({type(exc).__name__}); is it a corrupt or "
            "truncated torch.export.save file, or one from an incompatible torch version?"
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
        checkpoint_sha256=hashlib.sha256(data).hexdigest(),
        input_size=input_size,
        in_chans=in_chans,
        fixed_batch=fixed_batch,
    )


@contextlib.contextmanager
def _torch_export_quiet() -> Iterator[None]:
    """Keep torch.export's own log records and warnings off stderr while it loads.

    On a malformed archive torch logs a full traceback before raising; the command line
    reports the failure as one line instead. The loggers are restored afterwards.
    """
    manager = logging.Logger.manager
    loggers = [logging.getLogger(name) for name in ("torch.export", "torch._export")]
    loggers += [
        logger
        for name, logger in list(manager.loggerDict.items())
        if isinstance(logger, logging.Logger) and name.startswith(("torch.export.", "torch._export."))
    ]
    saved = [(logger, logger.disabled) for logger in loggers]
    for logger in loggers:
        logger.disabled = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, disabled in saved:
            logger.disabled = disabled


# --------------------------------------------------------------------------- export archive checks
#
# torch.export.load unpickles parts of the archive, and retries a refused weights-only load
# with full unpickling; it also evaluates shape expressions with sympy (which calls eval),
# resolves graph targets by attribute path under torch, imports modules named in pytree
# specs, and loads AOTInductor shared libraries. Every one of these reads a specific part
# of the archive, so each part is checked here, with the reader torch itself uses, before
# torch sees the file.

# Archive members torch reads with torch.load (paths inside the archive's root folder).
_PT2_PICKLE_DIRS = ("data/sample_inputs/", "data/weights/", "data/constants/")
# Members of the format before torch 2.8, read from the top of the zip with zipfile.
_PT2_LEGACY_PICKLES = (
    "serialized_state_dict.json",
    "serialized_state_dict.pt",
    "serialized_constants.json",
    "serialized_constants.pt",
    "serialized_example_inputs.pt",
)
_PT2_LEGACY_PROGRAM = "serialized_exported_program.json"

# Names a shape expression may use besides symbols (s0, u1, …): the functions torch's
# deserializer passes to sympy, and sympy's own relational and arithmetic functions.
_SYMPY_FUNCTIONS = frozenset(
    """FloorDiv ModularIndexing Where PythonMod Mod CleanDiv CeilToInt FloorToInt CeilDiv
    LShift RShift PowByNatural FloatPow FloatTrueDiv IntTrueDiv IsNonOverlappingAndDenseIndicator
    TruncToFloat TruncToInt RoundToInt RoundDecimal ToFloat Identity Max Min Eq Ne Lt Le Gt Ge
    And Or Not Xor ITE Piecewise Abs floor ceiling sqrt Integer Rational Float oo zoo nan int_oo
    True False true false Symbol Dummy positive negative nonnegative nonpositive integer real
    rational finite infinite zero nonzero even odd commutative extended_real""".split()
)
# A quoted string may only be a symbol's name (``Symbol('s31', positive=True)``): no quoted
# text can then carry code to a function that would evaluate it.
_SYM_TOKEN = re.compile(
    r"\s+|\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|[A-Za-z][A-Za-z0-9_]*|'[a-z]+\d+'|\*\*|//|[-+*/%()<>=!,&|~^]"
)
_SYM_NAME = re.compile(r"[a-z]+\d+|OpaqueUnaryFn_[a-z0-9]+")


def export_archive_hazards(data: bytes, source: str) -> list[str]:
    """What in a ``torch.export.save`` archive would run code while torch loads it.

    Args:
        data: the archive's bytes.
        source: how to name the file in messages.

    Returns:
        One phrase per hazard (``"a pickled Python object (os.system) in
        data/sample_inputs/model.pt"``); empty when torch can load the archive without
        unpickling anything beyond tensors, evaluating code or loading native libraries.

    Raises:
        CheckpointError: the bytes are not a readable torch.export archive.
    """
    if not data:
        raise CheckpointError(
            f"cannot read {source!r}: it is empty (0 bytes), not an exported program. "
            "Export it again with torch.export.save."
        )
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            names = archive.namelist()
            legacy_names = (*_PT2_LEGACY_PICKLES, _PT2_LEGACY_PROGRAM)
            legacy = {name: archive.read(name) for name in names if name in legacy_names}
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, zlib.error):
        raise CheckpointError(_not_a_zip_message(source, data, "an exported program")) from None
    hazards: list[str] = []
    if len(set(names)) != len(names):
        hazards.append("two members under one name, which zip readers may resolve differently")
    for name, content in legacy.items():
        if name == _PT2_LEGACY_PROGRAM:
            hazards += _graph_hazards(_parse_json(content, name, source))
        else:
            hazards += _pickle_hazards(content, name, source)
    if legacy:
        return hazards
    from torch.export.pt2_archive import PT2ArchiveReader

    try:
        with _torch_export_quiet():
            reader = PT2ArchiveReader(io.BytesIO(data))
            records = reader.get_file_names()
    except Exception:
        pickled = any(n.endswith("data.pkl") for n in names)
        looks = "a torch.save or TorchScript file" if pickled else "some other zip archive"
        raise CheckpointError(
            f"cannot read {source!r}: it is not a torch.export.save archive (it looks like {looks}). Give an exported "
            "program as a .pt2 file, a TorchScript or pickled model as .pt."
        ) from None
    return hazards + _pt2_record_hazards(reader, records, source)


def _pt2_record_hazards(reader: Any, records: list[str], source: str) -> list[str]:
    from torch.export.pt2_archive import constants as pt2

    hazards: list[str] = []
    raw: set[str] = set()
    pickled: set[str] = set()
    for record in records:
        if record.startswith(pt2.AOTINDUCTOR_DIR):
            hazards.append(f"AOTInductor-compiled native code ({record})")
            break
    for record in records:
        base, _, leaf = record.rpartition("/")
        if not (record.endswith("_config.json") and base + "/" in (pt2.WEIGHTS_DIR, pt2.CONSTANTS_DIR)):
            continue
        entries = _parse_json(_read_record(reader, record, source), record, source)
        config = entries.get("config") if isinstance(entries, dict) else None
        for entry in (config or {}).values():
            if not isinstance(entry, dict) or not isinstance(entry.get("path_name"), str):
                continue
            path_name = entry["path_name"]
            target = posixpath.normpath(posixpath.join(base, path_name))
            if base + "/" == pt2.CONSTANTS_DIR and path_name.startswith(
                (pt2.CUSTOM_OBJ_FILENAME_PREFIX, pt2.OPAQUE_OBJ_FILENAME_PREFIX)
            ):
                hazards.append(f"a Python or TorchScript object that loads by running its own code ({target})")
            elif entry.get("use_pickle"):
                pickled.add(target)
            else:
                raw.add(target)
    for record in records:
        leaf = record.rpartition("/")[2]
        if record.startswith(pt2.MODELS_DIR) and record.endswith(".json"):
            hazards += _graph_hazards(_parse_json(_read_record(reader, record, source), record, source))
        elif record in pickled or (
            record.startswith(_PT2_PICKLE_DIRS)
            and record not in raw
            and not record.endswith(".json")
            and not leaf.startswith((pt2.CUSTOM_OBJ_FILENAME_PREFIX, pt2.OPAQUE_OBJ_FILENAME_PREFIX))
        ):
            hazards += _pickle_hazards(_read_record(reader, record, source), record, source)
    return hazards


def _read_record(reader: Any, record: str, source: str) -> bytes:
    try:
        return reader.read_bytes(record)
    except Exception:
        raise CheckpointError(f"cannot read {record!r} inside {source!r}: the archive is corrupt or truncated.") from None


def _parse_json(content: bytes, record: str, source: str) -> Any:
    try:
        return json.loads(content)
    except (UnicodeDecodeError, ValueError):
        raise CheckpointError(f"{record!r} inside {source!r} is not valid JSON: the archive is corrupt.") from None


def _pickle_hazards(content: bytes, record: str, source: str) -> list[str]:
    try:
        _load_weights_only(io.BytesIO(content), f"{record!r} inside {source!r}")
    except _NeedsUnpickling as exc:
        what = f" ({exc.name})" if exc.name else ""
        return [f"a pickled Python object{what} in {record}, and unpickling runs arbitrary code"]
    return []


def _graph_hazards(program: Any) -> list[str]:
    """Hazards in a serialized program's JSON: shape expressions, node targets, pytree specs."""
    hazards: list[str] = []
    stack = [program]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            expr = item.get("expr_str")
            if isinstance(expr, str) and not _is_plain_shape_expression(expr):
                hazards.append(f"a shape expression that is not plain arithmetic ({expr[:40]!r})")
            target = item.get("target")
            if isinstance(target, str) and "inputs" in item:
                problem = _target_hazard(target)
                if problem:
                    hazards.append(problem)
            if "__enum__" in item:
                hazards.append("a pytree spec that imports a module by name (an enum)")
            factory = item.get("default_factory_module")
            if factory is not None and factory not in ("builtins", "collections"):
                hazards.append(f"a pytree spec that imports the module {str(factory)[:40]!r}")
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str) and item[:1] in ("[", "{"):
            # Treespecs are JSON strings inside the JSON.
            try:
                stack.append(json.loads(item))
            except ValueError:
                pass
    return hazards


def _is_plain_shape_expression(expr: str) -> bool:
    position = 0
    while position < len(expr):
        token = _SYM_TOKEN.match(expr, position)
        if token is None:
            return False
        text = token.group()
        if text[0].isalpha() and text not in _SYMPY_FUNCTIONS and not _SYM_NAME.fullmatch(text):
            return False
        position = token.end()
    return True


def _target_hazard(target: str) -> str | None:
    """Why a graph node's target is not a tensor operator, or ``None`` when it is one.

    Mirrors how torch's deserializer resolves the name (an attribute path under ``torch``,
    ``_operator`` or ``math``); anything it leaves as a string fails there on its own.
    """
    from torch._export.serde.serialize import _SYM_OPS

    parts = target.split(".")
    roots = {"_operator": operator, "torch": torch, "math": math}
    if target.startswith("#"):
        return f"a graph node that calls the extension operator {target[:60]!r}"
    root = next((module for prefix, module in roots.items() if target.startswith(prefix)), None)
    if root is None:
        return None
    resolved: Any = root
    for name in parts[1:]:
        if not hasattr(resolved, name):
            return None
        resolved = getattr(resolved, name)
    if isinstance(resolved, (torch._ops.OpOverload, torch._ops.OpOverloadPacket, torch._ops.HigherOrderOperator)):
        return None
    try:
        if resolved in _SYM_OPS:
            return None
    except TypeError:
        pass
    return f"a graph node that calls {target[:60]!r}, which is not a tensor operator"


def _is_torchscript(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as archive:
            return any("/code/" in n or n.endswith("constants.pkl") for n in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _load_archive(spec: str, path: Path, kwargs: dict[str, Any], trust_checkpoint: bool) -> LoadedModel:
    _require_file(path, "model file")
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


class _NeedsUnpickling(Exception):
    """A well-formed pickle that names Python objects outside torch's weights-only allow-list."""

    def __init__(self, name: str | None) -> None:
        super().__init__(name or "")
        self.name = name


# Phrases of torch's weights-only unpickler that mean "this pickle needs a Python object";
# every other refusal (an unknown opcode, a string running past the end) means the bytes
# are not an intact pickle at all.
_NEEDS_UNPICKLING = (
    "Unsupported global",
    "unsupported GLOBAL",
    "unrecognized function",
    "unsupported class",
    "Can only create new object",
    "Can only build Tensor",
    "must be imported to load",
)


def _load_weights_only(source: Path | io.BytesIO, what: str) -> Any:
    """``torch.load(weights_only=True)``, telling a pickle that needs trust from a broken file.

    Raises:
        _NeedsUnpickling: the pickle is intact and references Python objects.
        CheckpointError: the bytes cannot be read as a torch.save file.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        message = str(exc)
        if any(phrase in message for phrase in _NEEDS_UNPICKLING):
            found = re.search(r"GLOBAL ([A-Za-z_][\w.]*)", message) or re.search(r"function ([A-Za-z_][\w.]*)", message)
            raise _NeedsUnpickling(found.group(1) if found else None) from None
        raise CheckpointError(f"cannot read {what}: its pickle is corrupt or truncated.") from None
    except Exception as exc:  # torch raises many types for damaged files; none is a bug here
        raise CheckpointError(
            f"cannot read {what} ({type(exc).__name__}): it is corrupt or truncated, or not a torch.save file."
        ) from None


def _require_file(path: Path, what: str) -> None:
    if path.is_dir():
        raise UsageError(f"{what} {str(path)!r} is a folder, not a file. Give the checkpoint file inside it.")
    if not path.is_file():
        raise UsageError(f"{what} {str(path)!r} does not exist.")


def _not_a_zip_message(source: str, head: bytes, expected: str) -> str:
    if head.startswith(b"PK"):
        return f"cannot read {source!r}: it is a corrupt or truncated zip archive, not {expected}. Copy or save it again."
    return f"cannot read {source!r}: it is {_describe_foreign(head)}, not {expected}. Check the path."


def _describe_foreign(head: bytes) -> str:
    """A short description of bytes in no checkpoint format leakaudit reads."""
    if head.startswith(b"\x89HDF"):
        return "an HDF5 file"
    sample = head[:4096]
    for cut in (0, 1, 2, 3):  # a full sample may end inside a multi-byte character
        try:
            text = sample[: len(sample) - cut].decode("utf-8")
        except UnicodeDecodeError:
            if len(sample) < 4096:
                break
            continue
        if all(c.isprintable() or c in "\n\r\t\f" for c in text):
            return "a text file"
        break
    return "of unknown format (neither safetensors nor torch.save)"


def _checkpoint_format(path: Path) -> str:
    """``"zip"``, ``"pickle"`` or ``"safetensors"`` from a file's first bytes.

    Raises:
        CheckpointError: the file is empty, a truncated zip, or no checkpoint format.
    """
    with open(path, "rb") as handle:
        head = handle.read(4096)
    if not head:
        raise CheckpointError(f"cannot read {str(path)!r}: it is empty (0 bytes), not a checkpoint. Save or copy it again.")
    if head.startswith(b"PK"):
        try:
            with zipfile.ZipFile(path) as archive:
                archive.namelist()
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError):
            raise CheckpointError(_not_a_zip_message(str(path), head, "a checkpoint")) from None
        return "zip"
    if _looks_like_safetensors(head, path.stat().st_size):
        return "safetensors"
    if head.startswith(b"\x80"):  # pickle protocol 2 and later: how torch.save writes its legacy format
        return "pickle"
    raise CheckpointError(
        f"cannot read {str(path)!r}: it is {_describe_foreign(head)}, not a checkpoint. "
        "Expected a .safetensors or torch.save file."
    )


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    if len(head) < 10:
        return False
    header_size = int.from_bytes(head[:8], "little")
    return 2 <= header_size <= size - 8 and head[8:9] == b"{"


def _check_safetensors_header(path: Path) -> None:
    """Refuse a ``.safetensors`` name on an empty, cut-short or foreign file, saying which."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(4096)
    if not head:
        raise CheckpointError(f"cannot read {str(path)!r}: it is empty (0 bytes), not a safetensors file. Save or copy it again.")
    if _looks_like_safetensors(head, size):
        return
    if len(head) >= 9 and head[8:9] == b"{":
        raise CheckpointError(
            f"cannot read {str(path)!r}: it is a truncated safetensors file; its header alone needs "
            f"{int.from_bytes(head[:8], 'little') + 8} bytes and the file has {size}. Save or copy it again."
        )
    raise CheckpointError(f"cannot read {str(path)!r}: it is {_describe_foreign(head)}, not a safetensors file. Check the path.")


def _torch_load(path: Path, *, trust_checkpoint: bool) -> Any:
    """``torch.load`` with ``weights_only=True``; full unpickling only when trusted.

    Full unpickling is tried only for an intact pickle that the weights-only reader refused
    for the Python objects it names, never for a damaged file: a broken pickle proves nothing
    about what the rest of it would run.
    """
    kind = _checkpoint_format(path)
    if kind == "safetensors":
        return _load_safetensors(path)
    try:
        return _load_weights_only(path, repr(str(path)))
    except _NeedsUnpickling as exc:
        if not trust_checkpoint:
            what = f" ({exc.name})" if exc.name else ""
            raise UntrustedCheckpointError(
                f"{str(path)!r} contains pickled Python objects{what}, and unpickling runs arbitrary "
                "code from the file. Pass --trust-checkpoint only if you trust its source, or re-save "
                "its state_dict with safetensors."
            ) from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=False)  # trusted: --trust-checkpoint
    except Exception as exc:
        raise CheckpointError(f"cannot unpickle {str(path)!r}: {type(exc).__name__}: {_first_line(exc)}.") from None


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0].rstrip(".")[:200] if lines else "no message"


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(
            f"cannot read {str(path)!r} as safetensors ({type(exc).__name__}): the file is corrupt "
            "or truncated. Save or copy it again."
        ) from None


def load_state_dict(path: str | Path, *, trust_checkpoint: bool = False) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a ``torch.save`` file, unwrapping wrappers.

    The format is read from the file's first bytes, so a safetensors file under another
    suffix loads too; a ``.safetensors`` name on anything else is reported as what it is.

    Raises:
        UsageError: the path is missing or a folder.
        UntrustedCheckpointError: the file needs unpickling and ``trust_checkpoint`` is off.
        CheckpointError: the file is empty, truncated, corrupt or no checkpoint at all.
    """
    path = Path(path)
    _require_file(path, "weights file")
    if path.suffix == ".safetensors":
        _check_safetensors_header(path)
        return _load_safetensors(path)
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
