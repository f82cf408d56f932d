"""Weight files: format detection, safetensors, ``torch.load(weights_only=True)``, state dicts.

The format of a file is read from its first bytes, never trusted from its suffix, and a
damaged file is reported as damaged and never unpickled, trusted or not: only an intact
pickle that names Python objects is one to trust (``trust_checkpoint=True``).
"""

from __future__ import annotations

import io
import pickle
import re
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from leakaudit.errors import CheckpointError, UntrustedCheckpointError, UsageError

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
        if _is_legacy_pickle(source):  # the unpickler fell over its own bytes: say so, as above
            raise CheckpointError(f"cannot read {what}: its pickle is corrupt or truncated.") from None
        raise CheckpointError(
            f"cannot read {what} ({type(exc).__name__}): it is corrupt or truncated, or not a torch.save file."
        ) from None


def _is_legacy_pickle(source: Path | io.BytesIO) -> bool:
    """Whether ``source`` starts as torch.save's legacy format does (a pickle, not a zip)."""
    if isinstance(source, io.BytesIO):
        return source.getvalue()[:1] == b"\x80"
    with open(source, "rb") as handle:
        return handle.read(1) == b"\x80"


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
    raise_misfit(source, missing, unexpected, mismatched,
                 "Check the model spec and its options (--num-classes, --in-chans, --model-arg).")  # fmt: skip
    module.load_state_dict(state, strict=True)


def raise_misfit(source: str, missing: list[str], unexpected: list[str], mismatched: list[str], advice: str) -> None:
    """Raise the one message of weights that do not fit a model, key by key; nothing if they fit.

    Raises:
        CheckpointError: the first five of each of missing and unexpected keys and shape
            mismatches, with how many more, then ``advice``.
    """
    if not (missing or unexpected or mismatched):
        return
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
        if items:
            shown = ", ".join(items[:5]) + (f" (+{len(items) - 5} more)" if len(items) > 5 else "")
            parts.append(f"{label} {len(items)}: {shown}")
    raise CheckpointError(f"weights in {source!r} do not fit the architecture — " + "; ".join(parts) + f". {advice}")


def _strip_prefixes(state: dict[str, torch.Tensor], expected: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    changed = True
    while changed and not set(state) <= set(expected):
        changed = False
        for prefix in _PREFIXES:
            if state and all(k.startswith(prefix) for k in state):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                changed = True
    return state
