"""The classifier attack's raw-X reference, trained once per content and shared.

The reference heads (``raw-linear``, ``raw-cnn``) learn the private task from the raw inputs
X, never from Z: what they report depends on X's rows, the labels, the split and the attack's
settings, not on the model that was split. An audit with a baseline, a sweep or the demo
runs the classifier on several stores of the same data, and trained the same references
again for each; the raw-X CNN is the most expensive head there is. They are kept here,
keyed by a SHA-256 of everything they depend on (the inputs and labels of every role, the
settings but the choice of Z heads, the device and the number of ranks), and a later store
with the same content gets a copy of the same result: the same numbers a retraining with
the same seed gives. The process holds the last few references.

They are also kept on disk, beside the cached dumps (``$LEAKAUDIT_CACHE``, else
``~/.cache/leakaudit``, under ``raw-x/``), so that separate commands on stores of the same
data (``leakaudit attack`` on a baseline, then on each hardened model) train them once. An
entry is JSON only (nothing is unpickled), written through a rename so that no half-written
one is ever read, and carries a SHA-256 of its content. Its key adds to the content key the
tool's, torch's, NumPy's and scikit-learn's versions, the source of the code that trains the
heads and torch's thread count, so that an entry is reused only where training again would
give the same numbers. An entry that fails any check is trained again with a warning, like a
cached dump: it is derived data, and a damaged one must neither decide a verdict nor block
one. Under torchrun the disk is not used (the ranks would race to write it).
"""

from __future__ import annotations

import base64
import contextlib
import copy
import dataclasses
import functools
import hashlib
import json
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from leakaudit.attacks._training import Progress
from leakaudit.attacks.classifier_train import RAW_HEADS, HeadResult, build_raw, refit_head, train_head, val_accuracy
from leakaudit.training.engine import seed_for

if TYPE_CHECKING:
    from leakaudit.attacks.classifier import ClassifierConfig
    from leakaudit.attacks.classifier_data import ClassifierData

#: References kept (each holds a few test-row arrays and head results).
CACHE_SIZE = 8
#: Version of the on-disk entry's layout.
DISK_FORMAT = 1

_CACHE: OrderedDict[str, RawReference] = OrderedDict()
#: The folder an audit configured for its cache; ``None``: :func:`leakaudit.dump_cache.cache_dir`'s default.
_FOLDER: ContextVar[Path | None] = ContextVar("raw_reference_folder", default=None)


@dataclass
class RawReference:
    """The raw-X heads' results, their per-test-row correctness, and the refit of the chosen one."""

    heads: list[Any]
    correct: dict[str, np.ndarray]
    refitted: dict[str, np.ndarray | None] = field(default_factory=dict)
    cached: bool = False
    #: The on-disk entry it was read from or written to, if any.
    entry: str | None = None


def content_key(x: Any, labels: tuple[torch.Tensor, torch.Tensor, np.ndarray], config: Any, classes: int,
                device: torch.device, world_size: int) -> str:  # fmt: skip
    """SHA-256 of what the raw-X reference depends on (``x`` holds the train/val/test inputs)."""
    digest = hashlib.sha256()
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k not in ("head", "cache")}
    digest.update(json.dumps({"settings": settings, "classes": classes, "device": str(device), "world_size": world_size},
                             sort_keys=True, default=str).encode())  # fmt: skip
    for part in (x.train, x.val, x.test, *labels):
        array = part.numpy() if isinstance(part, torch.Tensor) else np.asarray(part)
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(np.ascontiguousarray(array).data)
    return digest.hexdigest()


def raw_reference(
    source: ClassifierData, classes: int, config: ClassifierConfig, device: torch.device, progress: Progress | None,
) -> RawReference:  # fmt: skip
    """Train the raw-X heads on X, and refit the chosen one (or all) on attacker-train + attacker-validation."""
    heads: list[HeadResult] = []
    correct: dict[str, np.ndarray] = {}
    for name in RAW_HEADS:
        torch.manual_seed(seed_for(config.seed, name))
        model, data = build_raw(name, classes, source.inputs(name, "inputs"))
        head, correct[name] = train_head(name, "X", model, data, source.head_labels(name), classes, config, device, progress)
        source.note_rows(head)
        heads.append(head)
        del model, data
    refitted: dict[str, np.ndarray | None] = {}
    if config.refit != "none":
        chosen = max(heads, key=val_accuracy)
        for head in heads if config.refit == "all" else [chosen]:
            torch.manual_seed(seed_for(config.seed, head.name))
            model, data = build_raw(head.name, classes, source.pooled_inputs(head.name, "inputs"))
            refitted[head.name] = refit_head(head, model, data, source.pooled_labels(head.name), classes, config, device,
                                             progress)  # fmt: skip
    return RawReference(heads, correct, refitted)


def shared_reference(key: str, compute: Callable[[], RawReference], *, disk: bool = False,
                     warn: Callable[[str], None] | None = None) -> RawReference:  # fmt: skip
    """The reference for ``key``: a copy of the kept one, else the disk's entry (``disk``), else ``compute()``'s.

    What is computed is kept for the next store, in the process and (``disk``) on disk. A
    disk entry that fails its checks is named through ``warn`` and computed again.
    """
    kept = _CACHE.get(key)
    if kept is not None:
        _CACHE.move_to_end(key)
        reused = copy.deepcopy(kept)
        reused.cached = True
        return reused
    path = entry_path(key) if disk else None
    reference = _read_entry(path, key, warn) if path is not None else None
    if reference is None:
        reference = compute()
        if path is not None:
            reference.entry = _write_entry(path, key, reference, warn)
    _CACHE[key] = copy.deepcopy(reference)
    while len(_CACHE) > CACHE_SIZE:
        _CACHE.popitem(last=False)
    return reference


