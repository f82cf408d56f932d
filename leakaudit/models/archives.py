"""Complete saved models: TorchScript archives, pickled modules and ``torch.export`` programs.

``torch.export.load`` unpickles parts of a ``.pt2`` archive (falling back to full
unpickling when the safe load refuses), evaluates its shape expressions with sympy, and
loads AOTInductor libraries; :func:`export_archive_hazards` checks every such part first,
so an archive that would run code loads only with ``trust_checkpoint=True``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import operator
import posixpath
import re
import warnings
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from leakaudit._io import sha256_file
from leakaudit.errors import CheckpointError, UntrustedCheckpointError, UsageError
from leakaudit.models.builders import LoadedModel
from leakaudit.models.weights import (
    _load_weights_only,
    _NeedsUnpickling,
    _not_a_zip_message,
    _require_file,
    _torch_load,
)


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