@contextlib.contextmanager
def cache_folder(folder: str | Path | None) -> Iterator[None]:
    """Keep raw-X references on disk under ``folder`` (an audit's ``cache:``) within the block."""
    token = _FOLDER.set(Path(folder) if folder is not None else None)
    try:
        yield
    finally:
        _FOLDER.reset(token)


@functools.cache
def _code_digest() -> str:
    """SHA-256 of the attack package's source: the code that trains the heads and turns them into numbers (read once)."""
    digest = hashlib.sha256()
    for source in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(source.name.encode())
        digest.update(source.read_bytes())
    return digest.hexdigest()


def entry_path(key: str) -> Path:
    """Where the disk entry of content ``key`` lives, given this tool, its libraries and its threads."""
    import sklearn

    from leakaudit import __version__
    from leakaudit.dump_cache import cache_dir

    folder = _FOLDER.get() or cache_dir()
    material = {"content": key, "tool": __version__, "torch": torch.__version__, "numpy": np.__version__,
                "sklearn": sklearn.__version__, "code": _code_digest(), "threads": torch.get_num_threads(),
                "format": DISK_FORMAT}  # fmt: skip
    name = hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()
    return folder / "raw-x" / f"{name[:32]}.json"


def _bits(mask: np.ndarray | None) -> dict[str, Any] | None:
    if mask is None:
        return None
    flat = np.asarray(mask, dtype=bool).ravel()
    return {"n": int(flat.size), "bits": base64.b64encode(np.packbits(flat).tobytes()).decode("ascii")}


def _unbits(value: Any) -> np.ndarray | None:
    if value is None:
        return None
    n = int(value["n"])
    packed = np.frombuffer(base64.b64decode(value["bits"], validate=True), dtype=np.uint8)
    if packed.size != (n + 7) // 8:
        raise ValueError("a per-row mask has the wrong length")
    return np.unpackbits(packed, count=n).astype(bool)


def _payload(key: str, reference: RawReference) -> dict[str, Any]:
    return {
        "content": key,
        "heads": [dataclasses.asdict(head) for head in reference.heads],
        "correct": {name: _bits(mask) for name, mask in reference.correct.items()},
        "refitted": {name: _bits(mask) for name, mask in reference.refitted.items()},
    }


def _digest(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, allow_nan=True).encode()).hexdigest()


def _write_entry(path: Path, key: str, reference: RawReference, warn: Callable[[str], None] | None) -> str | None:
    """Record ``reference`` at ``path`` (atomically); a cache that cannot be written only costs a retraining later."""
    from leakaudit._io import atomic_write_text

    payload = _payload(key, reference)
    entry = {"format": DISK_FORMAT, "sha256": _digest(payload), "payload": payload}
    try:
        atomic_write_text(path, json.dumps(entry, sort_keys=True) + "\n")
    except OSError as exc:
        if warn is not None:
            warn(f"the raw-X reference could not be kept in the cache ({exc.strerror or exc}: {str(path)!r}); "
                 "a later store of the same data will train it again.")  # fmt: skip
        return None
    return str(path)


def _read_entry(path: Path, key: str, warn: Callable[[str], None] | None) -> RawReference | None:
    """The reference recorded at ``path``, or ``None`` (absent, or failing a check: said through ``warn``)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (FileNotFoundError, NotADirectoryError):  # no entry (a cache that cannot hold one is said on writing)
        return None
    except UnicodeDecodeError:
        reason = "it is not UTF-8 text"
    except OSError as exc:
        reason = f"it cannot be read: {exc.strerror or exc}"
    else:
        try:
            reference = _parse_entry(text, key)
        except (ValueError, TypeError, KeyError) as exc:
            reason = str(exc) or type(exc).__name__
        else:
            reference.cached, reference.entry = True, str(path)
            return reference
    if warn is not None:
        warn(f"the cached raw-X reference {str(path)!r} is not reused ({reason}); training it again.")
    return None


def _parse_entry(text: str, key: str) -> RawReference:
    from leakaudit.attacks.classifier_train import HeadResult

    try:
        entry = json.loads(text)
    except json.JSONDecodeError:
        raise ValueError("it is not valid JSON") from None
    if not isinstance(entry, dict) or entry.get("format") != DISK_FORMAT:
        raise ValueError("it is not an entry of this version")
    payload = entry.get("payload")
    if not isinstance(payload, dict) or entry.get("sha256") != _digest(payload):
        raise ValueError("it fails its checksum")
    if payload.get("content") != key:
        raise ValueError("it records other content")
    heads = [HeadResult(**head) for head in payload["heads"]]
    correct = {name: _unbits(mask) for name, mask in payload["correct"].items()}
    refitted = {name: _unbits(mask) for name, mask in payload["refitted"].items()}
    if sorted(correct) != sorted(h.name for h in heads) or any(v is None for v in correct.values()):
        raise ValueError("its heads and their test rows do not match")
    return RawReference(heads, correct, refitted)  # type: ignore[arg-type]


def clear() -> None:
    """Forget every reference kept in the process (tests); the disk's entries stay."""
    _CACHE.clear()
